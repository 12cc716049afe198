"""P9: how Dagster's PostgreSQL storage, the export ledger, grows at 1,000 devices x 60 s slices
with the retention in force, and its size after day 1, 7 and 30.

    .venv/bin/python -m bench.ledger [--devices 1000 --interval 60 --days 30]

A month of a fleet cannot be run, so it is bulk-loaded from what the real pipeline writes. First
the pipeline runs briefly on the real services: dagster-daemon with its sensor launching
continuous runs (what a launched run adds to its events, its tags, its body; the sensor's ticks),
then the sensor and its runs on a frozen clock across a day's close (materializations,
reconciliations, day files, the sweep and the retention run, with heartbeats). Every row they
wrote is kept as a template. Each simulated day is then COPYed into a fresh database at the
fleet's size, in time order: a continuous run per slice with the materializations
`worth_recording` chooses, the reconciliations and day files at the close, the freshness check
once a slice, the hourly sweep, the daily retention run, a sensor tick every 10 s and each
device's progress. The retention runs on it as deployed (`prune_ledger` at EXPORT_RETENTION_CRON,
Dagster's tick purge as dagster.yaml sets it), a plain VACUUM follows as autovacuum's would
(space reused, not returned), and the database is measured at each day's end.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg2
from dagster import DagsterInstance, SensorResult, build_sensor_context
from dagster._core.definitions.run_request import InstigatorType
from dagster._core.scheduler.instigation import TickData, TickStatus
from dagster._serdes import serialize_value
from dagster._utils.schedules import cron_string_iterator

import export_pipeline.defs.driver
from bench.load import load, load_simulated
from bench.run import REPO, Bench
from export_pipeline.defs.continuous import export_day_files, export_due_slices
from export_pipeline.defs.maintenance import retain_ledger, sweep_late_data
from export_pipeline.defs.planning import TICK_SECONDS
from export_pipeline.defs.resources import ClockResource, build_resources
from export_pipeline.defs.runs import HEARTBEAT_SECONDS
from export_pipeline.defs.sensors import build_continuous_export
from export_pipeline.engine.dataset import ExportReport
from export_pipeline.engine.export import Exported
from export_pipeline.engine.grid import SECONDS_PER_DAY, DayRange
from export_pipeline.engine.progress import DayTotals, Progress
from export_pipeline.record.events import worth_recording
from export_pipeline.record.keys import (
    DEVICES,
)
from export_pipeline.record.ledger import record_progress, retain
from export_pipeline.settings import SEED_FIELDS, Settings
from export_pipeline_tests.services import POSTGRES, drop_database, fresh_database

NS = 1_000_000_000
CLOSE = datetime(2026, 3, 8, tzinfo=UTC)  # the captured close: 2026-03-07 ends
CAPTURED_DAY = "2026-03-07"
FIRST_DAY = date(2026, 1, 2)  # the first simulated day
TARGET_MB_PER_DAY = 50.0
NAME = "P9 ledger growth, {devices} devices x {interval} s"  # its entry in results.json
MARK = "\x00"  # around a field's name in a template; never in a row Dagster writes
EVENT_COLUMNS = "id, run_id, event, dagster_event_type, timestamp, step_key, asset_key, partition"
CHECK_COLUMNS = (
    "asset_key, check_name, partition, run_id, execution_status, evaluation_event, "
    "evaluation_event_timestamp, evaluation_event_storage_id, create_timestamp"
)
RUN_COLUMNS = (
    "run_id, snapshot_id, pipeline_name, mode, status, run_body, partition, partition_set, "
    "create_timestamp, update_timestamp, start_time, end_time, backfill_id"
)
TICK_COLUMNS = (
    "job_origin_id, selector_id, status, type, timestamp, tick_body, create_timestamp, "
    "update_timestamp"
)
# A run's work list: items of a range with its devices (`"devices": [...]` nested in each).
WORK = re.compile(r'"work": \[(?:[^\[\]]|\[[^\]]*\])*\]')
WORK_ITEM = re.compile(r"\{[^{}]*\}")
LIFECYCLE_OF_LAUNCH = ("Started process for run", "Process for run exited")
SCHEDULE_ORIGIN, SCHEDULE_SELECTOR = "schedules", "schedules"  # both schedules' ticks, as one
PRUNED = "event_logs, asset_event_tags, asset_check_executions, runs, run_tags, job_ticks, kvs"
HEARTBEAT = re.compile(r"exporting: \d+ of \d+ devices done")


def field_(name: str) -> str:
    return f"{MARK}{name}{MARK}"


def copy_escaped(value: str) -> str:
    """A value in COPY's text format."""
    return (
        value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    )


def copy_value(value: object) -> str:
    return r"\N" if value is None else copy_escaped(str(value))


def stamp(moment: float) -> str:
    """Dagster's naive UTC timestamp column."""
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


@dataclass(frozen=True)
class Template:
    """A captured value with fields to fill in, split once so each copy is one join; its
    literal parts are already escaped for COPY."""

    parts: tuple[str, ...]  # literal, field name, literal, ..., literal

    @classmethod
    def of(cls, text: str, values: Mapping[str, str] | None = None) -> Template:
        """`text` with each of `values` (a field's captured value) and every entry's timestamp
        made a field."""
        text = re.sub(r'("timestamp": )\d+(\.\d+)?', lambda m: m.group(1) + field_("ts"), text)
        for name, value in (values or {}).items():
            if value:
                text = text.replace(value, field_(name))
        parts = text.split(MARK)
        return cls(tuple(p if i % 2 else copy_escaped(p) for i, p in enumerate(parts)))

    def fill(self, values: Mapping[str, str]) -> str:
        parts = list(self.parts)
        parts[1::2] = [values[name] for name in parts[1::2]]
        return "".join(parts)


@dataclass(frozen=True)
class CheckRow:
    """An asset_check_executions row as captured (its partition filled as its event's)."""

    asset_key: str
    name: str
    status: str
    partitioned: bool
    event: Template


@dataclass(frozen=True)
class EventRow:
    """An event_logs row as captured, and its asset_check_executions row if it has one."""

    event_type: str | None
    step_key: str | None
    asset_key: str | None
    partitioned: bool  # its partition column (materializations only; evaluations name theirs)
    body: Template
    check: CheckRow | None = None


@dataclass
class RunKind:
    """What one run of a job writes whatever its work: its row, tags and lifecycle events; its
    variable events (materializations, evaluations, heartbeats) go after `content_at`."""

    job: str
    body: Template  # fields: run; date, start, end where it has a work list
    tags: list[tuple[str, str]]
    events: list[EventRow]
    content_at: int


@dataclass
class Captured:
    """Everything the real pipeline wrote that a simulated day is made of."""

    kinds: dict[str, RunKind]
    snapshot_id: str  # the job snapshot launched runs name (one per job and code version)
    materialization: EventRow
    evaluation: EventRow
    day_file: EventRow
    day_evaluation: EventRow
    heartbeat: EventRow
    freshness: EventRow
    tick_success: tuple[str, str, Template]  # job_origin_id, selector_id, body
    tick_skipped: tuple[str, str, Template]
    snapshots: list[tuple[Any, ...]]
    runless_types: dict[str, int]
    work_item: str  # the item of a run's work list: its range's date, start, end and devices


class Database:
    """One PostgreSQL database, autocommitting."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.connection = psycopg2.connect(dbname=name, **POSTGRES)
        self.connection.autocommit = True

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with self.connection.cursor() as cursor:
            cursor.execute(sql, args)
            return list(cursor.fetchall()) if cursor.description else []

    def copy(self, table: str, columns: str, lines: Sequence[str]) -> None:
        if lines:
            with self.connection.cursor() as cursor:
                cursor.copy_expert(
                    f"COPY {table} ({columns}) FROM STDIN", io.StringIO("".join(lines))
                )

    def tables(self) -> list[str]:
        return [
            row[0]
            for row in self.rows(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
            )
        ]

    def counts(self) -> dict[str, int]:
        return {t: int(self.rows(f'SELECT count(*) FROM "{t}"')[0][0]) for t in self.tables()}

    def sizes(self) -> dict[str, int]:
        return {
            t: int(self.rows("SELECT pg_total_relation_size(%s)", t)[0][0]) for t in self.tables()
        }

    def size(self) -> int:
        return int(self.rows("SELECT pg_database_size(%s)", self.name)[0][0])

    def close(self) -> None:
        self.connection.close()


def run_events(db: Database, run_id: str) -> list[tuple[Any, ...]]:
    return db.rows(
        "SELECT id, dagster_event_type, step_key, asset_key, partition, event FROM event_logs "
        "WHERE run_id = %s ORDER BY id",
        run_id,
    )


def event_row(db: Database, row: tuple[Any, ...], values: Mapping[str, str]) -> EventRow:
    """A captured event (id, type, step, asset key, partition, body) as a template."""
    event_id, event_type, step_key, asset_key, partition, body = row
    check = None
    if event_type == "ASSET_CHECK_EVALUATION":
        key, name, status, partitioned, text = db.rows(
            "SELECT asset_key, check_name, execution_status, partition IS NOT NULL, "
            "evaluation_event FROM asset_check_executions WHERE evaluation_event_storage_id = %s",
            event_id,
        )[0]
        check = CheckRow(key, name, status, partitioned, Template.of(text, values))
    return EventRow(
        event_type, step_key, asset_key, partition is not None, Template.of(body, values), check
    )


# ---- capture: the real pipeline, briefly ----------------------------------------------------


def capture_launched(bench: Bench, timeout: float = 600) -> dict[str, Any]:
    """dagster-daemon with the sensor and three devices until two continuous runs have finished
    and the sensor has skipped a tick: what a launched run and a tick write."""
    devices = [f"live-{n}" for n in range(1, 4)]
    now = datetime.now(UTC)
    load(bench.influx.url, bench.database, devices, int(now.timestamp() - 4200) * NS, 4800, NS)
    env = {
        **os.environ,
        **bench.env(EXPORT_INTERVAL_SECONDS="60", LOOKBACK_HOURS="1", DEVICE_IDS=",".join(devices)),
    }
    daemon = subprocess.Popen(
        [str(Path(sys.executable).with_name("dagster-daemon")), "run", "-m",
         "export_pipeline.definitions"],
        env=env,
        cwd=bench.root,
        stdout=(bench.root / "daemon.log").open("wb"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    db = Database(bench.pg_database)
    started = time.monotonic()
    try:
        while True:
            time.sleep(5)
            done = db.rows(
                "SELECT r.run_id FROM runs r WHERE r.pipeline_name = %s AND r.status = 'SUCCESS' "
                "AND EXISTS (SELECT 1 FROM event_logs e WHERE e.run_id = r.run_id "
                "AND e.event LIKE %s) ORDER BY r.id",
                export_due_slices.name,
                f"%{LIFECYCLE_OF_LAUNCH[1]}%",
            )
            skipped = db.rows("SELECT count(*) FROM job_ticks WHERE status = 'SKIPPED'")[0][0]
            if len(done) >= 2 and skipped:
                break
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"no two launched runs within {timeout:.0f} s: daemon.log")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=120)
    run_id = done[1][0]
    body, snapshot = db.rows("SELECT run_body, snapshot_id FROM runs WHERE run_id = %s", run_id)[0]
    success = db.rows(
        "SELECT job_origin_id, selector_id, tick_body FROM job_ticks WHERE tick_body LIKE %s",
        f"%{run_id}%",
    )[0]
    skipped_tick = db.rows(
        "SELECT job_origin_id, selector_id, tick_body FROM job_ticks WHERE status = 'SKIPPED' "
        "ORDER BY id DESC LIMIT 1"
    )[0]
    launched = {
        "run_id": run_id,
        "body": body,
        "snapshot_id": snapshot,
        "tags": db.rows("SELECT key, value FROM run_tags WHERE run_id = %s ORDER BY id", run_id),
        "events": run_events(db, run_id),
        "tick_success": success,
        "tick_skipped": skipped_tick,
        "runless": db.rows(
            "SELECT dagster_event_type, count(*) FROM event_logs WHERE run_id = '' GROUP BY 1"
        ),
    }
    db.close()
    return launched


def capture_close(bench: Bench) -> tuple[dict[str, list[str]], list[str]]:
    """The sensor and its runs on a frozen clock from 23:56 to 00:03 across a day's close, then
    the sweep and the retention run: the run ids of each job, and the devices."""
    start_ns = int((CLOSE - timedelta(minutes=10)).timestamp()) * NS
    devices = load_simulated(bench.influx.url, bench.database, 3, start_ns, 15 * 60)
    settings = bench.settings(
        EXPORT_INTERVAL_SECONDS="60",
        EXPORT_LATENESS_SECONDS="30",
        LOOKBACK_HOURS="1",
        DEVICE_IDS=",".join(devices),
    )
    os.environ.update(bench.env())  # dagster.yaml reads the CHECKPOINT_DB_* variables
    resources = build_resources(settings)
    sensor = build_continuous_export(settings)
    jobs = {job.name: job for job in (export_due_slices, export_day_files)}
    runs: dict[str, list[str]] = defaultdict(list)
    cursor = None
    beat = export_pipeline.defs.driver.HEARTBEAT_SECONDS
    export_pipeline.defs.driver.HEARTBEAT_SECONDS = 0.05  # so short runs log heartbeats too
    try:
        with DagsterInstance.from_config(str(bench.home)) as instance:
            for minute in range(-4, 4):
                now = CLOSE + timedelta(minutes=minute, seconds=31)
                clocked = {**resources, "clock": ClockResource(frozen_at=now.isoformat())}
                with build_sensor_context(
                    instance=instance, resources=clocked, cursor=cursor
                ) as context:
                    result = sensor(context)
                assert isinstance(result, SensorResult)
                cursor = result.cursor
                for added in result.dynamic_partitions_requests or []:
                    instance.add_dynamic_partitions(DEVICES, list(added.partition_keys or []))
                for request in result.run_requests or []:
                    job = jobs[request.job_name or export_due_slices.name]
                    outcome = job.execute_in_process(
                        run_config=request.run_config,
                        instance=instance,
                        resources=clocked,
                        tags=request.tags,
                    )
                    runs[job.name].append(outcome.run_id)
            later = {
                **resources,
                "clock": ClockResource(frozen_at=(CLOSE + timedelta(minutes=20)).isoformat()),
            }
            for job in (sweep_late_data, retain_ledger):
                runs[job.name].append(
                    job.execute_in_process(instance=instance, resources=later).run_id
                )
    finally:
        export_pipeline.defs.driver.HEARTBEAT_SECONDS = beat
    return runs, devices


def capture(bench: Bench) -> Captured:
    """Run the real pipeline briefly (see the module's docstring) and keep its rows."""
    launched = capture_launched(bench)
    runs, devices = capture_close(bench)
    db = Database(bench.pg_database)
    device = devices[0]
    values = {"device": device, "date": CAPTURED_DAY, "datepath": CAPTURED_DAY.replace("-", "/")}

    def content(run_id: str, event_type: str, of_device: bool = True) -> EventRow:
        rows = [
            r
            for r in run_events(db, run_id)
            if r[1] == event_type and (device in r[5] or not of_device)
        ]
        return event_row(db, rows[0], {"run": run_id, **values})

    close_run = next(
        run_id
        for run_id in runs[export_due_slices.name]
        if any(r[1] == "ASSET_CHECK_EVALUATION" for r in run_events(db, run_id))
    )
    day_run = runs[export_day_files.name][0]
    beat = next(r for r in run_events(db, close_run) if r[1] is None and HEARTBEAT.search(r[5]))
    beat_text = HEARTBEAT.sub(
        f"exporting: {field_('done')} of {field_('total')} devices done", beat[5]
    )
    heartbeat = EventRow(None, beat[2], None, False, Template.of(beat_text, {"run": close_run}))
    freshness = db.rows(
        "SELECT id, dagster_event_type, step_key, asset_key, partition, event FROM event_logs "
        "WHERE run_id = '' AND dagster_event_type = 'ASSET_CHECK_EVALUATION' "
        "ORDER BY id DESC LIMIT 1"
    )[0]

    # What launching a run adds to what it writes as it executes: its queueing and process
    # events, its tags, a body naming its code location.
    launched_id = launched["run_id"]
    events = launched["events"]
    queued = [r for r in events if r[1] in ("PIPELINE_ENQUEUED", "PIPELINE_STARTING")] + [
        r for r in events if LIFECYCLE_OF_LAUNCH[0] in r[5]
    ]
    exited = [r for r in events if LIFECYCLE_OF_LAUNCH[1] in r[5]]
    item = WORK_ITEM.findall(WORK.findall(launched["body"])[0])[0]
    work_item = re.sub(r'"date": "[^"]*"', f'"date": "{field_("date")}"', item)
    work_item = re.sub(r'"end": \d+', f'"end": {field_("end")}', work_item)
    work_item = re.sub(r'"start": \d+', f'"start": {field_("start")}', work_item)
    work_item = re.sub(r'"devices": \[[^\]]*\]', f'"devices": [{field_("devices")}]', work_item)

    def kind(job: str, run_id: str, op: str | None) -> RunKind:
        own = run_events(db, run_id)
        lifecycle = [
            r
            for r in own
            if r[1] not in ("ASSET_MATERIALIZATION", "ASSET_CHECK_EVALUATION")
            and not (r[1] is None and HEARTBEAT.search(r[5]))
        ]
        swap = {export_due_slices.name: job, "export_slices": op or "export_slices"}

        def renamed(text: str) -> str:
            for old, new in swap.items():
                text = text.replace(f'"{old}"', f'"{new}"')
            return text

        added = [
            EventRow(r[1], r[2], r[3], False, Template.of(renamed(r[5]), {"run": launched_id}))
            for r in queued
        ]
        after = [
            EventRow(r[1], r[2], r[3], False, Template.of(renamed(r[5]), {"run": launched_id}))
            for r in exited
        ]
        rows = [event_row(db, r, {"run": run_id}) for r in lifecycle]
        step = max(i for i, r in enumerate(lifecycle) if r[1] == "STEP_START")
        body = launched["body"]
        if op is None:  # a scheduled run: no work list, no sensor
            body = re.sub(r'"run_config": \{"ops": .*?\}\]\}\}\}\}', '"run_config": {}', body)
        tags = [
            (k, v)
            for k, v in launched["tags"]
            if not (op is None and (k.startswith("export/") or k == "dagster/run_key"))
            and not (op == "export_days" and k == "export/through")
        ]
        if op is None:
            tags = [
                ("dagster/schedule_name", job) if k == "dagster/sensor_name" else (k, v)
                for k, v in tags
            ]
        return RunKind(
            job=job,
            body=Template.of(
                WORK.sub(f'"work": [{field_("work")}]', renamed(body)), {"run": launched_id}
            ),
            tags=tags,
            events=added + rows + after,
            content_at=len(added) + step + 1,
        )

    kinds = {
        export_due_slices.name: kind(export_due_slices.name, close_run, "export_slices"),
        export_day_files.name: kind(export_day_files.name, day_run, "export_days"),
        sweep_late_data.name: kind(sweep_late_data.name, runs[sweep_late_data.name][0], None),
        retain_ledger.name: kind(retain_ledger.name, runs[retain_ledger.name][0], None),
    }
    plan = json.loads(launched["body"]).get("execution_plan_snapshot_id", "")
    snapshots = [
        (snapshot_id, bytes(body), kind)
        for snapshot_id, body, kind in db.rows(
            "SELECT snapshot_id, snapshot_body, snapshot_type FROM snapshots "
            "WHERE snapshot_id = ANY(%s)",
            [launched["snapshot_id"], plan],
        )
    ]
    origin, selector, success = launched["tick_success"]
    success = WORK.sub(f'"work": [{field_("work")}]', success)
    captured = Captured(
        kinds=kinds,
        snapshot_id=launched["snapshot_id"],
        materialization=content(close_run, "ASSET_MATERIALIZATION"),
        evaluation=content(close_run, "ASSET_CHECK_EVALUATION"),
        day_file=content(day_run, "ASSET_MATERIALIZATION", of_device=False),  # the date's
        day_evaluation=content(day_run, "ASSET_CHECK_EVALUATION"),
        heartbeat=heartbeat,
        freshness=event_row(db, freshness, {}),
        tick_success=(origin, selector, Template.of(success, {"run": launched_id})),
        tick_skipped=(
            launched["tick_skipped"][0],
            launched["tick_skipped"][1],
            Template.of(launched["tick_skipped"][2]),
        ),
        snapshots=snapshots,
        runless_types={str(t): int(n) for t, n in launched["runless"]},
        work_item=work_item,
    )
    db.close()
    return captured


# ---- a simulated day -------------------------------------------------------------------------


@dataclass
class Run:
    """One run of a simulated day: its kind, when it was requested, how long it ran, and its
    variable events."""

    kind: str
    start: float
    seconds: float
    work: tuple[str, int, int] | None = None  # date, start, end of every device's work item
    content: list[tuple[EventRow, dict[str, str]]] = field(default_factory=list)
    run_id: str = field(default_factory=lambda: str(uuid.uuid4()))


def recorded_by_slice(fleet: Sequence[str], interval: int) -> list[list[int]]:
    """For each slice of a day, the devices whose export of it is a materialization, as
    `worth_recording` decides with every device's progress at the slice's start (the same every
    day: it depends on the slice and the device, not the date)."""
    day = FIRST_DAY
    found: list[list[int]] = []
    for index in range(SECONDS_PER_DAY // interval):
        piece = DayRange(day, index * interval, (index + 1) * interval)
        previous_day = day if index else day - timedelta(days=1)
        previous = Progress(piece.start_time, previous_day, DayTotals())
        found.append(
            [
                n
                for n, device in enumerate(fleet)
                if worth_recording(
                    Exported(piece, ExportReport(device, day, ""), previous), previous, interval
                )
            ]
        )
    return found


class Simulation:
    """Days of a fleet's ledger, COPYed into one database in time order, with the retention
    run as deployed."""

    def __init__(
        self,
        captured: Captured,
        db: Database,
        instance: DagsterInstance,
        settings: Settings,
        fleet: Sequence[str],
        *,
        run_seconds: float,
        day_file_seconds: float,
        retention: bool,
    ) -> None:
        self.captured, self.db, self.instance, self.fleet = captured, db, instance, fleet
        self.settings = settings.export
        self.interval = self.settings.interval_seconds
        self.run_seconds, self.day_file_seconds = run_seconds, day_file_seconds
        self.retention = retention
        self.recorded = recorded_by_slice(fleet, self.interval)
        self.next_event_id = 1
        # One item for the fleet's range, naming every device, as the sensor writes it.
        self.work = Template.of(
            captured.work_item.replace(field_("devices"), ", ".join(json.dumps(d) for d in fleet))
        )
        self.tick_retention = instance.get_tick_retention_settings(InstigatorType.SENSOR)
        self.schedule_retention = instance.get_tick_retention_settings(InstigatorType.SCHEDULE)
        self.pruned: list[dict[str, float]] = []

    def day_runs(self, day: date) -> list[Run]:
        """What a day's schedule, sensor and fleet run, in time order."""
        start = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
        yesterday = (day - timedelta(days=1)).isoformat()
        lateness = self.settings.lateness_seconds + 1
        c = self.captured
        runs = []
        for index in range(SECONDS_PER_DAY // self.interval):
            run = Run(export_due_slices.name, start + index * self.interval + lateness, 0)
            if index == 0:  # the close of yesterday: every device's last slice, reconciled
                run.work = (yesterday, SECONDS_PER_DAY - self.interval, SECONDS_PER_DAY)
                for device in self.fleet:
                    values = self.values(device, yesterday)
                    run.content += [(c.materialization, values), (c.evaluation, values)]
            else:
                run.work = (day.isoformat(), (index - 1) * self.interval, index * self.interval)
                run.content = [
                    (c.materialization, self.values(self.fleet[n], day.isoformat()))
                    for n in self.recorded[index - 1]
                ]
            run.seconds = self.run_seconds
            run.content += self.heartbeats(run.seconds)
            runs.append(run)
        days = Run(export_day_files.name, start + lateness + TICK_SECONDS, self.day_file_seconds)
        days.work = (yesterday, 0, SECONDS_PER_DAY)
        for device in self.fleet:
            days.content.append((c.day_evaluation, self.values(device, yesterday)))
        days.content.append((c.day_file, self.values(self.fleet[0], yesterday)))  # the date
        days.content += self.heartbeats(days.seconds)
        runs.append(days)
        for job, cron in (
            (sweep_late_data.name, self.settings.sweep_cron),
            (retain_ledger.name, self.settings.retention_cron),
        ):
            for moment in cron_string_iterator(start, cron, "UTC"):
                if moment.timestamp() >= start + SECONDS_PER_DAY:
                    break
                runs.append(Run(job, moment.timestamp(), 10.0))
        return sorted(runs, key=lambda run: run.start)

    def values(self, device: str, day: str) -> dict[str, str]:
        return {"device": device, "date": day, "datepath": day.replace("-", "/")}

    def work_list(self, work: tuple[str, int, int]) -> str:
        """The work list of a run over the fleet, as its run config and its tick hold it."""
        return self.work.fill({"date": work[0], "start": str(work[1]), "end": str(work[2])})

    def heartbeats(self, seconds: float) -> list[tuple[EventRow, dict[str, str]]]:
        total = str(len(self.fleet))
        count = int(seconds // HEARTBEAT_SECONDS)
        return [
            (self.captured.heartbeat, {"done": str(len(self.fleet) * (n + 1) // (count + 1)),
                                       "total": total})
            for n in range(count)
        ]  # fmt: skip

    def load(self, runs: Sequence[Run], ticks_from: float, ticks_until: float) -> None:
        """COPY these runs with their events, tags, checks, the sensor's ticks and the
        freshness evaluations between `ticks_from` and `ticks_until`."""
        c = self.captured
        events: list[tuple[float, int, EventRow, dict[str, str], str]] = []
        run_lines, tag_lines, tick_lines = [], [], []
        requested: dict[int, Run] = {}  # sensor tick slot -> the run it requested
        for run in runs:
            kind = c.kinds[run.kind]
            rows = kind.events[: kind.content_at] + [e for e, _ in run.content]
            rows += kind.events[kind.content_at :]
            # Launch and step start within 2 s, the content over the run, the end in its last 0.5 s.
            before, middle = kind.content_at, kind.content_at + len(run.content)
            pace = (run.seconds - 2.5) / max(1, len(run.content))
            for n, row in enumerate(rows):
                values: dict[str, str] = {}
                if n < before:
                    moment = run.start + 2.0 * n / before
                elif n < middle:
                    moment = run.start + 2.0 + (n - before) * pace
                    values = run.content[n - before][1]
                else:
                    moment = (
                        run.start + run.seconds - 0.5 + 0.5 * (n - middle) / (len(rows) - middle)
                    )
                events.append((moment, len(events), row, values, run.run_id))
            end = run.start + run.seconds + 0.5
            work = "" if run.work is None else self.work_list(run.work)
            body = kind.body.fill({"run": run.run_id, "work": work, "ts": str(run.start)})
            run_lines.append(
                "\t".join([
                    run.run_id, c.snapshot_id, kind.job, r"\N", "SUCCESS", body, r"\N",
                    r"\N", stamp(run.start), stamp(end), str(run.start + 1), str(end), r"\N",
                ]) + "\n"
            )  # fmt: skip
            tag_lines += [
                f"{run.run_id}\t{copy_value(key)}\t{copy_value(value)}\n"
                for key, value in kind.tags
            ]
            if run.kind in (export_due_slices.name, export_day_files.name):
                requested[int(run.start // TICK_SECONDS)] = run
            else:
                tick = TickData(
                    instigator_origin_id=SCHEDULE_ORIGIN,
                    instigator_name=run.kind,
                    instigator_type=InstigatorType.SCHEDULE,
                    status=TickStatus.SUCCESS,
                    timestamp=run.start,
                    run_ids=[run.run_id],
                    selector_id=SCHEDULE_SELECTOR,
                    log_key=["__repository__", run.kind, "1"],
                    end_timestamp=run.start + 1,
                )
                tick_lines.append(
                    f"{SCHEDULE_ORIGIN}\t{SCHEDULE_SELECTOR}\tSUCCESS\tSCHEDULE\t{stamp(run.start)}"
                    f"\t{copy_escaped(serialize_value(tick))}\t{stamp(run.start)}"
                    f"\t{stamp(run.start + 1)}\n"
                )
        for slot in range(int(ticks_from // TICK_SECONDS), int(ticks_until // TICK_SECONDS)):
            moment = slot * TICK_SECONDS + 1.0
            asked = requested.get(slot)
            if asked is not None and asked.work is not None:
                origin, selector, template = c.tick_success
                body = template.fill(
                    {"run": asked.run_id, "work": self.work_list(asked.work), "ts": str(moment)}
                )
                status = "SUCCESS"
            else:
                origin, selector, template = c.tick_skipped
                body, status = template.fill({"ts": str(moment)}), "SKIPPED"
            tick_lines.append(
                f"{origin}\t{selector}\t{status}\tSENSOR\t{stamp(moment)}\t{body}"
                f"\t{stamp(moment)}\t{stamp(moment + 0.5)}\n"
            )
            if asked is not None and asked.kind == export_due_slices.name:
                events.append((moment, len(events), c.freshness, {}, ""))  # once a slice
        events.sort(key=lambda item: (item[0], item[1]))
        event_lines, check_lines = [], []
        for moment, _, row, values, run_id in events:
            event_id = self.next_event_id
            self.next_event_id += 1
            filled = {**values, "run": run_id, "ts": str(moment)}
            partition = f"{values['date']}|{values['device']}" if row.partitioned else None
            event_lines.append(
                "\t".join([
                    str(event_id), run_id, row.body.fill(filled), copy_value(row.event_type),
                    stamp(moment), copy_value(row.step_key), copy_value(row.asset_key),
                    copy_value(partition),
                ]) + "\n"
            )  # fmt: skip
            if row.check is not None:
                check = row.check
                check_partition = (
                    f"{values['date']}|{values['device']}" if check.partitioned else None
                )
                check_lines.append(
                    "\t".join([
                        copy_value(check.asset_key), copy_value(check.name),
                        copy_value(check_partition), run_id, copy_value(check.status),
                        check.event.fill(filled), stamp(moment), str(event_id), stamp(moment),
                    ]) + "\n"
                )  # fmt: skip
        self.db.copy("runs", RUN_COLUMNS, run_lines)
        self.db.copy("run_tags", "run_id, key, value", tag_lines)
        self.db.copy("event_logs", EVENT_COLUMNS, event_lines)
        self.db.copy("asset_check_executions", CHECK_COLUMNS, check_lines)
        self.db.copy("job_ticks", TICK_COLUMNS, tick_lines)
        self.db.rows("SELECT setval('event_logs_id_seq', %s)", self.next_event_id - 1)

    def progress(self, moment: float) -> None:
        """Each device's progress, upserted as the runs do (once an hour here: one row a
        device whatever the rate)."""
        through = datetime.fromtimestamp(moment, UTC)
        totals = DayTotals(3600, 60, dict.fromkeys(SEED_FIELDS, 3600))
        record_progress(
            self.instance, {d: Progress(through, through.date(), totals) for d in self.fleet}
        )

    def purge_ticks(self, moment: float) -> None:
        """Dagster's tick retention (dagster.yaml), as its daemons apply it after each tick."""
        sensor = self.captured.tick_success
        for origin, selector, settings in (
            (sensor[0], sensor[1], self.tick_retention),
            (SCHEDULE_ORIGIN, SCHEDULE_SELECTOR, self.schedule_retention),
        ):
            by_days: dict[int, list[TickStatus]] = defaultdict(list)
            for status, days in settings.items():
                by_days[days].append(status)
            for days, statuses in by_days.items():
                if days > 0:
                    self.instance.purge_ticks(
                        origin, selector, before=moment - days * 86_400, tick_statuses=statuses
                    )

    def day(self, day: date) -> dict[str, float]:
        """Load one day hour by hour, with the retention run at its hour; the seconds spent."""
        start = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
        runs = self.day_runs(day)
        spent = {"load": 0.0, "prune": 0.0, "vacuum": 0.0}
        for hour in range(24):
            begin, end = start + hour * 3600, start + (hour + 1) * 3600
            started = time.perf_counter()
            self.load([r for r in runs if begin <= r.start < end], begin, end)
            self.progress(end)
            spent["load"] += time.perf_counter() - started
            retention = [r for r in runs if r.kind == retain_ledger.name and begin <= r.start < end]
            if self.retention and retention:
                started = time.perf_counter()
                now = datetime.fromtimestamp(retention[0].start, UTC)
                pruned, _ = retain(self.instance, self.settings, now)
                self.pruned.append({**vars(pruned), "seconds": time.perf_counter() - started})
                spent["prune"] += time.perf_counter() - started
                started = time.perf_counter()
                self.db.rows(f"VACUUM ANALYZE {PRUNED}")  # as autovacuum after a large delete
                spent["vacuum"] += time.perf_counter() - started
            self.purge_ticks(end)
        started = time.perf_counter()
        self.db.rows("VACUUM job_ticks, kvs")  # the ticks purged since, the progress upserted
        self.db.rows("ANALYZE")
        spent["vacuum"] += time.perf_counter() - started
        return spent


# ---- the benchmark ---------------------------------------------------------------------------


def mb(size: float) -> float:
    return round(size / 1e6, 1)


def simulate(
    bench: Bench,
    captured: Captured,
    *,
    devices: int,
    interval: int,
    days: int,
    run_seconds: float,
    day_file_seconds: float,
) -> dict[str, Any]:
    """Load `days` days into a fresh database; its size, rows and tables at each day's end."""
    name = f"{bench.pg_database}_p9"
    fresh_database(name)
    fleet = [f"device-{n:04d}" for n in range(1, devices + 1)]
    env = bench.env(EXPORT_INTERVAL_SECONDS=str(interval), CHECKPOINT_DB_NAME=name)
    os.environ.update(env)  # dagster.yaml reads the CHECKPOINT_DB_* variables
    home = bench.root / "p9_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    try:
        with DagsterInstance.from_config(str(home)) as instance:
            db = Database(name)
            instance.add_dynamic_partitions(DEVICES, fleet)
            with db.connection.cursor() as cursor:
                for snapshot_id, body, kind in captured.snapshots:
                    cursor.execute(
                        "INSERT INTO snapshots (snapshot_id, snapshot_body, snapshot_type) "
                        "VALUES (%s, %s, %s)",
                        (snapshot_id, body, kind),
                    )
            simulation = Simulation(
                captured,
                db,
                instance,
                Settings.from_env(env),
                fleet,
                run_seconds=run_seconds,
                day_file_seconds=day_file_seconds,
                retention=True,
            )
            db.rows("VACUUM ANALYZE")
            sizes = [db.size()]
            counts = [db.counts()]
            tables = [db.sizes()]
            spent: dict[str, float] = defaultdict(float)
            events: list[tuple[Any, ...]] = []
            for n in range(days):
                for key, value in simulation.day(FIRST_DAY + timedelta(days=n)).items():
                    spent[key] += value
                sizes.append(db.size())
                counts.append(db.counts())
                tables.append(db.sizes())
                if n == 0:  # before any retention: what a day writes
                    events = db.rows(
                        "SELECT coalesce(dagster_event_type, 'log line'), count(*) "
                        "FROM event_logs GROUP BY 1 ORDER BY 2 DESC"
                    )
                print(
                    f"day {n + 1}: {mb(sizes[-1])} MB, event_logs {counts[-1]['event_logs']:,} "
                    f"rows, runs {counts[-1]['runs']:,}, job_ticks {counts[-1]['job_ticks']:,} "
                    f"({', '.join(f'{k} {v:.0f} s' for k, v in spent.items())})",
                    flush=True,
                )
            db.close()
            return {
                "sizes": sizes,
                "counts": counts,
                "tables": tables,
                "spent": dict(spent),
                "pruned": simulation.pruned,
                "events_day_1": {str(kind): int(count) for kind, count in events},
            }
    finally:
        drop_database(name)


def retention_seconds(pruned: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """How long the retention pass took on its first full day of work and on the last day: it
    scans what it keeps, so it slows as history grows."""
    working = [(day, p["seconds"]) for day, p in enumerate(pruned, 1) if p["materializations"]]
    if len(working) < 2:
        return {}
    (first_day, first), (last_day, last) = working[1], working[-1]
    return {
        f"retention_pass_s_day_{first_day}": round(first, 1),
        f"retention_pass_s_day_{last_day}": round(last, 1),
    }


def report(measured: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The figures P9 asks for, and what a day is made of."""
    sizes, counts, tables = measured["sizes"], measured["counts"], measured["tables"]
    days = len(sizes) - 1
    window = min(7, days - 1)
    steady = (sizes[days] - sizes[days - window]) / window
    no_retention = (sizes[min(7, days)] - sizes[1]) / max(1, min(7, days) - 1)

    def per_day(first: int, last: int) -> dict[str, int]:
        return {
            t: round((counts[last][t] - counts[first][t]) / (last - first))
            for t in counts[last]
            if counts[last][t] != counts[first][t]
        }

    result = {
        "devices": args.devices,
        "interval_s": args.interval,
        "days_simulated": days,
        **{f"mb_after_day_{d}": mb(sizes[d]) for d in (1, 7, 14, 30) if d <= days},
        "mb_per_day_steady": mb(steady),
        "steady_from_days": f"{days - window} to {days}",
        "mb_per_day_without_retention": mb(no_retention),
        "mb_after_day_30_without_retention": mb(sizes[1] + 29 * no_retention),
        "mb_per_device_year_growth": round(steady * 365 / args.devices / 1e6, 2),
        "mb_per_device_fixed": round((sizes[days] - days * steady) / args.devices / 1e6, 3),
        "rows_added_day_1": json.dumps(per_day(0, 1)),
        "events_day_1": json.dumps(measured["events_day_1"]),
        "rows_kept_per_day_steady": json.dumps(per_day(days - window, days)),
        "mb_by_table_at_end": json.dumps(
            {t: mb(s) for t, s in sorted(tables[days].items(), key=lambda i: -i[1]) if s > 1e6}
        ),
        **retention_seconds(measured["pruned"]),
        "run_seconds_assumed": args.run_seconds,
        "day_file_run_seconds_assumed": args.day_file_seconds,
        "simulation_seconds": round(sum(measured["spent"].values())),
        "ratio": round(steady / 1e6 / TARGET_MB_PER_DAY, 3),
        "target": f"<= {TARGET_MB_PER_DAY:.0f} MB a day in steady state",
    }
    if days < 30:
        result["mb_after_day_30_extrapolated"] = mb(sizes[days] + (30 - days) * steady)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--interval", type=int, default=60)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--run-seconds", type=float, default=8.0, help="a continuous run's length")
    parser.add_argument("--day-file-seconds", type=float, default=300.0, help="a day-file run's")
    parser.add_argument("--no-record", action="store_true", help="leave bench/results.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-") as root:
        bench = Bench(Path(root))
        try:
            started = time.perf_counter()
            captured = capture(bench)
            print(f"captured in {time.perf_counter() - started:.0f} s", flush=True)
            measured = simulate(
                bench,
                captured,
                devices=args.devices,
                interval=args.interval,
                days=args.days,
                run_seconds=args.run_seconds,
                day_file_seconds=args.day_file_seconds,
            )
        finally:
            bench.close()
    result = report(measured, args)
    result["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    print(json.dumps(result, indent=2))
    print("pruned per retention run:", measured["pruned"])
    print("sizes MB by day:", [mb(s) for s in measured["sizes"]])
    print("runless events while the daemon ran:", captured.runless_types)
    if not args.no_record:
        path = REPO / "bench" / "results.json"
        results = json.loads(path.read_text())
        results.setdefault("results", {})[
            NAME.format(devices=args.devices, interval=args.interval)
        ] = result
        path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
