"""Runs on worker hosts (deploy/workers/dagster.yaml, `python -m export_pipeline.workers`):
two hosts of the test's own making (network namespaces, `hosts.py`), the real daemon and sensor
on this machine, Redis as the Celery broker and result backend, InfluxDB, PostgreSQL and
SeaweedFS real and reached by the hosts over their links."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import DagsterEventType, DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter
from dagster._core.code_pointer import ModuleCodePointer
from dagster._core.launcher import LaunchRunContext
from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin
from dagster._grpc.types import ExecuteRunArgs
from dagster._serdes import pack_value

from export_pipeline.defs.resources import ExportBucketResource, answered
from export_pipeline.defs.runs import CONTINUOUS_JOB, HOST_TAG
from export_pipeline.engine.store import StoreError
from export_pipeline.health import BROKER_CHECK, build_checks, run_checks
from export_pipeline.record.ledger import checkpoints
from export_pipeline.settings import SettingsError, without_password
from export_pipeline.workers import (
    CODE_TAG,
    CODE_VERSION,
    BrokerUnreachable,
    CeleryLauncher,
    broker_answers,
    code_version,
    instance_broker,
    refuse_other_code,
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


def requeued(instance: DagsterInstance) -> bool:
    """A run whose launch failed for want of the broker, put back in the queue."""
    for run in runs_of(instance):
        if run.status != DagsterRunStatus.QUEUED:
            continue
        events = instance.all_logs(run.run_id, of_type=DagsterEventType.ENGINE_EVENT)
        if any("re-submitting the run into the queue" in event.message for event in events):
            return True
    return False


def test_runs_wait_for_the_broker_then_run_on_two_worker_hosts_and_survive_one_killed_mid_run(
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
            redis.stop()  # the broker is down when the first runs are launched
            daemon = subprocess.Popen(
                dagster_command("dagster-daemon", "run"),
                env={**os.environ},
                cwd=CLI_CWD,
                stdout=daemon_log,
                stderr=daemon_log,
                start_new_session=True,
            )
            with DagsterInstance.from_config(str(home)) as instance:
                # Not published, not failed: back in the queue until the broker answers.
                wait_until(lambda: requeued(instance), "a launch put back in the queue", 60)
                assert not [r for r in runs_of(instance) if r.status == DagsterRunStatus.FAILURE]
                redis.start()
                s3_port = int(stack.s3_url.rsplit(":", 1)[1])
                ports = {"influx": stack.influx.port, "s3": s3_port, "redis": redis.port}
                start_workers(hosts, {**os.environ, **here}, tmp_path, **ports)

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
                # Within a minute of the kill (or of the data's end, if later), the silence
                # allowed before the dead run is reaped included.
                wait_until(
                    lambda: (
                        all(found >= target for found in checkpoints(instance, devices).values())
                        and len(checkpoints(instance, devices)) == len(devices)
                    ),
                    "every device exported past the kill by worker-2",
                    (target - datetime.now(UTC)).total_seconds() + 60,
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
    # The workers' own check before each run never failed (a handler's error is only logged).
    for log in tmp_path.glob("worker-*.log"):
        assert "Signal handler" not in log.read_text(errors="replace"), log.name
    # Every row exactly once, value by value, in the 10 s slices.
    settings = stack.settings(**exported)
    days = sorted({start.date(), end.date()})
    for device in devices:
        assert assert_reconciled(stack, device, days, settings=settings) == 200


# --- Without hosts ------------------------------------------------------------------------------


def test_the_worker_command_fetches_a_run_only_for_a_free_process_named_after_its_host() -> None:
    env = {"EXPORT_WORKER_CONCURRENCY": "3", "CELERY_BROKER_URL": "redis://r:6379/0"}
    command = worker_command({**env, "LOG_LEVEL": ""}, "box-7")
    # This module's app: dagster-celery's tasks and the code check before each run.
    assert command[:4] == [sys.executable, "-m", "celery", "--app=export_pipeline.workers"]
    expected = {"--concurrency=3", "--disable-prefetch", "--hostname=export@box-7"}
    assert expected | {"--loglevel=INFO"} <= set(command)  # an empty LOG_LEVEL: the default
    assert "--disable-prefetch" not in worker_command({"CELERY_BROKER_URL": "pyamqp://q//"}, "b")
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
    own = ("run_coordinator", "run_launcher", "run_monitoring")
    assert {k: v for k, v in workers.items() if k not in own} == {
        k: v for k, v in repo.items() if k not in own
    }
    assert workers["run_monitoring"]["enabled"] and "run_monitoring" not in repo
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


def launch_args(run_id: str) -> dict[str, Any]:
    """What dagster-celery's task receives for a run, as the launcher packs it."""
    pointer = ModuleCodePointer("export_pipeline.definitions", "defs", str(CLI_CWD))
    origin = JobPythonOrigin(CONTINUOUS_JOB, RepositoryPythonOrigin(sys.executable, pointer))
    packed = pack_value(ExecuteRunArgs(job_origin=origin, run_id=run_id, instance_ref=None))
    return {"execute_job_args_packed": packed}


def test_a_host_on_other_code_refuses_the_run_naming_itself(instance: DagsterInstance) -> None:
    other = instance.add_run(
        DagsterRun(
            job_name=CONTINUOUS_JOB, run_id=str(uuid.uuid4()), tags={CODE_TAG: "0123456789ab"}
        )
    )
    refuse_other_code(kwargs=launch_args(other.run_id))
    failed = instance.get_run_by_id(other.run_id)
    assert failed is not None and failed.status == DagsterRunStatus.FAILURE
    (event,) = instance.all_logs(other.run_id, of_type=DagsterEventType.PIPELINE_FAILURE)
    assert re.search(
        rf"host {socket.gethostname()} runs export-pipeline code {CODE_VERSION}, but this run "
        "was published by code 0123456789ab",
        event.message,
    )
    same = instance.add_run(
        DagsterRun(job_name=CONTINUOUS_JOB, run_id=str(uuid.uuid4()), tags={CODE_TAG: CODE_VERSION})
    )
    refuse_other_code(kwargs=launch_args(same.run_id))
    kept = instance.get_run_by_id(same.run_id)
    assert kept is not None and kept.status == DagsterRunStatus.NOT_STARTED


def test_the_code_version_is_the_packages_source_and_nothing_else(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    (package / "sub" / "b.py").write_text("y = 2\n")
    first = code_version(package)
    (package / ".#a.py").symlink_to("nowhere")  # an editor's lock: not code, not readable
    (package / "sub" / "b.pyc").write_bytes(b"\0")
    assert code_version(package) == first
    (package / "sub" / "b.py").write_text("y = 3\n")
    assert code_version(package) != first


def test_a_broker_url_is_shown_without_its_password() -> None:
    assert without_password("redis://:pw@h:6379/0") == "redis://h:6379/0"
    failover = "pyamqp://u:pw@a:5672//;pyamqp://u:pw@b:5672//"
    assert without_password(failover) == "pyamqp://u@a:5672//;pyamqp://u@b:5672//"
    assert without_password("redis://:pw@h:port/0") == "redis://h:port/0"


def test_a_service_a_host_cannot_reach_is_named_with_the_host(stack: Stack) -> None:
    settings = stack.settings(S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}", EXPORT_RETRIES="0")
    store = ExportBucketResource.from_settings(settings.s3).store()
    with pytest.raises(StoreError) as raised:
        answered(store.check, settings.export)
    shown = "".join(traceback.format_exception_only(raised.value))
    assert "S3" in shown and f"(seen from host {socket.gethostname()})" in shown
