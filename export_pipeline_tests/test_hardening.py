"""Faults and odd input on the real stack; each ends by comparing S3 with InfluxDB."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from subprocess import Popen

import pytest
from dagster import DagsterInstance

from export_pipeline.influx import InfluxError
from export_pipeline.jobs import pool_storage_connections
from export_pipeline.ledger import checkpoints
from export_pipeline.schema import SCHEMA
from export_pipeline.writers import ObjectStore
from export_pipeline_tests.conftest import REPO, Stack
from export_pipeline_tests.services import MotoServer, point, restart_postgres, wait_until
from export_pipeline_tests.test_export import FOLDER, at, export, folder_rows
from export_pipeline_tests.test_sensors import T0, Fleet, every_10s, ns, work_of


def test_two_exports_of_one_device_day_at_once_leave_each_row_once(stack: Stack) -> None:
    stack.write(every_10s("D1", T0.replace(hour=10), T0.replace(hour=14)))
    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(lambda _: export(stack), range(2)))
    assert reports[0].rows == reports[1].rows == 1440
    stamps = [row["timestamp"] for row in folder_rows(stack)]
    assert len(stamps) == len(set(stamps)) == 1440


def test_an_upload_that_fails_half_way_leaves_no_object_and_no_open_multipart_upload(
    stack: Stack, tmp_path: Path
) -> None:
    big = tmp_path / "slice.parquet"
    big.write_bytes(os.urandom(20 * 1024 * 1024))  # above the multipart threshold
    client = stack.s3
    parts = []

    def fail_the_second_part(**kwargs: object) -> None:
        parts.append(1)
        if len(parts) == 2:
            raise ConnectionResetError("the S3 server went away during the upload")

    client.meta.events.register("before-call.s3.UploadPart", fail_the_second_part)
    store = ObjectStore(client, stack.bucket)
    with pytest.raises(Exception, match="went away"):
        store.upload(big, FOLDER + "export_120000.parquet", "parquet")
    assert stack.objects() == {}
    assert client.list_multipart_uploads(Bucket=stack.bucket).get("Uploads", []) == []


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
    "back\\slash": True,
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


def test_a_string_in_a_numeric_field_fails_the_device_day_by_name(stack: Stack) -> None:
    stack.influx.write(stack.database, [f'telemetry,device_id=D1 voltage="high" {at(12)}'])
    with pytest.raises(InfluxError, match=r"could not be parsed.*high"):
        export(stack)
    assert stack.objects() == {}


def start_daemon(stack: Stack, dagster_home: Path, checkpoint_env: dict[str, str]) -> Popen[bytes]:
    """A real `dagster-daemon` serving this stack's code location."""
    env = {
        **os.environ,
        **stack.env(DEVICE_IDS="D1"),
        **checkpoint_env,
        "DAGSTER_HOME": str(dagster_home),
    }
    daemon = str(Path(sys.executable).with_name("dagster-daemon"))
    return subprocess.Popen(
        [daemon, "run", "-m", "export_pipeline.definitions"],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def sensor_beat_after(instance: DagsterInstance, moment: float) -> bool:
    beat = instance.get_daemon_heartbeats().get("SENSOR")
    return beat is not None and beat.timestamp > moment


def test_sigterm_stops_the_daemon_cleanly(
    stack: Stack, dagster_home: Path, checkpoint_env: dict[str, str], instance: DagsterInstance
) -> None:
    started = time.time()
    daemon = start_daemon(stack, dagster_home, checkpoint_env)
    try:
        wait_until(
            lambda: sensor_beat_after(instance, started), "the daemon's first heartbeat", 120
        )
    finally:
        daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=60) in (0, -signal.SIGTERM)


@pytest.fixture
def private_s3(tmp_path: Path) -> Iterator[MotoServer]:
    """An S3 server of this test's own, so stopping it disturbs no other test."""
    server = MotoServer(tmp_path)
    server.start()
    yield server
    server.stop()


def test_s3_down_for_two_ticks_then_the_gap_is_exported(
    stack: Stack, instance: DagsterInstance, private_s3: MotoServer
) -> None:
    stack.s3_url = private_s3.url
    stack.s3.create_bucket(Bucket=stack.bucket)
    device = "D-s3-outage"
    stack.write(every_10s(device, T0 - timedelta(minutes=5), T0 + timedelta(minutes=10)))
    fleet = Fleet(stack, instance, DEVICE_IDS=device, EXPORT_RETRIES="1")
    fleet.tick_and_run(T0 + timedelta(seconds=30))
    before = checkpoints(instance, [device], [T0.date()])

    private_s3.stop()
    for second in (90, 150):  # two ticks while S3 is unreachable: the runs fail, nothing moves
        assert fleet.run(fleet.tick(T0 + timedelta(seconds=second))) == [False]
        assert checkpoints(instance, [device], [T0.date()]) == before
    # moto keeps objects in memory, so the restarted server starts empty: only the gap is
    # compared below (a real S3 or MinIO keeps what was there before the outage).
    private_s3.start()
    stack.s3.create_bucket(Bucket=stack.bucket)
    result = fleet.tick_and_run(T0 + timedelta(seconds=210))
    assert work_of(result) == [(device, "2026-02-07", 43_200, 43_380)]
    exported = fleet.exported(device)
    assert exported == fleet.in_influx(device, T0, T0 + timedelta(minutes=3))


def test_the_daemon_recovers_from_a_postgresql_restart_by_itself(
    stack: Stack, dagster_home: Path, checkpoint_env: dict[str, str], instance: DagsterInstance
) -> None:
    started = time.time()
    daemon = start_daemon(stack, dagster_home, checkpoint_env)

    def beat_after(moment: float) -> bool:
        return sensor_beat_after(instance, moment)

    try:
        wait_until(lambda: beat_after(started), "the daemon's first heartbeat", 120)
        restart_postgres()
        restarted = time.time()
        # This test process shares one instance with runs executed in-process, which pooled its
        # storage connections (a run process does that for itself); the restart cut them.
        pool_storage_connections(instance)
        # Heartbeats every 30 s; the daemon must write one again without being restarted.
        wait_until(lambda: beat_after(restarted), "a heartbeat after the restart", 120)
        assert daemon.poll() is None
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
