"""Which runs in flight hold which devices, and which are dead: pure rules on what was read."""

import os
from datetime import UTC, datetime, timedelta

from dagster import DagsterRun, instance_for_test

from export_pipeline.defs.run_config import run_devices
from export_pipeline.defs.runs import (
    ASSET_RUN_PATIENCE,
    DAILY,
    RANGE_TAGS,
    SLICES,
    RunInFlight,
    busy_devices,
    datasets_of,
    devices_of,
    is_dead,
    run_slots,
)
from export_pipeline.record.keys import TELEMETRY_DAILY, TELEMETRY_EXPORT
from export_pipeline.settings import Settings

NOW = datetime(2026, 2, 7, 12, tzinfo=UTC)
STALE = timedelta(seconds=180)


def in_flight(*devices: str, last_seen: datetime | None, asset_run: bool = False) -> RunInFlight:
    run = DagsterRun(job_name="__ASSET_JOB" if asset_run else "export_due_slices")
    return RunInFlight(run, frozenset({"slices"}), frozenset(devices), asset_run, last_seen)


def test_a_queued_run_is_never_dead() -> None:
    assert not is_dead(in_flight("D1", last_seen=None), NOW, STALE)


def test_a_running_run_silent_for_longer_than_the_stale_time_is_dead() -> None:
    assert not is_dead(in_flight("D1", last_seen=NOW - STALE), NOW, STALE)
    assert is_dead(in_flight("D1", last_seen=NOW - STALE - timedelta(seconds=1)), NOW, STALE)


def test_a_run_of_an_asset_is_given_four_times_as_long() -> None:
    assert ASSET_RUN_PATIENCE == 4  # the README's "four times that for a run of an asset"
    allowed = ASSET_RUN_PATIENCE * STALE
    asset_run = in_flight("D1", last_seen=NOW - allowed, asset_run=True)
    assert not is_dead(asset_run, NOW, STALE)
    assert is_dead(asset_run, NOW + timedelta(seconds=1), STALE)
    # A continuous run silent as long is long dead.
    assert is_dead(in_flight("D1", last_seen=NOW - 2 * STALE), NOW, STALE)


def test_the_stale_time_is_45_s_unless_export_stale_run_seconds_says_otherwise() -> None:
    assert Settings.from_env({"S3_BUCKET": "exports"}).export.stale_run_after == 45
    settings = Settings.from_env({"S3_BUCKET": "exports", "EXPORT_STALE_RUN_SECONDS": "7"})
    assert settings.export.stale_run_after == 7


def test_busy_devices_are_those_of_every_run_given() -> None:
    runs = [in_flight("D1", "D2", last_seen=None), in_flight("D3", last_seen=NOW)]
    assert busy_devices(runs) == {"D1", "D2", "D3"}


def test_a_continuous_runs_devices_come_from_its_run_config() -> None:
    """The sensor names a range's devices in one item; a hand-written item names one device."""
    work = [
        {"devices": ["a", "b"], "date": "2026-02-07"},
        {"device_id": "c", "date": "2026-02-07"},
        {"devices": [], "date": "2026-02-07"},
    ]
    assert run_devices({"ops": {"export_slices": {"config": {"work": work}}}}) == {"a", "b", "c"}
    assert run_devices({}) == set()
    assert run_devices({"ops": {"other": {"config": {"rows": 3}}}}) == set()


def test_a_run_of_dates_of_the_day_files_holds_the_whole_fleet_for_them() -> None:
    """telemetry_daily's partitions are the fleet's dates: a run of some holds every device's
    day files (the sensor writes none of theirs meanwhile), and none of their slices."""
    run = DagsterRun(
        job_name="__ASSET_JOB",
        asset_selection=frozenset({TELEMETRY_DAILY}),
        tags={RANGE_TAGS[0]: "2026-02-06", RANGE_TAGS[1]: "2026-02-07"},
    )
    assert datasets_of(run) == {DAILY}
    assert devices_of(run, ["D1", "D2", "D3"]) == {"D1", "D2", "D3"}
    slices = DagsterRun(
        job_name="__ASSET_JOB",
        asset_selection=frozenset({TELEMETRY_EXPORT}),
        tags={RANGE_TAGS[0]: "2026-02-06|D1", RANGE_TAGS[1]: "2026-02-07|D2"},
    )
    assert (datasets_of(slices), devices_of(slices, ["D1", "D2", "D3"])) == ({SLICES}, {"D1", "D2"})


def queued(limit: int) -> dict[str, object]:
    return {
        "run_coordinator": {
            "module": "dagster._core.run_coordinator.queued_run_coordinator",
            "class": "QueuedRunCoordinator",
            "config": {"max_concurrent_runs": limit},
        }
    }


def test_a_tick_is_split_into_no_more_runs_than_run_at_once_or_this_host_has_cores() -> None:
    """Runs of Dagster's default launcher start on this host; past its cores, or the queue's
    limit, another run only adds its start (or its wait)."""
    cores = len(os.sched_getaffinity(0))
    with instance_for_test(overrides=queued(64)) as instance:
        assert run_slots(instance) == min(64, cores)
    with instance_for_test(overrides=queued(1)) as instance:
        assert run_slots(instance) == 1
    with instance_for_test() as instance:  # no queue: the cores alone
        assert run_slots(instance) == cores
