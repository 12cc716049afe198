"""P8: a backfill of `telemetry_daily` launched as from the UI and run by a real dagster-daemon
(its runs in the pipeline's code server),
30 dates x 1,000 devices x 1,440 points per device-day (a run per date, the fleet's), against a
run per device-day measured in the same run (`export_day_files` with one item, four at a time,
as the run queue allows).

    .venv/bin/python -m bench.backfill                       # the issue's size (~45 minutes)
    .venv/bin/python -m bench.backfill --devices 100 --days 3
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from dagster import DagsterInstance, RunsFilter

from bench.load import load
from bench.run import Bench, record
from export_pipeline.defs.continuous import export_day_files, export_days
from export_pipeline.defs.planning import WorkItem
from export_pipeline.defs.resources import build_resources
from export_pipeline.defs.run_config import run_config_for
from export_pipeline.engine.grid import DayRange
from export_pipeline.record.keys import TELEMETRY_DAILY, DeviceDay, date_key
from export_pipeline_tests.backfills import submit_backfill, wait_for_backfill
from export_pipeline_tests.services import CodeServer, dagster_command

NS = 1_000_000_000
FIRST_DAY = date(2026, 1, 5)


def write_one(bench: Bench, device_day: DeviceDay) -> None:
    """One device-day's day file in a run of its own (`export_day_files` with one item)."""
    config = bench.root / f"one-{device_day.device_id}.json"
    config.write_text(
        json.dumps(
            run_config_for(
                [WorkItem(device_day.device_id, DayRange.whole(device_day.day))], export_days.name
            )
        )
    )
    command = dagster_command("dagster", "job", "execute", "-j", export_day_files.name)
    subprocess.run(
        [*command, "-c", str(config)],
        env={**os.environ, **bench.env(DEVICE_IDS="")},
        cwd=bench.root,
        check=True,
        capture_output=True,
    )


def table_of(bench: Bench) -> dict[str, int]:
    found = build_resources(bench.settings())
    table = found["iceberg"].daily_table(found["s3"])  # type: ignore[attr-defined]
    if table is None or table.load(None) is None:
        return {"data_files": 0, "commits": 0}
    files = sum(1 for _ in table.table.scan().plan_files())
    return {"data_files": files, "commits": len(table.table.snapshots())}


def p8(bench: Bench, devices: int, days: int, points: int, baseline_runs: int) -> dict[str, Any]:
    fleet = [f"p8-{i:04d}" for i in range(devices)]
    dates = [FIRST_DAY + timedelta(days=n) for n in range(days)]
    started = time.perf_counter()
    for day in dates:
        start = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()) * NS
        load(bench.influx.url, bench.database, fleet, start, points, 86_400 * NS // points)
    loaded = time.perf_counter() - started
    # The fleet is every registered device (the day files' partitions are its dates); InfluxDB has
    # no recent points, so the sensor finds nothing to export meanwhile.
    env = bench.env(DEVICE_IDS="")
    os.environ.update(env)
    with DagsterInstance.from_config(str(bench.home)) as instance:
        instance.add_dynamic_partitions("devices", fleet)

        # Without the batching: a run per device-day, four at a time.
        others = [DeviceDay(fleet[-1 - n], dates[-1]) for n in range(baseline_runs)]
        started = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda device_day: write_one(bench, device_day), others))
        per_partition = (time.perf_counter() - started) / baseline_runs

        # The daemon loads the code from the pipeline's code server, where the backfill's runs
        # execute (forked from its warm process), as docker-compose and scripts/run deploy them.
        code_server = CodeServer(env, bench.root / "code-server.log").start()
        daemon = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("dagster-daemon")),
                "run",
                "-w",
                str(code_server.workspace(bench.root / "workspace.yaml")),
            ],
            env={**os.environ, **env},
            cwd=bench.root,
            stdout=(bench.root / "daemon.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            partitions = [date_key(day) for day in dates]
            started = time.perf_counter()
            backfill = submit_backfill(instance, TELEMETRY_DAILY, partitions)
            status = wait_for_backfill(instance, backfill, timeout=4 * 3600)
            elapsed = time.perf_counter() - started
            runs = instance.get_run_records(RunsFilter(tags={"dagster/backfill": backfill}))
        finally:
            try:
                os.killpg(daemon.pid, signal.SIGTERM)
                daemon.wait(timeout=120)
            finally:
                code_server.stop()
    submitted = time.time() - elapsed
    timeline = sorted(
        (r.create_timestamp.timestamp(), r.start_time or 0.0, r.end_time or 0.0) for r in runs
    )
    files = len(bench.folder_sizes("telemetry_daily/device_id="))
    table = table_of(bench)
    device_days = len(partitions) * len(fleet)
    rate = device_days / elapsed * 60
    baseline = 60 / per_partition
    return {
        "device_days": device_days,
        "dates": len(partitions),
        "status": status,
        "runs": len(runs),
        "minutes": round(elapsed / 60, 1),
        "device_days_per_min": round(rate),
        "day_files": files,
        # The Iceberg table (on, as deployed): its data files and its date commits.
        "table_data_files": table["data_files"],
        "table_commits": table["commits"],
        "one_run_per_device_day_device_days_per_min": round(baseline, 1),
        "load_minutes": round(loaded / 60, 1),
        "ratio": round(rate / baseline, 1),
        # Each run's creation, start and end, in seconds after the backfill was submitted.
        "runs_created_started_ended_s": [
            [round(moment - submitted) for moment in run] for run in timeline
        ],
        "target": ">= 1,000 device-days a minute (30 days x 1,000 devices in <= 30 minutes)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--points", type=int, default=1440, help="per device-day")
    parser.add_argument("--baseline-runs", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-") as root:
        bench = Bench(Path(root))
        try:
            result = p8(bench, args.devices, args.days, args.points, args.baseline_runs)
        finally:
            bench.close()
    record(f"P8 backfill of telemetry_daily, {args.days} days x {args.devices} devices", result)


if __name__ == "__main__":
    main()
