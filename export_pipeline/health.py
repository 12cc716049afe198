"""`/health` and `/ready` for Kubernetes probes: `python -m export_pipeline.health` on PORT.

`/health` says the process is alive. `/ready` runs four checks at once, each bounded by a short
timeout, so it answers within two seconds even when a dependency hangs: the Dagster daemon's
sensor heartbeat is fresh, PostgreSQL answers a query, S3_BUCKET answers HeadBucket, InfluxDB
answers a ping; and a fifth where DAGSTER_HOME's instance runs them on worker hosts
(deploy/workers/dagster.yaml): the broker accepts a connection. A failing check's reason is
logged, never returned, so nothing internal reaches an unauthenticated caller. Invalid settings
make every check fail (and are logged by name).

`/ready` also lists `warnings` that do not make it fail: a fleet discovery has filled to
EXPORT_MAX_DEVICES, whose new devices are not exported.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version

import psycopg2
import requests
import uvicorn
from dagster import DagsterInstance
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from export_pipeline.defs.resources import ExportBucketResource
from export_pipeline.record.keys import DEVICES
from export_pipeline.settings import LOG_LEVELS, Settings, SettingsError, load_env_file
from export_pipeline.workers import broker_answers, instance_broker

log = logging.getLogger("export_pipeline.health")

CHECK_TIMEOUT_SECONDS = 1.5
HEARTBEAT_TOLERANCE_SECONDS = 120  # the daemon heartbeats every 30 s
CHECKS = ("worker_running", "checkpoint_store_connected", "s3_accessible", "influxdb_reachable")
BROKER_CHECK = "broker_reachable"  # with CELERY_BROKER_URL set: runs on worker hosts

Check = Callable[[], None]  # returns when healthy, raises with the reason otherwise


def package_version() -> str:
    try:
        return version("export-pipeline")
    except PackageNotFoundError:
        return "unknown"


@functools.cache
def dagster_instance() -> DagsterInstance:
    """Opened once: the first opening checks the storage schema and takes seconds."""
    return DagsterInstance.get()


def sensor_heartbeat_is_fresh(now: Callable[[], float] = time.time) -> None:
    heartbeat = dagster_instance().get_daemon_heartbeats().get("SENSOR")
    if heartbeat is None:
        raise RuntimeError("no sensor daemon heartbeat has ever been recorded")
    age = now() - heartbeat.timestamp
    if age > HEARTBEAT_TOLERANCE_SECONDS:
        raise RuntimeError(f"the sensor daemon's last heartbeat is {age:.0f} s old")


def build_checks(settings: Settings, broker: str | None = None) -> dict[str, Check]:
    """`broker`: the Celery broker runs are published to, where they run on worker hosts."""
    timeout = CHECK_TIMEOUT_SECONDS

    def checkpoint_store() -> None:
        db = settings.checkpoint
        connection = psycopg2.connect(
            host=db.host,
            port=db.port,
            dbname=db.name,
            user=db.user,
            password=db.password,
            connect_timeout=1,
            options="-c statement_timeout=1000",
        )
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
                cursor.fetchone()
        finally:
            connection.close()

    s3 = ExportBucketResource.from_settings(settings.s3).store(4, timeout_seconds=timeout)

    def influxdb() -> None:
        answer = requests.get(f"{settings.influx.url}/ping", timeout=timeout)
        if answer.status_code != 204:
            raise RuntimeError(f"ping answered {answer.status_code}")

    checks = {
        "worker_running": sensor_heartbeat_is_fresh,
        "checkpoint_store_connected": checkpoint_store,
        "s3_accessible": s3.check,
        "influxdb_reachable": influxdb,
    }
    if broker:  # runs go to worker hosts (docs/workers.md): none starts without the broker
        checks[BROKER_CHECK] = functools.partial(broker_answers, broker, timeout)
    return checks


def fleet_warnings(settings: Settings) -> list[str]:
    """The fleet at discovery's cap (DEVICE_IDS empty): new devices are not exported."""
    if settings.export.device_ids:
        return []
    registered = len(dagster_instance().get_dynamic_partitions(DEVICES))
    if registered < settings.export.max_devices:
        return []
    return [
        f"the fleet is at EXPORT_MAX_DEVICES={settings.export.max_devices:,} "
        f"({registered:,} devices registered): new devices are not exported"
    ]


def run_checks(
    checks: Mapping[str, Check],
    pool: ThreadPoolExecutor,
    pending: dict[str, Future[None]] | None = None,
) -> dict[str, bool]:
    """Run every check at once; one that has not passed within the timeout has failed.

    A check still hanging from an earlier probe is not started again (it fails at once), so a
    dependency that hangs holds one thread, not one per probe.
    """
    pending = {} if pending is None else pending
    futures: dict[str, Future[None]] = {}
    for name, check in checks.items():
        earlier = pending.get(name)
        if earlier is not None and not earlier.done():
            futures[name] = earlier
        else:
            futures[name] = pending[name] = pool.submit(check)
    wait(futures.values(), timeout=CHECK_TIMEOUT_SECONDS)
    results = {}
    for name, future in futures.items():
        if not future.done():
            log.warning("readiness check %s timed out after %.1f s", name, CHECK_TIMEOUT_SECONDS)
            results[name] = False
        elif future.exception() is not None:
            log.warning("readiness check %s failed: %s", name, future.exception())
            results[name] = False
        else:
            results[name] = True
    return results


def build_app(
    checks: Mapping[str, Check] | None, warnings: Callable[[], list[str]] | None = None
) -> Starlette:
    """`checks` is None when the settings are invalid: the service stays up and is not ready.
    `warnings` runs beside the checks, within their timeout."""
    # Hung checks keep their thread until their own timeout ends; enough threads for a few.
    pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="ready")
    pending: dict[str, Future[None]] = {}

    async def health(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "status": "healthy",
                "version": package_version(),
                "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            }
        )

    async def ready(request: Request) -> JSONResponse:
        noted: list[str] = []
        if checks is None:
            results = dict.fromkeys(CHECKS, False)
        else:
            found = pool.submit(warnings) if warnings is not None else None
            results = await _in_thread(lambda: run_checks(checks, pool, pending))
            if found is not None:
                try:
                    noted = found.result(timeout=0.1)
                except Exception as error:  # a timeout too: the checks say what is down
                    log.warning("readiness warnings could not be read: %r", error)
        ok = all(results.values())
        body: dict[str, object] = {"ready": ok, "checks": results}
        if noted:
            body["warnings"] = noted
        return JSONResponse(body, status_code=200 if ok else 503)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if checks is not None:
            # Open Dagster's storage before serving, so the first /ready is not a timeout; a
            # storage that is down must not keep the service from starting, though.
            try:
                await asyncio.wait_for(asyncio.wrap_future(pool.submit(dagster_instance)), 30)
            except Exception as error:
                log.warning("Dagster's storage could not be opened at start-up: %s", error)
        yield
        pool.shutdown(wait=False, cancel_futures=True)

    return Starlette(routes=[Route("/health", health), Route("/ready", ready)], lifespan=lifespan)


async def _in_thread(function: Callable[[], dict[str, bool]]) -> dict[str, bool]:
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(function)


def main() -> int:
    load_env_file()
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    level = level if level in LOG_LEVELS else "INFO"
    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("export_pipeline").setLevel(level)
    try:
        settings: Settings | None = Settings.from_env()
    except SettingsError as error:
        log.error("%s", error)
        settings = None
    try:
        broker = instance_broker(os.environ.get("DAGSTER_HOME"))
    except Exception as error:  # the instance's own check names what is wrong
        log.error("DAGSTER_HOME's dagster.yaml could not be read: %s", error)
        broker = None
    raw_port = os.environ.get("PORT", "8080")
    port = settings.port if settings else int(raw_port) if raw_port.isdigit() else 8080
    app = build_app(
        build_checks(settings, broker) if settings else None,
        functools.partial(fleet_warnings, settings) if settings else None,
    )
    # uvicorn stops gracefully on SIGTERM: it finishes the requests in flight, then returns.
    uvicorn.run(app, host="0.0.0.0", port=port, log_level=level.lower(), access_log=False)
    # A readiness check still blocked on a dependency that hangs holds a worker thread, which
    # the interpreter would wait for at exit: nothing is left to finish, so exit now.
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
