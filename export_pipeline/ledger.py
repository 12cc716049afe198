"""The export ledger, read from Dagster's own storage: no second checkpoint table, no state file.

- A device's checkpoint is the largest `exported_through` among the latest materializations of its
  recent device-day partitions (two queries for the whole fleet, whatever its size).
- What InfluxDB held for a closed device-day when it was reconciled (its count of values per
  field) is in that reconciliation's evaluation, for the late-data sweep to compare with.
- A device is busy while a continuous-export run that covers it is queued or running. A run that
  has logged nothing for too long is dead (its process was killed, which the default run launcher
  cannot see): it is marked failed, so its devices are free again.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from dagster import (
    AssetCheckKey,
    AssetKey,
    AssetRecordsFilter,
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    EventRecordsFilter,
    RunsFilter,
)
from dagster._core.storage.asset_check_execution_record import (
    AssetCheckExecutionRecordStatus as CheckStatus,
)
from dagster._core.storage.asset_check_execution_record import AssetCheckPartitionInfo

from export_pipeline.slicing import day_start

EXPORTED_THROUGH = "exported_through"
FIELD_COUNTS = "influxdb_field_counts"
CHECKED_THROUGH = "checked_through"
COVERED_THROUGH = "covered_through"
TELEMETRY_EXPORT = AssetKey("telemetry_export")
RECONCILIATION = AssetCheckKey(TELEMETRY_EXPORT, "reconciliation")
CONTINUOUS_JOB = "export_due_slices"
DEVICE_TAG = "dagster/partition/device"  # on runs materializing one device-day partition
CHECKPOINT_WINDOW_DAYS = 7
IN_FLIGHT = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
]


def checkpoints(
    instance: DagsterInstance,
    devices: Iterable[str],
    dates: Iterable[date],
    after_storage_id: int | None = None,
) -> dict[str, datetime]:
    """`exported_through` per device, from the latest materialization of each device-day
    (only those stored after `after_storage_id`, when given)."""
    return checkpoints_since(instance, devices, dates, after_storage_id)[0]


def checkpoints_since(
    instance: DagsterInstance,
    devices: Iterable[str],
    dates: Iterable[date],
    after_storage_id: int | None = None,
) -> tuple[dict[str, datetime], int | None]:
    """Checkpoints as `checkpoints`, and the largest storage id they were read from.

    Reading only what was stored after the previous tick keeps a tick's cost proportional to the
    work done since, not to the history: the database scans the newest index entries only.
    """
    keys = {f"{day.isoformat()}|{device}" for day in dates for device in devices}
    if not keys:
        return {}, after_storage_id
    latest = instance.get_latest_storage_id_by_partition(
        TELEMETRY_EXPORT, DagsterEventType.ASSET_MATERIALIZATION, keys, after_storage_id
    )
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
        device = str(materialization.partition).split("|", 1)[1]
        if device not in found or through > found[device]:
            found[device] = through
    return found, max(latest.values())


def covered_through(instance: DagsterInstance, partition_key: str) -> datetime | None:
    """Where the latest export of one device-day ended."""
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=TELEMETRY_EXPORT, asset_partitions=[partition_key]), limit=1
    ).records
    if not records or records[0].asset_materialization is None:
        return None
    value = records[0].asset_materialization.metadata.get(COVERED_THROUGH)
    return None if value is None else datetime.fromtimestamp(float(value.value), tz=UTC)  # type: ignore[arg-type]


def latest_reconciliations(
    instance: DagsterInstance, devices: Iterable[str], dates: Iterable[date]
) -> Sequence[AssetCheckPartitionInfo]:
    """The latest reconciliation of each of these device-days that has one (one query)."""
    keys = [f"{day.isoformat()}|{device}" for day in dates for device in devices]
    if not keys:
        return []
    return instance.event_log_storage.get_asset_check_partition_info(
        [RECONCILIATION], partition_keys=keys
    )


def failed_reconciliations(
    instance: DagsterInstance, devices: Iterable[str], dates: Iterable[date]
) -> list[tuple[str, date]]:
    """Closed device-days whose latest reconciliation failed: data arrived after they were
    exported (or something removed objects), so they are exported again."""
    failed = []
    for info in latest_reconciliations(instance, devices, dates):
        if info.partition_key and info.latest_execution_status == CheckStatus.FAILED:
            day, device = info.partition_key.split("|", 1)
            failed.append((device, date.fromisoformat(day)))
    return sorted(failed)


def reconciled_counts(
    instance: DagsterInstance, devices: Iterable[str], dates: Iterable[date]
) -> dict[tuple[str, date], dict[str, int]]:
    """InfluxDB's field counts recorded by the latest reconciliation of each device-day, where
    it passed and covered the whole day (failed ones are already being exported again)."""
    ids = [
        info.latest_check_event_storage_id
        for info in latest_reconciliations(instance, devices, dates)
        if info.partition_key and info.latest_execution_status == CheckStatus.SUCCEEDED
    ]
    found: dict[tuple[str, date], dict[str, int]] = {}
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        records = instance.event_log_storage.get_event_records(
            EventRecordsFilter(DagsterEventType.ASSET_CHECK_EVALUATION, storage_ids=chunk),
            limit=len(chunk),
        )
        for record in records:
            event = record.event_log_entry.dagster_event
            if event is None:
                continue
            evaluation = event.asset_check_evaluation_data
            counts = evaluation.metadata.get(FIELD_COUNTS)
            checked = evaluation.metadata.get(CHECKED_THROUGH)
            if counts is None or checked is None or evaluation.partition is None:
                continue  # recorded before counts were kept: not swept
            day_text, device = evaluation.partition.split("|", 1)
            day = date.fromisoformat(day_text)
            end = day_start(day + timedelta(days=1)).timestamp()
            if float(checked.value) < end:  # type: ignore[arg-type]
                continue  # only part of the day was reconciled
            values: dict[str, Any] = dict(counts.value)  # type: ignore[arg-type]
            found[(device, day)] = {str(name): int(value) for name, value in values.items()}
    return found


def checkpoint_dates(now: datetime, first_due: datetime, start_date: date) -> list[date]:
    """The dates whose partitions are searched for checkpoints: a week, or the lookback window
    if longer, never before the first partition."""
    first = min(
        first_due.date() - timedelta(days=1), now.date() - timedelta(CHECKPOINT_WINDOW_DAYS)
    )
    first = max(first, start_date)
    return [first + timedelta(days=n) for n in range((now.date() - first).days + 1)]


def run_devices(run_config: Mapping[str, Any]) -> set[str]:
    """The devices a continuous-export run covers, from its run config."""
    work = run_config.get("ops", {}).get("export_slices", {}).get("config", {}).get("work", [])
    return {item["device_id"] for item in work}


def busy_devices(instance: DagsterInstance, stale_after: timedelta) -> tuple[set[str], list[str]]:
    """Devices covered by live export runs (continuous ones, and materializations of their
    device-days from the UI, CLI or a backfill), and the ids of dead runs marked failed."""
    busy: set[str] = set()
    dead: list[str] = []
    for run in instance.get_runs(RunsFilter(statuses=IN_FLIGHT)):
        device = run.tags.get(DEVICE_TAG)
        if device is None and run.job_name != CONTINUOUS_JOB:
            continue
        # A whole-day materialization logs nothing between its start and end, so it is given
        # four times as long before it is presumed dead.
        silence = stale_after * (4 if device is not None else 1)
        if run.status in (DagsterRunStatus.STARTING, DagsterRunStatus.STARTED):
            last = instance.get_records_for_run(run.run_id, limit=1, ascending=False).records
            last_seen = last[0].timestamp if last else 0.0
            if time.time() - last_seen > silence.total_seconds():
                instance.report_run_failed(
                    run,
                    f"Marked failed by the continuous_export sensor: no event for over "
                    f"{silence.total_seconds():.0f} s, its process is presumed dead. "
                    "Its unexported slices are requested again.",
                )
                dead.append(run.run_id)
                continue
        busy |= {device} if device is not None else run_devices(run.run_config)
    return busy, dead
