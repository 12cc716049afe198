"""The export ledger, read from Dagster's own storage: no second checkpoint table, no state file.

- A device's checkpoint is the largest `exported_through` among the latest materializations of its
  recent device-day partitions (two queries for the whole fleet, whatever its size).
- What InfluxDB held for a closed device-day when it was reconciled (its count of values per
  field) is in that reconciliation's evaluation, for the late-data sweep to compare with.

Only reads live here; `metadata.py` builds what runs record.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any

from dagster import AssetCheckKey, AssetKey, AssetRecordsFilter, DagsterInstance

from export_pipeline.internals import (
    CheckPartition,
    check_evaluation_metadata,
    latest_check_evaluations,
    latest_storage_ids,
)
from export_pipeline.metadata import (
    CHECKED_THROUGH,
    EXPORTED_THROUGH,
    FIELD_COUNTS,
    TELEMETRY_EXPORT,
)
from export_pipeline.partitions import DeviceDay, partition_keys
from export_pipeline.slicing import day_start

CHECKPOINT_WINDOW_DAYS = 7


def checkpoint_dates(now: datetime, *, first_due: datetime, start_date: date) -> list[date]:
    """The dates whose partitions are searched for checkpoints: a week, or the lookback window
    if longer, never before the first partition."""
    first = min(
        first_due.date() - timedelta(days=1), now.date() - timedelta(CHECKPOINT_WINDOW_DAYS)
    )
    first = max(first, start_date)
    return [first + timedelta(days=n) for n in range((now.date() - first).days + 1)]


def checkpoints(
    instance: DagsterInstance, devices: Iterable[str], dates: Iterable[date]
) -> dict[str, datetime]:
    """`exported_through` per device, from the latest materialization of each device-day."""
    return checkpoints_since(instance, devices, dates)[0]


def checkpoints_since(
    instance: DagsterInstance,
    devices: Iterable[str],
    dates: Iterable[date],
    after_storage_id: int | None = None,
) -> tuple[dict[str, datetime], int | None]:
    """Checkpoints as `checkpoints`, from the materializations stored after `after_storage_id`
    (all, when None), and the largest storage id they were read from.

    Reading only what was stored after the previous tick keeps a tick's cost proportional to the
    work done since, not to the history: the database scans the newest index entries only.
    """
    keys = set(partition_keys(devices, dates))
    if not keys:
        return {}, after_storage_id
    latest = latest_storage_ids(instance, TELEMETRY_EXPORT, keys, after_storage_id)
    if not latest:
        return {}, after_storage_id
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=TELEMETRY_EXPORT, storage_ids=list(latest.values())),
        limit=len(latest),
    ).records
    found: dict[str, datetime] = {}
    for record in records:
        materialization = record.asset_materialization
        if materialization is None or not materialization.partition:
            continue
        value = materialization.metadata.get(EXPORTED_THROUGH)
        if value is None:
            continue
        through = datetime.fromtimestamp(float(value.value), tz=UTC)  # type: ignore[arg-type]
        device = DeviceDay.of(materialization.partition).device_id
        if device not in found or through > found[device]:
            found[device] = through
    return found, max(latest.values())


def latest_checks(
    instance: DagsterInstance, check: AssetCheckKey, devices: Iterable[str], dates: Iterable[date]
) -> dict[DeviceDay, CheckPartition]:
    """The latest evaluation of `check` for each of these device-days that has one."""
    keys = partition_keys(devices, dates)
    return {
        DeviceDay.of(found.partition_key): found
        for found in latest_check_evaluations(instance, check, keys)
    }


def latest_materializations(
    instance: DagsterInstance, asset_key: AssetKey, devices: Iterable[str], dates: Iterable[date]
) -> dict[DeviceDay, int]:
    """The storage id of the latest materialization of each of these device-days that has one."""
    keys = set(partition_keys(devices, dates))
    if not keys:
        return {}
    latest = latest_storage_ids(instance, asset_key, keys)
    return {DeviceDay.of(key): storage_id for key, storage_id in latest.items()}


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
        counts, checked = values.get(FIELD_COUNTS), values.get(CHECKED_THROUGH)
        if counts is None or checked is None or partition is None:
            continue  # recorded before counts were kept: not swept
        device_day = DeviceDay.of(partition)
        if float(checked) < day_start(device_day.day + timedelta(days=1)).timestamp():
            continue  # only part of the day was reconciled
        found_counts[device_day] = {str(name): int(value) for name, value in dict(counts).items()}
    return found_counts
