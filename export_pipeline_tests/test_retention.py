"""The ledger stays flat: retention removes what nothing needs, on the real PostgreSQL storage,
and the exports, the sensor, the sweep and the UI's view of every partition carry on as before."""

import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg2
import pytest
from dagster import (
    AssetCheckKey,
    AssetMaterialization,
    AssetRecordsFilter,
    DagsterEventType,
    DagsterInstance,
)

import export_pipeline.record.storage
from export_pipeline.defs.maintenance import retain_ledger
from export_pipeline.defs.resources import ClockResource, build_resources
from export_pipeline.record.keys import (
    DAILY_RECONCILIATION,
    RECONCILIATION,
    TELEMETRY_DAILY,
    TELEMETRY_EXPORT,
    DeviceDay,
    partition_keys,
)
from export_pipeline.record.ledger import progress_of
from export_pipeline.record.storage import (
    device_day_dates,
    latest_check_evaluations,
    prune_ledger,
    write_values,
)
from export_pipeline.record.versions import RECORD_VERSION, VERSION_KEY, record_version
from export_pipeline_tests.audit import assert_reconciled
from export_pipeline_tests.conftest import TEST_DATABASE, Stack
from export_pipeline_tests.services import POSTGRES
from export_pipeline_tests.test_sensors import (
    Fleet,
    device_marked_at,
    every_10s,
    new_device,
    work_of,
)

CLOSE = datetime(2026, 2, 8, tzinfo=UTC)  # 02-07 ends
DAYS = [date(2026, 2, 7), date(2026, 2, 8)]
KEYS = [TELEMETRY_EXPORT, TELEMETRY_DAILY]


def everything() -> datetime:
    """Retention's `before` for events stored up to now (they carry the wall clock's time)."""
    return datetime.now(UTC) + timedelta(minutes=1)


def query(sql: str, *args: Any) -> list[tuple[Any, ...]]:
    connection = psycopg2.connect(dbname=TEST_DATABASE, **POSTGRES)
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, args)
            return list(cursor.fetchall())
    finally:
        connection.close()


def ledger_state(instance: DagsterInstance, devices: list[str]) -> dict[str, Any]:
    """What the UI, the sensor and the sweep read of these devices' partitions."""
    keys = set(partition_keys(devices, DAYS))
    dates = {day.isoformat() for day in DAYS}  # telemetry_daily's partitions

    def latest(check: AssetCheckKey) -> list[tuple[str, bool | None, int]]:
        found = latest_check_evaluations(instance, check, list(keys))
        return sorted((c.partition_key, c.passed, c.storage_id) for c in found)

    return {
        "materializations": {
            asset_key: dict(
                instance.get_latest_storage_id_by_partition(
                    asset_key, DagsterEventType.ASSET_MATERIALIZATION, wanted
                )
            )
            for asset_key, wanted in ((TELEMETRY_EXPORT, keys), (TELEMETRY_DAILY, dates))
        },
        "evaluations": latest(RECONCILIATION),
        "day_file_evaluations": latest(DAILY_RECONCILIATION),
        "progress": progress_of(instance, devices),
    }


def consistent() -> None:
    """No tag row without its event, no evaluation row without its event."""
    assert query(
        "SELECT count(*) FROM asset_event_tags t WHERE t.event_id IS NOT NULL AND NOT EXISTS "
        "(SELECT 1 FROM event_logs e WHERE e.id = t.event_id)"
    ) == [(0,)]
    assert (
        query(
            "SELECT c.asset_key, c.check_name, c.partition, c.run_id, c.execution_status, "
            "c.evaluation_event_storage_id FROM asset_check_executions c "
            "WHERE c.evaluation_event_storage_id IS NOT NULL AND NOT EXISTS "
            "(SELECT 1 FROM event_logs e WHERE e.id = c.evaluation_event_storage_id)"
        )
        == []
    )


@pytest.fixture
def history(stack: Stack, instance: DagsterInstance) -> Iterator[tuple[Fleet, list[str]]]:
    """Two devices exported over a day's close: slices every minute, the close reconciled, the
    day files written; many runs, many superseded events."""
    # Hourly records at :30, outside every minute exported here (a random id puts one in the
    # minutes after the close about one time in twenty, and the resumed tick then records it).
    devices = [device_marked_at(30), device_marked_at(30)]
    for device in devices:
        stack.write(every_10s(device, CLOSE - timedelta(minutes=20), CLOSE + timedelta(minutes=4)))
    fleet = Fleet(stack, instance, DEVICE_IDS=",".join(devices), LOOKBACK_HOURS="24")
    for minute in range(-15, 4):
        fleet.tick_and_run(CLOSE + timedelta(minutes=minute, seconds=30))
    yield fleet, devices


def count_runs(devices: list[str]) -> int:
    return len(query("SELECT run_id FROM runs WHERE run_body LIKE %s", f"%{devices[0]}%"))


def test_retention_keeps_the_latest_event_of_every_partition_and_every_checkpoint(
    instance: DagsterInstance, history: tuple[Fleet, list[str]]
) -> None:
    fleet, devices = history
    before = ledger_state(instance, devices)
    runs = count_runs(devices)
    pruned = prune_ledger(instance, asset_keys=KEYS, before=everything())

    assert pruned.materializations > 0 and pruned.events > 0 and pruned.runs > 0
    assert ledger_state(instance, devices) == before  # latest events, checkpoints: all there
    assert count_runs(devices) < runs  # runs left with nothing are gone
    consistent()
    # The sensor resumes exactly, and the slices and day files are still whole.
    resumed = fleet.tick_and_run(CLOSE + timedelta(minutes=4, seconds=30))
    assert {(item[0], item[2], item[3]) for item in work_of(resumed)} == {
        (device, 180, 240) for device in devices
    }
    for device in devices:
        assert assert_reconciled(fleet.stack, device, DAYS, settings=fleet.settings) == 144
    assert prune_ledger(instance, asset_keys=KEYS, before=everything()).materializations == 0


def test_the_sweep_still_finds_late_data_after_retention(
    instance: DagsterInstance, history: tuple[Fleet, list[str]]
) -> None:
    fleet, devices = history
    prune_ledger(instance, asset_keys=KEYS, before=everything())
    later = CLOSE + timedelta(days=1)
    assert fleet.sweep(later)  # nothing changed: nothing flagged
    assert {
        c.passed
        for c in latest_check_evaluations(instance, RECONCILIATION, partition_keys(devices, DAYS))
    } == {True}
    fleet.stack.write(
        every_10s(devices[0], CLOSE - timedelta(hours=2), CLOSE - timedelta(hours=1), 60)
    )
    assert fleet.sweep(later + timedelta(minutes=1))
    result = fleet.tick_and_run(later + timedelta(minutes=2))
    assert (devices[0], "2026-02-07", 0, 86_400) in work_of(result)
    assert (
        assert_reconciled(fleet.stack, devices[0], [DAYS[0]], settings=fleet.settings) == 120 + 60
    )


def test_a_retention_pass_killed_half_way_leaves_a_consistent_ledger_that_the_next_finishes(
    instance: DagsterInstance, history: tuple[Fleet, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, devices = history
    before = ledger_state(instance, devices)
    real, statements = export_pipeline.record.storage._execute, []

    def dies_after_three(connection: Any, statement: str, parameters: Any) -> Any:
        statements.append(statement)
        if len(statements) > 3:
            raise KeyboardInterrupt("killed")  # as a SIGTERM or a kill between statements
        return real(
            connection,
            statement,
            {**parameters, "batch": 2} if "batch" in parameters else parameters,
        )

    monkeypatch.setattr(export_pipeline.record.storage, "_execute", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        prune_ledger(instance, asset_keys=KEYS, before=everything())
    consistent()
    assert ledger_state(instance, devices) == before
    monkeypatch.setattr(export_pipeline.record.storage, "_execute", real)
    finished = prune_ledger(instance, asset_keys=KEYS, before=everything())
    assert finished.materializations > 0
    consistent()
    assert ledger_state(instance, devices) == before
    assert prune_ledger(instance, asset_keys=KEYS, before=everything()).materializations == 0


def test_retention_during_exports_never_removes_a_checkpoint_or_a_latest_event(
    stack: Stack, instance: DagsterInstance
) -> None:
    devices = [new_device() for _ in range(4)]
    for device in devices:
        stack.write(every_10s(device, CLOSE - timedelta(hours=1), CLOSE + timedelta(minutes=14)))
    fleet = Fleet(stack, instance, DEVICE_IDS=",".join(devices), LOOKBACK_HOURS="2")
    done = threading.Event()
    passes: list[Any] = []

    def prune_meanwhile() -> None:
        # All but the last seconds: the harness reads each run's record once it has finished.
        while not done.is_set():
            before = datetime.now(UTC) - timedelta(seconds=3)
            passes.append(prune_ledger(instance, asset_keys=KEYS, before=before))

    pruner = threading.Thread(target=prune_meanwhile)
    pruner.start()
    try:
        for minute in range(-3, 15):
            fleet.tick_and_run(CLOSE + timedelta(minutes=minute, seconds=30))
    finally:
        done.set()
        pruner.join()
    assert len(passes) > 1 and sum(found.materializations for found in passes) > 0
    expected = CLOSE + timedelta(minutes=14)
    assert {d: p.through for d, p in progress_of(instance, devices).items()} == dict.fromkeys(
        devices, expected
    )
    latest = instance.get_latest_storage_id_by_partition(
        TELEMETRY_EXPORT, DagsterEventType.ASSET_MATERIALIZATION, set(partition_keys(devices, DAYS))
    )
    assert len(latest) == 2 * len(devices)  # every partition is still materialized
    consistent()
    for device in devices:
        assert assert_reconciled(stack, device, DAYS, settings=fleet.settings) == 360 + 84


def test_the_ledger_retention_schedule_runs_daily_by_default(stack: Stack) -> None:
    from export_pipeline.defs.schedules import build_ledger_retention

    schedule = build_ledger_retention(stack.settings())
    assert schedule.cron_schedule == "40 3 * * *"
    assert schedule.execution_timezone == "UTC"
    assert schedule.default_status.value == "RUNNING"
    assert stack.settings(EXPORT_LEDGER_RETENTION_DAYS="2").export.ledger_retention_days == 2


def test_a_failed_run_leaves_no_check_planned(stack: Stack, instance: DagsterInstance) -> None:
    """The assets declare no partitioned check (a run used to plan one per partition, left
    PLANNED when it failed); a device-day's reconciliation is recorded when it is evaluated."""
    from export_pipeline_tests.test_daily import registered, write_days

    (device,) = registered(instance, new_device())
    stack.write(every_10s(device, CLOSE - timedelta(hours=1), CLOSE))
    # The run fails before it reconciles anything: InfluxDB has no such bucket.
    partition = f"{DAYS[0]}|{device}"
    assert not write_days(stack, instance, [device], DAYS[0], INFLUXDB_BUCKET="missing").success
    rows = query(
        "SELECT execution_status FROM asset_check_executions WHERE partition = %s", partition
    )
    assert rows == []
    assert latest_check_evaluations(instance, DAILY_RECONCILIATION, [partition]) == []
    assert write_days(stack, instance, [device], DAYS[0]).success
    assert [
        c.passed for c in latest_check_evaluations(instance, DAILY_RECONCILIATION, [partition])
    ] == [True]


def test_retention_forgets_the_slices_device_days_out_of_their_window_and_nothing_else(
    instance: DagsterInstance, history: tuple[Fleet, list[str]]
) -> None:
    """With EXPORT_PARTITION_DAYS, a device-day of telemetry_export older than its partitions
    loses its events and reconciliations; its day file's, the newer days' and every device's
    progress stay, and the sensor resumes exactly."""
    fleet, devices = history
    before = ledger_state(instance, devices)
    old, kept = (partition_keys(devices, [day]) for day in DAYS)
    # The job on 2026-02-17 with a 10-day window: its partitions start on 02-08.
    settings = fleet.stack.settings(EXPORT_PARTITION_DAYS="10")
    resources = {
        **build_resources(settings),
        "clock": ClockResource(frozen_at="2026-02-17T12:00:00+00:00"),
    }
    assert retain_ledger.execute_in_process(instance=instance, resources=resources).success
    after = ledger_state(instance, devices)
    assert after["materializations"][TELEMETRY_EXPORT] == {
        key: storage_id
        for key, storage_id in before["materializations"][TELEMETRY_EXPORT].items()
        if key in kept
    }
    assert before["materializations"][TELEMETRY_EXPORT].keys() > set(kept)  # 02-07 was there
    assert after["materializations"][TELEMETRY_DAILY] == before["materializations"][TELEMETRY_DAILY]
    assert after["day_file_evaluations"] == before["day_file_evaluations"]
    assert [e for e in after["evaluations"] if e[0] in old] == []
    assert [e for e in after["evaluations"] if e[0] in kept] == [
        e for e in before["evaluations"] if e[0] in kept
    ]
    assert latest_check_evaluations(instance, DAILY_RECONCILIATION, old)  # the day files' stay
    assert after["progress"] == before["progress"]
    consistent()
    resumed = fleet.tick_and_run(CLOSE + timedelta(minutes=4, seconds=30))
    assert {(item[0], item[2], item[3]) for item in work_of(resumed)} == {
        (device, 180, 240) for device in devices
    }


def test_a_version_1_record_has_its_day_files_device_days_recorded_as_dates_then_forgotten(
    stack: Stack, instance: DagsterInstance
) -> None:
    """telemetry_daily's partitions were device-days before they were dates: a version 1 record
    holds a materialization per device-day, which no partition shows any more (each device-day's
    state is its reconciliation, which stays). The migration to version 2 (here run by the
    retention, as by the sensor's first tick) records each of their dates that has no
    materialization yet, from the reconciliations, then removes them whatever their age; a date
    already recorded keeps its own."""
    from export_pipeline_tests.test_daily import write_days

    days = [date(2026, 3, 10), date(2026, 3, 11)]  # dates no other test records
    device = new_device()
    stack.write(
        every_10s(
            device, datetime(2026, 3, 10, 9, tzinfo=UTC), datetime(2026, 3, 10, 10, tzinfo=UTC)
        )
    )
    # days[1] was exported with its partition a device-day; days[0] too, and since as a date.
    assert write_days(
        stack, instance, [device], days[0], now=datetime(2026, 3, 13, tzinfo=UTC)
    ).success
    legacy = [DeviceDay(device, day).key for day in days]
    for partition in legacy:
        instance.report_runless_asset_event(
            AssetMaterialization(TELEMETRY_DAILY, partition=partition, metadata={"rows": 1})
        )
    wanted = {*legacy, *(day.isoformat() for day in days)}
    write_values(instance, {VERSION_KEY: "1"})

    def materialized() -> dict[str, int]:
        return dict(
            instance.get_latest_storage_id_by_partition(
                TELEMETRY_DAILY, DagsterEventType.ASSET_MATERIALIZATION, wanted
            )
        )

    before = materialized()
    assert set(before) == {*legacy, days[0].isoformat()}
    resources = {
        **build_resources(stack.settings(DEVICE_IDS=device)),
        "clock": ClockResource(frozen_at="2000-01-01T00:00:00+00:00"),  # nothing superseded
    }
    assert retain_ledger.execute_in_process(instance=instance, resources=resources).success
    after = materialized()
    assert set(after) == {day.isoformat() for day in days}
    assert after[days[0].isoformat()] == before[days[0].isoformat()]
    assert device_day_dates(instance, TELEMETRY_DAILY) == []
    assert record_version(instance) == RECORD_VERSION
    (record,) = instance.fetch_materializations(
        AssetRecordsFilter(TELEMETRY_DAILY, storage_ids=[after[days[1].isoformat()]]), limit=1
    ).records
    assert record.asset_materialization is not None
    metadata = record.asset_materialization.metadata
    assert (metadata["devices"].value, metadata["device_days_missing"].value) == (1, 1)
    consistent()
