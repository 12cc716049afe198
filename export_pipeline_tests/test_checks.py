"""Reconciliation and freshness checks, evaluated on the real stack."""

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from dagster import (
    AssetCheckKey,
    AssetSelection,
    DagsterEventType,
    DagsterInstance,
    EventRecordsFilter,
    SensorResult,
    materialize,
)
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from export_pipeline.defs.checks import build_reconciled_check
from export_pipeline.defs.continuous import export_due_slices
from export_pipeline.defs.planning import SensorCursor
from export_pipeline.defs.resources import ClockResource
from export_pipeline.engine.day_files import DayFiles
from export_pipeline.engine.grid import DayRange
from export_pipeline.engine.influx import InfluxSource
from export_pipeline.engine.slice_files import Slices
from export_pipeline.record.events import (
    reconciled_evaluation,
    reconciliation_evaluation,
    summary_digest,
)
from export_pipeline.record.keys import (
    DAILY_RECONCILIATION,
    FRESHNESS,
    RECONCILED,
    RECONCILIATION,
    DeviceDay,
)
from export_pipeline.record.ledger import checkpoints
from export_pipeline_tests.audit import assert_day_file_reconciled, assert_reconciled
from export_pipeline_tests.conftest import Stack, telemetry_export
from export_pipeline_tests.services import point
from export_pipeline_tests.test_sensors import DAY, T0, Fleet, every_10s, new_device, ns, work_of

MIDNIGHT = datetime(2026, 2, 8, tzinfo=UTC)
SUCCEEDED = AssetCheckExecutionRecordStatus.SUCCEEDED
FAILED = AssetCheckExecutionRecordStatus.FAILED


def latest_check(
    instance: DagsterInstance, key: AssetCheckKey, partition: str
) -> tuple[AssetCheckExecutionRecordStatus, Any]:
    """The status and the evaluation of the latest execution of `key` for this one partition
    (not the latest of the check over every partition of the session's storage)."""
    storage = instance.event_log_storage
    (info,) = storage.get_asset_check_partition_info([key], partition_keys=[partition])
    (record,) = storage.get_event_records(
        EventRecordsFilter(
            DagsterEventType.ASSET_CHECK_EVALUATION,
            storage_ids=[info.latest_check_event_storage_id],
        )
    )
    evaluation = record.event_log_entry.dagster_event.asset_check_evaluation_data  # type: ignore[union-attr]
    return info.latest_execution_status, evaluation


def summary_of(evaluation: Any) -> str:
    return str(evaluation.metadata["summary"].value)


def test_late_data_after_a_slice_was_exported_is_reexported_when_the_day_closes(
    stack: Stack, instance: DagsterInstance
) -> None:
    device = new_device()
    stack.write(every_10s(device, MIDNIGHT - timedelta(hours=1), MIDNIGHT + timedelta(minutes=2)))
    # A day lookback: the device's day is exported from 00:00, so what it holds is known (a first,
    # partial day is exported again whole when it closes, whatever arrived late).
    fleet = Fleet(stack, instance, DEVICE_IDS=device, LOOKBACK_HOURS="24")
    fleet.tick_and_run(MIDNIGHT - timedelta(minutes=30))  # 02-06 23:30 to 02-07 23:29
    # A point for 23:10 arrives twenty minutes late, after its slice was exported.
    stack.write([point(ns(MIDNIGHT - timedelta(minutes=50)) + 5 * 10**9, device, {"power": 7.0})])
    fleet.tick_and_run(MIDNIGHT + timedelta(seconds=30))  # the day closes: reconciled, fails
    partition = f"2026-02-07|{device}"
    status, evaluation = latest_check(instance, RECONCILIATION, partition)
    assert status == FAILED
    assert evaluation.metadata["difference"].value == -1
    assert summary_of(evaluation) == "InfluxDB has 361 power values, S3 360"

    result = fleet.tick_and_run(MIDNIGHT + timedelta(seconds=90))
    assert (device, "2026-02-07", 0, 86_400) in work_of(result)
    status, evaluation = latest_check(instance, RECONCILIATION, partition)
    assert status == SUCCEEDED
    assert evaluation.metadata["difference"].value == 0
    assert assert_reconciled(stack, device, [DAY], settings=fleet.settings) == 361


def test_the_reconciliation_check_reports_a_missing_object(
    stack: Stack, instance: DagsterInstance
) -> None:
    device = new_device()
    stack.write(every_10s(device, T0, T0 + timedelta(minutes=10)))
    fleet = Fleet(stack, instance, DEVICE_IDS=device)
    instance.add_dynamic_partitions("devices", [device])
    resources = {**fleet.resources, "clock": ClockResource(frozen_at="2026-02-09T00:00:00+00:00")}
    partition = f"2026-02-07|{device}"
    assets = [telemetry_export]  # with its reconciliation check
    run = materialize(assets, partition_key=partition, resources=resources, instance=instance)
    assert run.success
    status, evaluation = latest_check(instance, RECONCILIATION, partition)
    assert status == SUCCEEDED
    assert (evaluation.metadata["s3_rows"].value, evaluation.metadata["files"].value) == (60, 10)

    # The reconciliation the closing export runs, called directly here with what the day's
    # export wrote.
    with InfluxSource(fleet.settings.influx) as source:
        store = stack.store()
        slices = Slices(source, store, "telemetry", fleet.settings.export)
        wrote = slices.export(device, DayRange.whole(DAY)).totals
        key = f"telemetry/device_id={device}/date=2026/02/07/export_120300.parquet"
        stack.s3.delete_object(Bucket=stack.bucket, Key=key)
        result = slices.reconcile(device, DAY, wrote)
    assert not result.passed
    assert (result.files, result.expected_files) == (9, 10)  # 12:03-12:04 is gone
    assert result.description == "S3 holds 9 files, the exports wrote 10"


def export_slices_due(fleet: Fleet, now: datetime) -> SensorResult:
    """A tick at `now` and its slice runs (not its day-file runs, which these checks do not
    need)."""
    result = fleet.tick(now)
    slices = [r for r in result.run_requests or [] if r.job_name == export_due_slices.name]
    assert slices and all(fleet.run(SensorResult(run_requests=slices), now))
    return result


def test_a_lost_or_a_leftover_object_fails_the_days_check_and_the_day_is_exported_again(
    stack: Stack, instance: DagsterInstance
) -> None:
    """Through Dagster, in CSV: the evaluation the closing run records fails for a folder that
    lost an object or got one the exports did not write, passes for an intact one, and the next
    tick's whole-day re-export repairs both."""
    clean, lost, leftover = devices = [new_device() for _ in range(3)]
    for device in devices:
        stack.write(every_10s(device, MIDNIGHT - timedelta(hours=1), MIDNIGHT))
    fleet = Fleet(
        stack, instance, DEVICE_IDS=",".join(devices), LOOKBACK_HOURS="24", EXPORT_FORMAT="csv"
    )
    export_slices_due(fleet, MIDNIGHT - timedelta(minutes=30))  # 02-07 through 23:29
    folder = "telemetry/device_id={}/date=2026/02/07/"
    stack.s3.delete_object(Bucket=stack.bucket, Key=folder.format(lost) + "export_231000.csv")
    stray = folder.format(leftover) + "export_120000.csv"  # a slice without rows
    stack.s3.put_object(Bucket=stack.bucket, Key=stray, Body=b'"timestamp","device_id"\n')

    export_slices_due(fleet, MIDNIGHT + timedelta(seconds=30))  # 23:29 to 24:00: the day closes
    partition = "2026-02-07|{}"
    status, evaluation = latest_check(instance, RECONCILIATION, partition.format(clean))
    assert status == SUCCEEDED
    assert summary_of(evaluation) == "360 rows in 60 files match InfluxDB"
    status, evaluation = latest_check(instance, RECONCILIATION, partition.format(lost))
    assert status == FAILED
    assert summary_of(evaluation) == "S3 holds 59 files, the exports wrote 60"
    status, evaluation = latest_check(instance, RECONCILIATION, partition.format(leftover))
    assert status == FAILED
    assert summary_of(evaluation) == "S3 holds 61 files, the exports wrote 60"

    result = export_slices_due(fleet, MIDNIGHT + timedelta(seconds=90))
    whole_days = {item[0] for item in work_of(result) if item[1:] == ("2026-02-07", 0, 86_400)}
    assert whole_days == {lost, leftover}
    # The tick that planned the re-exports reported the summary the UI shows, naming both.
    summary = latest_summary(instance, RECONCILED)
    assert not summary.passed
    assert summary.metadata["failed"].value == sorted(
        [f"{lost} 2026-02-07", f"{leftover} 2026-02-07"]
    )
    for device in devices:
        assert latest_check(instance, RECONCILIATION, partition.format(device))[0] == SUCCEEDED
        assert assert_reconciled(stack, device, [DAY], settings=fleet.settings) == 360
    fleet.tick(MIDNIGHT + timedelta(seconds=100))  # the summary changed: reported again
    summary = latest_summary(instance, RECONCILED)
    assert summary.passed
    assert summary.metadata["device_days_failed"].value == 0
    assert summary.metadata["device_days_reconciled"].value >= 3
    # Unchanged, it is not reported again (a tick every ten seconds would fill the ledger).
    before = latest_summary_id(instance, RECONCILED)
    fleet.tick(MIDNIGHT + timedelta(seconds=160))
    assert latest_summary_id(instance, RECONCILED) == before


def latest_summary_id(instance: DagsterInstance, key: AssetCheckKey) -> int:
    storage = instance.event_log_storage
    return storage.get_latest_asset_check_execution_by_key([key])[key].id


def latest_summary(instance: DagsterInstance, key: AssetCheckKey) -> Any:
    """The latest evaluation of an unpartitioned check, as the UI shows it."""
    storage = instance.event_log_storage
    record = storage.get_latest_asset_check_execution_by_key([key])[key]
    return record.event.dagster_event.asset_check_evaluation_data  # type: ignore[union-attr]


def test_a_day_file_replaced_by_one_of_another_schema_fails_its_check(
    stack: Stack, tmp_path: Path
) -> None:
    device = new_device()
    stack.write(every_10s(device, T0, T0 + timedelta(minutes=10)))
    settings = stack.settings()
    key = f"telemetry_daily/device_id={device}/date=2026-02-07/data.parquet"
    with InfluxSource(settings.influx) as source:
        store = stack.store()
        day_files = DayFiles(source, store, "telemetry_daily", 1000, tmp_path)
        day_files.export(device, DayRange.whole(DAY))
        assert day_files.reconcile(device, DAY, None).passed
        # The same rows, timestamps in milliseconds: every count still matches InfluxDB's.
        table = stack.table(key)
        table = table.set_column(0, "timestamp", table["timestamp"].cast(pa.timestamp("ms", "UTC")))
        pq.write_table(table, tmp_path / "other.parquet")
        stack.s3.upload_file(str(tmp_path / "other.parquet"), stack.bucket, key)
        # As for slices, the check runs with the export: called directly on the replaced file.
        result = day_files.reconcile(device, DAY, None)
    assert result.exported_field_counts == result.field_counts
    assert not result.passed
    assert result.schema_mismatches == [key]
    assert result.description == "1 files with another schema"
    evaluation = reconciliation_evaluation(result, DAILY_RECONCILIATION)
    assert not evaluation.passed
    assert evaluation.metadata["schema_mismatches"].value == [key]
    # The audit, which parses the file, refuses it too; a rewrite makes the day whole again.
    with InfluxSource(settings.influx) as source:
        DayFiles(source, store, "telemetry_daily", 1000, tmp_path).export(
            device, DayRange.whole(DAY)
        )
    assert assert_day_file_reconciled(stack, device, [DAY], daily_prefix="telemetry_daily") == 60


def reported_freshness(fleet: Fleet, now: datetime) -> Any:
    """The freshness evaluation the sensor reports on a tick at `now` (asserted to be new)."""
    storage = fleet.instance.event_log_storage
    before = storage.get_latest_asset_check_execution_by_key([FRESHNESS]).get(FRESHNESS)
    fleet.tick(now)
    after = storage.get_latest_asset_check_execution_by_key([FRESHNESS])[FRESHNESS]
    assert before is None or after.id > before.id, "the tick reported no freshness"
    return after.event.dagster_event.asset_check_evaluation_data  # type: ignore[union-attr]


def test_the_reconciled_check_executed_from_the_ui_names_a_failed_device_day(
    stack: Stack, instance: DagsterInstance
) -> None:
    device = new_device()
    stack.write(every_10s(device, MIDNIGHT - timedelta(hours=1), MIDNIGHT))
    fleet = Fleet(stack, instance, DEVICE_IDS=device, LOOKBACK_HOURS="24")
    export_slices_due(fleet, MIDNIGHT - timedelta(minutes=30))
    folder = f"telemetry/device_id={device}/date=2026/02/07/"
    stack.s3.delete_object(Bucket=stack.bucket, Key=folder + "export_231000.parquet")
    export_slices_due(fleet, MIDNIGHT + timedelta(seconds=30))  # the day closes: it fails
    check = build_reconciled_check(telemetry_export, RECONCILIATION)
    now = MIDNIGHT + timedelta(minutes=1)
    resources = {**fleet.resources, "clock": ClockResource(frozen_at=now.isoformat())}
    run = materialize(
        [telemetry_export, check],
        selection=AssetSelection.checks(check),
        resources=resources,
        instance=instance,
    )
    (evaluation,) = run.get_asset_check_evaluations()
    assert evaluation.asset_check_key == RECONCILED
    assert not evaluation.passed
    assert evaluation.metadata["failed"].value == [f"{device} 2026-02-07"]


def test_the_sensor_reports_freshness_and_names_devices_that_fall_behind(
    stack: Stack, instance: DagsterInstance
) -> None:
    fresh, stuck = new_device(), new_device()
    stack.write(every_10s(fresh, T0 - timedelta(minutes=5), T0 + timedelta(minutes=10)))
    fleet = Fleet(stack, instance, DEVICE_IDS=f"{fresh},{stuck}")
    # Only `fresh` gets exported; `stuck` has no checkpoint at all, the furthest behind a device
    # can be.
    request = fleet.tick(T0 + timedelta(seconds=30)).run_requests[0]  # type: ignore[index]
    assert export_due_slices.execute_in_process(
        run_config=only(request.run_config, fresh), instance=instance, resources=fleet.resources
    ).success
    data = reported_freshness(fleet, T0 + timedelta(seconds=90))
    assert not data.passed
    assert data.metadata["devices"].value == 2
    assert data.metadata["devices_behind"].value == 1
    assert dict(data.metadata["behind"].value) == {stuck: None}


def only(run_config: Mapping[str, Any], device: str) -> dict[str, Any]:
    """A continuous run's config, keeping the work of one device."""
    work = run_config["ops"]["export_slices"]["config"]["work"]
    mine = [{**item, "devices": [device]} for item in work if device in item["devices"]]
    return {"ops": {"export_slices": {"config": {"work": mine}}}}


def test_freshness_fails_only_past_three_intervals_and_the_lateness_allowance(
    stack: Stack, instance: DagsterInstance
) -> None:
    """With 60 s slices and 30 s of lateness a device may be 210 s behind, not 211."""
    ahead, behind = new_device(), new_device()
    for device in (ahead, behind):
        stack.write(every_10s(device, T0 - timedelta(minutes=5), T0 + timedelta(minutes=5)))
    fleet = Fleet(stack, instance, DEVICE_IDS=f"{ahead},{behind}")
    fleet.tick_and_run(T0 + timedelta(seconds=30))  # both exported through 12:00
    request = fleet.tick(T0 + timedelta(seconds=90)).run_requests[0]  # type: ignore[index]
    assert export_due_slices.execute_in_process(
        run_config=only(request.run_config, ahead), instance=instance, resources=fleet.resources
    ).success
    assert checkpoints(instance, [ahead, behind]) == {
        ahead: T0 + timedelta(minutes=1),
        behind: T0,
    }

    # 12:03:29: `behind` is 209 s behind, `ahead` 149 s: every device is fresh.
    data = reported_freshness(fleet, T0 + timedelta(minutes=3, seconds=29))
    assert data.passed
    assert data.metadata["devices_behind"].value == 0
    assert data.metadata["max_export_lag_seconds"].value == 209.0
    # 12:03:31: `behind` is 211 s behind and named; `ahead`, 151 s, is not.
    data = reported_freshness(fleet, T0 + timedelta(minutes=3, seconds=31))
    assert not data.passed
    assert data.metadata["devices_behind"].value == 1
    assert dict(data.metadata["behind"].value) == {behind: 211}
    assert data.severity.value == "WARN"


def test_the_reconciled_summary_names_failed_device_days_and_changes_only_with_them() -> None:
    day, other = DAY, DAY - timedelta(days=1)
    latest: dict[DeviceDay, bool | None] = {
        DeviceDay("a", day): True,
        DeviceDay("b", day): False,
        DeviceDay("c", other): False,
        DeviceDay("d", day): None,  # being evaluated
    }
    failing = reconciled_evaluation(RECONCILED, latest, [other, day])
    assert not failing.passed
    assert failing.metadata["failed"].value == ["c 2026-02-06", "b 2026-02-07"]
    assert failing.metadata["device_days_reconciled"].value == 1
    assert failing.description is not None and "b 2026-02-07" in failing.description
    repaired = {**latest, DeviceDay("b", day): True, DeviceDay("c", other): True}
    fixed = reconciled_evaluation(RECONCILED, repaired, [other, day])
    assert fixed.passed
    assert fixed.metadata["device_days_reconciled"].value == 3
    assert summary_digest([fixed]) != summary_digest([failing])
    more = reconciled_evaluation(RECONCILED, {**latest, DeviceDay("e", day): True}, [other, day])
    assert summary_digest([more]) == summary_digest([failing])  # counts alone: not reported
    later = reconciled_evaluation(RECONCILED, latest, [day])
    assert summary_digest([later]) != summary_digest([failing])  # a new window: reported
    many = {DeviceDay(f"dev-{n:02d}", day): False for n in range(25)}
    assert len(list(reconciled_evaluation(RECONCILED, many, [day]).metadata["failed"].value)) == 20  # type: ignore[arg-type]


def test_the_sensor_cursor_reads_its_earlier_forms() -> None:
    """The slice alone, then with the summaries' digest, then with the record's version: an
    earlier form reads as version 0, which the sensor checks again."""
    assert SensorCursor.of(None) == SensorCursor("", "", 0)
    assert SensorCursor.of("2026-02-07T12:00:00+00:00") == SensorCursor("2026-02-07T12:00:00+00:00")
    assert SensorCursor.of("2026-02-07T12:00:00+00:00 0a1b2c3d") == SensorCursor(
        "2026-02-07T12:00:00+00:00", "0a1b2c3d", 0
    )
    cursor = SensorCursor("2026-02-07T12:00:00+00:00", "0a1b2c3d", 2)
    assert SensorCursor.of(cursor.text) == cursor
    assert SensorCursor.of(SensorCursor("2026-02-07T12:00:00+00:00", "", 2).text).record == 2
