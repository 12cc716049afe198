"""Every use of Dagster's non-public API, in one place.

The ledger lives in Dagster's storage, and a few of its reads and writes have no public API in
Dagster 1.13. Each function here wraps one such use and is pinned by a test of the behaviour we
rely on (`export_pipeline_tests/test_internals.py`), so a Dagster upgrade that changes one fails
a named test instead of an export.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dagster import (
    AssetCheckKey,
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    EventRecordsFilter,
    OpExecutionContext,
)
from dagster._core.errors import DagsterInvariantViolationError
from dagster._core.events import DagsterEvent, DagsterEventBatchMetadata
from dagster._core.execution.context.metadata_logging import (
    AssetMetadataHandle,
    OutputMetadataAccumulator,
)
from dagster._core.storage.asset_check_execution_record import (
    AssetCheckExecutionRecordStatus,
)

_POOLED = "_export_pipeline_pooled"  # set on a storage whose connections are pooled


def pool_storage_connections(instance: DagsterInstance) -> None:
    """Hold pooled PostgreSQL connections for this process's storage writes.

    Dagster's PostgreSQL storage opens a new connection per statement (NullPool); measured here,
    a materialization event then costs ~12 ms, and ~3.3 ms over the pooled engine the webserver
    uses (`optimize_for_webserver`). The pool lives as long as the process; a PostgreSQL restart
    fails the run that holds it, and the next tick exports what it left.
    """
    for storage in (instance.event_log_storage, instance.run_storage):
        optimize = getattr(storage, "optimize_for_webserver", None)
        # Once a storage: Dagster's optimize replaces the engine without closing the one it
        # had, so a process that runs many runs on one instance (a test session, a worker
        # process) would keep a pool of connections open per run until garbage collection.
        if optimize is not None and not getattr(storage, _POOLED, False):
            optimize(statement_timeout=0, pool_recycle=3600, max_overflow=4)
            setattr(storage, _POOLED, True)


def latest_storage_ids(
    instance: DagsterInstance,
    asset_key: AssetKey,
    partitions: set[str],
    after_storage_id: int | None = None,
) -> Mapping[str, int]:
    """The storage id of the latest materialization of each of these partitions (one query).

    What `get_latest_storage_id_by_partition` answers, read as the key range from the least to
    the greatest of `partitions` and filtered here: Dagster sends one bind parameter per
    partition, and a sensor tick asks for 35k of them (0.6 s a query at 5,000 devices, 0.15 s
    so). Keys compare by code point (COLLATE "C") whatever the database's collation, as Python
    compares them.
    """
    if not partitions:
        return {}
    storage: Any = instance.event_log_storage
    with storage.index_connection() as conn:
        rows = _read(
            conn,
            _LATEST_MATERIALIZATIONS,
            {
                "asset_key": asset_key.to_string(),
                "event_type": DagsterEventType.ASSET_MATERIALIZATION.value,
                "lowest": min(partitions),
                "highest": max(partitions),
                "after": after_storage_id or 0,
            },
        ).fetchall()
    return {key: storage_id for key, storage_id in rows if key in partitions}


_LATEST_MATERIALIZATIONS = """
SELECT partition, max(id) FROM event_logs
WHERE asset_key = :asset_key AND dagster_event_type = :event_type
  AND partition COLLATE "C" BETWEEN :lowest AND :highest
GROUP BY partition HAVING max(id) > :after
"""


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
    readable through the event log storage, whose `get_asset_check_partition_info` also joins
    each partition's latest materialization (1.8 s a check for 35k partitions, which every
    sensor tick reads). This is its first half, on the same table and rule (the row with the
    highest id among those with an evaluation event), read as a key range as
    `latest_storage_ids` does.
    """
    if not partition_keys:
        return []
    storage: Any = instance.event_log_storage
    with storage.index_connection() as conn:
        rows = _read(
            conn,
            _LATEST_CHECK_EVALUATIONS,
            {
                "asset_key": check.asset_key.to_string(),
                "check_name": check.name,
                "lowest": min(partition_keys),
                "highest": max(partition_keys),
            },
        ).fetchall()
    wanted = set(partition_keys)
    status = {
        AssetCheckExecutionRecordStatus.SUCCEEDED.value: True,
        AssetCheckExecutionRecordStatus.FAILED.value: False,
    }
    return [
        CheckPartition(key, status.get(state), event_id)
        for key, state, event_id in rows
        if key in wanted
    ]


_LATEST_CHECK_EVALUATIONS = """
SELECT DISTINCT ON (partition) partition, execution_status, evaluation_event_storage_id
FROM asset_check_executions
WHERE asset_key = :asset_key AND check_name = :check_name
  AND partition COLLATE "C" BETWEEN :lowest AND :highest AND evaluation_event_storage_id IS NOT NULL
ORDER BY partition, id DESC
"""


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


KVS_PREFIX = "export_pipeline/"


def read_values(instance: DagsterInstance, keys: Iterable[str]) -> dict[str, str]:
    """Values of ours in Dagster's key-value table (in its run storage: the same PostgreSQL),
    one query for any number of keys."""
    wanted = {KVS_PREFIX + key for key in keys}
    if not wanted:
        return {}
    found = instance.run_storage.get_cursor_values(wanted)
    return {key[len(KVS_PREFIX) :]: value for key, value in found.items()}


def write_values(instance: DagsterInstance, values: Mapping[str, str]) -> None:
    """Upsert values of ours in one statement: a row per key, whatever the history."""
    if values:
        instance.run_storage.set_cursor_values({KVS_PREFIX + k: v for k, v in values.items()})


@contextmanager
def batched_event_writes() -> Iterator[None]:
    """Events that carry batch metadata are stored together while this is open: Dagster does so
    when DAGSTER_EVENT_BATCH_SIZE is set (it reads the variable at each event) and flushes a
    batch at its last event. Dagster gives batch metadata to the materializations of a
    many-partition output, so an asset that yields its output inside this block has them stored
    in one INSERT (the output is stored while the asset's generator waits at its `yield`)."""
    previous = os.environ.get("DAGSTER_EVENT_BATCH_SIZE")
    os.environ["DAGSTER_EVENT_BATCH_SIZE"] = str(1 << 30)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["DAGSTER_EVENT_BATCH_SIZE"]
        else:
            os.environ["DAGSTER_EVENT_BATCH_SIZE"] = previous


def log_materializations(
    context: OpExecutionContext, materializations: Sequence[AssetMaterialization]
) -> None:
    """Log materializations from an op in one batch: one INSERT instead of one round trip each
    (~3.3 ms with pooled connections), which at midnight is one per device."""
    if not materializations:
        return
    step = context._step_execution_context
    batch = uuid.uuid4().hex
    with batched_event_writes():
        for index, materialization in enumerate(materializations):
            last = index == len(materializations) - 1
            event = DagsterEvent.asset_materialization(
                step, materialization, DagsterEventBatchMetadata(batch, last)
            )
            context._events.append(event)


def add_partition_metadata(
    context: AssetExecutionContext,
    asset_key: AssetKey,
    by_partition: Mapping[str, Mapping[str, Any]],
) -> None:
    """Each partition's own metadata on its materialization, as `context.add_asset_metadata(...,
    partition_key=)` gives it, for many partitions at once.

    Dagster's method checks the key against every partition of the run's range, each call
    computed anew with a query for the dynamic partitions: quadratic in the run's partitions,
    measured at ~100 s of a 1,000 device-day backfill run. Here the keys are checked once.
    """
    targeted = set(context.partition_keys)
    strays = sorted(key for key in by_partition if key not in targeted)
    if strays:
        raise DagsterInvariantViolationError(
            f"Attempted to add metadata for partition keys {strays[:5]} that are not targeted."
        )
    step = context.op_execution_context._step_execution_context
    accumulated = dict(step._metadata_accumulator.per_output_metadata)
    for partition_key, metadata in by_partition.items():
        handle = AssetMetadataHandle(asset_key=asset_key, partition_key=partition_key)
        accumulated[handle] = {**accumulated.get(handle, {}), **metadata}
    step._metadata_accumulator = OutputMetadataAccumulator(per_output_metadata=accumulated)


@dataclass
class Pruned:
    """What one retention pass removed from Dagster's storage."""

    materializations: int = 0
    evaluations: int = 0
    events: int = 0
    runs: int = 0
    forgotten: int = 0  # materializations and evaluations of partitions out of their window


# Each statement below is one transaction: a pass killed between two leaves the ledger consistent
# (an event goes with its tags, an evaluation with its event), and the next pass goes on.
_SUPERSEDED_MATERIALIZATIONS = """
WITH doomed AS (
    SELECT e.id FROM event_logs e
    WHERE e.asset_key = ANY(:keys) AND e.dagster_event_type = 'ASSET_MATERIALIZATION'
      AND e.partition IS NOT NULL AND e.timestamp < :before
      AND EXISTS (
        SELECT 1 FROM event_logs newer
        WHERE newer.asset_key = e.asset_key AND newer.dagster_event_type = e.dagster_event_type
          AND newer.partition = e.partition AND newer.id > e.id)
    LIMIT :batch
), tags AS (DELETE FROM asset_event_tags WHERE event_id IN (SELECT id FROM doomed))
DELETE FROM event_logs WHERE id IN (SELECT id FROM doomed) RETURNING id
"""
# The latest evaluation of each check and partition, found by one aggregate (an anti-join on
# "a newer one exists" was planned without an index, and grew quadratically with the history).
# A partition key is never empty, so '' stands for the unpartitioned checks' NULL.
_SUPERSEDED_EVALUATIONS = """
WITH latest AS (
    SELECT asset_key, check_name, COALESCE(partition, '') AS partition, max(id) AS id
    FROM asset_check_executions WHERE asset_key = ANY(:keys)
    GROUP BY asset_key, check_name, COALESCE(partition, '')
), doomed AS (
    SELECT c.id, c.evaluation_event_storage_id AS event_id FROM asset_check_executions c
    JOIN latest l ON l.asset_key = c.asset_key AND l.check_name = c.check_name
      AND l.partition = COALESCE(c.partition, '') AND c.id < l.id
    WHERE c.asset_key = ANY(:keys)
      AND COALESCE(c.evaluation_event_timestamp, c.create_timestamp) < :before
    LIMIT :batch
), events AS (DELETE FROM event_logs WHERE id IN (SELECT event_id FROM doomed))
DELETE FROM asset_check_executions WHERE id IN (SELECT id FROM doomed) RETURNING id
"""
# The partitions of an asset that fell out of its date window (keys below :bound), with the
# evaluations of its checks for them: nothing reads them any more, and the UI shows none.
_FORGOTTEN_MATERIALIZATIONS = """
WITH doomed AS (
    SELECT e.id FROM event_logs e
    WHERE e.asset_key = :key AND e.dagster_event_type = 'ASSET_MATERIALIZATION'
      AND e.partition COLLATE "C" < :bound
    LIMIT :batch
), tags AS (DELETE FROM asset_event_tags WHERE event_id IN (SELECT id FROM doomed))
DELETE FROM event_logs WHERE id IN (SELECT id FROM doomed) RETURNING id
"""
# Materializations of an asset whose partitions became dates from device-days (telemetry_daily
# before its partitions were dates): each device-day's state is its reconciliation, which stays.
_DEVICE_DAY_MATERIALIZATIONS = """
WITH doomed AS (
    SELECT e.id FROM event_logs e
    WHERE e.asset_key = :key AND e.dagster_event_type = 'ASSET_MATERIALIZATION'
      AND e.partition LIKE '%|%'
    LIMIT :batch
), tags AS (DELETE FROM asset_event_tags WHERE event_id IN (SELECT id FROM doomed))
DELETE FROM event_logs WHERE id IN (SELECT id FROM doomed) RETURNING id
"""
_DEVICE_DAY_DATES = """
SELECT DISTINCT split_part(partition, '|', 1) FROM event_logs
WHERE asset_key = :key AND dagster_event_type = 'ASSET_MATERIALIZATION' AND partition LIKE '%|%'
"""
_FORGOTTEN_EVALUATIONS = """
WITH doomed AS (
    SELECT c.id, c.evaluation_event_storage_id AS event_id FROM asset_check_executions c
    WHERE c.asset_key = :key AND c.partition COLLATE "C" < :bound
    LIMIT :batch
), events AS (DELETE FROM event_logs WHERE id IN (SELECT event_id FROM doomed))
DELETE FROM asset_check_executions WHERE id IN (SELECT id FROM doomed) RETURNING id
"""
_OLD_RUNS = """
SELECT run_id, id FROM runs
WHERE status IN ('SUCCESS', 'FAILURE', 'CANCELED') AND update_timestamp < :before AND id > :after
ORDER BY id LIMIT :batch
"""
# A run's events but what the ledger keeps: the latest materialization of each partition and
# the latest evaluation of each check (older ones are gone by then), and the planned evaluation
# a check's row still points at (a run that ended before evaluating it).
_LOGS_OF_RUNS = """
WITH doomed AS (
    SELECT e.id FROM event_logs e
    WHERE e.run_id = ANY(:runs) AND e.dagster_event_type IS DISTINCT FROM 'ASSET_MATERIALIZATION'
      AND e.dagster_event_type IS DISTINCT FROM 'ASSET_CHECK_EVALUATION'
      AND NOT (e.dagster_event_type = 'ASSET_CHECK_EVALUATION_PLANNED' AND EXISTS (
        SELECT 1 FROM asset_check_executions c WHERE c.evaluation_event_storage_id = e.id))
), tags AS (DELETE FROM asset_event_tags WHERE event_id IN (SELECT id FROM doomed))
DELETE FROM event_logs WHERE id IN (SELECT id FROM doomed) RETURNING id
"""
_EMPTY_RUNS = """
DELETE FROM runs r WHERE r.run_id = ANY(:runs)
  AND NOT EXISTS (SELECT 1 FROM event_logs e WHERE e.run_id = r.run_id) RETURNING r.run_id
"""


def device_day_dates(instance: DagsterInstance, asset_key: AssetKey) -> list[str]:
    """The dates of the device-day materializations of an asset whose partitions are now dates,
    for their dates to be recorded before they go (`forget_device_day_materializations`)."""
    storage: Any = instance.event_log_storage
    with storage.index_connection() as conn:
        rows = _read(conn, _DEVICE_DAY_DATES, {"key": asset_key.to_string()}).fetchall()
    return sorted(str(row[0]) for row in rows)


def forget_device_day_materializations(
    instance: DagsterInstance, asset_key: AssetKey, *, batch: int = 5_000
) -> int:
    """Remove the materializations of device-days of an asset whose partitions are now dates,
    whatever their age (a migration of the record, `versions.py`); how many went."""
    storage: Any = instance.event_log_storage
    removed = 0
    with storage.index_connection() as conn:
        while True:
            found = _execute(
                conn, _DEVICE_DAY_MATERIALIZATIONS, {"key": asset_key.to_string(), "batch": batch}
            )
            removed += found.rowcount
            if found.rowcount < batch:
                return removed


def prune_ledger(
    instance: DagsterInstance,
    *,
    asset_keys: Sequence[AssetKey],
    before: datetime,
    forget_before: Mapping[AssetKey, str] | None = None,
    batch: int = 5_000,
) -> Pruned:
    """Remove from Dagster's storage what nothing needs any more, up to `before`: materializations
    of a partition that a later one superseded, evaluations of a check superseded likewise, the
    logs and bookkeeping events of finished runs, and finished runs left with no event. The
    latest materialization of every partition and evaluation of every check stay, with their
    metadata, so the UI still shows each partition as it last was. `forget_before` names, per
    asset, the key below which its partitions are no longer partitions (its date window): their
    events and evaluations go too, whatever their age.

    Dagster has no retention for asset events (its `retention:` covers ticks only, deleting a run
    deletes its materializations, and wiping partitions is not implemented on PostgreSQL), so
    this is SQL on its tables: `test_retention` pins their shape.
    """
    pruned = Pruned()
    moment = before.astimezone(UTC).replace(tzinfo=None)  # Dagster stores naive UTC
    keys = [key.to_string() for key in asset_keys]
    storage: Any = instance.event_log_storage
    with storage.index_connection() as conn:

        def drain(statement: str, **parameters: Any) -> int:
            removed = 0
            while True:
                found = _execute(
                    conn, statement, {"keys": keys, "before": moment, "batch": batch, **parameters}
                )
                removed += found.rowcount
                if found.rowcount < batch:
                    return removed

        for asset_key, bound in (forget_before or {}).items():
            parameters = {"key": asset_key.to_string(), "bound": bound}
            pruned.forgotten += drain(_FORGOTTEN_MATERIALIZATIONS, **parameters)
            pruned.forgotten += drain(_FORGOTTEN_EVALUATIONS, **parameters)
        pruned.materializations = drain(_SUPERSEDED_MATERIALIZATIONS)
        pruned.evaluations = drain(_SUPERSEDED_EVALUATIONS)
        after = 0
        while True:
            rows = _execute(
                conn, _OLD_RUNS, {"before": moment, "after": after, "batch": batch}
            ).fetchall()
            if not rows:
                break
            runs = [row[0] for row in rows]
            after = rows[-1][1]
            pruned.events += _execute(conn, _LOGS_OF_RUNS, {"runs": runs}).rowcount
            pruned.runs += _execute(conn, _EMPTY_RUNS, {"runs": runs}).rowcount
    return pruned


def _read(connection: Any, statement: str, parameters: Mapping[str, Any]) -> Any:
    """A query of ours on Dagster's tables (kept apart from `_execute`, the pruner's writes)."""
    from sqlalchemy import text

    return connection.execute(text(statement), parameters)


def _execute(connection: Any, statement: str, parameters: Mapping[str, Any]) -> Any:
    """One statement of the pruner, one transaction (Dagster's PostgreSQL engines autocommit)."""
    return _read(connection, statement, parameters)


def tag_run(instance: DagsterInstance, run_id: str, tags: Mapping[str, str]) -> None:
    """Add tags to a run from inside it (the run's own process and host, for the sensor)."""
    instance.add_run_tags(run_id, tags)
