"""The export ledger, read from Dagster's own storage: no second checkpoint table, no state file.

- A device's checkpoint is the largest `exported_through` among the latest materializations of its
  recent device-day partitions (two queries for the whole fleet, whatever its size).
- What InfluxDB held for a closed device-day when it was reconciled (its count of values per
  field) is in that reconciliation's evaluation, for the late-data sweep to compare with.

Only reads live here; `metadata.py` builds what runs record.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta

from dagster import AssetRecordsFilter, DagsterInstance

from export_pipeline.internals import (
    check_evaluation_metadata,
    latest_check_evaluations,
    latest_storage_ids,
)
from export_pipeline.metadata import (
    CHECKED_THROUGH,
    EXPORTED_THROUGH,
    FIELD_COUNTS,
    RECONCILIATION,
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


def failed_reconciliations(
    instance: DagsterInstance, devices: Iterable[str], dates: Iterable[date]
) -> list[DeviceDay]:
    """Device-days whose latest reconciliation failed: data arrived after they were exported
    (or something removed objects), so they are exported again."""
    keys = partition_keys(devices, dates)
    latest = latest_check_evaluations(instance, RECONCILIATION, keys)
    return sorted(DeviceDay.of(check.partition_key) for check in latest if check.passed is False)


def reconciled_counts(
    instance: DagsterInstance, devices: Iterable[str], dates: Iterable[date]
) -> dict[tuple[str, date], dict[str, int]]:
    """InfluxDB's field counts recorded by the latest reconciliation of each device-day, where
    it passed and covered the whole day (failed ones are already being exported again)."""
    keys = partition_keys(devices, dates)
    passed = [
        c.storage_id for c in latest_check_evaluations(instance, RECONCILIATION, keys) if c.passed
    ]
    found: dict[tuple[str, date], dict[str, int]] = {}
    for partition, values in check_evaluation_metadata(instance, passed).values():
        counts, checked = values.get(FIELD_COUNTS), values.get(CHECKED_THROUGH)
        if counts is None or checked is None or partition is None:
            continue  # recorded before counts were kept: not swept
        device_day = DeviceDay.of(partition)
        if float(checked) < day_start(device_day.day + timedelta(days=1)).timestamp():
            continue  # only part of the day was reconciled
        found[device_day] = {str(name): int(value) for name, value in dict(counts).items()}
    return found
