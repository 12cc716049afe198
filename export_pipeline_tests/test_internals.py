"""The behaviour we rely on from Dagster's non-public API (`export_pipeline/internals.py`), on
PostgreSQL storage: a Dagster upgrade that changes one of them fails here, by name."""

import time
import uuid
from datetime import UTC, datetime, timedelta

from dagster import (
    AssetCheckEvaluation,
    AssetKey,
    AssetMaterialization,
    Config,
    DagsterInstance,
    DagsterRunStatus,
    MetadataValue,
    OpExecutionContext,
    job,
    op,
)

from export_pipeline.internals import (
    check_evaluation_metadata,
    is_valid_cron,
    last_event_time,
    latest_check_evaluations,
    latest_storage_ids,
    mark_run_failed,
    pool_storage_connections,
)
from export_pipeline.jobs import register_devices
from export_pipeline.metadata import RECONCILIATION


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
