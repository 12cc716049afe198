"""P10: the assets' Partitions tab at a large fleet with a year of history, timed through the
GraphQL queries the tab sends to a real `dagster-webserver`.

    .venv/bin/python -m bench.partitions [--devices 5000 --days 365 --partition-days 30]

The history is bulk-loaded as P5 loads it (`bench.history.load_history`: per closed device-day
the materializations the pipeline keeps, its reconciliation and its day file's; per closed date
telemetry_daily's materialization), from EXPORT_START_DATE `--days` back. The ledger retention
then runs as its schedule would (`internals.prune_ledger`, which forgets the slices' device-days
before their window of EXPORT_PARTITION_DAYS=`--partition-days`; 0: no window, nothing
forgotten). Then the webserver serves the project's workspace against that storage and each
query is timed cold (Dagster's asset status cache emptied, the server just started) and warm
(the median of three more; one more when the first took over 10 s). The queries are the UI's
own, as its bundle spells them: `PartitionHealthQuery` (an asset's partition bar and grid) and
`AssetChecksQuery` (an asset's checks tab) for both datasets, and `AssetCheckDetailsQuery` (a
check's page) for each `reconciled` check. (Before the reconciliations left Dagster's
partitioned checks, the tab also sent `AssetCheckPartitionHealthQuery`: 94 s a check at 5,000
devices x 365 days.)
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
from export_pipeline.record.keys import (
    DAILY_RECONCILED,
    DEVICES,
    RECONCILED,
    TELEMETRY_DAILY,
    TELEMETRY_EXPORT,
)
from export_pipeline.record.ledger import retain as ledger_retention
from export_pipeline.settings import ExportSettings, Settings
from export_pipeline_tests.services import POSTGRES, free_port, wait_until

WEBAPP_CHUNKS = "dagster_webserver/webapp/build/_next/static/chunks"


def ui_query(name: str) -> str:
    """The query as the installed UI sends it (found in its bundle, so an upgrade is followed),
    with the fragments it spreads, and theirs."""
    import dagster_webserver

    chunks = Path(dagster_webserver.__file__).parent.parent / WEBAPP_CHUNKS
    bundle = [chunk.read_text(errors="replace") for chunk in sorted(chunks.glob("*.js"))]

    def definition(head: str) -> str:
        for text in bundle:
            start = text.find(head)
            if start >= 0:
                end = min(i for i in (text.find(q, start) for q in '`"') if i >= 0)
                return text[start:end].encode().decode("unicode_escape")
        raise LookupError(f"{head!r} is not in the UI bundle under {chunks}")

    query = definition(f"query {name}(")
    while True:
        used = set(re.findall(r"\.\.\.([A-Za-z_]\w*)", query))
        missing = sorted(used - set(re.findall(r"fragment (\w+) on ", query)))
        if not missing:
            return query
        query += "\n" + definition(f"fragment {missing[0]} on ")


def key_input(path: Sequence[str]) -> dict[str, Any]:
    return {"path": list(path)}


def retain(instance: DagsterInstance, settings: ExportSettings, now: datetime) -> int:
    """The ledger retention's pass (`ledger.retain`, as `retain_ledger` runs it), then VACUUM
    ANALYZE as PostgreSQL's autovacuum would after it: the events it removed."""
    pruned, _ = ledger_retention(instance, settings, now)
    connection = psycopg2.connect(dbname=database_of(instance), **POSTGRES)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE event_logs")
        cursor.execute("VACUUM ANALYZE asset_check_executions")
    connection.close()
    return pruned.forgotten + pruned.materializations + pruned.evaluations


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
    start_day = (now - timedelta(days=args.days)).date()
    devices = [f"p10-{i:05d}" for i in range(args.devices)]
    with tempfile.TemporaryDirectory(prefix="bench-p10-") as root:
        bench = Bench(Path(root))
        try:
            env = bench.env(
                EXPORT_START_DATE=start_day.isoformat(),
                EXPORT_PARTITION_DAYS=str(args.partition_days),
                LOG_LEVEL="WARNING",
            )
            os.environ.update(env)  # dagster.yaml reads the CHECKPOINT_DB_* variables
            settings = Settings.from_env(env).export
            with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
                instance.add_dynamic_partitions(DEVICES, devices)
                started = time.perf_counter()
                loaded = load_history(instance, devices, now, args.days, 7, real_days=2)
                load_seconds = time.perf_counter() - started
                started = time.perf_counter()
                pruned = retain(instance, settings, now)
                retention_seconds = time.perf_counter() - started
                empty_status_cache(instance)
            server = Webserver(env, Path(root) / "webserver.log")
            try:
                health, checks, check = (
                    ui_query("PartitionHealthQuery"),
                    ui_query("AssetChecksQuery"),
                    ui_query("AssetCheckDetailsQuery"),
                )
                queries: dict[str, tuple[str, dict[str, Any]]] = {}
                for asset, summary in (
                    (TELEMETRY_EXPORT, RECONCILED),
                    (TELEMETRY_DAILY, DAILY_RECONCILED),
                ):
                    asset_key = {"assetKey": key_input(asset.path)}
                    queries[f"{asset.to_user_string()} partition health"] = (health, asset_key)
                    queries[f"{asset.to_user_string()} checks"] = (checks, asset_key)
                    queries[f"{summary.to_user_string()} executions"] = (
                        check,
                        {**asset_key, "checkName": summary.name, "limit": 25},
                    )
                timings = {name: measured(server, *query) for name, query in queries.items()}
            finally:
                server.stop()
        finally:
            bench.close()
    slowest = max(max(t["cold_seconds"], t["warm_seconds"]) for t in timings.values())
    return {
        "devices": args.devices,
        "history_days": args.days,
        "export_partition_days": settings.partition_window_days or args.days + 1,
        "partitions": {
            TELEMETRY_EXPORT.to_user_string(): args.devices
            * (settings.partition_window_days or args.days + 1),
            TELEMETRY_DAILY.to_user_string(): args.days,  # the closed dates
        },
        "rows_removed_by_retention": pruned,
        "retention_seconds": round(retention_seconds),
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
    parser.add_argument(
        "--partition-days",
        type=int,
        default=ExportSettings.partition_days,
        help="EXPORT_PARTITION_DAYS (0: no window)",
    )
    parser.add_argument("--no-save", action="store_true", help="print, do not write results")
    args = parser.parse_args()
    result = p10(args)
    print(json.dumps(result, indent=2))
    if args.no_save:
        return
    name = f"P10 Partitions tab, {args.devices} devices x {args.days} days"
    name += f", EXPORT_PARTITION_DAYS={args.partition_days}"
    path = REPO / "bench" / "results.json"
    report = json.loads(path.read_text())
    report["results"][name] = result
    path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
