"""P3: continuous operation as deployed — dagster-daemon running the sensor, its runs executing
in the pipeline's code server — while the simulator writes one point a second per device; export
lag sampled every 10 s.

    .venv/bin/python -m bench.sustained --devices 1000 --minutes 12
    .venv/bin/python -m bench.sustained --devices 5000 --minutes 12

P13, `--worker-hosts 2` (as root): the same with the runs on worker hosts (docs/workers.md), two
network namespaces of the bench's own with a Celery worker each, one run at a time each, Redis as
the broker: as many runs at once as the one-host default gives this machine's two cores. The cores
are shared, so it shows the mechanism's overhead, not more capacity.

Lag is sampled from the third interval on, so 12 minutes at 60 s slices measure 10 ticks; the
lateness allowance is the default (EXPORT_LATENESS_SECONDS, 30 s).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from bench.run import Bench, record
from export_pipeline.record.ledger import checkpoints
from export_pipeline_tests.services import CodeServer

JOB_NAME = "export_due_slices"
JOB = RunsFilter(job_name=JOB_NAME)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def start_workers(bench: Bench, env: dict[str, str], count: int, stack: ExitStack) -> None:
    """`count` worker hosts (network namespaces), a Celery worker on each taking one run at a
    time, Redis as broker and backend; the daemon's instance becomes the workers' one."""
    from export_pipeline_tests.hosts import WORKERS_YAML, RedisServer, network, start_workers

    redis = RedisServer(bench.root)
    redis.start()
    stack.callback(redis.stop)
    hosts = stack.enter_context(network(count))
    shutil.copy(WORKERS_YAML, bench.home / "dagster.yaml")
    local = f"redis://127.0.0.1:{redis.port}"
    env.update(
        CELERY_BROKER_URL=f"{local}/0",
        CELERY_RESULT_BACKEND=f"{local}/1",
        EXPORT_WORKER_SLOTS=str(count),
        EXPORT_WORKER_CONCURRENCY="1",
    )
    (bench.root / "logs").mkdir()
    ports = {"influx": bench.influx.port, "s3": bench.s3_server.port, "redis": redis.port}
    start_workers(hosts, env, bench.root / "logs", **ports)


def sustained(
    bench: Bench, devices: int, minutes: float, interval: int, worker_hosts: int = 0
) -> dict[str, Any]:
    fleet = [f"device-{i:03d}" for i in range(1, devices + 1)]
    env = {
        **os.environ,
        **bench.env(
            EXPORT_INTERVAL_SECONDS=str(interval),
            LOOKBACK_HOURS="1",
            DEVICE_IDS=",".join(fleet),
        ),
    }
    with ExitStack() as stack:
        if worker_hosts:
            start_workers(bench, env, worker_hosts, stack)
        os.environ.update(env)
        (bench.root / "logs").mkdir(exist_ok=True)
        result = measured(bench, env, fleet, minutes, interval)
    if worker_hosts:
        result["worker_hosts"] = worker_hosts
        result["target"] = "every run succeeds; lag p99 reported beside P3's on one host"
    return result


def measured(
    bench: Bench, env: dict[str, str], fleet: list[str], minutes: float, interval: int
) -> dict[str, Any]:
    devices, logs = len(fleet), bench.root / "logs"
    simulator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "export_pipeline.simulate",
            "--devices",
            str(devices),
            "--follow",
            "--create-database",
        ],
        env=env,
        cwd=bench.root,
        stdout=(logs / "simulate.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    # The daemon loads the code from the pipeline's code server, where runs execute (forked from
    # its warm process), as docker-compose and scripts/run deploy them.
    code_server = CodeServer(env, logs / "code-server.log").start()
    daemon = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("dagster-daemon")),
            "run",
            "-w",
            str(code_server.workspace(bench.root / "workspace.yaml")),
        ],
        env=env,
        cwd=bench.root,
        stdout=(logs / "daemon.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    lags: list[float] = []
    started = time.time()
    try:
        with DagsterInstance.from_config(str(bench.home)) as instance:
            while time.time() - started < minutes * 60:
                time.sleep(10)
                if time.time() - started < 2 * interval:
                    continue  # the first tick starts the fleet; measure from the second on
                now = datetime.now(UTC)
                done = checkpoints(instance, fleet)
                lags += [
                    (now - done[d]).total_seconds() if d in done else float("inf") for d in fleet
                ]
            # The runs asked for while measuring are let finish before the daemon stops (a run
            # cut by the stop is not a failed one); up to two minutes.
            asked = [r.dagster_run.run_id for r in instance.get_run_records(JOB)]
            deadline = time.time() + 120
            while time.time() < deadline:
                runs = instance.get_run_records(RunsFilter(job_name=JOB_NAME, run_ids=asked))
                if all(r.dagster_run.is_finished for r in runs):
                    break
                time.sleep(2)
            # Why a run failed, kept with the result: the bench's database does not outlive it.
            failures = {
                r.dagster_run.run_id[:8]: [
                    entry.message[:500]
                    for entry in instance.all_logs(r.dagster_run.run_id)
                    if isinstance(entry.level, int) and entry.level >= logging.ERROR
                ][-3:]
                for r in runs
                if r.dagster_run.status == DagsterRunStatus.FAILURE
            }
    finally:
        try:
            daemon.send_signal(signal.SIGTERM)
            simulator.terminate()
            daemon.wait(timeout=120)
            simulator.wait(timeout=30)
        finally:
            code_server.stop()
    finished = [r for r in runs if r.dagster_run.status == DagsterRunStatus.SUCCESS]
    durations = [r.end_time - r.start_time for r in finished if r.end_time and r.start_time]
    delays = [r.start_time - r.create_timestamp.timestamp() for r in finished if r.start_time]
    p99 = percentile(lags, 0.99) if lags else float("inf")
    return {
        "devices": devices,
        "minutes": minutes,
        "runs_succeeded": len(finished),
        "runs_total": len(runs),
        "runs_not_succeeded": sorted(
            f"{r.dagster_run.run_id[:8]} {r.dagster_run.status.value}"
            for r in runs
            if r.dagster_run.status != DagsterRunStatus.SUCCESS
        ),
        "failures": failures,
        "run_seconds_median": round(statistics.median(durations), 1) if durations else None,
        "run_seconds_max": round(max(durations), 1) if durations else None,
        # From the sensor's request to the run's process starting: the daemon's share of the lag.
        "run_start_delay_seconds_median": round(statistics.median(delays), 1) if delays else None,
        "lag_p50_seconds": round(percentile(lags, 0.5), 1) if lags else None,
        # JSON has no infinity: a device not yet exported at a sample makes the p99 unbounded.
        "lag_p99_seconds": round(p99, 1) if p99 != float("inf") else None,
        "samples_of_devices_never_exported": sum(1 for lag in lags if lag == float("inf")),
        "ticks_measured": int((minutes * 60 - 2 * interval) // interval),
        "ratio": round(p99 / interval, 2) if p99 != float("inf") else None,
        "target": "every run succeeds; p99 <= 100 s at 5,000 devices, <= 2 intervals at 10,000",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--minutes", type=float, default=12)
    parser.add_argument("--interval", type=int, default=60)
    parser.add_argument("--worker-hosts", type=int, default=0, help="P13: runs on worker hosts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-") as root:
        bench = Bench(Path(root))
        try:
            result = sustained(bench, args.devices, args.minutes, args.interval, args.worker_hosts)
        finally:
            bench.close()
    name = f"P3 sustained, {args.devices} devices"
    if args.worker_hosts:
        name = f"P13 sustained on {args.worker_hosts} worker hosts, {args.devices} devices"
    if "EXPORT_DEVICES_PER_RUN" in os.environ:  # a tuned run is a row of its own
        name += f", EXPORT_DEVICES_PER_RUN={os.environ['EXPORT_DEVICES_PER_RUN']}"
        result["devices_per_run"] = int(os.environ["EXPORT_DEVICES_PER_RUN"])
    record(name, result)


if __name__ == "__main__":
    main()
