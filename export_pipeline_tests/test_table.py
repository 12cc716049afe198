"""The Iceberg table of closed days (`engine/table.py`, `defs/iceberg.py`): the day files
registered where they are, one commit per date, late days replaced atomically, maintenance, and
the docs' readers, on real PostgreSQL (the catalog), SeaweedFS and InfluxDB."""

import dataclasses
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance

from export_pipeline.defs.iceberg import iceberg_maintenance
from export_pipeline.defs.resources import (
    ExportBucketResource,
    IcebergResource,
    build_resources,
)
from export_pipeline.engine.reconciliation import footer_bytes, parquet_footer
from export_pipeline.engine.schema import SCHEMA
from export_pipeline.engine.table import (
    DATE_PROPERTY,
    RECONCILIATION_PROPERTY,
    REPLACED_FOLDER,
    STEP_PROPERTY,
    TABLE_FOLDER,
    DailyTable,
    DateChanges,
    HeldFile,
    date_changes,
    open_catalog,
    replaced_key,
    sql_catalog_uri,
    table_root,
    to_retire,
)
from export_pipeline.settings import Settings, SettingsError
from export_pipeline_tests.conftest import (
    POSTGRES,
    TEST_DATABASE,
    TEST_IDENTITY,
    Stack,
    docs_example,
)
from export_pipeline_tests.services import SeaweedServer, wait_until
from export_pipeline_tests.test_daily import (
    DAY,
    LATER,
    MIDNIGHT,
    NEXT,
    hz,
    key_of,
    new_device,
    registered,
    resources,
    write_days,
)

URI = "s3://b/telemetry_daily/device_id={}/date=2026-02-07/data.parquet"


@pytest.fixture
def stack(stack: Stack) -> Stack:
    """The stack with the table on, as deployed by default."""
    return dataclasses.replace(stack, iceberg=True)


# --- Pure: what a date's commit does ------------------------------------------------------------


def test_a_device_day_held_as_the_folder_has_it_is_not_committed_again() -> None:
    held = {"a": [HeldFile(URI.format("a"), 100)]}
    assert date_changes(held, {"a": (URI.format("a"), 100)}) == DateChanges()


def test_a_new_device_day_is_added_and_a_changed_one_replaced() -> None:
    held = {"a": [HeldFile(URI.format("a"), 100)]}
    changes = date_changes(held, {"a": (URI.format("a"), 120), "b": (URI.format("b"), 50)})
    assert changes == DateChanges(
        removed=(URI.format("a"),), added=(URI.format("a"), URI.format("b"))
    )


def test_a_replaced_copy_leaves_the_table_in_the_commit_that_adds_the_new_file() -> None:
    copy = "s3://b/telemetry_daily/_iceberg/replaced/device_id=a/date=2026-02-07/x-data.parquet"
    changes = date_changes({"a": [HeldFile(copy, 100)]}, {"a": (URI.format("a"), 90)})
    assert changes == DateChanges(removed=(copy,), added=(URI.format("a"),))


def test_a_device_day_without_a_file_leaves_the_table_and_other_devices_are_left_alone() -> None:
    held = {"a": [HeldFile(URI.format("a"), 100)], "b": [HeldFile(URI.format("b"), 100)]}
    assert date_changes(held, {"a": None}) == DateChanges(removed=(URI.format("a"),))


def test_only_files_held_under_their_folder_key_are_retired_before_a_rewrite() -> None:
    copy = "s3://b/telemetry_daily/_iceberg/replaced/device_id=b/date=2026-02-07/x-data.parquet"
    held = {"a": [HeldFile(URI.format("a"), 100)], "b": [HeldFile(copy, 100)]}
    wanted = {"a": URI.format("a"), "b": URI.format("b"), "c": URI.format("c")}
    assert to_retire(held, wanted) == [URI.format("a")]


def test_a_replaced_copy_gets_a_new_name_under_the_tables_folder_each_time() -> None:
    key = "telemetry_daily/device_id=a/date=2026-02-07/data.parquet"
    root = table_root("telemetry_daily", ("telemetry", "daily"))
    assert root == f"telemetry_daily/{TABLE_FOLDER}/telemetry/daily"
    first = replaced_key(root, key, "telemetry_daily")
    assert first != replaced_key(root, key, "telemetry_daily")
    assert first.startswith(f"{root}/{REPLACED_FOLDER}/device_id=a/date=2026-02-07/")
    assert first.endswith("-data.parquet")


def test_bad_iceberg_settings_are_refused_by_name_without_showing_a_password() -> None:
    env = {
        "S3_BUCKET": "b",
        "ICEBERG_ENABLED": "maybe",
        "ICEBERG_NAMESPACE": "1st",
        "ICEBERG_TABLE": "daily-files",
        "ICEBERG_CATALOG_URI": "mysql://reader:hunter2@db/catalog",
        "ICEBERG_SNAPSHOT_RETENTION_DAYS": "0",
    }
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(env)
    message = str(raised.value)
    for name in (
        "ICEBERG_ENABLED='maybe'",
        "ICEBERG_NAMESPACE='1st'",
        "ICEBERG_TABLE='daily-files'",
        "ICEBERG_CATALOG_URI (scheme 'mysql')",
        "ICEBERG_SNAPSHOT_RETENTION_DAYS=0",
    ):
        assert name in message
    assert "hunter2" not in message


# --- On the real stack -------------------------------------------------------------------------


def daily_table(stack: Stack, **env: str) -> DailyTable:
    settings = stack.settings(**env)
    found = build_resources(settings)
    # The secrets as a run resolves their EnvVars.
    iceberg = IcebergResource.from_settings(settings.iceberg, settings.checkpoint).model_copy(
        update={
            "catalog_uri": settings.iceberg.catalog_uri,
            "catalog_token": settings.iceberg.catalog_token,
            "db_password": settings.checkpoint.password,
        }
    )
    table = iceberg.daily_table(found["s3"])  # type: ignore[arg-type]
    assert table is not None
    table.load(None)
    return table


def data_files(table: DailyTable, snapshot_id: int | None = None) -> dict[str, int]:
    """Each data file of a snapshot (default: the current one), with its row count."""
    scan = table.table.scan(snapshot_id=snapshot_id)
    return {task.file.file_path: task.file.record_count for task in scan.plan_files()}


def rows_of(table: DailyTable, device: str, snapshot_id: int | None = None) -> int:
    scan = table.table.scan(row_filter=f"device_id == '{device}'", snapshot_id=snapshot_id)
    return scan.to_arrow().num_rows


def summary_of(snapshot: Any) -> dict[str, str]:
    """A snapshot's summary properties (operation included)."""
    assert snapshot is not None and snapshot.summary is not None
    return {**snapshot.summary.additional_properties, "operation": snapshot.summary.operation}


def folder_keys(stack: Stack) -> list[str]:
    return sorted(stack.objects())


def two_days_of(stack: Stack, devices: list[str], *, rows: int = 600) -> None:
    """`rows` points on DAY and half as many on NEXT, for each device."""
    for device in devices:
        stack.write(hz(device, MIDNIGHT + timedelta(hours=6), rows))
        stack.write(hz(device, MIDNIGHT + timedelta(days=1, hours=6), rows // 2))


def test_a_dates_day_files_enter_the_table_where_they_are_in_one_commit_per_date(
    stack: Stack, instance: DagsterInstance
) -> None:
    devices = registered(instance, new_device(), new_device())
    two_days_of(stack, devices)
    result = write_days(stack, instance, devices, DAY, NEXT)
    assert result.success
    table = daily_table(stack)
    # No copy: the table's files are the folder's day files, nothing else.
    bucket = f"s3://{stack.bucket}/"
    assert sorted(data_files(table)) == [bucket + key for key in folder_keys(stack)]
    assert sorted(data_files(table).values()) == [300, 300, 600, 600]
    commits = [summary_of(s) for s in table.table.snapshots()]
    assert [c[DATE_PROPERTY] for c in commits] == ["2026-02-07", "2026-02-08"]
    assert {c[RECONCILIATION_PROPERTY] for c in commits} == {
        "2 of 2 device-days reconciled, 0 failed"
    }
    for device in devices:
        assert rows_of(table, device) == 900
    # Partition values come from the files: a device's day is found without reading others.
    plan = table.table.scan(
        row_filter=f"device_id == '{devices[0]}' and timestamp >= '2026-02-08T00:00:00+00:00'"
    ).plan_files()
    assert [task.file.file_path for task in plan] == [bucket + key_of(devices[0], NEXT)]
    # The UI: each date's materialization names its commit and the current snapshot.
    current = table.table.current_snapshot()
    assert current is not None
    metadata = result.asset_materializations_for_node("telemetry_daily")[0].metadata
    assert metadata["iceberg_snapshot_id"].value == str(current.snapshot_id)
    assert str(metadata["iceberg_commit"].value).startswith("snapshot ")


def test_a_repeated_commit_changes_nothing(stack: Stack, instance: DagsterInstance) -> None:
    (device,) = registered(instance, new_device())
    stack.write(hz(device, MIDNIGHT + timedelta(hours=1), 60))
    assert write_days(stack, instance, [device], DAY).success
    table = daily_table(stack)
    before = [s.snapshot_id for s in table.table.snapshots()]
    report = table.commit_date(DAY, [device])
    assert report.snapshot_id is None and (report.added, report.removed) == (0, 0)
    assert [s.snapshot_id for s in daily_table(stack).table.snapshots()] == before


def test_a_runs_commit_takes_its_files_as_it_found_them_and_looks_up_only_the_others(
    stack: Stack, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    devices = registered(instance, new_device(), new_device())
    for device in devices:
        stack.write(hz(device, MIDNIGHT + timedelta(hours=2), 120))
    # Written with the table off: the date is in the folder, not yet in the table.
    assert write_days(stack, instance, devices, DAY, ICEBERG_ENABLED="false").success
    table = daily_table(stack)
    table.load(SCHEMA)
    known, other = (key_of(device, DAY) for device in devices)
    folder = known.rsplit("/", 1)[0] + "/"
    footer = footer_bytes(parquet_footer(table.store, known))
    seen = {known: (table.store.list_keys(folder)[known], footer)}
    listed: list[str] = []
    list_keys = table.store.list_keys

    def listing(prefix: str) -> dict[str, int]:
        listed.append(prefix)
        return list_keys(prefix)

    monkeypatch.setattr(table.store, "list_keys", listing)
    report = table.commit_date(DAY, devices, seen=seen)
    assert (report.added, report.removed) == (2, 0)
    assert listed == [other.rsplit("/", 1)[0] + "/"]  # the file the run did not see
    assert data_files(table) == {f"s3://{stack.bucket}/{key}": 120 for key in (known, other)}
    sizes = {
        task.file.file_path: task.file.file_size_in_bytes
        for task in table.table.scan().plan_files()
    }
    assert sizes == {
        f"s3://{stack.bucket}/{key}": len(body) for key, body in stack.objects().items()
    }


def test_a_late_day_replaces_its_file_atomically_and_the_previous_snapshot_keeps_the_old_rows(
    stack: Stack, instance: DagsterInstance
) -> None:
    late, steady = registered(instance, new_device(), new_device())
    for device in (late, steady):
        stack.write(hz(device, MIDNIGHT + timedelta(hours=6), 600))
    assert write_days(stack, instance, [late, steady], DAY).success
    first = daily_table(stack).table.current_snapshot()
    assert first is not None
    stack.write(hz(late, MIDNIGHT + timedelta(hours=9), 120))  # late data for one device
    assert write_days(stack, instance, [late, steady], DAY).success

    table = daily_table(stack)
    history = table.table.snapshots()
    assert [summary_of(s).get(STEP_PROPERTY) for s in history] == [None, "retire", None]
    retire, current = history[1], history[2]
    assert rows_of(table, late) == 720 and rows_of(table, steady) == 600
    # The snapshot before the new file reads the old rows, from the copy.
    assert rows_of(table, late, retire.snapshot_id) == 600
    # No snapshot since the copy holds a device-day twice, or lacks it.
    for snapshot in (retire, current):
        assert sorted(data_files(table, snapshot.snapshot_id).values()) in (
            [600, 600],
            [600, 720],
        )
    # The folder keeps one file per device-day, the new one; the old ones are under _iceberg/.
    assert folder_keys(stack) == sorted([key_of(late, DAY), key_of(steady, DAY)])
    copies = [k for k in stack.objects(table=True) if f"/{REPLACED_FOLDER}/" in k]
    assert len(copies) == 2  # the date was written again whole: both devices' files
    assert not set(data_files(table)) & {f"s3://{stack.bucket}/{k}" for k in copies}


def test_duckdb_polars_and_pyiceberg_read_the_table_as_the_docs_show(
    stack: Stack, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    from duckdb_extensions import import_extension  # httpfs from PyPI: no download at run time

    import_extension("httpfs")
    devices = registered(instance, "dev-0001", new_device())
    two_days_of(stack, devices)
    assert write_days(stack, instance, devices, DAY, NEXT).success
    catalog_uri = sql_catalog_uri(
        host=str(POSTGRES["host"]),
        port=int(str(POSTGRES["port"])),
        name=TEST_DATABASE,
        user=str(POSTGRES["user"]),
        password="",
    )
    for variable, value in {**stack.env(), "ICEBERG_CATALOG_URI": catalog_uri}.items():
        monkeypatch.setenv(variable, value)
    namespace: dict[str, Any] = {}
    for name in ("duckdb", "polars", "iceberg_pyiceberg", "iceberg_duckdb", "iceberg_polars"):
        exec(compile(docs_example(name), f"docs ({name})", "exec"), namespace)
    # pyiceberg: dev-0001's week, 02-01 to 02-07 (02-08 is past it).
    assert namespace["week"].num_rows == 600
    assert set(namespace["week"].column("device_id").to_pylist()) == {"dev-0001"}
    # DuckDB through iceberg_scan, and Polars: dev-0001's days.
    assert namespace["daily"] == [("dev-0001", DAY, 600), ("dev-0001", NEXT, 300)]
    assert namespace["by_day"]["day"].to_list() == [DAY, NEXT]
    assert namespace["by_day"]["samples"].to_list() == [600, 300]


def test_maintenance_commits_a_date_a_run_left_out_then_expires_and_sweeps(
    stack: Stack, instance: DagsterInstance
) -> None:
    devices = registered(instance, new_device(), new_device())
    two_days_of(stack, devices)
    assert write_days(stack, instance, devices, DAY).success
    assert write_days(stack, instance, devices, DAY).success  # a rewrite: two copies aside
    # 02-08's files are written but never committed (as if the run died before its commit).
    assert write_days(stack, instance, devices, NEXT, ICEBERG_ENABLED="false").success
    assert len(data_files(daily_table(stack))) == 2

    env = {"DEVICE_IDS": ",".join(devices)}
    result = iceberg_maintenance.execute_in_process(
        resources=resources(stack, LATER, **env), instance=instance
    )
    assert result.success
    table = daily_table(stack)
    bucket = f"s3://{stack.bucket}/"
    assert sorted(data_files(table)) == [bucket + key for key in folder_keys(stack)]
    assert summary_of(table.table.current_snapshot())[DATE_PROPERTY] == "2026-02-08"

    # A week on: every snapshot but the current expires, and what none references goes.
    stray = f"{table.root}/metadata/stray.avro"
    stack.s3.put_object(Bucket=stack.bucket, Key=stray, Body=b"from a commit that failed")
    report = table.maintain(now=datetime.now(UTC) + timedelta(days=8), retention=timedelta(days=7))
    table = daily_table(stack)
    assert report.expired_snapshots == 3 and len(table.table.snapshots()) == 1
    left = {bucket + key for key in stack.objects(table=True)}
    assert left == table.referenced(table.table)  # only what the table needs
    assert not [key for key in left if f"/{REPLACED_FOLDER}/" in key]
    assert stray not in {key for key in stack.objects(table=True)}
    for device in devices:
        assert rows_of(table, device) == 900
    assert sorted(folder_keys(stack)) == sorted(
        key_of(device, day) for device in devices for day in (DAY, NEXT)
    )


def test_maintenance_keeps_an_unreferenced_file_young_enough_to_be_a_commit_in_flight(
    stack: Stack, instance: DagsterInstance
) -> None:
    (device,) = registered(instance, new_device())
    stack.write(hz(device, MIDNIGHT + timedelta(hours=6), 60))
    assert write_days(stack, instance, [device], DAY).success
    table = daily_table(stack)
    in_flight = f"{table.root}/metadata/snap-in-flight.avro"
    stack.s3.put_object(Bucket=stack.bucket, Key=in_flight, Body=b"a manifest list being written")
    report = table.maintain(now=datetime.now(UTC), retention=timedelta(days=7))
    assert report.kept_young == 1 and in_flight in stack.objects(table=True)
    report = table.maintain(now=datetime.now(UTC) + timedelta(hours=2), retention=timedelta(days=7))
    assert in_flight not in stack.objects(table=True)


def table_in_process(env: dict[str, str]) -> DailyTable:
    """The table as a run in a process of its own opens it (a spawned worker's)."""
    os.environ.update(env)
    found = build_resources(Settings.from_env(env))
    table = found["iceberg"].daily_table(found["s3"])  # type: ignore[attr-defined]
    table.load(None)
    return table


def commit_in_process(env: dict[str, str], day: str, devices: list[str], start: Any) -> None:
    """Commit one date from a process of its own, once `start` is set."""
    table = table_in_process(env)
    start.wait(30)
    report = table.commit_date(date.fromisoformat(day), devices)
    assert report.snapshot_id is not None


def rewrite_in_process(env: dict[str, str], day: str, devices: list[str], start: Any) -> None:
    """Write these devices' day files of `day` again, as a run does: retire, write, commit."""
    from export_pipeline.engine.layout import day_file_key

    table = table_in_process(env)
    start.wait(30)
    when = date.fromisoformat(day)
    assert table.retire(when, devices) == len(devices)
    for device in devices:
        key = day_file_key(table.daily_prefix, device_id=device, day=when)
        table.store.put(table.store.read_tail(key, 1 << 30), key=key, fmt="parquet")
    assert table.commit_date(when, devices).removed == len(devices)


def test_processes_committing_at_once_all_land(stack: Stack, instance: DagsterInstance) -> None:
    """Three processes at once, as the sensor's runs of two dates: one commits a new date, two
    write the other date again for different devices (a retire and an overwrite each)."""
    devices = registered(instance, *(new_device() for _ in range(4)))
    two_days_of(stack, devices, rows=60)
    assert write_days(stack, instance, devices, DAY, NEXT, ICEBERG_ENABLED="false").success
    table = daily_table(stack)
    table.load(SCHEMA)
    table.commit_date(DAY, devices)  # DAY is in the table; NEXT is not yet
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    env = stack.env()
    jobs = [
        (commit_in_process, NEXT, devices),
        (rewrite_in_process, DAY, devices[:2]),
        (rewrite_in_process, DAY, devices[2:]),
    ]
    workers = [
        context.Process(target=target, args=(env, day.isoformat(), some, start))
        for target, day, some in jobs
    ]
    for worker in workers:
        worker.start()
    time.sleep(4)  # all have loaded the same table
    start.set()
    for worker in workers:
        worker.join(120)
    assert [worker.exitcode for worker in workers] == [0, 0, 0]
    table = daily_table(stack)
    bucket = f"s3://{stack.bucket}/"
    assert sorted(data_files(table)) == [bucket + key for key in folder_keys(stack)]
    assert sorted(data_files(table).values()) == [30] * 4 + [60] * 4
    dates = [summary_of(s)[DATE_PROPERTY] for s in table.table.snapshots()]
    assert dates.count("2026-02-08") == 1 and dates.count("2026-02-07") == 5  # + 2 retires


def test_maintenance_killed_half_way_deletes_nothing_the_table_needs(
    stack: Stack, instance: DagsterInstance
) -> None:
    devices = registered(instance, new_device(), new_device())
    for device in devices:
        stack.write(hz(device, MIDNIGHT + timedelta(hours=6), 60))
    for _ in range(2):  # a rewrite: copies aside, manifests and metadata to sweep
        assert write_days(stack, instance, devices, DAY).success
    bucket = f"s3://{stack.bucket}/"
    before = len(stack.objects(table=True))
    # The process dies at a chosen point (os._exit: no cleanup, as a kill): after the expiry's
    # commit, before the listing; and after half the unreferenced files are deleted.
    script = textwrap.dedent(
        """
        import os, sys
        from datetime import UTC, datetime, timedelta
        from export_pipeline.defs.resources import build_resources
        from export_pipeline.engine.store import ObjectStore
        from export_pipeline.settings import Settings

        crash_at = sys.argv[1]
        if crash_at == "listing":
            ObjectStore.list_all = lambda self, prefix: os._exit(9)
        else:
            delete = ObjectStore.delete
            def half_then_die(self, keys):
                delete(self, keys[: len(keys) // 2])
                os._exit(9)
            ObjectStore.delete = half_then_die
        found = build_resources(Settings.from_env())
        table = found["iceberg"].daily_table(found["s3"])
        table.load(None)
        table.maintain(now=datetime.now(UTC) + timedelta(days=8), retention=timedelta(days=7))
        """
    )
    for crash_at in ("listing", "deleting"):
        crashed = subprocess.run(
            [sys.executable, "-c", script, crash_at],
            env={**os.environ, **stack.env()},
            timeout=120,
        )
        assert crashed.returncode == 9
        table = daily_table(stack)
        present = {bucket + key for key in stack.objects(table=True)}
        assert table.referenced(table.table) <= present  # everything the table needs is there
        for device in devices:
            assert rows_of(table, device) == 60
    assert len(present) < before  # the second crash had deleted some
    table.maintain(now=datetime.now(UTC) + timedelta(days=8), retention=timedelta(days=7))
    table = daily_table(stack)
    present = {bucket + key for key in stack.objects(table=True)}
    assert present == table.referenced(table.table)


def test_a_table_of_another_bucket_is_refused_by_name(
    stack: Stack, instance: DagsterInstance
) -> None:
    (device,) = registered(instance, new_device())
    stack.write(hz(device, MIDNIGHT + timedelta(hours=6), 60))
    assert write_days(stack, instance, [device], DAY).success
    other = f"{stack.bucket}x"
    stack.s3.create_bucket(Bucket=other)
    result = write_days(
        stack, instance, [device], DAY, S3_BUCKET=other, ICEBERG_NAMESPACE=stack.database
    )
    assert not result.success
    message = str(result.failure_data_for_node("telemetry_daily").error)
    assert (
        "ICEBERG_NAMESPACE" in message
        and f"s3://{stack.bucket}/telemetry_daily/_iceberg" in message
    )


def test_an_unreachable_catalog_fails_the_run_naming_it_without_its_password(
    stack: Stack, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    (device,) = registered(instance, new_device())
    stack.write(hz(device, MIDNIGHT + timedelta(hours=6), 60))
    monkeypatch.setenv("CHECKPOINT_DB_PASSWORD", "hunter2")  # the EnvVar the resource resolves
    result = write_days(
        stack, instance, [device], DAY, CHECKPOINT_DB_PORT="1", CHECKPOINT_DB_PASSWORD="hunter2"
    )
    assert not result.success
    message = str(result.failure_data_for_node("telemetry_daily").error)
    assert f"postgresql+psycopg2://postgres@127.0.0.1:1/{TEST_DATABASE}" in message
    assert "CHECKPOINT_DB_" in message and "hunter2" not in message


def test_a_downstream_asset_reads_the_dates_rows_through_the_table(
    stack: Stack, instance: DagsterInstance
) -> None:
    """`day_table`: the table's current snapshot, for a device x date downstream partition (a
    device id with a quote is a value, not part of an expression) and for a whole date."""
    from dagster import AssetIn, MaterializeResult, asset, materialize

    from export_pipeline.defs.partitions import closed_dates, device_days
    from export_pipeline_tests.conftest import telemetry_daily

    quoted = f"o'brien-{new_device()}"
    devices = registered(instance, quoted, new_device())
    for n, device in enumerate(devices):
        stack.write(hz(device, MIDNIGHT + timedelta(hours=6), 100 + n))
    assert write_days(stack, instance, devices, DAY).success
    settings = stack.settings()

    @asset(
        partitions_def=device_days(settings.export),
        ins={"telemetry_daily": AssetIn(key="telemetry_daily", input_manager_key="day_table")},
    )
    def per_device(telemetry_daily: Any) -> MaterializeResult:
        return MaterializeResult(metadata={"rows": telemetry_daily.num_rows})

    @asset(
        partitions_def=closed_dates(settings.export),
        ins={"telemetry_daily": AssetIn(key="telemetry_daily", input_manager_key="day_table")},
    )
    def per_date(telemetry_daily: Any) -> MaterializeResult:
        ids = sorted(set(telemetry_daily.column("device_id").to_pylist()))
        return MaterializeResult(metadata={"rows": telemetry_daily.num_rows, "ids": ids})

    source = telemetry_daily.to_source_assets()
    one = materialize(
        [*source, per_device],
        partition_key=f"{DAY}|{quoted}",
        resources=resources(stack),
        instance=instance,
    )
    assert one.asset_materializations_for_node("per_device")[0].metadata["rows"].value == 100
    whole = materialize(
        [*source, per_date],
        partition_key=DAY.isoformat(),
        resources=resources(stack),
        instance=instance,
    )
    metadata = whole.asset_materializations_for_node("per_date")[0].metadata
    assert metadata["rows"].value == 201 and metadata["ids"].value == sorted(devices)


def test_the_sensors_day_files_run_commits_the_closed_date(
    stack: Stack, instance: DagsterInstance
) -> None:
    """Continuous operation: the day-files run the sensor requests commits its date, and the
    date's materialization names the commit."""
    from export_pipeline_tests.test_daily import CLOSE, materialization_of
    from export_pipeline_tests.test_sensors import Fleet, days_of, every_10s

    device = new_device()
    stack.write(every_10s(device, CLOSE - timedelta(hours=1), CLOSE + timedelta(minutes=5)))
    fleet = Fleet(stack, instance, DEVICE_IDS=device)
    fleet.tick_and_run(CLOSE - timedelta(minutes=30))
    fleet.tick_and_run(CLOSE + timedelta(seconds=30))  # the day's slices reconcile
    assert days_of(fleet.tick_and_run(CLOSE + timedelta(seconds=90))) == [(device, "2026-02-07")]
    table = daily_table(stack)
    assert data_files(table) == {f"s3://{stack.bucket}/{key_of(device, DAY)}": 360}
    current = table.table.current_snapshot()
    assert summary_of(current)[DATE_PROPERTY] == "2026-02-07"
    recorded = materialization_of(instance, DAY)
    assert recorded["iceberg_snapshot_id"] == str(current.snapshot_id)  # type: ignore[union-attr]


def test_a_rest_catalog_holds_the_table_in_its_own_bucket_and_the_day_files_stay_put(
    stack: Stack, instance: DagsterInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SeaweedFS's Iceberg REST catalog (as AWS S3 Tables: SigV4-signed requests, each table in
    the catalog's bucket): the table's metadata is the catalog's, its data files the folder's day
    files, and a day written again is replaced all the same."""
    server = SeaweedServer(tmp_path / "seaweedfs", [TEST_IDENTITY], table_bucket="lake")
    server.start()
    try:
        rest = dataclasses.replace(stack, s3_url=server.url)
        rest.s3.create_bucket(Bucket=rest.bucket)
        env = {
            "ICEBERG_CATALOG_URI": server.iceberg_url,
            "ICEBERG_WAREHOUSE": "lake",
            "ICEBERG_CATALOG_SIGNING_NAME": "s3tables",
        }
        monkeypatch.setenv("ICEBERG_CATALOG_URI", server.iceberg_url)  # a secret: an EnvVar
        settings = rest.settings(**env)
        io = ExportBucketResource.from_settings(settings.s3).iceberg_io()
        catalog = open_catalog(server.iceberg_url, io=io, warehouse="lake", signing_name="s3tables")

        def table_bucket_made() -> bool:  # weed makes it once S3 is up, a moment later
            try:
                catalog.list_namespaces()
            except Exception:
                return False
            return True

        wait_until(table_bucket_made, "SeaweedFS's table bucket")
        late, steady = registered(instance, new_device(), new_device())
        for device in (late, steady):
            rest.write(hz(device, MIDNIGHT + timedelta(hours=6), 100))
        assert write_days(rest, instance, [late, steady], DAY, now=LATER, **env).success
        rest.write(hz(late, MIDNIGHT + timedelta(hours=9), 20))
        assert write_days(rest, instance, [late, steady], DAY, now=LATER, **env).success

        table = daily_table(rest, **env)
        assert table.table.location().startswith("s3://lake/")
        bucket = f"s3://{rest.bucket}/"
        assert sorted(data_files(table)) == [bucket + key for key in folder_keys(rest)]
        assert rows_of(table, late) == 120 and rows_of(table, steady) == 100
        retire = table.table.snapshots()[-2]
        assert summary_of(retire).get(STEP_PROPERTY) == "retire"
        assert rows_of(table, late, retire.snapshot_id) == 100
        # The copies of the replaced files are in the pipeline's bucket, and the sweep finds
        # them there once no snapshot needs them.
        copies = [k for k in rest.objects(table=True) if f"/{REPLACED_FOLDER}/" in k]
        assert len(copies) == 2
        table.maintain(now=datetime.now(UTC) + timedelta(days=8), retention=timedelta(days=7))
        assert not [k for k in rest.objects(table=True) if f"/{REPLACED_FOLDER}/" in k]
        assert rows_of(daily_table(rest, **env), late) == 120
    finally:
        server.stop()
