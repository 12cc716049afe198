"""The behaviour we rely on from Dagster's non-public API (`export_pipeline/record/storage.py`,
and `settings.is_valid_cron`), on PostgreSQL storage: a Dagster upgrade that changes one of them
fails here, by name."""

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from dagster import (
    AssetCheckEvaluation,
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    AssetRecordsFilter,
    Config,
    DagsterInstance,
    DagsterRunStatus,
    MaterializeResult,
    MetadataValue,
    OpExecutionContext,
    StaticPartitionsDefinition,
    asset,
    job,
    materialize,
    op,
)
from dagster._core.errors import DagsterInvariantViolationError
from sqlalchemy import text

from export_pipeline.defs.devices import register_devices
from export_pipeline.record.keys import RECONCILIATION
from export_pipeline.record.storage import (
    add_partition_metadata,
    batched_event_writes,
    check_evaluation_metadata,
    last_event_time,
    latest_check_evaluations,
    latest_storage_ids,
    mark_run_failed,
    pool_storage_connections,
)
from export_pipeline.settings import is_valid_cron


def unique_asset() -> AssetKey:
    return AssetKey(f"pinned_{uuid.uuid4().hex[:8]}")


def test_cron_strings_are_judged_as_dagster_schedules_judge_them() -> None:
    assert is_valid_cron("20 * * * *") and is_valid_cron("@hourly")
    assert not is_valid_cron("0 * * * * *") and not is_valid_cron("hourly")


def test_postgres_storages_can_pool_their_connections_and_still_write(
    instance: DagsterInstance,
) -> None:
    for storage in (instance.event_log_storage, instance.run_storage):
        assert callable(getattr(storage, "optimize_for_webserver", None))
    pool_storage_connections(instance)
    asset = unique_asset()
    instance.report_runless_asset_event(AssetMaterialization(asset_key=asset, partition="p"))
    assert latest_storage_ids(instance, asset, {"p"})
    # Once a storage: Dagster's optimize makes a new engine each call and leaves the old one's
    # connection open, which a process running run after run on one instance would pile up.
    storages: list[Any] = [instance.event_log_storage, instance.run_storage]
    engines = [storage._engine for storage in storages]
    pool_storage_connections(instance)
    assert [storage._engine for storage in storages] == engines


def test_the_latest_storage_id_of_each_partition_and_only_after_a_cursor(
    instance: DagsterInstance,
) -> None:
    asset = unique_asset()
    for partition in ("a", "b", "a"):
        instance.report_runless_asset_event(
            AssetMaterialization(asset_key=asset, partition=partition)
        )
    latest = latest_storage_ids(instance, asset, {"a", "b", "c"})
    assert set(latest) == {"a", "b"} and latest["a"] > latest["b"]
    assert latest_storage_ids(instance, asset, {"a", "b"}, after_storage_id=latest["b"]) == {
        "a": latest["a"]
    }
    # Read as a key range: a partition inside it but not asked for is not answered, and keys
    # compare by code point ("B" < "a" < "é"), whatever the database's collation.
    for partition in ("B", "é", "a|x"):
        instance.report_runless_asset_event(
            AssetMaterialization(asset_key=asset, partition=partition)
        )
    assert set(latest_storage_ids(instance, asset, {"B", "é", "c"})) == {"B", "é"}
    assert set(latest_storage_ids(instance, asset, {"a", "b"})) == {"a", "b"}


class Evaluations(Config):
    passed_by_partition: dict[str, bool]


@op
def evaluate(context: OpExecutionContext, config: Evaluations) -> None:
    """Logs a reconciliation evaluation per partition, as a continuous run does."""
    for partition, passed in config.passed_by_partition.items():
        context.log_event(
            AssetCheckEvaluation(  # type: ignore[arg-type]
                asset_key=RECONCILIATION.asset_key,
                check_name=RECONCILIATION.name,
                passed=passed,
                partition=partition,
                metadata={"influxdb_field_counts": MetadataValue.json({"voltage": 3})},
            )
        )


@job
def evaluations() -> None:
    evaluate()


def test_the_latest_evaluation_of_a_partitioned_check_per_partition(
    instance: DagsterInstance,
) -> None:
    suffix = uuid.uuid4().hex[:8]
    first, second, never = (f"2026-02-07|{name}-{suffix}" for name in ("d1", "d2", "d3"))
    for passed_by_partition in ({first: False, second: True}, {first: True}):
        config = {"ops": {"evaluate": {"config": {"passed_by_partition": passed_by_partition}}}}
        assert evaluations.execute_in_process(run_config=config, instance=instance).success
    checks = latest_check_evaluations(instance, RECONCILIATION, [first, second, never])
    latest = {check.partition_key: check for check in checks}
    assert set(latest) == {first, second}
    assert latest[first].passed is True and latest[second].passed is True
    assert latest[first].storage_id > latest[second].storage_id
    only = latest_check_evaluations(instance, RECONCILIATION, [first, never])
    assert [check.partition_key for check in only] == [first]  # `second` lies between them
    found = check_evaluation_metadata(instance, [latest[first].storage_id])
    assert found == {latest[first].storage_id: (first, {"influxdb_field_counts": {"voltage": 3}})}


def test_a_runs_last_event_time_and_marking_it_failed_from_outside(
    instance: DagsterInstance,
) -> None:
    run = instance.create_run_for_job(register_devices, status=DagsterRunStatus.STARTED)
    instance.report_engine_event("still alive", run)
    seen = last_event_time(instance, run.run_id)
    assert seen is not None and abs(seen - datetime.now(UTC)) < timedelta(seconds=30)
    time.sleep(0.01)
    mark_run_failed(instance, run, "presumed dead in a test")
    after = instance.get_run_by_id(run.run_id)
    assert after is not None and after.status == DagsterRunStatus.FAILURE
    last = instance.get_records_for_run(run.run_id, limit=1, ascending=False).records[0]
    assert "presumed dead in a test" in str(last.event_log_entry.message)
    assert last_event_time(instance, str(uuid.uuid4())) is None


def test_per_partition_metadata_and_one_insert_for_a_many_partition_output(
    instance: DagsterInstance,
) -> None:
    key, partitions = unique_asset(), StaticPartitionsDefinition(["a", "b", "c"])

    @asset(key=key, partitions_def=partitions)
    def pinned(context: AssetExecutionContext) -> Iterator[MaterializeResult]:
        with pytest.raises(DagsterInvariantViolationError, match="not targeted"):
            add_partition_metadata(context, key, {"z": {"n": 0}})
        add_partition_metadata(context, key, {"a": {"n": 1}, "c": {"n": 3}})
        add_partition_metadata(context, key, {"b": {"n": 2}, "c": {"m": 4}})
        with batched_event_writes():
            yield MaterializeResult()

    range_tags = {
        "dagster/asset_partition_range_start": "a",
        "dagster/asset_partition_range_end": "c",
    }
    assert materialize([pinned], instance=instance, tags=range_tags).success
    found = {}
    for partition in ("a", "b", "c"):
        only = AssetRecordsFilter(asset_key=key, asset_partitions=[partition])
        (record,) = instance.fetch_materializations(only, limit=2).records
        materialization = record.asset_materialization
        assert materialization is not None
        found[partition] = {k: v.value for k, v in materialization.metadata.items()}
    assert found == {"a": {"n": 1}, "b": {"n": 2}, "c": {"n": 3, "m": 4}}
    # One INSERT: the three rows were written by one transaction.
    with instance.event_log_storage.index_connection() as connection:  # type: ignore[attr-defined]
        transactions = connection.execute(
            text(
                "SELECT count(DISTINCT xmin::text) FROM event_logs "
                "WHERE asset_key = :key AND dagster_event_type = 'ASSET_MATERIALIZATION'"
            ),
            {"key": key.to_string()},
        ).scalar()
    assert transactions == 1
