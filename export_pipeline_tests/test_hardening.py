"""Faults and odd input on the real stack; each ends by comparing S3 with InfluxDB."""

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from subprocess import Popen
from typing import Any

import boto3
import pytest
from dagster import (
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    EventRecordsFilter,
    RunsFilter,
)

from export_pipeline.defs.resources import ExportBucketResource
from export_pipeline.defs.run_config import run_devices
from export_pipeline.engine.influx import InfluxError
from export_pipeline.engine.schema import SCHEMA
from export_pipeline.engine.store import MultipartUploads
from export_pipeline.record.keys import RECONCILIATION, DeviceDay
from export_pipeline.record.ledger import checkpoints
from export_pipeline_tests.audit import assert_reconciled
from export_pipeline_tests.conftest import (
    AWS_ENV,
    TEST_IDENTITY,
    Daemons,
    Stack,
    stop_daemon,
)
from export_pipeline_tests.services import (
    PostgresServer,
    SeaweedServer,
    TcpProxy,
    point,
    private_dagster_home,
    private_postgres,
    wait_until,
)
from export_pipeline_tests.test_export import FOLDER, at, export, folder_rows
from export_pipeline_tests.test_sensors import T0, Fleet, every_10s, new_device, ns, work_of


def test_two_exports_of_one_device_day_at_once_leave_each_row_once(stack: Stack) -> None:
    stack.write(every_10s("D1", T0.replace(hour=10), T0.replace(hour=14)))
    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(lambda _: export(stack), range(2)))
    assert reports[0].rows == reports[1].rows == 1440
    assert assert_reconciled(stack, "D1", [T0.date()]) == 1440


def test_an_upload_that_fails_half_way_leaves_no_object_and_no_open_multipart_upload(
    stack: Stack, tmp_path: Path, s3_link: TcpProxy
) -> None:
    big = tmp_path / "slice.parquet"
    big.write_bytes(os.urandom(20 * 1024 * 1024))  # above the multipart threshold
    direct = Stack(stack.influx, s3_link.target_url, stack.database, stack.bucket).s3
    s3_link.reset_after(12 * 1024 * 1024)  # the second part's connection is reset
    with pytest.raises(Exception):  # noqa: B017 (whichever error the reset ends with)
        stack.store().upload(big, key=FOLDER + "export_120000.parquet", fmt="parquet")
    # S3 was still there: the upload was aborted, its parts are gone.
    assert "Contents" not in direct.list_objects_v2(Bucket=stack.bucket)
    assert direct.list_multipart_uploads(Bucket=stack.bucket).get("Uploads", []) == []


def test_the_s3_server_killed_mid_upload_leaves_no_object_and_a_new_upload_is_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL to SeaweedFS while a multipart upload is in flight, as a crash or an OOM kill
    would: after it restarts on the same data there is no object, and the export's next upload
    of the file is whole."""
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    server = SeaweedServer(tmp_path / "seaweedfs", [TEST_IDENTITY])
    server.start()
    try:
        bucket, key = "killed", FOLDER + "export_120000.parquet"
        admin = boto3.client("s3", endpoint_url=server.url, region_name="us-east-1")
        admin.create_bucket(Bucket=bucket)
        big = tmp_path / "slice.parquet"
        big.write_bytes(os.urandom(128 * 1024 * 1024))  # long enough to be caught mid-way
        store = ExportBucketResource(
            bucket=bucket,
            prefix="telemetry",
            daily_prefix="telemetry_daily",
            region_name="us-east-1",
            endpoint_url=server.url,
        ).store()
        failed: list[BaseException] = []

        def upload() -> None:
            try:
                store.upload(big, key=key, fmt="parquet")
            except Exception as error:
                failed.append(error)

        uploading = threading.Thread(target=upload)
        uploading.start()
        wait_until(
            lambda: admin.list_multipart_uploads(Bucket=bucket).get("Uploads"),
            "the multipart upload to start",
            timeout=30,
        )
        server.kill()
        uploading.join(timeout=120)
        assert failed, "the upload outlived the S3 server"
        server.start()
        assert "Contents" not in admin.list_objects_v2(Bucket=bucket)
        # Nobody could abort: the parts wait under an open upload, which the sweep aborts.
        later = datetime.now(UTC) + timedelta(minutes=1)
        assert MultipartUploads(admin, bucket).abort_abandoned("telemetry/", later) == [key]
        assert admin.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
        store.upload(big, key=key, fmt="parquet")
        assert admin.get_object(Bucket=bucket, Key=key)["Body"].read() == big.read_bytes()
    finally:
        server.kill()  # its data is this test's: nothing to shut down gracefully


HOSTILE_IDS = {
    "a/b": False,
    "..": False,
    "x..y": False,
    "p|q": False,
    "x" * 1024: False,
    "x=y": True,
    "c,d": True,
    "it's": True,
    'say "hi"': True,
    "back\\slash": False,  # SeaweedFS would store it under back/slash
    "with space": True,
    "温度计": True,
}


def test_hostile_device_ids_are_exported_under_their_own_folder_or_refused(
    stack: Stack, instance: DagsterInstance
) -> None:
    for device in HOSTILE_IDS:
        stack.write([point(ns(T0) - 60 * 10**9, device, {"voltage": 1.0})])
    fleet = Fleet(stack, instance, DEVICE_IDS="")  # discovered from InfluxDB
    result = fleet.tick_and_run(T0 + timedelta(seconds=31))
    requested = {item[0] for item in work_of(result)}
    assert requested == {device for device, safe in HOSTILE_IDS.items() if safe}
    for key in stack.objects():
        assert key.startswith("telemetry/device_id=") and "/../" not in key
    for device in requested:
        assert fleet.exported(device) == [ns(T0) - 60 * 10**9]
        assert assert_reconciled(stack, device, [T0.date()]) == 1


def test_integer_fields_extra_fields_and_tags_and_shared_timestamps(stack: Stack) -> None:
    stack.influx.write(
        stack.database,
        [
            # Integer-typed fields, an unknown field and an unknown tag.
            f"telemetry,device_id=D1,device_type=fan,location=lab,floor=3 "
            f"voltage=230i,current=2i,power=400i,humidity=40i {at(12)}",
            # The same instant in another series (another location): a second row.
            f"telemetry,device_id=D1,device_type=fan,location=roof "
            f"voltage=229i,current=1i,power=100i {at(12)}",
        ],
    )
    export(stack)
    rows = folder_rows(stack)
    assert [(r["location"], r["voltage"], r["power_factor"]) for r in rows] == [
        ("lab", 230.0, pytest.approx(400 / 460)),
        ("roof", 229.0, pytest.approx(100 / 229)),
    ]
    assert list(rows[0]) == SCHEMA.names  # humidity and floor are not exported
    assert assert_reconciled(stack, "D1", [T0.date()], unique=False) == 2


def test_a_string_in_a_numeric_field_fails_the_device_day_by_name(stack: Stack) -> None:
    stack.influx.write(stack.database, [f'telemetry,device_id=D1 voltage="high" {at(12)}'])
    with pytest.raises(InfluxError, match=r"could not be parsed.*high"):
        export(stack)
    assert stack.objects() == {}


def sensor_beat_after(instance: DagsterInstance, moment: float) -> bool:
    beat = instance.get_daemon_heartbeats().get("SENSOR")
    return beat is not None and beat.timestamp > moment


class LiveDevice:
    """1 Hz telemetry around now for a daemon running on the real clock, in 10 s slices: two
    minutes of history and one still to come, and more on request."""

    def __init__(self, stack: Stack, instance: DagsterInstance) -> None:
        self.stack, self.instance, self.device = stack, instance, new_device()
        now = datetime.fromtimestamp(int(time.time()) // 10 * 10, UTC)
        self.start = self.end = now - timedelta(minutes=2)
        self.rows = 0
        self.write(self.start, now + timedelta(minutes=1))
        self.env = {
            "DEVICE_IDS": self.device,
            "EXPORT_INTERVAL_SECONDS": "10",
            "EXPORT_LATENESS_SECONDS": "0",
            "LOOKBACK_HOURS": "1",
            "EXPORT_STALE_RUN_SECONDS": "20",
        }

    def write(self, start: datetime, end: datetime) -> None:
        self.stack.write(every_10s(self.device, start, end, step=1))
        self.rows += int((end - start).total_seconds())
        self.end = max(self.end, end)

    @property
    def days(self) -> list[date]:
        return sorted({self.start.date(), self.end.date()})

    def through(self) -> datetime | None:
        return checkpoints(self.instance, [self.device]).get(self.device)

    def wait_until_first_export(self) -> None:
        wait_until(lambda: self.through() is not None, "the daemon's first export", 180)

    def wait_until_exported(self, what: str) -> None:
        wait_until(lambda: (self.through() or self.start) >= self.end, what, 240)

    def assert_reconciled(self) -> None:
        assert assert_reconciled(self.stack, self.device, self.days) == self.rows


def test_sigterm_stops_the_daemon_and_a_restarted_one_exports_every_row_once(
    stack: Stack, instance: DagsterInstance, daemons: Daemons
) -> None:
    live = LiveDevice(stack, instance)
    daemon = daemons.start(**live.env)
    try:
        live.wait_until_first_export()
    finally:
        assert stop_daemon(daemon) in (0, -signal.SIGTERM)
    stopped_at = live.through()
    assert stopped_at is not None
    if stopped_at >= live.end:  # a slow machine: the first daemon got everything
        live.write(stopped_at, stopped_at + timedelta(seconds=30))  # work for the restart

    daemon = daemons.start(**live.env)
    try:
        live.wait_until_exported("the restarted daemon's exports")
    finally:
        assert stop_daemon(daemon) in (0, -signal.SIGTERM)
    live.assert_reconciled()


@pytest.fixture
def s3_link(stack: Stack) -> Iterator[TcpProxy]:
    """This test's own network path to the S3 server, to cut and restore; the server and the
    objects it holds live on, as S3 or MinIO would behind a broken link."""
    proxy = TcpProxy(stack.s3_url)
    proxy.start()
    stack.s3_url = proxy.url
    yield proxy
    proxy.stop()


def test_s3_unreachable_for_two_ticks_then_every_row_is_exported_once(
    stack: Stack, instance: DagsterInstance, s3_link: TcpProxy
) -> None:
    device = new_device()
    stack.write(every_10s(device, T0 - timedelta(minutes=5), T0 + timedelta(minutes=3)))
    fleet = Fleet(stack, instance, DEVICE_IDS=device, EXPORT_RETRIES="1")
    fleet.tick_and_run(T0 + timedelta(seconds=30))
    result = fleet.outage_of_two_ticks(device, s3_link.cut, s3_link.restore)
    assert work_of(result) == [(device, "2026-02-07", 43_200, 43_380)]
    assert assert_reconciled(stack, device, [T0.date()]) == 48


def test_a_multipart_upload_cut_off_by_the_network_leaves_no_object_and_is_aborted_later(
    stack: Stack, instance: DagsterInstance, tmp_path: Path, s3_link: TcpProxy
) -> None:
    big = tmp_path / "slice.parquet"
    big.write_bytes(os.urandom(20 * 1024 * 1024))  # above the multipart threshold
    key = FOLDER + "export_120000.parquet"
    store = stack.store()
    direct = Stack(stack.influx, s3_link.target_url, stack.database, stack.bucket).s3
    s3_link.cut_after(12 * 1024 * 1024)  # the link dies during the second part
    with pytest.raises(Exception):  # noqa: B017 (whichever error boto3 ends with)
        store.upload(big, key=key, fmt="parquet")
    # The client could not reach S3 to abort: the first part is stored under an open upload.
    assert "Contents" not in direct.list_objects_v2(Bucket=stack.bucket)
    assert [u["Key"] for u in direct.list_multipart_uploads(Bucket=stack.bucket)["Uploads"]] == [
        key
    ]
    s3_link.restore()
    store.upload(big, key=key, fmt="parquet")  # the slice is exported again, whole
    assert direct.get_object(Bucket=stack.bucket, Key=key)["Body"].read() == big.read_bytes()

    # The sweep aborts what the cut left once it is older than EXPORT_STALE_RUN_SECONDS and no
    # live run owns it (SeaweedFS dates an upload by the real clock, as S3 does).
    fleet = Fleet(stack, instance, DEVICE_IDS="D1", EXPORT_STALE_RUN_SECONDS="1")
    time.sleep(1.5)
    assert fleet.sweep(T0)
    assert direct.list_multipart_uploads(Bucket=stack.bucket).get("Uploads", []) == []
    assert direct.get_object(Bucket=stack.bucket, Key=key)["Body"].read() == big.read_bytes()


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of the test's own, to restart without cutting anyone else's connections."""
    with private_postgres() as server:
        yield server


def test_the_daemon_recovers_from_a_postgresql_restart_by_itself(
    stack: Stack, postgres: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The daemon, its runs and this test's reads all use a Dagster storage on the private
    # PostgreSQL: the repo's dagster.yaml in a DAGSTER_HOME of its own, CHECKPOINT_DB_* set to
    # the private server (for this process too, where dagster.yaml is read).
    env = private_dagster_home(postgres, tmp_path / "dagster_home")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    home = Path(env["DAGSTER_HOME"])
    daemons = Daemons(stack, home, env)
    with DagsterInstance.from_config(str(home)) as instance:
        live = LiveDevice(stack, instance)
        daemon = daemons.start(**live.env)
        try:
            live.wait_until_first_export()
            postgres.restart()  # every connection is cut, a run's included
            restarted = time.time()
            # Heartbeats every 30 s; the daemon must write one again without being restarted,
            # and go on exporting: a run cut off by the restart is redone.
            wait_until(lambda: sensor_beat_after(instance, restarted), "a heartbeat after it", 120)
            live.wait_until_exported("the exports after the restart")
            assert daemon.poll() is None
        finally:
            daemons.reap()  # SIGTERM, then its process group: before the server goes
    settings = stack.settings(**live.env)  # the 10 s slices the daemon exported
    assert assert_reconciled(stack, live.device, live.days, settings=settings) == live.rows


def reconciliation_of(instance: DagsterInstance, partition: str) -> tuple[str, dict[str, Any]]:
    """The status and metadata of a device-day's latest reconciliation."""
    storage = instance.event_log_storage
    (info,) = storage.get_asset_check_partition_info([RECONCILIATION], partition_keys=[partition])
    (record,) = storage.get_event_records(
        EventRecordsFilter(
            DagsterEventType.ASSET_CHECK_EVALUATION,
            storage_ids=[info.latest_check_event_storage_id],
        )
    )
    evaluation = record.event_log_entry.dagster_event.asset_check_evaluation_data  # type: ignore[union-attr]
    metadata = {name: value.value for name, value in evaluation.metadata.items()}
    return info.latest_execution_status.value, metadata


def test_late_data_days_after_its_day_is_found_by_the_sweep_and_exported_again(
    stack: Stack, instance: DagsterInstance
) -> None:
    device, midnight = new_device(), datetime(2026, 2, 8, tzinfo=UTC)
    days = [date(2026, 2, 7), date(2026, 2, 8), date(2026, 2, 9)]
    stack.write(every_10s(device, midnight - timedelta(hours=1), midnight))
    fleet = Fleet(stack, instance, DEVICE_IDS=device)
    fleet.tick_and_run(midnight + timedelta(seconds=30))  # 02-07 closes and is reconciled
    later = midnight + timedelta(days=3, hours=1)
    fleet.tick_and_run(later)  # 02-08 to 02-10 close without a point
    assert fleet.sweep(later)
    partitions = [DeviceDay(device, day).key for day in days]
    assert {reconciliation_of(instance, key)[0] for key in partitions} == {"SUCCEEDED"}

    # Three days late, a device back online uploads its buffer: an hour of 02-07 that had
    # already been exported around, and a point on 02-09, a day exported empty.
    stack.write(every_10s(device, midnight - timedelta(hours=3), midnight - timedelta(hours=2), 60))
    stack.write([point(ns(midnight + timedelta(days=1, hours=12)), device, {"temperature": 21.5})])
    assert fleet.sweep(later + timedelta(seconds=60))
    status, metadata = reconciliation_of(instance, partitions[0])
    assert status == "FAILED"
    assert metadata["reconciled_field_counts"]["voltage"] == 360
    assert metadata["influxdb_field_counts"]["voltage"] == 420
    assert reconciliation_of(instance, partitions[1])[0] == "SUCCEEDED"  # untouched
    status, metadata = reconciliation_of(instance, partitions[2])
    assert status == "FAILED" and "temperature 0 -> 1" in metadata["summary"]

    result = fleet.tick_and_run(later + timedelta(seconds=90))
    assert {(d, start, end) for _, d, start, end in work_of(result) if start == 0} >= {
        ("2026-02-07", 0, 86_400),
        ("2026-02-09", 0, 86_400),
    }
    assert {reconciliation_of(instance, key)[0] for key in partitions} == {"SUCCEEDED"}
    assert assert_reconciled(stack, device, days) == 420 + 1
    assert fleet.sweep(later + timedelta(seconds=120))  # nothing changed since: nothing to do
    assert {reconciliation_of(instance, key)[0] for key in partitions} == {"SUCCEEDED"}


def test_points_far_in_the_past_or_future_stay_out_of_the_days_being_exported(
    stack: Stack, instance: DagsterInstance
) -> None:
    """A point ahead of the clock is exported once its slice has closed, never earlier."""
    device = new_device()
    stack.write(every_10s(device, T0 - timedelta(minutes=2), T0))
    ahead = T0 + timedelta(seconds=90)  # 12:01:30, written while the clock says 12:00:30
    stack.write(
        [
            point(ns(datetime(1980, 1, 1, tzinfo=UTC)), device, {"voltage": 1.0}),
            point(ns(datetime(2200, 1, 1, tzinfo=UTC)), device, {"voltage": 2.0}),
            point(ns(ahead), device, {"voltage": 3.0}),
        ]
    )
    fleet = Fleet(stack, instance, DEVICE_IDS=device)
    result = fleet.tick_and_run(T0 + timedelta(seconds=30))
    assert work_of(result) == [(device, "2026-02-07", 39_600, 43_200)]
    folder = f"telemetry/device_id={device}/date=2026/02/07"
    assert {key.rsplit("/", 1)[0] for key in stack.objects()} == {folder}
    assert f"{folder}/export_120100.parquet" not in stack.objects()
    # Its slice, 12:01-12:02, closes at 12:02 and is due 30 s later (EXPORT_LATENESS_SECONDS).
    result = fleet.tick_and_run(T0 + timedelta(minutes=2, seconds=31))
    assert work_of(result) == [(device, "2026-02-07", 43_200, 43_320)]
    assert f"{folder}/export_120100.parquet" in stack.objects()
    assert assert_reconciled(stack, device, [T0.date()]) == 12 + 1
    assert {key.rsplit("/", 1)[0] for key in stack.objects()} == {folder}


class LiveFleet:
    """Devices writing one point a second each, on the real clock, from a thread of the test."""

    def __init__(self, stack: Stack, count: int) -> None:
        self.stack, self.devices = stack, [new_device() for _ in range(count)]
        self.first = datetime.fromtimestamp(int(time.time()), UTC)
        self.last = self.first
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._write, daemon=True)
        self._thread.start()

    def _write(self) -> None:
        second = int(time.time())
        while not self._stop.is_set():
            stamp = datetime.fromtimestamp(second, UTC)
            self.stack.write(
                [
                    point(ns(stamp), d, {"voltage": 230.0, "power": second % 97})
                    for d in self.devices
                ]
            )
            self.last = stamp
            second += 1
            self._stop.wait(max(0.0, second - time.time()))

    def stop(self) -> datetime:
        """Stop writing; the moment of the last point written."""
        self._stop.set()
        self._thread.join()
        return self.last

    @property
    def days(self) -> list[date]:
        return sorted({self.first.date(), self.last.date()})


def kill_group(daemon: Popen[bytes]) -> None:
    """SIGKILL a daemon with everything it started: its code server and the runs it launched."""
    os.killpg(daemon.pid, signal.SIGKILL)
    daemon.wait()


def test_a_daemon_killed_with_its_runs_recovers_within_a_minute(
    stack: Stack, instance: DagsterInstance, daemons: Daemons
) -> None:
    # The scenario: 3 devices at 1 Hz, 10 s slices, 2 s of lateness, the daemon and its
    # runs SIGKILLed, the daemon back 20 s later, writing stopped 45 s after that: every row
    # written is in S3 within 60 s, none twice. In a time zone other than UTC.
    live = LiveFleet(stack, 3)
    env = {
        "DEVICE_IDS": ",".join(live.devices),
        "EXPORT_INTERVAL_SECONDS": "10",
        "EXPORT_LATENESS_SECONDS": "2",
        "LOOKBACK_HOURS": "1",
        "TZ": "Asia/Kolkata",
    }
    try:
        daemon = daemons.start(**env)
        wait_until(lambda: len(checkpoints(instance, live.devices)) == 3, "a first export", 120)

        def a_run_in_flight() -> bool:
            running = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED]))
            return any(set(live.devices) & run_devices(run.run_config) for run in running)

        wait_until(a_run_in_flight, "a run to kill with the daemon", 60)
        kill_group(daemon)
        time.sleep(20)
        daemons.start(**env)
        time.sleep(45)
    finally:
        stopped = live.stop()
    everything = stopped.replace(second=stopped.second // 10 * 10) + timedelta(seconds=10)

    def exported() -> bool:
        found = checkpoints(instance, live.devices)
        return len(found) == 3 and min(found.values()) >= everything

    wait_until(exported, "every row written", timeout=60)
    for device in live.devices:
        assert assert_reconciled(stack, device, live.days) > 0
