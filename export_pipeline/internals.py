"""Every use of Dagster's non-public API, in one place.

The ledger lives in Dagster's storage, and a few of its reads and writes have no public API in
Dagster 1.13. Each function here wraps one such use and is pinned by a test of the behaviour we
rely on (`export_pipeline_tests/test_internals.py`), so a Dagster upgrade that changes one fails
a named test instead of an export.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dagster import (
    AssetCheckKey,
    AssetKey,
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    EventRecordsFilter,
)
from dagster._core.storage.asset_check_execution_record import (
    AssetCheckExecutionRecordStatus,
)
from dagster._utils.schedules import is_valid_cron_string


def is_valid_cron(expression: str) -> bool:
    """Dagster's own rule for a schedule's cron string (five fields or an alias, no seconds)."""
    return bool(is_valid_cron_string(expression))


def pool_storage_connections(instance: DagsterInstance) -> None:
    """Hold pooled PostgreSQL connections for this process's storage writes.

    Dagster's PostgreSQL storage opens a new connection per statement (NullPool); measured here,
    a materialization event then costs ~12 ms, and ~3.3 ms over the pooled engine the webserver
    uses (`optimize_for_webserver`). The pool lives as long as the process; a PostgreSQL restart
    fails the run that holds it, and the next tick exports what it left.
    """
    for storage in (instance.event_log_storage, instance.run_storage):
        optimize = getattr(storage, "optimize_for_webserver", None)
        if optimize is not None:
            optimize(statement_timeout=0, pool_recycle=3600, max_overflow=4)


def latest_storage_ids(
    instance: DagsterInstance,
    asset_key: AssetKey,
    partitions: set[str],
    after_storage_id: int | None = None,
) -> Mapping[str, int]:
    """The storage id of the latest materialization of each of these partitions (one query)."""
    return instance.get_latest_storage_id_by_partition(
        asset_key, DagsterEventType.ASSET_MATERIALIZATION, partitions, after_storage_id
    )


@dataclass(frozen=True)
class CheckPartition:
    """The latest evaluation of a partitioned asset check for one partition."""

    partition_key: str
    passed: bool | None  # None: planned or running, no result yet
    storage_id: int


def latest_check_evaluations(
    instance: DagsterInstance, check: AssetCheckKey, partition_keys: Sequence[str]
) -> list[CheckPartition]:
    """The latest evaluation of `check` for each of these partitions that has one (one query).

    Partitioned asset checks are a preview in Dagster 1.13; their per-partition state is only
    readable through the event log storage.
    """
    if not partition_keys:
        return []
    infos = instance.event_log_storage.get_asset_check_partition_info(
        [check], partition_keys=list(partition_keys)
    )
    status = {
        AssetCheckExecutionRecordStatus.SUCCEEDED: True,
        AssetCheckExecutionRecordStatus.FAILED: False,
    }
    return [
        CheckPartition(
            info.partition_key,
            status.get(info.latest_execution_status),
            info.latest_check_event_storage_id,
        )
        for info in infos
        if info.partition_key
    ]


def check_evaluation_metadata(
    instance: DagsterInstance, storage_ids: Iterable[int]
) -> dict[int, tuple[str | None, Mapping[str, Any]]]:
    """The partition and metadata values of these check evaluation events, by storage id."""
    ids = list(storage_ids)
    found: dict[int, tuple[str | None, Mapping[str, Any]]] = {}
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
            values = {name: value.value for name, value in evaluation.metadata.items()}
            found[record.storage_id] = (evaluation.partition, values)
    return found


def last_event_time(instance: DagsterInstance, run_id: str) -> datetime | None:
    """When the run last stored an event (a log line, a materialization, its start)."""
    records = instance.get_records_for_run(run_id, limit=1, ascending=False).records
    return datetime.fromtimestamp(records[0].timestamp, UTC) if records else None


def mark_run_failed(instance: DagsterInstance, run: DagsterRun, message: str) -> None:
    """Record a run as failed from outside it: the default run launcher cannot see a run's
    process die, so a run killed with its daemon stays STARTED in storage for ever."""
    instance.report_run_failed(run, message)
