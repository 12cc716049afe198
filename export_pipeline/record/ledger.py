"""The export ledger, in Dagster's own storage (its PostgreSQL): no second database, no state
file.

- A device's progress (its checkpoint and what its current day's slices hold, `progress.py`) is
  one row in Dagster's key-value table, upserted by the run that moved it and read for the whole
  fleet in one query: a tick costs the same after a year as after a day, and retention may remove
  old events without losing a checkpoint.
- What InfluxDB held for a closed device-day when it was reconciled (its count of values per
  field) is in that reconciliation's evaluation, for the late-data sweep to compare with; the
  latest evaluation and materialization of each device-day drive the sensor's re-exports and
  day files.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any

from dagster import (
    AssetCheckKey,
    AssetKey,
    AssetRecordsFilter,
    DagsterInstance,
)

from export_pipeline.engine.grid import day_start
from export_pipeline.engine.progress import Progress
from export_pipeline.record.events import DayFileRecord
from export_pipeline.record.keys import (
    CHECKED_THROUGH,
    DAILY_RECONCILIATION,
    DEVICES,
    EXPORTED_THROUGH,
    FIELD_COUNTS,
    TELEMETRY_DAILY,
    TELEMETRY_EXPORT,
    DeviceDay,
    date_key,
    device_days_by_key,
    first_window_day,
    keys_before,
)
from export_pipeline.record.progress import progress_json, progress_of_json
from export_pipeline.record.storage import (
    CheckPartition,
    Pruned,
    check_evaluation_metadata,
    latest_check_evaluations,
    latest_storage_ids,
    prune_ledger,
    read_values,
    write_values,
)
from export_pipeline.settings import WEEK_DAYS, ExportSettings


def registered_devices(instance: DagsterInstance, settings: ExportSettings) -> list[str]:
    """The fleet the checks and the sweep look at: DEVICE_IDS, or every registered device."""
    return list(settings.device_ids) or list(instance.get_dynamic_partitions(DEVICES))


PROGRESS = "progress/"  # + device id: a key of Dagster's key-value table


def checkpoint_dates(now: datetime, *, first_due: datetime, start_date: date) -> list[date]:
    """The dates whose partitions are searched for checkpoints: a week, or the lookback window
    if longer, never before the first partition."""
    first = min(first_due.date() - timedelta(days=1), now.date() - timedelta(WEEK_DAYS))
    first = max(first, start_date)
    return [first + timedelta(days=n) for n in range((now.date() - first).days + 1)]


def progress_of(instance: DagsterInstance, devices: Iterable[str]) -> dict[str, Progress]:
    """Each device's progress, where it has some."""
    found = read_values(instance, [PROGRESS + device for device in devices])
    return {key[len(PROGRESS) :]: progress_of_json(value, key=key) for key, value in found.items()}


def record_progress(instance: DagsterInstance, progress: Mapping[str, Progress]) -> None:
    """Upsert these devices' progress, in one statement."""
    write_values(instance, {PROGRESS + d: progress_json(found) for d, found in progress.items()})


def checkpoints(instance: DagsterInstance, devices: Iterable[str]) -> dict[str, datetime]:
    """`exported_through` per device: the end of its last slice complete in S3."""
    return {device: found.through for device, found in progress_of(instance, devices).items()}


def recorded_checkpoints(
    instance: DagsterInstance, devices: Iterable[str], dates: Iterable[date]
) -> dict[str, datetime]:
    """The largest `exported_through` among the latest materializations of these device-days."""
    found: dict[str, datetime] = {}
    for device_day, values in latest_metadata(instance, TELEMETRY_EXPORT, devices, dates).items():
        if EXPORTED_THROUGH in values:
            through = datetime.fromtimestamp(float(values[EXPORTED_THROUGH]), tz=UTC)
            found[device_day.device_id] = max(through, found.get(device_day.device_id, through))
    return found


def latest_checks(
    instance: DagsterInstance, check: AssetCheckKey, devices: Iterable[str], dates: Iterable[date]
) -> dict[DeviceDay, CheckPartition]:
    """The latest evaluation of `check` for each of these device-days that has one."""
    keys = device_days_by_key(devices, dates)
    return {
        keys[found.partition_key]: found
        for found in latest_check_evaluations(instance, check, list(keys))
    }


def latest_materializations(
    instance: DagsterInstance, asset_key: AssetKey, devices: Iterable[str], dates: Iterable[date]
) -> dict[DeviceDay, int]:
    """The storage id of the latest materialization of each of these device-days that has one."""
    keys = device_days_by_key(devices, dates)
    if not keys:
        return {}
    latest = latest_storage_ids(instance, asset_key, set(keys))
    return {keys[key]: storage_id for key, storage_id in latest.items()}


def recorded_dates(
    instance: DagsterInstance, asset_key: AssetKey, dates: Iterable[date]
) -> dict[date, int]:
    """The storage id of the latest materialization of each of these dates that has one (an
    asset partitioned by date, as telemetry_daily)."""
    keys = {date_key(day): day for day in dates}
    latest = latest_storage_ids(instance, asset_key, set(keys))
    return {keys[key]: storage_id for key, storage_id in latest.items()}


def latest_metadata(
    instance: DagsterInstance, asset_key: AssetKey, devices: Iterable[str], dates: Iterable[date]
) -> dict[DeviceDay, Mapping[str, Any]]:
    """The metadata values of the latest materialization of each of these device-days."""
    latest = latest_materializations(instance, asset_key, devices, dates)
    records = (
        instance.fetch_materializations(
            AssetRecordsFilter(asset_key=asset_key, storage_ids=list(latest.values())),
            limit=len(latest),
        ).records
        if latest
        else []
    )
    found: dict[DeviceDay, Mapping[str, Any]] = {}
    for record in records:
        materialization = record.asset_materialization
        if materialization is not None and materialization.partition:
            values = {name: value.value for name, value in materialization.metadata.items()}
            found[DeviceDay.of(materialization.partition)] = values
    return found


def reconciled_counts(
    instance: DagsterInstance, check: AssetCheckKey, devices: Iterable[str], dates: Iterable[date]
) -> dict[tuple[str, date], dict[str, int]]:
    """InfluxDB's field counts recorded by the latest reconciliation of each device-day, where
    it passed and covered the whole day (failed ones are already being exported again)."""
    latest = latest_checks(instance, check, devices, dates)
    passed = [found.storage_id for found in latest.values() if found.passed]
    found_counts: dict[tuple[str, date], dict[str, int]] = {}
    for partition, values in check_evaluation_metadata(instance, passed).values():
        counts, checked = values.get(FIELD_COUNTS), float(values.get(CHECKED_THROUGH, 0))
        if counts is None or partition is None:
            continue  # nothing to compare with
        device_day = DeviceDay.of(partition)
        if checked < day_start(device_day.day + timedelta(days=1)).timestamp():
            continue  # only part of the day was reconciled
        found_counts[device_day] = {str(name): int(value) for name, value in dict(counts).items()}
    return found_counts


def day_file_records(
    instance: DagsterInstance, devices: Iterable[str], dates: Iterable[date]
) -> dict[DeviceDay, DayFileRecord]:
    """Each of these device-days whose day file was ever written (or found without rows), as its
    latest reconciliation says: telemetry_daily's partitions are dates, this is a device's part."""
    latest = latest_checks(instance, DAILY_RECONCILIATION, devices, dates)
    values = check_evaluation_metadata(instance, [found.storage_id for found in latest.values()])

    def number(found: Mapping[str, Any], name: str) -> int | None:
        return int(found[name]) if name in found else None

    records = {}
    for device_day, check in latest.items():
        found = values.get(check.storage_id, (None, {}))[1]
        records[device_day] = DayFileRecord(
            check.passed, number(found, "s3_rows"), number(found, "files")
        )
    return records


def retain(
    instance: DagsterInstance, settings: ExportSettings, now: datetime
) -> tuple[Pruned, date]:
    """Prune what the record no longer needs (`storage.prune_ledger`): superseded events older
    than EXPORT_LEDGER_RETENTION_DAYS, and the events of telemetry_export's device-days before
    its first partition, which this returns with what went."""
    first_day = first_window_day(settings, now.date())
    pruned = prune_ledger(
        instance,
        asset_keys=[TELEMETRY_EXPORT, TELEMETRY_DAILY],
        before=now - timedelta(days=settings.ledger_retention_days),
        forget_before={TELEMETRY_EXPORT: keys_before(first_day)},
    )
    return pruned, first_day
