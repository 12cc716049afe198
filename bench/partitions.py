"""P10: the assets' Partitions tab at a large fleet with a year of history, timed through the
GraphQL queries the tab sends to a real `dagster-webserver`.

    .venv/bin/python -m bench.partitions [--devices 5000 --days 365 --window-days 0]

The history is bulk-loaded as P5 loads it (`bench.history.load_history`: per closed device-day
the materializations the pipeline keeps, its reconciliation, the day file and its
reconciliation). Then the webserver serves the project's workspace against that storage and each
query is timed cold (Dagster's asset status cache emptied, the server just started) and warm
(the median of three more; one more when the first took over 10 s). The queries are the UI's
own, as its bundle spells them: `PartitionHealthQuery` (the asset's partition bar and grid) and
`AssetCheckPartitionHealthQuery` (a partitioned check's statuses) for both datasets.

`--window-days N` starts the partitions N days back (EXPORT_START_DATE) with the whole history
still stored; `--prune` also deletes what is stored of the days before the window, which is what
a date window tied to retention would leave.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg2
import requests
from dagster import DagsterInstance

from bench.history import database_of, load_history
from bench.run import REPO, Bench
from export_pipeline.metadata import (
    DAILY_RECONCILIATION,
    RECONCILIATION,
    TELEMETRY_DAILY,
    TELEMETRY_EXPORT,
)
from export_pipeline.partitions import DEVICES
from export_pipeline_tests.services import POSTGRES, free_port, wait_until

WEBAPP_CHUNKS = "dagster_webserver/webapp/build/_next/static/chunks"


def ui_query(name: str) -> str:
    """The query as the installed UI sends it (found in its bundle, so an upgrade is followed)."""
    import dagster_webserver

    chunks = Path(dagster_webserver.__file__).parent.parent / WEBAPP_CHUNKS
    for chunk in sorted(chunks.glob("*.js")):
        text = chunk.read_text(errors="replace")
        start = text.find(f"query {name}(")
        if start >= 0:
            end = min(i for i in (text.find(q, start) for q in '`"') if i >= 0)
            return text[start:end].encode().decode("unicode_escape")
    raise LookupError(f"{name} is not in the UI bundle under {chunks}")


def key_input(path: Sequence[str]) -> dict[str, Any]:
    return {"path": list(path)}


def prune_before(instance: DagsterInstance, first_day: str) -> int:
    """Delete the stored events and check rows of the days before the window."""
    connection = psycopg2.connect(dbname=database_of(instance), **POSTGRES)
    with connection, connection.cursor() as cursor:
        cursor.execute(
            "DELETE FROM asset_check_executions WHERE split_part(partition, '|', 1) < %s",
            (first_day,),
        )
        cursor.execute(
            "DELETE FROM event_logs WHERE partition IS NOT NULL "
            "AND split_part(partition, '|', 1) < %s",
            (first_day,),
        )
        deleted = int(cursor.rowcount)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE event_logs")
        cursor.execute("VACUUM ANALYZE asset_check_executions")
    connection.close()
    return deleted


def empty_status_cache(instance: DagsterInstance) -> None:
    connection = psycopg2.connect(dbname=database_of(instance), **POSTGRES)
    with connection, connection.cursor() as cursor:
        cursor.execute("UPDATE asset_keys SET cached_status_data = NULL")
    connection.close()


class Webserver:
    """`dagster-webserver` on the project's workspace, as `scripts/run` starts it."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/graphql"
        self.log = log.open("w")
        self.process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "dagster-webserver"),
                "-w",
                str(REPO / "workspace.yaml"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
            ],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_until(self.loaded, "the webserver and its code location", timeout=180)

    def loaded(self) -> bool:
        answer = self.post("{ assetNodes { id } }")
        return bool(answer.get("data", {}).get("assetNodes"))

    def post(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        response = requests.post(
            self.url, json={"query": query, "variables": variables or {}}, timeout=900
        )
        response.raise_for_status()
        return dict(response.json())

    def timed(self, query: str, variables: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        started = time.perf_counter()
        answer = self.post(query, variables)
        seconds = time.perf_counter() - started
        if answer.get("errors"):
            raise RuntimeError(f"GraphQL errors: {json.dumps(answer['errors'])[:2000]}")
        return seconds, answer

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def measured(server: Webserver, query: str, variables: dict[str, Any]) -> dict[str, Any]:
    cold, answer = server.timed(query, variables)
    repeats = 3 if cold < 10 else 1  # a minute-long answer needs no median to miss 5 s
    warm = [server.timed(query, variables)[0] for _ in range(repeats)]
    return {
        "cold_seconds": round(cold, 2),
        "warm_seconds": round(statistics.median(warm), 2),
        "answer_bytes": len(json.dumps(answer)),
    }


def p10(args: argparse.Namespace) -> dict[str, Any]:
    now = datetime.now(UTC).replace(microsecond=0)
    window = args.window_days or args.days
    first_day = (now - timedelta(days=window)).date()
    devices = [f"p10-{i:05d}" for i in range(args.devices)]
    with tempfile.TemporaryDirectory(prefix="bench-p10-") as root:
        bench = Bench(Path(root))
        try:
            env = bench.env(EXPORT_START_DATE=first_day.isoformat(), LOG_LEVEL="WARNING")
            os.environ.update(env)  # dagster.yaml reads the CHECKPOINT_DB_* variables
            with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
                instance.add_dynamic_partitions(DEVICES, devices)
                started = time.perf_counter()
                loaded = load_history(instance, devices, now, args.days, 7, real_days=2)
                load_seconds = time.perf_counter() - started
                pruned = prune_before(instance, first_day.isoformat()) if args.prune else 0
                empty_status_cache(instance)
            server = Webserver(env, Path(root) / "webserver.log")
            try:
                health, check = (
                    ui_query("PartitionHealthQuery"),
                    ui_query("AssetCheckPartitionHealthQuery"),
                )
                queries: dict[str, tuple[str, dict[str, Any]]] = {
                    f"{TELEMETRY_EXPORT.to_user_string()} partition health": (
                        health,
                        {"assetKey": key_input(TELEMETRY_EXPORT.path)},
                    ),
                    f"{TELEMETRY_DAILY.to_user_string()} partition health": (
                        health,
                        {"assetKey": key_input(TELEMETRY_DAILY.path)},
                    ),
                    f"{RECONCILIATION.to_user_string()} statuses": (
                        check,
                        {
                            "assetKey": key_input(TELEMETRY_EXPORT.path),
                            "checkName": RECONCILIATION.name,
                        },
                    ),
                    f"{DAILY_RECONCILIATION.to_user_string()} statuses": (
                        check,
                        {
                            "assetKey": key_input(TELEMETRY_DAILY.path),
                            "checkName": DAILY_RECONCILIATION.name,
                        },
                    ),
                }
                timings = {name: measured(server, *query) for name, query in queries.items()}
            finally:
                server.stop()
        finally:
            bench.close()
    slowest = max(max(t["cold_seconds"], t["warm_seconds"]) for t in timings.values())
    return {
        "devices": args.devices,
        "history_days": args.days,
        "partition_days": window,
        "partitions_per_asset": args.devices * (window + 1),
        "pruned_before_window": args.prune,
        "rows_pruned": pruned,
        "history_materializations": loaded["materializations"],
        "history_evaluations": loaded["evaluations"],
        "load_seconds": round(load_seconds),
        "queries": timings,
        "slowest_seconds": slowest,
        "ratio": round(slowest / 5, 2),
        "target": "<= 5 s",
        "measured_at": now.isoformat(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=5_000)
    parser.add_argument("--days", type=int, default=365, help="of history, ending now")
    parser.add_argument("--window-days", type=int, default=0, help="0: every day of history")
    parser.add_argument("--prune", action="store_true", help="delete the days before the window")
    parser.add_argument("--no-save", action="store_true", help="print, do not write results")
    args = parser.parse_args()
    result = p10(args)
    print(json.dumps(result, indent=2))
    if args.no_save:
        return
    name = f"P10 Partitions tab, {args.devices} devices x {args.days} days"
    if args.window_days:
        name += f", {args.window_days}-day window" + (" pruned" if args.prune else "")
    path = REPO / "bench" / "results.json"
    report = json.loads(path.read_text())
    report["results"][name] = result
    path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
