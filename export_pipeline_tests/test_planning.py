from datetime import UTC, date, datetime, timedelta

import pytest

from export_pipeline.defs.planning import (
    Snapshot,
    WorkItem,
    batches,
    dates_to_record,
    devices_per_run,
    due_day_files,
    due_work,
    plan_tick,
    ready_at,
    tick_seconds,
    with_reexports,
)
from export_pipeline.engine.grid import DayRange, closed_until, day_ranges
from export_pipeline.engine.progress import Progress
from export_pipeline.record.keys import DeviceDay
from export_pipeline.record.storage import CheckPartition
from export_pipeline.settings import ExportSettings

SETTINGS = ExportSettings(interval_seconds=60, lateness_seconds=30, lookback_hours=1)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def test_a_slice_is_due_once_closed_for_the_lateness_allowance() -> None:
    assert closed_until(
        utc(2026, 2, 7, 12, 1, 29), interval_seconds=60, lateness_seconds=30
    ) == utc(2026, 2, 7, 12, 0)
    assert closed_until(
        utc(2026, 2, 7, 12, 1, 30), interval_seconds=60, lateness_seconds=30
    ) == utc(2026, 2, 7, 12, 1)


def test_ranges_are_cut_at_utc_midnight() -> None:
    assert day_ranges(start=utc(2026, 2, 7, 23, 58), end=utc(2026, 2, 8, 0, 1)) == [
        DayRange(date(2026, 2, 7), 86_280, 86_400),
        DayRange(date(2026, 2, 8), 0, 60),
    ]


def test_a_device_resumes_at_its_checkpoint() -> None:
    work = due_work(["D1"], {"D1": utc(2026, 2, 7, 11, 58)}, utc(2026, 2, 7, 12, 0, 45), SETTINGS)
    assert work == [WorkItem("D1", DayRange(date(2026, 2, 7), 43_080, 43_200))]


def test_a_device_never_exported_starts_lookback_hours_ago() -> None:
    work = due_work(["D2"], {}, utc(2026, 2, 7, 12, 0, 45), SETTINGS)
    assert work == [WorkItem("D2", DayRange(date(2026, 2, 7), 39_600, 43_200))]


def test_lookback_never_reaches_before_the_first_partition() -> None:
    settings = ExportSettings(interval_seconds=60, lookback_hours=48, start_date=date(2026, 2, 7))
    work = due_work(["D3"], {}, utc(2026, 2, 7, 0, 10), settings)
    assert [item.range for item in work] == [DayRange(date(2026, 2, 7), 0, 540)]


def test_a_device_up_to_date_has_nothing_due() -> None:
    assert due_work(["D1"], {"D1": utc(2026, 2, 7, 12)}, utc(2026, 2, 7, 12, 1, 10), SETTINGS) == []


def test_batches_keep_a_devices_pieces_together_in_time_order() -> None:
    day1, day2 = DayRange(date(2026, 2, 7), 86_340, 86_400), DayRange(date(2026, 2, 8), 0, 60)
    items = [WorkItem("B", day2), WorkItem("A", day1), WorkItem("B", day1), WorkItem("C", day1)]
    assert batches(items, 2) == [
        [WorkItem("A", day1), WorkItem("B", day1), WorkItem("B", day2)],
        [WorkItem("C", day1)],
    ]


def test_a_checkpoint_off_the_interval_grid_is_aligned_down() -> None:
    # EXPORT_INTERVAL_SECONDS went from 60 to 300 with the checkpoint at 11:01.
    settings = ExportSettings(interval_seconds=300, lateness_seconds=30, lookback_hours=1)
    work = due_work(["D1"], {"D1": utc(2026, 2, 7, 11, 1)}, utc(2026, 2, 7, 11, 10, 30), settings)
    assert work == [WorkItem("D1", DayRange(date(2026, 2, 7), 39_600, 40_200))]


def test_whole_day_reexports_replace_the_due_pieces_of_that_day() -> None:
    day1, day2 = date(2026, 2, 7), date(2026, 2, 8)
    due = [WorkItem("D1", DayRange(day1, 86_340, 86_400)), WorkItem("D1", DayRange(day2, 0, 60))]
    again = [WorkItem("D1", DayRange(day1, 0, 86_400))]
    assert sorted(with_reexports(due, again)) == [
        WorkItem("D1", DayRange(day1, 0, 86_400)),
        WorkItem("D1", DayRange(day2, 0, 60)),
    ]


NOW = utc(2026, 2, 7, 12, 0, 45)  # slices through 12:00 are due (60 s slices, 30 s lateness)


def at(throughs: dict[str, datetime]) -> dict[str, Progress]:
    """Devices' progress at these checkpoints."""
    return {device: Progress(through, through.date(), None) for device, through in throughs.items()}


def snapshot(**changes: object) -> Snapshot:
    values: dict[str, object] = {
        "fleet": ["D1", "D2"],
        "known": frozenset({"D1", "D2"}),
        "progress": {},
        "slice_checks": {},
        "day_checks": {},
        "busy": frozenset(),
    }
    values.update(changes)
    return Snapshot(**values)  # type: ignore[arg-type]


def test_a_tick_asks_for_the_slices_due_before_the_next_tick_to_be_read_once_due() -> None:
    """At 12:01:21 the slice [12:00, 12:01) is due at 12:01:30, before the next tick (10 s):
    it is asked for now, in a run that starts reading at 12:01:30; at 12:01:19 it is not."""
    behind = snapshot(progress=at({"D1": utc(2026, 2, 7, 12), "D2": utc(2026, 2, 7, 11, 58)}))
    ahead = tick_seconds(SETTINGS)
    plan = plan_tick(utc(2026, 2, 7, 12, 1, 21), SETTINGS, behind, ahead=ahead)
    [run] = plan.runs
    assert run == [
        WorkItem("D1", DayRange(date(2026, 2, 7), 43_200, 43_260)),
        WorkItem("D2", DayRange(date(2026, 2, 7), 43_080, 43_260)),
    ]
    assert plan.until == utc(2026, 2, 7, 12, 1)  # what the runs are keyed by
    assert plan.due == utc(2026, 2, 7, 12)  # what freshness is reported for, once
    assert plan.cursor().until == "2026-02-07T12:00:00+00:00"
    assert ready_at(run, SETTINGS) == utc(2026, 2, 7, 12, 1, 30)
    early = plan_tick(utc(2026, 2, 7, 12, 1, 19), SETTINGS, behind, ahead=ahead)
    assert early.runs == [[WorkItem("D2", DayRange(date(2026, 2, 7), 43_080, 43_200))]]
    assert ready_at(early.runs[0], SETTINGS) == utc(2026, 2, 7, 12, 0, 30)  # already due


def test_the_sensor_ticks_and_looks_ahead_no_more_often_than_a_slice() -> None:
    assert tick_seconds(SETTINGS) == 10
    assert tick_seconds(ExportSettings(interval_seconds=5)) == 5


def test_a_run_waits_until_not_before_and_no_longer_than_a_tick() -> None:
    from dagster import Failure

    from export_pipeline.defs.run_config import lateness_wait

    now = utc(2026, 2, 7, 12, 1, 27)
    assert lateness_wait("", now, 10) == 0.0
    assert lateness_wait("2026-02-07T12:01:30+00:00", now, 10) == 3.0
    assert lateness_wait("2026-02-07T12:01:00+00:00", now, 10) == 0.0  # already due
    assert lateness_wait("2026-02-07T13:01:30+01:00", now, 10) == 3.0  # any offset
    assert lateness_wait("2026-02-07T12:05:00+00:00", now, 10) == 10.0  # clocks disagree
    with pytest.raises(Failure, match="not_before='soon' is not an ISO-8601 time"):
        lateness_wait("soon", now, 10)
    with pytest.raises(Failure, match="has no time zone"):
        lateness_wait("2026-02-07T12:01:30", now, 10)


def test_a_tick_plans_each_devices_due_slices_from_its_checkpoint() -> None:
    plan = plan_tick(NOW, SETTINGS, snapshot(progress=at({"D1": utc(2026, 2, 7, 11, 58)})))
    assert plan.runs == [
        [
            WorkItem("D1", DayRange(date(2026, 2, 7), 43_080, 43_200)),
            WorkItem("D2", DayRange(date(2026, 2, 7), 39_600, 43_200)),
        ]
    ]
    assert plan.until == utc(2026, 2, 7, 12)
    assert plan.warnings == [
        "D2: no checkpoint (never exported): exporting from LOOKBACK_HOURS ago; "
        "materialize earlier device-days to fill in"
    ]


def test_busy_devices_get_no_work_and_new_devices_are_registered() -> None:
    plan = plan_tick(
        NOW,
        SETTINGS,
        snapshot(fleet=["D1", "D2", "D3"], busy=frozenset({"D2"}), progress=at({"D1": NOW})),
    )
    assert plan.new_devices == ["D3"]
    assert {item.device_id for run in plan.runs for item in run} == {"D3"}  # D1 is up to date
    assert "1 new, 1 busy" in plan.summary


def test_failed_reconciliations_become_whole_day_reexports_unless_the_device_is_busy() -> None:
    yesterday = date(2026, 2, 6)
    plan = plan_tick(
        NOW,
        SETTINGS,
        snapshot(
            progress=at({"D1": utc(2026, 2, 7, 12), "D2": utc(2026, 2, 7, 12)}),
            slice_checks={
                DeviceDay("D1", yesterday): CheckPartition("", passed=False, storage_id=1),
                DeviceDay("D2", yesterday): CheckPartition("", passed=False, storage_id=2),
            },
            busy=frozenset({"D2"}),
        ),
    )
    assert plan.runs == [[WorkItem("D1", DayRange(yesterday, 0, 86_400), reexport=True)]]
    assert "re-exporting 2026-02-06|D1: its reconciliation failed" in plan.warnings


def test_runs_hold_at_most_devices_per_run_devices() -> None:
    settings = ExportSettings(interval_seconds=60, lateness_seconds=30, devices_per_run=2)
    plan = plan_tick(NOW, settings, snapshot(fleet=["A", "B", "C"], known=frozenset("ABC")))
    assert [sorted({item.device_id for item in run}) for run in plan.runs] == [["A", "B"], ["C"]]


def test_a_tick_takes_no_more_runs_than_the_queue_runs_at_once() -> None:
    """Five devices at two a run would be three runs; with two run slots, the third would wait
    in the queue behind the others, so the tick's runs grow instead."""
    settings = ExportSettings(interval_seconds=60, lateness_seconds=30, devices_per_run=2)
    fleet = ["A", "B", "C", "D", "E"]
    tick = snapshot(fleet=fleet, known=frozenset(fleet), run_slots=2)
    plan = plan_tick(NOW, settings, tick)
    assert [sorted({item.device_id for item in run}) for run in plan.runs] == [
        ["A", "B", "C"],
        ["D", "E"],
    ]
    assert devices_per_run(5, settings, None) == devices_per_run(3, settings, 2) == 2


def test_freshness_fails_naming_the_devices_more_than_three_intervals_behind() -> None:
    behind = NOW - timedelta(seconds=3 * 60 + 30 + 1)
    within = NOW - timedelta(seconds=3 * 60 + 30)
    plan = plan_tick(NOW, SETTINGS, snapshot(progress=at({"D1": within, "D2": behind})))
    assert plan.freshness.passed is False
    assert plan.freshness.metadata["behind"].value == {"D2": 211}
    fresh = plan_tick(NOW, SETTINGS, snapshot(progress=at({"D1": within, "D2": within})))
    assert fresh.freshness.passed is True


def test_a_runs_config_is_its_config_class_and_reads_back_as_the_work() -> None:
    """The sensor writes a run's config through WorkConfig, one item per range with its
    devices (a config grows by a string per device, not by an item); the op reads it back
    as the same work."""
    from export_pipeline.defs.run_config import WorkConfig, WorkItemConfig, run_config_for

    slice_ = DayRange(date(2026, 2, 7), 600, 660)
    items = [
        WorkItem("D1", slice_),
        WorkItem("D2", DayRange.whole(date(2026, 2, 6)), reexport=True),
        WorkItem("D3", slice_),
    ]
    ready = datetime(2026, 2, 7, 0, 11, 30, tzinfo=UTC)
    config = run_config_for(items, "export_slices", not_before=ready)
    assert list(config) == ["ops"] and list(config["ops"]) == ["export_slices"]
    written = config["ops"]["export_slices"]["config"]
    assert written["work"] == [
        {
            "devices": ["D1", "D3"],
            "date": "2026-02-07",
            "start": 600,
            "end": 660,
            "reexport": False,
        },
        {"devices": ["D2"], "date": "2026-02-06", "start": 0, "end": 86_400, "reexport": True},
    ]
    read = WorkConfig.model_validate(written)
    assert read == WorkConfig(
        work=[
            WorkItemConfig(devices=["D1", "D3"], date="2026-02-07", start=600, end=660),
            WorkItemConfig(devices=["D2"], date="2026-02-06", reexport=True),
        ],
        not_before=ready.isoformat(),
    )
    assert read.devices() == {"D1", "D2", "D3"}
    # A run asked for once its work is due waits for nothing.
    assert "not_before" not in run_config_for(items, "export_days")["ops"]["export_days"]["config"]
    assert WorkItemConfig(device_id="D4", date="2026-02-07").device_ids() == ["D4"]


def test_a_devices_ranges_come_back_from_a_runs_config_in_time_order() -> None:
    """A device behind (three slices due) shares its last range's item with a device that is
    up to date, whose item comes first: read back, its slices are still in time order."""
    from export_pipeline.defs.run_config import WorkConfig, ranges_of, run_config_for

    day = date(2026, 2, 7)
    late = DayRange.whole(date(2026, 2, 6))
    items = [
        WorkItem("A", DayRange(day, 720, 780)),
        *(WorkItem("B", DayRange(day, start, start + 60)) for start in (600, 660, 720)),
        WorkItem("B", late, reexport=True),
    ]
    config = run_config_for(items, "export_slices")["ops"]["export_slices"]["config"]
    assert [item["devices"] for item in config["work"]] == [["A", "B"], ["B"], ["B"], ["B"]]
    due, again = ranges_of(WorkConfig.model_validate(config).work)
    assert due == {
        "A": [DayRange(day, 720, 780)],
        "B": [DayRange(day, 600, 660), DayRange(day, 660, 720), DayRange(day, 720, 780)],
    }
    assert again == {"B": [late]}


def test_a_work_item_without_a_device_is_refused_naming_its_range() -> None:
    from dagster import Failure

    from export_pipeline.defs.run_config import WorkItemConfig

    with pytest.raises(Failure, match=r"2026-02-07 \[600, 660\) names no device"):
        WorkItemConfig(date="2026-02-07", start=600, end=660).device_ids()


def test_a_day_file_is_due_when_its_slices_reconciled_after_it_or_it_failed() -> None:
    """The day file's own reconciliation is its record (telemetry_daily's partitions are dates):
    slices reconciled after it make it due, as does its failure; a busy device waits."""
    day = date(2026, 2, 6)

    def check(passed: bool | None, storage_id: int) -> CheckPartition:
        return CheckPartition("", passed=passed, storage_id=storage_id)

    slices = {DeviceDay(d, day): check(True, 10) for d in ("D1", "D2", "D3", "D4", "D5")}
    files = {
        DeviceDay("D2", day): check(True, 9),  # written before its slices last reconciled
        DeviceDay("D3", day): check(True, 11),  # written after: done
        DeviceDay("D4", day): check(False, 12),  # late data found by the sweep
        DeviceDay("D5", day): check(True, 11),
    }
    found = snapshot(slice_checks=slices, day_checks=files, busy_days=frozenset({"D1"}))
    assert due_day_files(found) == [
        WorkItem(device, DayRange.whole(day)) for device in ("D2", "D4")
    ]  # D1 never written, but a run in flight holds it


def test_a_date_is_recorded_when_its_day_files_changed_after_its_record_and_no_run_holds_it() -> (
    None
):
    """telemetry_daily's dates are recorded by the day-files run that writes them; one that died
    first leaves the date for the sensor to record, once no day-files run is in flight."""
    first, second = date(2026, 2, 5), date(2026, 2, 6)

    def check(storage_id: int) -> CheckPartition:
        return CheckPartition("", passed=True, storage_id=storage_id)

    files = {
        DeviceDay("D1", first): check(5),
        DeviceDay("D2", first): check(7),
        DeviceDay("D1", second): check(9),
    }
    # `first` was recorded after its last day file (8 > 7); `second` never was.
    found = snapshot(day_checks=files, dates_recorded={first: 8})
    assert dates_to_record(found) == [second]
    assert dates_to_record(snapshot(day_checks=files, dates_recorded={first: 6})) == [first, second]
    assert dates_to_record(snapshot(day_checks=files, busy_days=frozenset({"D2"}))) == []
    assert plan_tick(NOW, SETTINGS, found).dates == [second]


def test_the_documented_hand_written_run_config_is_a_valid_export_due_slices_config() -> None:
    """docs/operations.md's run config for `export_due_slices`, read as the job reads it."""
    import yaml
    from dagster import validate_run_config

    from export_pipeline.defs.continuous import export_due_slices
    from export_pipeline.defs.run_config import WorkConfig, ranges_of, run_devices
    from export_pipeline_tests.conftest import docs_example

    config = yaml.safe_load(docs_example("run-config", "yaml"))
    validate_run_config(export_due_slices, config)
    work = WorkConfig.model_validate(config["ops"]["export_slices"]["config"]).work
    due, again = ranges_of(work)
    assert again == {"device-001": [DayRange.whole(date(2026, 2, 7))]}
    assert due == {"device-001": []}
    assert run_devices(config) == {"device-001"}


def test_discovery_keeps_registered_devices_and_bounds_new_ones() -> None:
    from export_pipeline.defs.planning import discover
    from export_pipeline.defs.sensors import LoggedOnce

    settings = ExportSettings(max_devices=4, new_devices_per_tick=2, device_id_pattern="d[0-9]")
    # A registered device stays exported though it no longer matches the pattern.
    found = discover(["old-1", "d3", "d1", "d2", "zz", "a/b"], {"old-1"}, settings)
    assert found.fleet == ["old-1", "d1", "d2"]  # new ones in sorted order, two a tick
    assert (found.waiting, found.over_cap) == (1, 0)
    assert set(found.refused) == {"zz", "a/b"}
    full = discover(["d1", "d2", "d3", "d4"], {"d1", "d2", "d3", "old-1"}, settings)
    assert full.fleet == ["d1", "d2", "d3"] and (full.waiting, full.over_cap) == (0, 1)
    assert "beyond EXPORT_MAX_DEVICES=4" in full.warnings(settings)[0]

    once = LoggedOnce(most=2)
    assert once.first_time({"a": "A", "b": "B"}) == ["A", "B"]
    assert once.first_time({"a": "A"}) == ["1 device ids refused as before"]
    assert once.first_time({"c": "C"}) == ["C"]  # the least recently refused, b, is let go
    assert once.first_time({"a": "A"}) == ["1 device ids refused as before"]
    assert once.first_time({"b": "B"}) == ["B"]  # logged again
