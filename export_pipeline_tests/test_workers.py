"""Runs on worker hosts (deploy/workers/dagster.yaml, `python -m export_pipeline.workers`):
two hosts of the test's own making (network namespaces, `hosts.py`), the real daemon and sensor
on this machine, Redis as the Celery broker and result backend, InfluxDB, PostgreSQL and
SeaweedFS real and reached by the hosts over their links."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import DagsterInstance, DagsterRun, DagsterRunStatus, Failure, RunsFilter
from dagster._core.launcher import LaunchRunContext

from export_pipeline.defs.runs import (
    CODE_TAG,
    CODE_VERSION,
    CONTINUOUS_JOB,
    HOST_TAG,
    mark_process,
)
from export_pipeline.health import BROKER_CHECK, build_checks, run_checks
from export_pipeline.record.ledger import checkpoints
from export_pipeline.settings import SettingsError
from export_pipeline.workers import (
    BrokerUnreachable,
    CeleryLauncher,
    broker_answers,
    instance_broker,
    worker_command,
)
from export_pipeline_tests.audit import assert_reconciled
from export_pipeline_tests.conftest import CLI_CWD, REPO, Stack
from export_pipeline_tests.hosts import WORKERS_YAML, RedisServer, network, start_workers
from export_pipeline_tests.services import (
    POSTGRES,
    dagster_command,
    drop_database,
    free_port,
    fresh_database,
    wait_until,
)
from export_pipeline_tests.test_sensors import every_10s, new_device

STALE_SECONDS = 15


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def runs_of(instance: DagsterInstance) -> list[Any]:
    return list(instance.get_runs(RunsFilter(job_name=CONTINUOUS_JOB)))


def hosts_of(instance: DagsterInstance) -> set[str]:
    return {run.tags[HOST_TAG] for run in runs_of(instance) if HOST_TAG in run.tags}


def running_on(instance: DagsterInstance, host: str) -> list[Any]:
    return [
        run
        for run in runs_of(instance)
        if run.status == DagsterRunStatus.STARTED and run.tags.get(HOST_TAG) == host
    ]


def test_runs_execute_on_two_worker_hosts_and_one_killed_mid_run_is_finished_by_the_other(
    stack: Stack, redis: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = f"export_pipeline_workers_{uuid.uuid4().hex[:8]}"
    fresh_database(database)
    devices = [new_device() for _ in range(6)]
    now = datetime.fromtimestamp(int(time.time()) // 10 * 10, UTC)
    start, end = now - timedelta(minutes=2), now + timedelta(seconds=80)
    for device in devices:
        stack.write(every_10s(device, start, end, step=1))
    exported = {
        "DEVICE_IDS": ",".join(devices),
        "EXPORT_INTERVAL_SECONDS": "10",
        "EXPORT_LATENESS_SECONDS": "0",
        "LOOKBACK_HOURS": "1",
        "EXPORT_STALE_RUN_SECONDS": str(STALE_SECONDS),
        "EXPORT_DEVICES_PER_RUN": "1",
    }
    broker = f"127.0.0.1:{redis.port}"
    # This machine's view: the daemon's, and this test's instance.
    here = {
        **stack.env(**exported),
        "CHECKPOINT_DB_HOST": str(POSTGRES["host"]),
        "CHECKPOINT_DB_PORT": str(POSTGRES["port"]),
        "CHECKPOINT_DB_NAME": database,
        "CHECKPOINT_DB_USER": str(POSTGRES["user"]),
        "CHECKPOINT_DB_PASSWORD": "",
        "CELERY_BROKER_URL": f"redis://{broker}/0",
        "CELERY_RESULT_BACKEND": f"redis://{broker}/1",
        "EXPORT_WORKER_SLOTS": "4",  # two hosts, two runs each
        "EXPORT_WORKER_CONCURRENCY": "2",
    }
    home = tmp_path / "daemon_home"
    home.mkdir()
    shutil.copy(WORKERS_YAML, home / "dagster.yaml")
    for name, value in {**here, "DAGSTER_HOME": str(home)}.items():
        monkeypatch.setenv(name, value)
    daemon_log = (tmp_path / "daemon.log").open("ab")
    daemon = None
    try:
        with network(2) as hosts:
            s3_port = int(stack.s3_url.rsplit(":", 1)[1])
            ports = {"influx": stack.influx.port, "s3": s3_port, "redis": redis.port}
            start_workers(hosts, {**os.environ, **here}, tmp_path, **ports)
            daemon = subprocess.Popen(
                dagster_command("dagster-daemon", "run"),
                env={**os.environ},
                cwd=CLI_CWD,
                stdout=daemon_log,
                stderr=daemon_log,
                start_new_session=True,
            )
            with DagsterInstance.from_config(str(home)) as instance:
                # Every run executes on a worker host, and both take runs.
                wait_until(
                    lambda: hosts_of(instance) == {"worker-1", "worker-2"}, "runs on both", 180
                )
                assert all(run.tags[CODE_TAG] == CODE_VERSION for run in runs_of(instance))

                # A host dies mid-run: the sensor reaps its silent run, the other host does
                # the rest, within a minute after the silence allowed.
                wait_until(lambda: running_on(instance, "worker-1"), "a run on worker-1", 60)
                doomed = {run.run_id for run in running_on(instance, "worker-1")}
                hosts.hosts[0].kill()
                killed = datetime.now(UTC)
                target = max(end, killed)
                wait_until(
                    lambda: (
                        all(found >= target for found in checkpoints(instance, devices).values())
                        and len(checkpoints(instance, devices)) == len(devices)
                    ),
                    "every device exported past the kill by worker-2",
                    STALE_SECONDS + 60,
                )
                reaped = [instance.get_run_by_id(run_id) for run_id in doomed]
                assert {run.status for run in reaped if run} == {DagsterRunStatus.FAILURE}
                later = [
                    run
                    for run in runs_of(instance)
                    if run.status == DagsterRunStatus.SUCCESS
                    and (stats := instance.get_run_stats(run.run_id)).start_time
                    and stats.start_time > killed.timestamp()
                ]
                assert later and {run.tags[HOST_TAG] for run in later} == {"worker-2"}
    finally:
        if daemon is not None:
            daemon.terminate()
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, 9)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(daemon.pid, 9)
        daemon_log.close()
        drop_database(database)
    # Every row exactly once, value by value, in the 10 s slices.
    settings = stack.settings(**exported)
    days = sorted({start.date(), end.date()})
    for device in devices:
        assert assert_reconciled(stack, device, days, settings=settings) == 200


# --- Without hosts ------------------------------------------------------------------------------


def test_the_worker_command_takes_a_run_at_a_time_per_process_named_after_its_host() -> None:
    command = worker_command({"EXPORT_WORKER_CONCURRENCY": "3"}, "box-7")
    assert command[:4] == [sys.executable, "-m", "celery", "--app=dagster_celery.app"]
    assert {"--concurrency=3", "--prefetch-multiplier=1", "--hostname=export@box-7"} <= set(command)
    for bad in ("0", "many", "65"):
        with pytest.raises(SettingsError, match=f"EXPORT_WORKER_CONCURRENCY.*{bad}"):
            worker_command({"EXPORT_WORKER_CONCURRENCY": bad}, "box-7")


def test_a_broker_that_does_not_answer_is_named_without_its_password() -> None:
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    with pytest.raises(
        ConnectionError, match=r"redis://127\.0\.0\.1:\d+/0 \(CELERY_BROKER_URL\)"
    ) as raised:
        broker_answers(url, timeout=0.5)
    assert "s3cret" not in str(raised.value)


def test_the_workers_instance_is_the_repos_but_for_the_queue_and_the_launcher() -> None:
    repo = yaml.safe_load((REPO / "dagster.yaml").read_text())
    workers = yaml.safe_load(WORKERS_YAML.read_text())
    assert {k: v for k, v in workers.items() if k not in ("run_coordinator", "run_launcher")} == {
        k: v for k, v in repo.items() if k != "run_coordinator"
    }
    assert workers["run_launcher"]["module"] == CeleryLauncher.__module__
    assert workers["run_launcher"]["class"] == CeleryLauncher.__name__
    config = workers["run_coordinator"]["config"]
    assert config["max_concurrent_runs"] == {"env": "EXPORT_WORKER_SLOTS"}
    # A launch refused for want of a broker is retried, the run left queued.
    assert config["max_user_code_failure_retries"] > 0


def test_a_run_is_not_published_while_the_broker_is_down_and_says_it_stays_queued() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    launcher = CeleryLauncher(default_queue="dagster", broker=dead, backend=dead)
    run = DagsterRun(job_name=CONTINUOUS_JOB, run_id=str(uuid.uuid4()))
    with pytest.raises(BrokerUnreachable, match=r"does not answer.*the run stays queued"):
        launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))


def test_ready_says_when_the_broker_is_missing(
    stack: Stack, redis: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The broker is the instance's: none with the repo's dagster.yaml, the launcher's with the
    # workers' (its {env: CELERY_BROKER_URL}).
    assert instance_broker(str(REPO)) is None
    shutil.copy(WORKERS_YAML, tmp_path / "dagster.yaml")
    url = f"redis://127.0.0.1:{redis.port}/0"
    for name, value in {"CELERY_BROKER_URL": url, "CELERY_RESULT_BACKEND": url}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("EXPORT_WORKER_SLOTS", "4")
    assert instance_broker(str(tmp_path)) == url
    assert BROKER_CHECK not in build_checks(stack.settings())
    checks = {BROKER_CHECK: build_checks(stack.settings(), url)[BROKER_CHECK]}
    with ThreadPoolExecutor(2) as pool:
        assert run_checks(checks, pool) == {BROKER_CHECK: True}
        redis.stop()
        assert run_checks(checks, pool) == {BROKER_CHECK: False}


def test_a_host_on_other_code_refuses_the_run_naming_itself(instance: DagsterInstance) -> None:
    run = instance.add_run(
        DagsterRun(
            job_name=CONTINUOUS_JOB, run_id=str(uuid.uuid4()), tags={CODE_TAG: "0123456789ab"}
        )
    )
    with pytest.raises(
        Failure,
        match=rf"host {socket.gethostname()} runs .* code {CODE_VERSION}, but this run was "
        "made by code 0123456789ab",
    ):
        mark_process(instance, run)
    same = instance.add_run(
        DagsterRun(job_name=CONTINUOUS_JOB, run_id=str(uuid.uuid4()), tags={CODE_TAG: CODE_VERSION})
    )
    mark_process(instance, same)
    marked = instance.get_run_by_id(same.run_id)
    assert marked is not None and marked.tags[HOST_TAG] == socket.gethostname()
