"""Runs on worker hosts: Dagster's Celery run launcher, and `python -m export_pipeline.workers`.

With `deploy/workers/dagster.yaml` as the instance, the daemon does not start a run: it publishes
it to a Celery broker, and a worker on any host executes the whole run in one of its processes
(dagster-celery's `execute_job` task, the in-process executor every job of the package uses). A
worker loads the run's job from its own install of this package and reaches InfluxDB, S3 and
PostgreSQL with its own environment, so every address is the worker host's view of the service.

What the package adds to dagster-celery:

- `CeleryLauncher`: a run is published only when the broker answers. When it does not, the
  launch fails as an unreachable code location does, which the run queue retries
  (`max_user_code_failure_retries` in deploy/workers/dagster.yaml): the run stays queued until
  the broker is back, where dagster-celery's launcher would mark it failed. Each run is stamped
  with the code version of the daemon that publishes it (`export/code`).
- `python -m export_pipeline.workers`: a Celery worker for those runs (this module is its Celery
  app: dagster-celery's, and a check before each run), started only when its settings are valid
  and its broker answers, named after its host, fetching a run only when one of its processes is
  free. A run stamped with other code than the worker's is failed before it starts, naming the
  host and both versions: a host left behind by a deployment takes no work.

A worker host that dies mid-run leaves its run STARTED for ever (Celery never hears back): the
continuous_export sensor marks it failed once it has logged nothing for EXPORT_STALE_RUN_SECONDS,
and requests its slices again, for whichever worker is free (`defs/runs.py`).
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from pathlib import Path
from typing import Any

from celery.signals import task_prerun
from dagster import DagsterInstance
from dagster._core.errors import DagsterUserCodeUnreachableError
from dagster._core.launcher import LaunchRunContext
from dagster._grpc.types import ExecuteRunArgs, ResumeRunArgs
from dagster._serdes import unpack_value
from dagster_celery import app as dagster_celery_app
from dagster_celery.launcher import CeleryRunLauncher

from export_pipeline.settings import (
    LOG_LEVELS,
    Settings,
    SettingsError,
    load_env_file,
    without_password,
)

BROKER_VARIABLE, BACKEND_VARIABLE = "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"
CONCURRENCY_VARIABLE = "EXPORT_WORKER_CONCURRENCY"
BROKER_TIMEOUT_SECONDS = 3.0
QUEUE = "dagster"  # dagster-celery's queue, which its app declares
CODE_TAG = "export/code"  # the code version of the daemon that published the run


PACKAGE = Path(__file__).resolve().parent


def code_version(package: Path = PACKAGE) -> str:
    """A digest of the package's source: two processes agree on it only when they run the same
    code, whatever its version number says (a worker host left on an older install)."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue  # an editor's lock or backup file, not code
        digest.update(relative.as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


# Read once, when the package is imported: the code this process runs, even if its files are
# replaced afterwards.
CODE_VERSION = code_version()


class BrokerUnreachable(DagsterUserCodeUnreachableError):
    """The Celery broker did not answer: the run queue puts the run back rather than failing it
    (it retries launches that fail with this class of error)."""


def broker_answers(url: str, timeout: float = BROKER_TIMEOUT_SECONDS) -> None:
    """Returns when the broker at `url` accepts a connection; raises naming it otherwise."""
    from kombu import Connection

    with Connection(url, connect_timeout=timeout) as connection:
        answering(connection, url, timeout)


def answering(connection: Any, url: str, timeout: float = BROKER_TIMEOUT_SECONDS) -> None:
    """Returns once `connection` (to the broker at `url`) is made; raises naming the broker,
    without its password, otherwise."""
    from kombu.exceptions import OperationalError

    try:
        connection.ensure_connection(max_retries=1, timeout=timeout)
    except (OperationalError, OSError) as error:
        raise ConnectionError(
            f"the Celery broker at {without_password(url)} ({BROKER_VARIABLE}) does not answer: "
            f"{type(error).__name__}: {error}"
        ) from error


class CeleryLauncher(CeleryRunLauncher):
    """dagster-celery's run launcher, which keeps a run queued while the broker is down and
    stamps each run with the code version that publishes it."""

    def launch_run(self, context: LaunchRunContext) -> None:
        from kombu.exceptions import OperationalError

        try:  # the app's own connection: its transport and TLS options
            with self.celery.connection_for_write() as connection:
                answering(connection, self.broker or "")
        except ConnectionError as error:
            raise BrokerUnreachable(f"{error}; the run stays queued") from error
        self._instance.add_run_tags(context.dagster_run.run_id, {CODE_TAG: CODE_VERSION})
        try:
            super().launch_run(context)
        except OperationalError as error:  # the broker went away since
            raise BrokerUnreachable(
                f"the Celery broker at {without_password(self.broker or '')} failed the "
                f"publish: {error}; the run stays queued"
            ) from error


# The worker's Celery app: dagster-celery's, with its run tasks.
app = dagster_celery_app.app


@task_prerun.connect
def refuse_other_code(kwargs: dict[str, Any] | None = None, **_: Any) -> None:
    """Before a run starts on this worker: a run stamped with other code than this worker's is
    failed, naming the host (the run's task then finds it finished and does nothing)."""
    packed = (kwargs or {}).get("execute_job_args_packed")
    if packed is None:
        return
    run_id = unpack_value(packed, as_type=(ExecuteRunArgs, ResumeRunArgs)).run_id
    with DagsterInstance.get() as instance:
        run = instance.get_run_by_id(run_id)
        made_by = run.tags.get(CODE_TAG) if run else None
        if run is None or made_by in (None, CODE_VERSION):
            return
        instance.report_run_failed(
            run,
            f"host {socket.gethostname()} runs export-pipeline code {CODE_VERSION}, but this run "
            f"was published by code {made_by}: install the same code on every worker host and "
            "restart its workers; the run's slices are requested again",
        )


def instance_broker(home: str | None) -> str | None:
    """The broker runs are published to, where the instance in `home` (DAGSTER_HOME) launches
    them on worker hosts; None where runs start on this host. Read from its dagster.yaml, with
    the environment's values, without connecting to anything."""
    from dagster._core.instance.ref import InstanceRef

    if not home:
        return None
    data = InstanceRef.from_dir(home).run_launcher_data
    if data is None or data.class_name != CeleryLauncher.__name__:
        return None
    return data.rehydrate(CeleryLauncher).broker


def worker_command(env: dict[str, str], hostname: str) -> list[str]:
    """The Celery worker's command line: dagster-celery's app, its queue, EXPORT_WORKER_CONCURRENCY
    runs at once (default 2), no prefetch, named after the host."""
    raw = env.get(CONCURRENCY_VARIABLE, "2")
    if not raw.isdigit() or not 1 <= int(raw) <= 64:
        raise SettingsError(
            f"{CONCURRENCY_VARIABLE} must be a whole number from 1 to 64, not {raw!r}"
        )
    level = (env.get("LOG_LEVEL") or "").strip().upper()
    return [
        sys.executable,
        "-m",
        "celery",
        "--app=export_pipeline.workers",  # this module, whatever runs it (`python -m`: __main__)
        "worker",
        f"--queues={QUEUE}",
        f"--concurrency={raw}",
        # A run is fetched only when a process is free (Redis), never held behind a slow one.
        "--prefetch-multiplier=1",
        *(["--disable-prefetch"] if env.get(BROKER_VARIABLE, "").startswith("redis") else []),
        f"--hostname=export@{hostname}",
        # No chatter between workers: each takes runs from the broker, and nothing else.
        "--without-gossip",
        "--without-mingle",
        f"--loglevel={level if level in LOG_LEVELS else 'INFO'}",
    ]


def main() -> int:
    """Check what the worker needs, then become the Celery worker (exec)."""
    load_env_file()
    env = dict(os.environ)
    try:
        Settings.from_env()
        for name in (BROKER_VARIABLE, BACKEND_VARIABLE, "DAGSTER_HOME"):
            if not env.get(name):
                raise SettingsError(f"{name} is not set: a worker needs it (docs/workers.md)")
        command = worker_command(env, socket.gethostname())
        broker_answers(env[BROKER_VARIABLE])
    except (SettingsError, ConnectionError) as error:
        print(f"export_pipeline.workers: {error}", file=sys.stderr)
        return 2
    os.execv(command[0], command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
