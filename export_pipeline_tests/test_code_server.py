"""The pipeline's code server (`python -m export_pipeline.code_server`): runs launched as the
daemon launches them start from its warm forkserver, export, stop when terminated, fail when
their process dies, and keep starting when the forkserver itself was killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import psutil
import pytest
from dagster import DagsterInstance, DagsterRunStatus

from export_pipeline.defs.continuous import export_due_slices, export_slices
from export_pipeline.defs.planning import WorkItem
from export_pipeline.defs.run_config import run_config_for
from export_pipeline.engine.grid import DayRange
from export_pipeline_tests.audit import assert_reconciled
from export_pipeline_tests.conftest import Stack
from export_pipeline_tests.launches import Launches
from export_pipeline_tests.services import CodeServer, point, wait_until

DAY = date(2026, 2, 7)
MIDNIGHT_NS = int(datetime(2026, 2, 7, tzinfo=UTC).timestamp()) * 10**9
INTERVAL = 10


def one_hz(device: str, seconds: range) -> list[str]:
    return [
        point(MIDNIGHT_NS + s * 10**9, device, {"voltage": 230.0 + s % 7, "power": 100.0 + s % 5})
        for s in seconds
    ]


def slices(device: str, start: int, end: int) -> dict[str, object]:
    """The run config of export_due_slices for one device's [start, end) seconds of DAY."""
    return run_config_for([WorkItem(device, DayRange(DAY, start, end))], export_slices.name)


@pytest.fixture
def server(
    stack: Stack, dagster_home: Path, checkpoint_env: dict[str, str], tmp_path: Path
) -> Iterator[CodeServer]:
    env = {
        **stack.env(EXPORT_INTERVAL_SECONDS=str(INTERVAL)),
        **checkpoint_env,
        "DAGSTER_HOME": str(dagster_home),
    }
    started = CodeServer(env, tmp_path / "code-server.log").start()
    try:
        yield started
    finally:
        started.stop()


def started_process(instance: DagsterInstance, run_id: str, timeout: float = 60) -> psutil.Process:
    """The run's process, from its "Started process for run (pid: N)" event."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in instance.all_logs(run_id):
            message = (record.dagster_event and record.dagster_event.message) or ""
            if message.startswith("Started process for run (pid: "):
                return psutil.Process(int(message.split("pid: ")[1].rstrip(").")))
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} reported no process within {timeout:.0f} s")


def test_runs_fork_from_the_warm_forkserver_export_stop_when_terminated_and_survive_kills(
    stack: Stack, instance: DagsterInstance, server: CodeServer
) -> None:
    short, long_ = f"dev-{uuid.uuid4().hex[:8]}", f"dev-{uuid.uuid4().hex[:8]}"
    stack.write(one_hz(short, range(60)))
    for first in range(0, 86_400, 10_000):
        stack.write(one_hz(long_, range(first, min(first + 10_000, 86_400))))
    with Launches(instance, server) as launches:
        # A run exports, from a process the forkserver forked (not a new interpreter).
        forkserver = server.forkservers()
        assert len(forkserver) == 1 and "export_pipeline.warm" in " ".join(forkserver[0].cmdline())
        # ... which imports the code as the server starts: pyarrow's library is mapped there.
        wait_until(
            lambda: any("libarrow" in region.path for region in forkserver[0].memory_maps()),
            "the forkserver's imports",
            timeout=60,
        )
        run = launches.launch(export_due_slices.name, slices(short, 0, 60))
        assert launches.wait(run).status == DagsterRunStatus.SUCCESS
        assert (
            assert_reconciled(
                stack, short, [DAY], settings=stack.settings(EXPORT_INTERVAL_SECONDS=str(INTERVAL))
            )
            == 60
        )

        # A day of 10 s slices takes a while: its process is the forkserver's child, and a
        # terminate (the UI's) stops it as canceled, with the slices it uploaded kept whole.
        run = launches.launch(export_due_slices.name, slices(long_, 0, 86_400))
        process = started_process(instance, run.run_id)
        assert process.parent().pid == forkserver[0].pid

        def uploaded() -> list[str]:
            return [key for key in stack.objects() if f"device_id={long_}/" in key]

        while not uploaded():
            time.sleep(0.05)
        assert instance.run_launcher.terminate(run.run_id)
        assert launches.wait(run, timeout=60).status == DagsterRunStatus.CANCELED

        def ended() -> bool:
            # CANCELED is recorded by the run itself, moments before its process exits.
            try:
                return process.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_until(ended, "the canceled run's process to exit", 30)
        assert 0 < len(uploaded()) < 86_400 // INTERVAL

        # A run whose process is killed is failed by the server; the next run still starts.
        run = launches.launch(export_due_slices.name, slices(long_, 0, 86_400))
        process = started_process(instance, run.run_id)
        process.kill()
        assert launches.wait(run, timeout=60).status == DagsterRunStatus.FAILURE

        # The forkserver killed while a run is in flight: the run goes on to its end (the
        # server does not take the forkserver's end for the run's), and the next run starts
        # from a new forkserver.
        run = launches.launch(export_due_slices.name, slices(long_, 0, 86_400))
        started_process(instance, run.run_id)
        forkserver[0].kill()  # a zombie until the server's next launch reaps it
        assert launches.wait(run, timeout=120).status == DagsterRunStatus.SUCCESS
        assert len(uploaded()) == 86_400 // INTERVAL
        run = launches.launch(export_due_slices.name, slices(short, 0, 60))
        assert launches.wait(run).status == DagsterRunStatus.SUCCESS
        renewed = server.forkservers()
        assert len(renewed) == 1 and renewed[0].pid != forkserver[0].pid


def test_the_code_server_refuses_to_start_naming_a_bad_setting(
    stack: Stack, tmp_path: Path
) -> None:
    env = {**os.environ, **stack.env(S3_BUCKET="Not_A_Bucket")}
    started = subprocess.run(
        [sys.executable, "-m", "export_pipeline.code_server", "--socket", str(tmp_path / "s")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode != 0
    assert "S3_BUCKET='Not_A_Bucket' is not a valid bucket name" in started.stderr
    assert not (tmp_path / "s").exists()


def test_sigterm_stops_the_code_server_and_its_forkserver_even_with_sigint_ignored(
    stack: Stack, tmp_path: Path
) -> None:
    """Started as a shell's background job is (SIGINT ignored, which Dagster's mapping of
    SIGTERM to SIGINT's handler would pass on to SIGTERM), SIGTERM still stops it."""
    server = CodeServer(stack.env(), tmp_path / "code-server.log").start(sigint_ignored=True)
    try:
        assert server.process is not None
        forkserver = server.forkservers()[0]
        os.kill(server.process.pid, signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
        forkserver.wait(timeout=30)  # it ends with its parent
    finally:
        server.stop()
