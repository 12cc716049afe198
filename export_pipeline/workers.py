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
  the broker is back, where dagster-celery's launcher would mark it failed.
- `python -m export_pipeline.workers`: a Celery worker for those runs, started only when its
  settings are valid and its broker answers, named after its host, taking one run per process
  at a time (no prefetch: a run waiting behind another on a busy worker would be late).

A worker host that dies mid-run leaves its run STARTED for ever (Celery never hears back): the
continuous_export sensor marks it failed once it has logged nothing for EXPORT_STALE_RUN_SECONDS,
and requests its slices again, for whichever worker is free (`defs/runs.py`).
"""

from __future__ import annotations

import os
import socket
import sys

from dagster._core.errors import DagsterUserCodeUnreachableError
from dagster._core.launcher import LaunchRunContext
from dagster_celery.launcher import CeleryRunLauncher

from export_pipeline.settings import Settings, SettingsError, load_env_file, without_password

BROKER_VARIABLE, BACKEND_VARIABLE = "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"
CONCURRENCY_VARIABLE = "EXPORT_WORKER_CONCURRENCY"
BROKER_TIMEOUT_SECONDS = 3.0
QUEUE = "dagster"  # dagster-celery's queue, which its app declares


class BrokerUnreachable(DagsterUserCodeUnreachableError):
    """The Celery broker did not answer: the run queue puts the run back rather than failing it
    (it retries launches that fail with this class of error)."""


def broker_answers(url: str, timeout: float = BROKER_TIMEOUT_SECONDS) -> None:
    """Returns when the broker at `url` accepts a connection; raises naming it otherwise."""
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=timeout) as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)
    except Exception as error:
        raise ConnectionError(
            f"the Celery broker at {without_password(url)} ({BROKER_VARIABLE}) does not answer: "
            f"{type(error).__name__}: {error}"
        ) from error


class CeleryLauncher(CeleryRunLauncher):
    """dagster-celery's run launcher, which keeps a run queued while the broker is down."""

    def launch_run(self, context: LaunchRunContext) -> None:
        try:
            broker_answers(self.broker or "")
        except ConnectionError as error:
            raise BrokerUnreachable(f"{error}: the run stays queued") from error
        super().launch_run(context)


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
    return [
        sys.executable,
        "-m",
        "celery",
        "--app=dagster_celery.app",
        "worker",
        f"--queues={QUEUE}",
        f"--concurrency={raw}",
        "--prefetch-multiplier=1",
        f"--hostname=export@{hostname}",
        # No chatter between workers: each takes runs from the broker, and nothing else.
        "--without-gossip",
        "--without-mingle",
        f"--loglevel={env.get('LOG_LEVEL', 'INFO').upper()}",
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
