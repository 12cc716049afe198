"""`telemetry_daily`: one Parquet object per closed device-day, a date of the fleet's per
partition, on the real stack."""

import io
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from dagster import (
    AssetIn,
    AssetRecordsFilter,
    DagsterEventType,
    DagsterInstance,
    MaterializeResult,
    RunsFilter,
    asset,
    materialize,
)

from export_pipeline.defs import continuous
from export_pipeline.defs.io_managers import with_io_managers
from export_pipeline.defs.partitions import closed_dates
from export_pipeline.defs.resources import ClockResource, build_resources
from export_pipeline.engine.files import DAY_FILE_ROWS_PER_GROUP
from export_pipeline.engine.schema import SCHEMA
from export_pipeline.record.events import DayFileRecord, day_files_metadata
from export_pipeline.record.keys import (
    DAILY_RECONCILIATION,
    TELEMETRY_DAILY,
    TELEMETRY_EXPORT,
    DeviceDay,
)
from export_pipeline.settings import ExportSettings
from export_pipeline_tests.audit import assert_day_file_reconciled, assert_reconciled
from export_pipeline_tests.backfills import submit_backfill, wait_for_backfill
from export_pipeline_tests.conftest import (
    Daemons,
    Stack,
    device_days,
    docs_example,
    telemetry_daily,
)
from export_pipeline_tests.services import TcpProxy, point
from export_pipeline_tests.test_sensors import Fleet, days_of, every_10s, work_of

DAY, NEXT = date(2026, 2, 7), date(2026, 2, 8)
MIDNIGHT = datetime(2026, 2, 7, tzinfo=UTC)
LATER = datetime(2026, 2, 10, tzinfo=UTC)  # both days closed
NS = 1_000_000_000


def ns(moment: datetime) -> int:
    return int(moment.timestamp()) * NS


def new_device() -> str:
    return f"dev-{uuid.uuid4().hex[:8]}"


def hz(device: str, start: datetime, seconds: int, **fields: float) -> list[str]:
    """1 Hz points from `start`, with varying values."""
    return [
        point(
            ns(start) + i * NS,
            device,
            {
                "voltage": 230.0 + i % 7 / 4,
                "current": 1.0 + i % 3 / 8,
                "power": 200.0 + i % 11,
                **fields,
            },
        )
        for i in range(seconds)
    ]


def resources(stack: Stack, now: datetime = LATER, **env: str) -> dict[str, Any]:
    found = build_resources(stack.settings(**env))
    return with_io_managers({**found, "clock": ClockResource(frozen_at=now.isoformat())})


def key_of(device: str, day: date) -> str:
    return f"telemetry_daily/device_id={device}/date={day.isoformat()}/data.parquet"


def write_days(
    stack: Stack,
    instance: DagsterInstance,
    devices: Sequence[str],
    *days: date,
    now: datetime = LATER,
    **env: str,
) -> Any:
    """One run of telemetry_daily over the dates `days` (a range: first to last), for `devices`
    (DEVICE_IDS; every registered device where an id holds a comma)."""
    partitions = [day.isoformat() for day in days]
    tags = (
        {
            "dagster/asset_partition_range_start": partitions[0],
            "dagster/asset_partition_range_end": partitions[-1],
        }
        if len(partitions) > 1
        else {}
    )
    if not any("," in device for device in devices):
        env = {"DEVICE_IDS": ",".join(devices), **env}
    return materialize(
        [telemetry_daily],
        partition_key=partitions[0] if len(partitions) == 1 else None,
        tags=tags,
        resources=resources(stack, now, **env),
        instance=instance,
        raise_on_error=False,
    )


def materialization_of(instance: DagsterInstance, day: date) -> dict[str, Any]:
    """The metadata values of the latest materialization of a date of telemetry_daily."""
    latest = instance.get_latest_storage_id_by_partition(
        TELEMETRY_DAILY, DagsterEventType.ASSET_MATERIALIZATION, {day.isoformat()}
    )
    (record,) = instance.fetch_materializations(
        AssetRecordsFilter(TELEMETRY_DAILY, storage_ids=[latest[day.isoformat()]]), limit=1
    ).records
    assert record.asset_materialization is not None
    return {name: value.value for name, value in record.asset_materialization.metadata.items()}


def registered(instance: DagsterInstance, *devices: str) -> list[str]:
    instance.add_dynamic_partitions("devices", list(devices))
    return list(devices)


def test_a_dates_metadata_sums_up_its_fleets_day_files_and_names_what_it_lacks() -> None:
    """Pure: a date of telemetry_daily is the fleet's; its metadata counts each device-day's
    record of that date only, names the failed ones and the devices never written."""
    records = {
        DeviceDay("D1", DAY): DayFileRecord(True, 100, 1),
        DeviceDay("D2", DAY): DayFileRecord(True, 0, 0),  # no rows: no file
        DeviceDay("D3", DAY): DayFileRecord(False, None, None),  # late data, being rewritten
        DeviceDay("D1", NEXT): DayFileRecord(True, 7, 1),  # another date
    }
    found = day_files_metadata(DAY, ["D1", "D2", "D3", "D4"], records, "s3://b/glob")
    assert found["dagster/row_count"] == 100
    assert found["day_files"] == 1
    assert (found["devices"], found["device_days_reconciled"]) == (4, 2)
    assert (found["device_days_failed"], found["failed"].value) == (1, ["D3"])
    assert (found["device_days_missing"], found["missing"].value) == (1, ["D4"])


def test_a_closed_device_day_is_one_object_in_hive_layout_equal_to_influxdb(
    stack: Stack, instance: DagsterInstance
) -> None:
    (device,) = registered(instance, new_device())
    stack.write(hz(device, MIDNIGHT + timedelta(hours=9), 3600))
    stack.write(
        [
            point(
                ns(MIDNIGHT + timedelta(hours=23, minutes=59, seconds=59)),
                device,
                {"temperature": -3.0},
            )
        ]
    )
    result = write_days(stack, instance, [device], DAY, EXPORT_LAYOUT="seed")

    assert result.success
    assert list(stack.objects()) == [key_of(device, DAY)]  # hive, whatever EXPORT_LAYOUT says
    assert assert_day_file_reconciled(stack, device, [DAY], daily_prefix="telemetry_daily") == 3601
    event = instance.get_latest_materialization_event(TELEMETRY_DAILY)
    assert event is not None and event.asset_materialization is not None
    metadata = event.asset_materialization.metadata
    assert event.asset_materialization.partition == DAY.isoformat()  # the fleet's date
    assert metadata["dagster/row_count"].value == 3601
    assert metadata["day_files"].value == 1
    assert metadata["device_days_reconciled"].value == 1
    assert metadata["device_days_missing"].value == 0
    assert (
        metadata["dagster/uri"].value
        == f"s3://{stack.bucket}/telemetry_daily/device_id=*/date={DAY}/data.parquet"
    )
    (check,) = instance.event_log_storage.get_asset_check_partition_info(
        [DAILY_RECONCILIATION], partition_keys=[f"{DAY}|{device}"]
    )
    assert check.latest_execution_status.value == "SUCCEEDED"


def test_the_file_is_sorted_delta_and_dictionary_encoded_with_statistics_to_skip_by_time(
    stack: Stack, instance: DagsterInstance
) -> None:
    (device,) = registered(instance, new_device())
    stack.write(hz(device, MIDNIGHT + timedelta(hours=1), 7200))
    assert write_days(stack, instance, [device], DAY).success
    body = stack.objects()[key_of(device, DAY)]
    metadata = pq.ParquetFile(io.BytesIO(body)).metadata
    group = metadata.row_group(0)
    columns = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
    assert "DELTA_BINARY_PACKED" in columns["timestamp"].encodings
    for name in ("device_id", "voltage", "power_factor"):
        assert "RLE_DICTIONARY" in columns[name].encodings, name
    assert columns["voltage"].compression == "ZSTD"
    stats = columns["timestamp"].statistics
    assert stats.min == datetime(2026, 2, 7, 1, tzinfo=UTC)
    assert stats.max == datetime(2026, 2, 7, 2, 59, 59, tzinfo=UTC)
    assert group.sorting_columns == (pq.SortingColumn(0),)
    assert pq.read_table(io.BytesIO(body)).column("timestamp").to_pylist() == sorted(
        pq.read_table(io.BytesIO(body)).column("timestamp").to_pylist()
    )


def test_a_day_without_rows_has_no_object_and_a_rerun_writes_the_same_bytes(
    stack: Stack, instance: DagsterInstance
) -> None:
    busy, silent = registered(instance, new_device(), new_device())
    stack.write(hz(busy, MIDNIGHT, 600))
    assert write_days(stack, instance, [busy, silent], DAY).success
    first = stack.objects()
    assert list(first) == [key_of(busy, DAY)]
    assert materialization_of(instance, DAY)["device_days_reconciled"] == 2
    assert write_days(stack, instance, [busy], DAY).success
    assert stack.objects() == first
    assert assert_day_file_reconciled(stack, silent, [DAY], daily_prefix="telemetry_daily") == 0


def test_many_dates_of_many_devices_are_written_in_one_run(
    stack: Stack, instance: DagsterInstance
) -> None:
    devices = registered(instance, new_device(), new_device(), new_device())
    for device in devices:
        for day in (MIDNIGHT, MIDNIGHT + timedelta(days=1)):
            stack.write(hz(device, day + timedelta(hours=6), 120))
    before = len(instance.get_runs())
    result = write_days(stack, instance, devices, DAY, NEXT)
    assert result.success
    assert len(instance.get_runs()) == before + 1
    assert sorted(stack.objects()) == sorted(key_of(d, day) for d in devices for day in (DAY, NEXT))
    materialized = {m.partition for m in result.asset_materializations_for_node("telemetry_daily")}
    assert materialized == {DAY.isoformat(), NEXT.isoformat()}
    for date_ in (DAY, NEXT):
        metadata = materialization_of(instance, date_)
        assert (metadata["dagster/row_count"], metadata["day_files"]) == (360, 3)
    for device in devices:
        assert (
            assert_day_file_reconciled(stack, device, [DAY, NEXT], daily_prefix="telemetry_daily")
            == 240
        )


def test_a_day_not_yet_closed_is_refused_by_name(stack: Stack, instance: DagsterInstance) -> None:
    (device,) = registered(instance, new_device())
    stack.write(hz(device, MIDNIGHT, 60))
    result = write_days(stack, instance, [device], DAY, now=MIDNIGHT + timedelta(hours=23))
    assert not result.success
    error = result.get_step_failure_events()[0].step_failure_data.error
    assert error is not None and f"{DAY}: not closed yet" in error.to_string()
    assert stack.objects() == {}


def test_an_empty_answer_never_removes_a_day_file(stack: Stack, instance: DagsterInstance) -> None:
    (device,) = registered(instance, new_device())
    stack.write(hz(device, MIDNIGHT, 60) + hz("other", MIDNIGHT, 1))
    assert write_days(stack, instance, [device], DAY).success
    before = stack.objects()
    stack.influx.query(f"DELETE FROM telemetry WHERE device_id = '{device}'", stack.database)
    result = write_days(stack, instance, [device], DAY)
    assert not result.success
    error = result.get_step_failure_events()[0].step_failure_data.error
    assert error is not None
    assert f"InfluxDB returned no rows for {device} on {DAY}" in error.to_string()
    assert "it was kept" in error.to_string()
    assert stack.objects() == before


@pytest.fixture
def s3_link(stack: Stack) -> Iterator[TcpProxy]:
    proxy = TcpProxy(stack.s3_url)
    proxy.start()
    stack.s3_url = proxy.url
    yield proxy
    proxy.stop()


def test_a_write_cut_off_half_way_leaves_the_previous_object(
    stack: Stack, instance: DagsterInstance, s3_link: TcpProxy
) -> None:
    (device,) = registered(instance, new_device())
    stack.write(hz(device, MIDNIGHT, 3600))
    assert write_days(stack, instance, [device], DAY).success
    before = stack.objects()
    stack.write(hz(device, MIDNIGHT + timedelta(hours=2), 3600, temperature=20.0))
    s3_link.cut_after(len(before[key_of(device, DAY)]) // 2)  # the upload dies half-way
    assert not write_days(stack, instance, [device], DAY, EXPORT_RETRIES="0").success
    s3_link.restore()
    assert stack.objects() == before
    assert write_days(stack, instance, [device], DAY).success
    assert assert_day_file_reconciled(stack, device, [DAY], daily_prefix="telemetry_daily") == 7200


@pytest.mark.parametrize("device", ["x=y", "it's", 'say "hi"', "with space", "温度计", "c,d"])
def test_hostile_device_ids_get_a_day_folder_of_their_own(
    stack: Stack, instance: DagsterInstance, device: str
) -> None:
    registered(instance, device)
    stack.write(hz(device, MIDNIGHT, 30) + hz("other", MIDNIGHT, 30))
    assert write_days(stack, instance, [device], DAY).success
    assert list(stack.objects()) == [key_of(device, DAY)]
    assert assert_day_file_reconciled(stack, device, [DAY], daily_prefix="telemetry_daily") == 30


def test_a_big_day_is_written_in_row_groups_a_reader_can_skip(
    stack: Stack, instance: DagsterInstance
) -> None:
    (device,) = registered(instance, new_device())
    rows = DAY_FILE_ROWS_PER_GROUP + 1000
    step = 86_400 * NS // rows
    lines = [point(ns(MIDNIGHT) + i * step, device, {"power": float(i)}) for i in range(rows)]
    for start in range(0, rows, 50_000):
        stack.write(lines[start : start + 50_000])
    assert write_days(stack, instance, [device], DAY, EXPORT_BATCH_SIZE="20000").success
    metadata = pq.ParquetFile(io.BytesIO(stack.objects()[key_of(device, DAY)])).metadata
    assert metadata.num_rows == rows and metadata.num_row_groups == 2
    first, second = (metadata.row_group(i).column(0).statistics for i in range(2))
    assert first.max < second.min  # a reader skips a group by time


@asset(partitions_def=device_days, ins={"telemetry_daily": AssetIn(key=TELEMETRY_DAILY)})
def daily_rows(telemetry_daily: ds.Dataset) -> MaterializeResult:
    """A downstream asset that streams the device-day instead of holding it."""
    batches = telemetry_daily.to_batches(columns=["power"])
    return MaterializeResult(metadata={"rows": sum(batch.num_rows for batch in batches)})


def test_a_downstream_asset_can_take_the_device_day_as_a_dataset(
    stack: Stack, instance: DagsterInstance
) -> None:
    devices = registered(instance, new_device(), new_device())
    for device in devices:
        stack.write(hz(device, MIDNIGHT, 900))
    assert write_days(stack, instance, devices, DAY).success
    result = materialize(
        [*telemetry_daily.to_source_assets(), daily_rows],
        partition_key=f"{DAY}|{devices[0]}",  # the date's day file of this device only
        resources=resources(stack),
        instance=instance,
    )
    event = result.asset_materializations_for_node("daily_rows")[0]
    assert event.metadata["rows"].value == 900


@asset(
    partitions_def=closed_dates(ExportSettings()),
    ins={"telemetry_daily": AssetIn(key=TELEMETRY_DAILY)},
)
def fleet_rows(telemetry_daily: pa.Table) -> MaterializeResult:
    """A downstream asset of the fleet's day: every device's day file of the date."""
    devices = sorted(set(telemetry_daily.column("device_id").to_pylist()))
    return MaterializeResult(metadata={"rows": telemetry_daily.num_rows, "devices": devices})


def test_a_downstream_asset_partitioned_by_date_gets_every_devices_day_file(
    stack: Stack, instance: DagsterInstance
) -> None:
    devices = registered(instance, new_device(), new_device())
    for device in devices:
        stack.write(hz(device, MIDNIGHT, 300) + hz(device, MIDNIGHT + timedelta(days=1), 7))
    assert write_days(stack, instance, devices, DAY, NEXT).success
    result = materialize(
        [*telemetry_daily.to_source_assets(), fleet_rows],
        partition_key=DAY.isoformat(),
        resources=resources(stack),
        instance=instance,
    )
    metadata = result.asset_materializations_for_node("fleet_rows")[0].metadata
    assert metadata["rows"].value == 600  # both devices, not the next day
    assert metadata["devices"].value == sorted(devices)


def test_a_downstream_asset_of_a_day_without_rows_gets_an_empty_table(
    stack: Stack, instance: DagsterInstance, tmp_path: Path
) -> None:
    (device,) = registered(instance, new_device())
    stack.write(hz("another-device", MIDNIGHT, 10))

    @asset(partitions_def=device_days, ins={"telemetry_daily": AssetIn(key=TELEMETRY_DAILY)})
    def rows_of_day(telemetry_daily: pa.Table) -> MaterializeResult:
        return MaterializeResult(
            metadata={"rows": telemetry_daily.num_rows, "columns": telemetry_daily.column_names}
        )

    assert write_days(stack, instance, [device, "another-device"], DAY).success
    result = materialize(
        [*telemetry_daily.to_source_assets(), rows_of_day],
        partition_key=f"{DAY}|{device}",
        resources=resources(stack),
        instance=instance,
    )
    metadata = result.asset_materializations_for_node("rows_of_day")[0].metadata
    assert metadata["rows"].value == 0
    assert metadata["columns"].value == pa.Table.from_pylist([], schema=SCHEMA).column_names


# --- Continuous operation: the sensor requests day files as days close --------------------------

CLOSE = datetime(2026, 2, 8, tzinfo=UTC)  # 02-07 ends


def test_the_sensor_writes_a_day_file_once_the_days_slices_reconcile(
    stack: Stack, instance: DagsterInstance
) -> None:
    device = new_device()
    stack.write(every_10s(device, CLOSE - timedelta(hours=1), CLOSE + timedelta(minutes=5)))
    fleet = Fleet(stack, instance, DEVICE_IDS=device)
    assert days_of(fleet.tick_and_run(CLOSE - timedelta(minutes=30))) == []
    closing = fleet.tick_and_run(CLOSE + timedelta(seconds=30))  # slices reconciled here
    assert days_of(closing) == []
    after = fleet.tick_and_run(CLOSE + timedelta(seconds=90))
    assert days_of(after) == [(device, "2026-02-07")]
    assert assert_day_file_reconciled(stack, device, [DAY], daily_prefix="telemetry_daily") == 360
    date_ = materialization_of(instance, DAY)  # the date, summed up by the day-files run
    assert (date_["devices"], date_["day_files"], date_["dagster/row_count"]) == (1, 1, 360)
    assert days_of(fleet.tick_and_run(CLOSE + timedelta(seconds=150))) == []  # written once


def test_a_date_a_day_files_run_died_before_recording_is_recorded_by_the_next_tick(
    stack: Stack, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A day-files run records its dates as it ends; one killed after its files and their
    reconciliations were stored leaves its date unrecorded, and the sensor records it."""
    device = new_device()
    stack.write(every_10s(device, CLOSE - timedelta(hours=1), CLOSE))
    fleet = Fleet(stack, instance, DEVICE_IDS=device)
    fleet.tick_and_run(CLOSE + timedelta(seconds=30))

    def latest() -> int:
        found = instance.get_latest_storage_id_by_partition(
            TELEMETRY_DAILY, DagsterEventType.ASSET_MATERIALIZATION, {DAY.isoformat()}
        )
        return found.get(DAY.isoformat(), 0)

    before = latest()
    with monkeypatch.context() as patch:
        patch.setattr(continuous, "record_dates", lambda *args, **kwargs: None)  # the run dies here
        assert days_of(fleet.tick_and_run(CLOSE + timedelta(seconds=90))) == [(device, str(DAY))]
    assert assert_day_file_reconciled(stack, device, [DAY], daily_prefix="telemetry_daily") == 360
    assert latest() == before
    fleet.tick_and_run(CLOSE + timedelta(seconds=150))
    assert latest() > before
    date_ = materialization_of(instance, DAY)
    assert (date_["devices"], date_["day_files"], date_["dagster/row_count"]) == (1, 1, 360)
    recorded = latest()
    fleet.tick_and_run(CLOSE + timedelta(seconds=210))
    assert latest() == recorded  # once: nothing changed since


def test_late_data_found_by_the_sweep_rewrites_the_day_file(
    stack: Stack, instance: DagsterInstance
) -> None:
    device = new_device()
    stack.write(every_10s(device, CLOSE - timedelta(hours=1), CLOSE))
    fleet = Fleet(stack, instance, DEVICE_IDS=device)
    fleet.tick_and_run(CLOSE + timedelta(seconds=30))
    fleet.tick_and_run(CLOSE + timedelta(seconds=90))
    assert assert_day_file_reconciled(stack, device, [DAY], daily_prefix="telemetry_daily") == 360
    later = CLOSE + timedelta(days=2)
    stack.write(every_10s(device, CLOSE - timedelta(hours=3), CLOSE - timedelta(hours=2), 60))
    assert fleet.sweep(later)
    again = fleet.tick_and_run(later + timedelta(seconds=30))  # the slices, whole
    assert (device, "2026-02-07", 0, 86_400) in work_of(again)
    # 02-07 again, and 02-08 and 02-09, which closed meanwhile (without points, so no file).
    assert days_of(fleet.tick_and_run(later + timedelta(seconds=90))) == [
        (device, f"2026-02-0{day}") for day in (7, 8, 9)
    ]
    assert assert_day_file_reconciled(stack, device, [DAY], daily_prefix="telemetry_daily") == 420
    assert assert_reconciled(stack, device, [DAY], settings=fleet.settings) == 420


def test_retention_removes_the_slices_of_days_with_a_reconciled_day_file_only(
    stack: Stack, instance: DagsterInstance
) -> None:
    device = new_device()
    first, second = CLOSE, CLOSE + timedelta(days=1)
    for end in (first, second):
        stack.write(every_10s(device, end - timedelta(minutes=10), end))
    fleet = Fleet(stack, instance, DEVICE_IDS=device, EXPORT_SLICE_RETENTION_DAYS="1")
    fleet.tick_and_run(first - timedelta(minutes=30))
    fleet.tick_and_run(first + timedelta(seconds=30))
    fleet.tick_and_run(first + timedelta(seconds=90))  # 02-07's day file
    fleet.tick_and_run(second + timedelta(seconds=30))  # 02-08 closes; its day file never runs
    assert assert_day_file_reconciled(stack, device, [DAY], daily_prefix="telemetry_daily") == 60
    slices = {day: f"telemetry/device_id={device}/date={day:%Y/%m/%d}/" for day in (DAY, NEXT)}
    before = stack.objects()

    assert fleet.sweep(second + timedelta(days=2))  # both days are past retention now
    left = stack.objects()
    assert not [key for key in left if key.startswith(slices[DAY])]  # 02-07: in its day file
    assert [k for k in left if k.startswith(slices[NEXT])] == [
        k for k in before if k.startswith(slices[NEXT])
    ]  # 02-08 has no day file: its slices stay
    event = instance.get_latest_materialization_event(TELEMETRY_EXPORT)
    assert event is not None and event.asset_materialization is not None
    assert event.asset_materialization.partition == f"{DAY}|{device}"
    assert event.asset_materialization.metadata["slices_removed"].value == 10  # 10 minutes

    # Late data for 02-07 is caught by its day file's reconciliation: the day file is written
    # again, and the slices retention removed are not brought back.
    stack.write([point(ns(CLOSE - timedelta(hours=5)), device, {"power": 1.0})])
    later = second + timedelta(days=2, hours=1)
    assert fleet.sweep(later)
    result = fleet.tick_and_run(later + timedelta(seconds=30))
    assert (device, "2026-02-07", 0, 86_400) not in work_of(result)
    # 02-07 again, and 02-08 at last, its first tick since it closed.
    assert days_of(result) == [(device, "2026-02-07"), (device, "2026-02-08")]
    assert assert_day_file_reconciled(stack, device, [DAY], daily_prefix="telemetry_daily") == 61
    assert not [key for key in stack.objects() if key.startswith(slices[DAY])]


# --- The examples of docs/datasets.md, run as they are written ------------------------------------


def run_example(name: str, stack: Stack, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Run the docs' block `name` with this stack's settings in the environment."""
    for variable, value in stack.env().items():
        monkeypatch.setenv(variable, value)
    namespace: dict[str, Any] = {}
    exec(compile(docs_example(name), f"docs ({name})", "exec"), namespace)
    return namespace


def test_the_docs_daily_energy_asset_gets_each_device_day_as_arrow(
    stack: Stack, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    (device,) = registered(instance, new_device())
    stack.write(hz(device, MIDNIGHT + timedelta(hours=8), 3600))
    daily_energy = run_example("daily_energy", stack, monkeypatch)["daily_energy"]
    assert write_days(stack, instance, [device], DAY).success
    result = materialize(
        [*telemetry_daily.to_source_assets(), daily_energy],
        partition_key=f"{DAY}|{device}",
        resources=resources(stack),
        instance=instance,
    )
    kwh = result.asset_materializations_for_node("daily_energy")[0].metadata["kwh"].value
    # Each sample's power held one second, the last one not at all.
    assert kwh == pytest.approx(sum(200.0 + i % 11 for i in range(3599)) / 3.6e6)


def test_the_docs_duckdb_and_polars_queries_read_the_day_files_with_their_hive_columns(
    stack: Stack, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    from duckdb_extensions import import_extension  # httpfs from PyPI: no download at run time

    import_extension("httpfs")
    devices = registered(instance, "007", new_device())  # "007" stays a string, not a number
    for device in devices:
        stack.write(hz(device, MIDNIGHT, 600) + hz(device, MIDNIGHT + timedelta(days=1), 300))
    assert write_days(stack, instance, devices, DAY, NEXT).success
    expected = sorted(
        (device, day, rows) for device in devices for day, rows in ((DAY, 600), (NEXT, 300))
    )

    duck = run_example("duckdb", stack, monkeypatch)["days"]
    assert [(device, day, rows) for device, day, rows, _ in duck] == expected
    polars = run_example("polars", stack, monkeypatch)["days"]
    assert (
        list(zip(polars["device_id"], polars["date"], polars["samples"], strict=True)) == expected
    )
    assert [round(w, 6) for w in polars["avg_watts"]] == [round(row[3], 6) for row in duck]


def test_a_backfill_launched_as_from_the_ui_runs_a_date_of_the_fleet_a_run(
    stack: Stack, instance: DagsterInstance, daemons: Daemons
) -> None:
    devices = registered(instance, *(new_device() for _ in range(4)))
    for device in devices:
        for day in (MIDNIGHT, MIDNIGHT + timedelta(days=1)):
            stack.write(hz(device, day + timedelta(hours=3), 60))
    partitions = [DAY.isoformat(), NEXT.isoformat()]
    backfill = submit_backfill(instance, TELEMETRY_DAILY, partitions)
    daemons.start(DEVICE_IDS=",".join(devices))
    assert wait_for_backfill(instance, backfill, timeout=240) == "COMPLETED_SUCCESS"
    runs = instance.get_runs(RunsFilter(tags={"dagster/backfill": backfill}))
    assert len(runs) == 2  # a date of four devices a run
    for device in devices:
        assert (
            assert_day_file_reconciled(stack, device, [DAY, NEXT], daily_prefix="telemetry_daily")
            == 120
        )
    for date_ in (DAY, NEXT):
        assert materialization_of(instance, date_)["day_files"] == 4
