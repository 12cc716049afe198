"""Continuous export: sensor ticks driven by a frozen clock, runs executed on PostgreSQL storage,
objects read back from S3 and compared with InfluxDB."""

import os
import signal
import subprocess
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from dagster import (
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    RunsFilter,
    SensorResult,
    build_sensor_context,
    materialize,
)
from sqlalchemy import text

from export_pipeline.defs.continuous import export_day_files, export_due_slices
from export_pipeline.defs.maintenance import sweep_late_data
from export_pipeline.defs.resources import ClockResource, build_resources
from export_pipeline.defs.run_config import run_devices
from export_pipeline.defs.runs import HOST_TAG
from export_pipeline.defs.sensors import build_continuous_export
from export_pipeline.engine.influx import InfluxSource
from export_pipeline.engine.schema import SOURCE_SCHEMA
from export_pipeline.record.ledger import PROGRESS, checkpoints
from export_pipeline.record.storage import KVS_PREFIX, last_event_time
from export_pipeline_tests.audit import assert_reconciled
from export_pipeline_tests.conftest import CLI_CWD, Stack, telemetry_export
from export_pipeline_tests.services import InfluxServer, dagster_command, point

T0 = datetime(2026, 2, 7, 12, 0, tzinfo=UTC)
DAY = T0.date()
NS = 1_000_000_000
CONTINUOUS = {
    "EXPORT_INTERVAL_SECONDS": "60",
    "EXPORT_LATENESS_SECONDS": "30",
    "LOOKBACK_HOURS": "1",
    "EXPORT_RETRIES": "0",
}


def ns(moment: datetime) -> int:
    return int(moment.timestamp()) * NS


def every_10s(device: str, start: datetime, end: datetime, step: int = 10) -> list[str]:
    return [
        point(ns(start) + i * step * NS, device, {"voltage": 230.0 + i, "power": float(i)})
        for i in range(int((end - start).total_seconds()) // step)
    ]


class Fleet:
    """A sensor and its runs against one test's stack, ticking on a frozen clock."""

    def __init__(self, stack: Stack, instance: DagsterInstance, **env: str) -> None:
        self.stack, self.instance = stack, instance
        self.env = {**CONTINUOUS, **env}
        self.settings = stack.settings(**self.env)
        self.resources = build_resources(self.settings)
        self.sensor = build_continuous_export(self.settings)
        self.cursor: str | None = None

    def tick(self, now: datetime) -> SensorResult:
        """One evaluation, with the cursor the previous one left, as the daemon runs them."""
        resources = {**self.resources, "clock": ClockResource(frozen_at=now.isoformat())}
        with build_sensor_context(
            instance=self.instance, resources=resources, cursor=self.cursor
        ) as context:
            result = self.sensor(context)
        assert isinstance(result, SensorResult)
        self.cursor = result.cursor
        for request in result.dynamic_partitions_requests or []:
            self.instance.add_dynamic_partitions(
                request.partitions_def_name,
                list(request.partition_keys or []),
            )
        return result

    def run(self, result: SensorResult, now: datetime | None = None) -> list[bool]:
        """Execute the requested runs as the daemon would launch them (at `now`)."""
        resources = dict(self.resources)
        if now is not None:
            resources["clock"] = ClockResource(frozen_at=now.isoformat())
        outcomes = []
        for request in result.run_requests or []:
            jobs = {job.name: job for job in (export_due_slices, export_day_files)}
            job = jobs[request.job_name or export_due_slices.name]
            outcome = job.execute_in_process(
                run_config=request.run_config,
                instance=self.instance,
                resources=resources,
                tags=request.tags,
                raise_on_error=False,
            )
            outcomes.append(outcome.success)
        return outcomes

    def tick_and_run(self, now: datetime) -> SensorResult:
        result = self.tick(now)
        assert all(self.run(result, now))
        return result

    def outage_of_two_ticks(
        self, device: str, down: Callable[[], None], up: Callable[[], None]
    ) -> SensorResult:
        """A service down from 12:01 to 12:03: the two ticks meanwhile request runs that fail,
        and the device's checkpoint stays; the tick after it comes back is returned."""
        before = checkpoints(self.instance, [device])
        down()
        for second in (90, 150):
            assert self.run(self.tick(T0 + timedelta(seconds=second))) == [False]
            assert checkpoints(self.instance, [device]) == before
        up()
        return self.tick_and_run(T0 + timedelta(seconds=210))

    def sweep(self, now: datetime) -> bool:
        """One run of the late-data sweep, as its schedule launches it (at `now`)."""
        resources = {**self.resources, "clock": ClockResource(frozen_at=now.isoformat())}
        outcome = sweep_late_data.execute_in_process(
            instance=self.instance, resources=resources, raise_on_error=False
        )
        return outcome.success

    def exported(self, device: str, day: date = DAY) -> list[int]:
        """Timestamps (ns) of the device-day's rows in S3, in key order."""
        folder = f"telemetry/device_id={device}/date={day:%Y/%m/%d}/"
        keys = sorted(key for key in self.stack.objects() if key.startswith(folder))
        tables = [self.stack.table(key) for key in keys]
        if not tables:
            return []
        stamps = pa.concat_tables(tables).column("timestamp").cast(pa.int64()).to_pylist()
        return [stamp * 1000 for stamp in stamps]

    def in_influx(self, device: str, start: datetime, end: datetime) -> list[int]:
        source = InfluxSource(self.settings.influx)
        batches = list(source.read(device, start_ns=ns(start), end_ns=ns(end)))
        return pa.Table.from_batches(batches, schema=SOURCE_SCHEMA).column("time").to_pylist()


def work_of(result: SensorResult) -> list[tuple[str, str, int, int]]:
    """The slices the tick requested: (device, date, start, end)."""
    items = []
    for request in result.run_requests or []:
        if request.job_name == export_due_slices.name:
            for item in request.run_config["ops"]["export_slices"]["config"]["work"]:
                for device in item["devices"]:
                    items.append((device, item["date"], item["start"], item["end"]))
    return sorted(items)


def days_of(result: SensorResult) -> list[tuple[str, str]]:
    """The day files the tick requested: (device, date)."""
    return sorted(
        (device, item["date"])
        for request in result.run_requests or []
        if request.job_name == export_day_files.name
        for item in request.run_config["ops"]["export_days"]["config"]["work"]
        for device in item["devices"]
    )


def new_device() -> str:
    return f"dev-{uuid.uuid4().hex[:8]}"


def device_marked_at(minute: int) -> str:
    """A new device whose hourly progress materialization (see `worth_recording`) falls at
    `minute` past the hour with 60 s slices: a random id would put it anywhere, sometimes in the
    minutes a test exports."""
    while zlib.crc32((device := new_device()).encode()) % 60 != minute:
        pass
    return device


def test_each_tick_exports_exactly_the_slices_that_closed(
    stack: Stack, instance: DagsterInstance
) -> None:
    device = device_marked_at(30)  # its hourly record is at 12:30, after the ticks below
    stack.write(every_10s(device, T0 - timedelta(minutes=10), T0 + timedelta(minutes=5)))
    fleet = Fleet(stack, instance, DEVICE_IDS=device)

    first = fleet.tick_and_run(T0 + timedelta(seconds=31))
    assert work_of(first) == [(device, "2026-02-07", 39_600, 43_200)]  # an hour of lookback
    second = fleet.tick_and_run(T0 + timedelta(seconds=95))
    assert work_of(second) == [(device, "2026-02-07", 43_200, 43_260)]
    assert work_of(fleet.tick(T0 + timedelta(seconds=95))) == []  # nothing new is due yet
    third = fleet.tick_and_run(T0 + timedelta(seconds=215))
    assert work_of(third) == [(device, "2026-02-07", 43_260, 43_380)]

    exported = fleet.exported(device)
    assert exported == fleet.in_influx(device, T0 - timedelta(hours=1), T0 + timedelta(minutes=3))
    assert len(exported) == 78 and len(set(exported)) == 78
    through = checkpoints(instance, [device])
    assert through == {device: T0 + timedelta(minutes=3)}
    latest = instance.get_latest_materialization_event(telemetry_export.key)
    assert latest is not None and latest.asset_materialization is not None
    # The first export of the day is a materialization; the next ones of the hour are progress
    # only (see worth_recording), each tick's lag in the freshness check.
    assert latest.asset_materialization.metadata["export_lag_seconds"].value == 31.0


def test_a_runs_progress_is_stored_in_batches_not_a_statement_per_device(
    stack: Stack, instance: DagsterInstance
) -> None:
    """Progress is upserted with the first device to finish, then at most once a second: a
    statement per device costs a round trip each (seconds a tick at thousands of devices)."""
    devices = [new_device() for _ in range(30)]
    stack.write([p for d in devices for p in every_10s(d, T0 - timedelta(minutes=3), T0)])
    fleet = Fleet(stack, instance, DEVICE_IDS=",".join(devices))

    started = time.monotonic()
    fleet.tick_and_run(T0 + timedelta(seconds=31))
    elapsed = time.monotonic() - started

    assert checkpoints(instance, devices) == dict.fromkeys(devices, T0)
    keys = [KVS_PREFIX + PROGRESS + device for device in devices]
    with instance.run_storage.connect() as connection:  # type: ignore[attr-defined]
        statements = connection.execute(
            text("SELECT count(DISTINCT xmin::text) FROM kvs WHERE key = ANY(:keys)"),
            {"keys": keys},
        ).scalar()
    assert 1 <= statements <= 2 + elapsed  # rows upserted together share a transaction id


def test_a_device_that_appears_mid_stream_is_registered_and_exported(
    stack: Stack, instance: DagsterInstance
) -> None:
    first, late = new_device(), new_device()
    stack.write(every_10s(first, T0 - timedelta(minutes=5), T0 + timedelta(minutes=5)))
    fleet = Fleet(stack, instance, DEVICE_IDS="*")  # discover devices from InfluxDB

    result = fleet.tick_and_run(T0 + timedelta(seconds=31))
    assert {item[0] for item in work_of(result)} == {first}
    stack.write(every_10s(late, T0, T0 + timedelta(minutes=5)))
    result = fleet.tick_and_run(T0 + timedelta(seconds=91))
    assert {item[0] for item in work_of(result)} == {first, late}
    assert late in instance.get_dynamic_partitions("devices")
    assert fleet.exported(late) == fleet.in_influx(late, T0, T0 + timedelta(minutes=1))


def test_unsafe_discovered_device_ids_are_skipped_not_fatal(
    stack: Stack, instance: DagsterInstance
) -> None:
    good = new_device()
    stack.write(every_10s(good, T0, T0 + timedelta(minutes=1)))
    stack.write([point(ns(T0), "bad/id", {"voltage": 1.0}), point(ns(T0), "a..b", {"power": 1})])
    result = Fleet(stack, instance, DEVICE_IDS="").tick(T0 + timedelta(seconds=91))
    assert {item[0] for item in work_of(result)} == {good}


def test_slices_crossing_midnight_land_in_their_own_date(
    stack: Stack, instance: DagsterInstance
) -> None:
    device = new_device()
    midnight = datetime(2026, 2, 8, tzinfo=UTC)
    stack.write(every_10s(device, midnight - timedelta(minutes=3), midnight + timedelta(minutes=3)))
    fleet = Fleet(stack, instance, DEVICE_IDS=device)
    fleet.tick_and_run(midnight - timedelta(minutes=1, seconds=29))  # through 23:58
    result = fleet.tick_and_run(midnight + timedelta(minutes=1, seconds=30))
    assert work_of(result) == [
        (device, "2026-02-07", 86_280, 86_400),
        (device, "2026-02-08", 0, 60),
    ]
    assert fleet.exported(device, date(2026, 2, 8)) == fleet.in_influx(
        device, midnight, midnight + timedelta(minutes=1)
    )
    day_end = fleet.exported(device, date(2026, 2, 7))[-1]
    assert day_end == ns(midnight) - 10 * NS


def test_a_restart_after_an_hour_catches_up_each_slice_exactly_once(
    stack: Stack, instance: DagsterInstance
) -> None:
    device = new_device()
    stack.write(every_10s(device, T0 - timedelta(minutes=30), T0 + timedelta(hours=1, minutes=5)))
    fleet = Fleet(stack, instance, DEVICE_IDS=device)
    fleet.tick_and_run(T0 + timedelta(seconds=30))
    # The daemon is down for an hour; the first tick after it requests the whole gap, once.
    result = fleet.tick_and_run(T0 + timedelta(hours=1, seconds=30))
    assert work_of(result) == [(device, "2026-02-07", 43_200, 46_800)]
    exported = fleet.exported(device)
    assert exported == fleet.in_influx(device, T0 - timedelta(hours=1), T0 + timedelta(hours=1))
    assert max(Counter(exported).values()) == 1


def test_a_duplicated_run_leaves_no_duplicate_rows(stack: Stack, instance: DagsterInstance) -> None:
    device = new_device()
    stack.write(every_10s(device, T0 - timedelta(minutes=10), T0))
    fleet = Fleet(stack, instance, DEVICE_IDS=device)
    result = fleet.tick(T0 + timedelta(seconds=30))
    assert fleet.run(result) == [True]
    before = fleet.stack.objects()
    assert fleet.run(result) == [True]  # at-least-once delivery: the same run again
    assert fleet.stack.objects() == before
    assert assert_reconciled(stack, device, [DAY]) == 60


def test_a_late_point_within_the_lateness_allowance_lands_in_its_slice(
    stack: Stack, instance: DagsterInstance
) -> None:
    device = new_device()
    stack.write(every_10s(device, T0 - timedelta(minutes=1), T0 + timedelta(seconds=50)))
    fleet = Fleet(stack, instance, DEVICE_IDS=device)
    fleet.tick_and_run(T0 + timedelta(seconds=30))
    # 12:01:15: the slice [12:00, 12:01) has closed but is within the allowance (until
    # 12:01:30), and more than a tick (10 s) away from it: not asked for.
    assert work_of(fleet.tick(T0 + timedelta(seconds=75))) == []
    # 12:01:25: asked for a tick ahead, in a run that reads nothing before 12:01:30.
    result = fleet.tick(T0 + timedelta(seconds=85))
    assert work_of(result) == [(device, "2026-02-07", 43_200, 43_260)]
    assert not_before_of(result) == ["2026-02-07T12:01:30+00:00"]
    # The run starts at 12:01:27 and waits 3 s; a late point arrives while it waits.
    late = threading.Timer(
        0.5, stack.write, [[point(ns(T0) + 59 * NS, device, {"voltage": 999.0})]]
    )
    late.start()
    assert fleet.run(result, T0 + timedelta(seconds=87)) == [True]
    late.join()
    assert ns(T0) + 59 * NS in fleet.exported(device)


def not_before_of(result: SensorResult) -> list[str]:
    """When each requested run of slices starts reading, if it was asked for ahead."""
    return [
        request.run_config["ops"]["export_slices"]["config"].get("not_before", "")
        for request in result.run_requests or []
        if request.job_name == export_due_slices.name
    ]


def test_a_device_with_a_run_in_flight_is_not_requested_again(
    stack: Stack, instance: DagsterInstance
) -> None:
    device = new_device()
    stack.write(every_10s(device, T0 - timedelta(minutes=5), T0 + timedelta(minutes=5)))
    fleet = Fleet(stack, instance, DEVICE_IDS=device)
    result = fleet.tick(T0 + timedelta(seconds=31))
    request = result.run_requests[0]  # type: ignore[index]
    queued = instance.create_run_for_job(
        export_due_slices, run_config=request.run_config, status=DagsterRunStatus.NOT_STARTED
    )
    assert work_of(fleet.tick(T0 + timedelta(seconds=91))) == []
    instance.report_run_canceled(queued)
    assert work_of(fleet.tick(T0 + timedelta(seconds=91)))[0][0] == device


def test_todays_partition_exports_closed_slices_and_the_sensor_continues_from_there(
    stack: Stack, instance: DagsterInstance
) -> None:
    device = new_device()
    stack.write(every_10s(device, T0 - timedelta(minutes=5), T0 + timedelta(minutes=5)))
    fleet = Fleet(stack, instance, DEVICE_IDS=device)
    instance.add_dynamic_partitions("devices", [device])
    now = T0 + timedelta(minutes=2, seconds=40)  # 12:02:40: slices through 12:02 are closed
    result = materialize(
        [telemetry_export],
        partition_key=f"2026-02-07|{device}",
        resources={**fleet.resources, "clock": ClockResource(frozen_at=now.isoformat())},
        instance=instance,
    )
    assert result.success
    assert fleet.exported(device) == fleet.in_influx(
        device, T0 - timedelta(minutes=5), T0 + timedelta(minutes=2)
    )
    assert work_of(fleet.tick(now + timedelta(minutes=1))) == [
        (device, "2026-02-07", 43_320, 43_380)
    ]


@pytest.fixture
def private_influx(tmp_path: Path) -> Iterator[InfluxServer]:
    """An InfluxDB of this test's own, so stopping it disturbs no other test."""
    server = InfluxServer(tmp_path)
    server.start()
    yield server
    server.stop()


def test_influxdb_down_for_two_ticks_then_every_row_is_exported_once(
    stack: Stack, instance: DagsterInstance, private_influx: InfluxServer
) -> None:
    device = new_device()
    stack.influx = private_influx
    private_influx.create_database(stack.database)
    stack.write(every_10s(device, T0 - timedelta(minutes=2), T0 + timedelta(minutes=3)))
    fleet = Fleet(stack, instance, DEVICE_IDS=device)
    fleet.tick_and_run(T0 + timedelta(seconds=30))
    result = fleet.outage_of_two_ticks(device, private_influx.stop, private_influx.start)
    assert work_of(result) == [(device, "2026-02-07", 43_200, 43_380)]
    assert assert_reconciled(stack, device, [DAY]) == 30


def some_exported(fleet: Fleet, devices: list[str]) -> bool:
    return bool(checkpoints(fleet.instance, devices))


def some_uploaded_but_not_recorded(fleet: Fleet, devices: list[str]) -> bool:
    """A device has objects in S3 and no checkpoint yet: its uploads are under way. (S3 is
    listed first: a checkpoint recorded after the listing would otherwise pass for none.)"""
    listing = fleet.stack.s3.list_objects_v2(Bucket=fleet.stack.bucket).get("Contents", [])
    done = checkpoints(fleet.instance, devices)
    folders = {item["Key"].split("/")[1] for item in listing}
    return any(f"device_id={device}" in folders for device in set(devices) - set(done))


def start_run_and_signal_it_midway(
    fleet: Fleet,
    devices: list[str],
    dagster_home: Path,
    tmp_path: Path,
    signum: int,
    when: Callable[[Fleet, list[str]], bool] = some_exported,
) -> subprocess.Popen[bytes]:
    """Launch a real `dagster job execute` of the tick's run, then signal it once `when` holds
    (by default: it has exported part, not all, of its devices)."""
    request = fleet.tick(T0 + timedelta(seconds=30)).run_requests[0]  # type: ignore[index]
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(request.run_config))
    env = {**os.environ, **fleet.stack.env(**fleet.env), "DAGSTER_HOME": str(dagster_home)}
    process = subprocess.Popen(
        [
            *dagster_command("dagster", "job", "execute"),
            "-j",
            "export_due_slices",
            "-c",
            str(config),
        ],
        env=env,
        cwd=CLI_CWD,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not when(fleet, devices):
        time.sleep(0.02)
    process.send_signal(signum)
    return process


# One device at a time, so a signal finds a run midway; a dead run on this host is noticed by its
# process, not its silence, so the silence allowed is long enough for any busy machine.
SLOW_RUN = {"EXPORT_CONCURRENCY": "1", "EXPORT_STALE_RUN_SECONDS": "20"}
# A run stores progress at most once a second, so the device before the one under way may have
# its objects and no checkpoint yet: the kill is asked for as soon as any device is in that
# state, and five devices leave the run work to be cut off in (with three, a CI run on a busy
# machine saw the run finish between the look and the signal).
KILLED_FLEET = 5


def hour_of_1hz_data(stack: Stack, count: int) -> list[str]:
    devices = [new_device() for _ in range(count)]
    for device in devices:
        stack.write(every_10s(device, T0 - timedelta(hours=1), T0, step=1))
    return devices


def assert_folders_equal_influx(fleet: Fleet, devices: list[str]) -> None:
    for device in devices:
        assert assert_reconciled(fleet.stack, device, [DAY]) == 3600


def killed_mid_upload(
    fleet: Fleet, devices: list[str], dagster_home: Path, tmp_path: Path
) -> tuple[DagsterRun, dict[str, datetime]]:
    """SIGKILL a run while a device's objects are reaching S3: some are there, its checkpoint is
    not. The run stays STARTED in storage, as nobody told Dagster."""
    process = start_run_and_signal_it_midway(
        fleet, devices, dagster_home, tmp_path, signal.SIGKILL, some_uploaded_but_not_recorded
    )
    process.wait()
    partial = checkpoints(fleet.instance, devices)
    assert len(partial) < len(devices), "the run was killed after its work, not during it"
    assert some_uploaded_but_not_recorded(fleet, devices)
    killed = run_of(fleet.instance, devices)
    assert killed.status == DagsterRunStatus.STARTED
    return killed, partial


def run_of(instance: DagsterInstance, devices: list[str]) -> DagsterRun:
    """The one continuous run of these devices (the instance is shared by the module's tests)."""
    (found,) = [
        run
        for run in instance.get_runs(RunsFilter(job_name="export_due_slices"))
        if run_devices(run.run_config) == set(devices)
    ]
    return found


def last_message(instance: DagsterInstance, run_id: str) -> str:
    records = instance.get_records_for_run(run_id, limit=1, ascending=False).records
    return str(records[0].event_log_entry.message)


def test_a_run_killed_with_sigkill_mid_upload_is_repaired_by_the_next_tick(
    stack: Stack, instance: DagsterInstance, dagster_home: Path, tmp_path: Path
) -> None:
    devices = hour_of_1hz_data(stack, KILLED_FLEET)
    fleet = Fleet(stack, instance, DEVICE_IDS=",".join(devices), **SLOW_RUN)
    killed, partial = killed_mid_upload(fleet, devices, dagster_home, tmp_path)
    # Its process was on this host and is gone: the next tick fails it and requests the rest
    # at once, however recent its last event.
    result = fleet.tick_and_run(T0 + timedelta(seconds=30))
    assert {item[0] for item in work_of(result)} == set(devices) - set(partial)
    assert_folders_equal_influx(fleet, devices)
    assert instance.get_run_by_id(killed.run_id).status == DagsterRunStatus.FAILURE  # type: ignore[union-attr]
    assert "its process is gone" in last_message(instance, killed.run_id)


def test_a_dead_run_on_another_host_blocks_its_devices_until_silent_too_long(
    stack: Stack, instance: DagsterInstance, dagster_home: Path, tmp_path: Path
) -> None:
    devices = hour_of_1hz_data(stack, KILLED_FLEET)
    fleet = Fleet(stack, instance, DEVICE_IDS=",".join(devices), **SLOW_RUN)
    killed, partial = killed_mid_upload(fleet, devices, dagster_home, tmp_path)
    # As if it ran in another pod: its process cannot be looked up, only its silence judged.
    instance.add_run_tags(killed.run_id, {HOST_TAG: "another-pod"})
    silent_since = last_event_time(instance, killed.run_id)
    assert silent_since is not None
    assert work_of(fleet.tick(T0 + timedelta(seconds=30))) == []
    assert datetime.now(UTC) - silent_since < timedelta(seconds=20), "the tick came too late"
    assert instance.get_run_by_id(killed.run_id).status == DagsterRunStatus.STARTED  # type: ignore[union-attr]
    wait = silent_since + timedelta(seconds=20.5) - datetime.now(UTC)
    time.sleep(max(0.0, wait.total_seconds()))
    result = fleet.tick_and_run(T0 + timedelta(seconds=30))
    assert {item[0] for item in work_of(result)} == set(devices) - set(partial)
    assert_folders_equal_influx(fleet, devices)
    assert instance.get_run_by_id(killed.run_id).status == DagsterRunStatus.FAILURE  # type: ignore[union-attr]
    assert "no event for over 20 s" in last_message(instance, killed.run_id)


def test_sigterm_stops_a_run_cleanly_and_the_next_tick_exports_the_rest(
    stack: Stack, instance: DagsterInstance, dagster_home: Path, tmp_path: Path
) -> None:
    devices = hour_of_1hz_data(stack, 3)
    fleet = Fleet(stack, instance, DEVICE_IDS=",".join(devices), **SLOW_RUN)
    process = start_run_and_signal_it_midway(fleet, devices, dagster_home, tmp_path, signal.SIGTERM)
    assert process.wait(timeout=60) != 0
    partial = checkpoints(instance, devices)
    assert 1 <= len(partial) < 3
    stopped = run_of(instance, devices)
    assert stopped.status in (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)
    # One device at a time (EXPORT_CONCURRENCY=1): at most the one under way when the signal
    # came has objects without a checkpoint; the ones not started have none.
    listing = stack.s3.list_objects_v2(Bucket=stack.bucket).get("Contents", [])
    folders = {item["Key"].split("/")[1] for item in listing}
    started = [d for d in set(devices) - set(partial) if f"device_id={d}" in folders]
    assert len(started) <= 1
    # The run ended itself (no longer in flight), so the rest is requested at once.
    result = fleet.tick_and_run(T0 + timedelta(seconds=30))
    assert {item[0] for item in work_of(result)} == set(devices) - set(partial)
    assert_folders_equal_influx(fleet, devices)


def test_the_sensor_runs_by_default_every_ten_seconds_or_every_slice_if_shorter(
    stack: Stack,
) -> None:
    sensor = build_continuous_export(stack.settings(EXPORT_INTERVAL_SECONDS="120"))
    assert sensor.minimum_interval_seconds == 10
    short = build_continuous_export(stack.settings(EXPORT_INTERVAL_SECONDS="5"))
    assert short.minimum_interval_seconds == 5
    assert sensor.default_status.value == "RUNNING"


def test_materializing_a_later_day_does_not_skip_the_gap_before_it(
    stack: Stack, instance: DagsterInstance
) -> None:
    device = new_device()
    stack.write(every_10s(device, T0 - timedelta(hours=1), T0 + timedelta(minutes=5)))
    next_day = datetime(2026, 2, 8, 6, tzinfo=UTC)
    stack.write(every_10s(device, next_day, next_day + timedelta(minutes=5)))
    fleet = Fleet(stack, instance, DEVICE_IDS=device)
    fleet.tick_and_run(T0 + timedelta(seconds=30))  # checkpoint: 02-07 12:00
    # An operator materializes 02-08 while 02-07 12:00-24:00 has not been exported yet.
    later = {**fleet.resources, "clock": ClockResource(frozen_at="2026-02-08T07:00:00+00:00")}
    assert materialize(
        [telemetry_export],
        partition_key=f"2026-02-08|{device}",
        resources=later,
        instance=instance,
    ).success
    assert checkpoints(instance, [device]) == {device: T0}
    result = fleet.tick(datetime(2026, 2, 8, 7, 0, 30, tzinfo=UTC))
    assert work_of(result)[0] == (device, "2026-02-07", 43_200, 86_400)


def test_a_device_silent_for_longer_than_the_window_resumes_at_its_checkpoint(
    stack: Stack, instance: DagsterInstance
) -> None:
    device = new_device()
    stack.write(every_10s(device, T0 - timedelta(minutes=5), T0 + timedelta(minutes=5)))
    fleet = Fleet(stack, instance, DEVICE_IDS=device)
    first = fleet.tick(T0 + timedelta(seconds=30))
    assert all(fleet.run(first))
    cursor = fleet.tick(T0 + timedelta(seconds=45)).cursor  # remembers the checkpoint
    ten_days_later = T0 + timedelta(days=10, seconds=30)
    resources = {**fleet.resources, "clock": ClockResource(frozen_at=ten_days_later.isoformat())}
    with build_sensor_context(instance=instance, resources=resources, cursor=cursor) as context:
        result = fleet.sensor(context)
    assert isinstance(result, SensorResult)
    assert work_of(result)[0] == (device, "2026-02-07", 43_200, 86_400)
    assert len(work_of(result)) == 11  # every day up to 02-17, none skipped


def test_a_device_day_being_materialized_holds_its_device(
    stack: Stack, instance: DagsterInstance
) -> None:
    device = new_device()
    stack.write(every_10s(device, T0 - timedelta(minutes=5), T0 + timedelta(minutes=5)))
    fleet = Fleet(stack, instance, DEVICE_IDS=device)
    run = instance.create_run_for_job(
        export_due_slices,
        run_config={"ops": {"export_slices": {"config": {"work": []}}}},
        status=DagsterRunStatus.NOT_STARTED,
        tags={"dagster/partition/device": device, "dagster/partition": f"2026-02-07|{device}"},
    )
    assert work_of(fleet.tick(T0 + timedelta(seconds=30))) == []
    instance.report_run_canceled(run)
    assert work_of(fleet.tick(T0 + timedelta(seconds=30)))


def test_a_flood_of_new_ids_stops_at_discoverys_bounds_and_each_refusal_is_logged_once(
    stack: Stack, instance: DagsterInstance, capsys: pytest.CaptureFixture[str]
) -> None:
    """Any writer to InfluxDB chooses tag values: discovery registers at most
    EXPORT_NEW_DEVICES_PER_TICK a tick and stops at EXPORT_MAX_DEVICES, saying so; ids not
    matching DEVICE_ID_PATTERN, or unsafe (a 5,000-character one), are logged once, cut."""
    run = uuid.uuid4().hex[:8]
    flood = [f"flood-{run}-{n:02d}" for n in range(30)]
    hostile = ["x" * 5000, "bad/id", f"other-{run}"]
    stack.write([point(ns(T0), device, {"voltage": 1.0}) for device in flood + hostile])
    before = set(instance.get_dynamic_partitions("devices"))
    fleet = Fleet(
        stack,
        instance,
        DEVICE_IDS="",
        EXPORT_MAX_DEVICES=str(len(before) + 25),
        EXPORT_NEW_DEVICES_PER_TICK="10",
        DEVICE_ID_PATTERN=f"flood-{run}-[0-9]+",
    )
    added = []
    for tick in range(4):
        capsys.readouterr()
        fleet.tick(T0 + timedelta(seconds=91 + 60 * tick))
        registered = set(instance.get_dynamic_partitions("devices")) - before
        added.append(len(registered))
        logged = capsys.readouterr().err  # the sensor's log, as the daemon's output shows it
        assert all(len(line) < 400 for line in logged.splitlines())
        refusals = [line for line in logged.splitlines() if "skipped:" in line]
        if tick == 0:
            assert len(refusals) == 3 and "5,000 characters" in logged
            assert f"'other-{run}' does not match DEVICE_ID_PATTERN" in logged
        else:
            assert refusals == [] and "3 device ids refused as before" in logged
        assert "5 new devices seen are beyond EXPORT_MAX_DEVICES" in logged
    assert added == [10, 20, 25, 25]
    assert registered == set(flood[:25])
