"""P3: continuous operation as deployed — dagster-daemon running the sensor and its runs — while
the simulator writes one point a second per device; export lag sampled every 10 s.

    .venv/bin/python -m bench.sustained --devices 1000 --minutes 12
    .venv/bin/python -m bench.sustained --devices 5000 --minutes 12

Lag is sampled from the third interval on, so 12 minutes at 60 s slices measure 10 ticks; the
lateness allowance is the default (EXPORT_LATENESS_SECONDS, 30 s).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from bench.run import Bench, record
from export_pipeline.record.ledger import checkpoints

JOB_NAME = "export_due_slices"
JOB = RunsFilter(job_name=JOB_NAME)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def sustained(bench: Bench, devices: int, minutes: float, interval: int) -> dict[str, Any]:
    fleet = [f"device-{i:03d}" for i in range(1, devices + 1)]
    env = {
        **os.environ,
        **bench.env(
            EXPORT_INTERVAL_SECONDS=str(interval),
            LOOKBACK_HOURS="1",
            DEVICE_IDS=",".join(fleet),
        ),
    }
    os.environ.update(env)
    logs = bench.root / "logs"
    logs.mkdir()
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
    daemon = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("dagster-daemon")),
            "run",
            "-m",
            "export_pipeline.definitions",
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
        daemon.send_signal(signal.SIGTERM)
        simulator.terminate()
        daemon.wait(timeout=120)
        simulator.wait(timeout=30)
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-") as root:
        bench = Bench(Path(root))
        try:
            result = sustained(bench, args.devices, args.minutes, args.interval)
        finally:
            bench.close()
    name = f"P3 sustained, {args.devices} devices"
    if "EXPORT_DEVICES_PER_RUN" in os.environ:  # a tuned run is a row of its own
        name += f", EXPORT_DEVICES_PER_RUN={os.environ['EXPORT_DEVICES_PER_RUN']}"
        result["devices_per_run"] = int(os.environ["EXPORT_DEVICES_PER_RUN"])
    record(name, result)


if __name__ == "__main__":
    main()
