"""P5: a sensor tick over a large fleet with weeks of history in Dagster's PostgreSQL storage.

The history is what the pipeline leaves with the ledger retention in force, bulk-loaded with
COPY into Dagster's own tables: each device's progress (a key-value row); for every device-day
of the retention window the materializations a continuous run records (`worth_recording`: the
first, about one an hour, the close), and one for each older day (the latest, which retention
keeps); for every closed device-day a passed reconciliation of its slices and its day file's
passed reconciliation, and for every closed date telemetry_daily's materialization. What the
sensor reads back (the latest event of a partition, a check's latest status) carries a real
serialized event recorded through Dagster, with partition and times substituted; older rows
carry a placeholder body and exist for their index entries, which is what the sensor's queries
scan.
"""

from __future__ import annotations

import io
import os
import statistics
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg2
from dagster import (
    AssetKey,
    AssetMaterialization,
    DagsterInstance,
    MetadataValue,
    SensorResult,
    build_sensor_context,
)

from export_pipeline.defs.resources import ClockResource, build_resources
from export_pipeline.defs.sensors import build_continuous_export
from export_pipeline.engine.progress import DayTotals, Progress
from export_pipeline.record.keys import (
    COVERED_THROUGH,
    DAILY_RECONCILIATION,
    EXPORTED_THROUGH,
    RECONCILIATION,
    TELEMETRY_DAILY,
    TELEMETRY_EXPORT,
    DeviceDay,
    date_key,
)
from export_pipeline.record.ledger import record_progress
from export_pipeline.record.storage import write_values
from export_pipeline.record.versions import RECORD_VERSION, VERSION_KEY
from export_pipeline.settings import Settings
from export_pipeline_tests.services import POSTGRES

TEMPLATE_PARTITION = DeviceDay("template-device", date(2000, 1, 1)).key
TEMPLATE_TIME = 946_684_800.0  # 2000-01-01T00:00:00Z
RECORDED_PER_DAY = 26  # worth_recording at 60 s slices: the first export, 24 hourly, the close


def template_event(instance: DagsterInstance, asset_key: AssetKey) -> str:
    instance.report_runless_asset_event(
        AssetMaterialization(
            asset_key=asset_key,
            partition=TEMPLATE_PARTITION,
            metadata={
                EXPORTED_THROUGH: MetadataValue.timestamp(TEMPLATE_TIME),
                COVERED_THROUGH: MetadataValue.timestamp(TEMPLATE_TIME),
            },
        )
    )
    record = instance.fetch_materializations(asset_key, limit=1).records[0]
    connection = psycopg2.connect(dbname=database_of(instance), **POSTGRES)
    with connection, connection.cursor() as cursor:
        cursor.execute("SELECT event FROM event_logs WHERE id = %s", (record.storage_id,))
        body = str(cursor.fetchone()[0])
        cursor.execute("DELETE FROM event_logs WHERE id = %s", (record.storage_id,))
    return body


def database_of(instance: DagsterInstance) -> str:
    return str(instance.event_log_storage.postgres_url.rsplit("/", 1)[1])  # type: ignore[attr-defined]


def _copy_line(*values: object) -> str:
    def text(value: object) -> str:
        if value is None:
            return "\\N"
        return str(value).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")

    return "\t".join(text(value) for value in values) + "\n"


class _Day:
    """One day's rows, in COPY's text format, with storage ids allocated in order."""

    def __init__(self, next_id: int, bodies: dict[AssetKey, str]) -> None:
        self.next_id, self.bodies = next_id, bodies
        self.events, self.checks = io.StringIO(), io.StringIO()
        self.materializations = self.evaluations = 0

    def event(self, key: AssetKey, partition: str, moment: datetime, kind: str, real: bool) -> int:
        body = "{}"
        if real:
            body = self.bodies[key].replace(TEMPLATE_PARTITION, partition)
            body = body.replace(str(TEMPLATE_TIME), str(moment.timestamp()))
        stamp = moment.strftime("%Y-%m-%d %H:%M:%S")
        row = (self.next_id, "", body, kind, stamp, None, key.to_string(), partition)
        self.events.write(_copy_line(*row))
        self.next_id += 1
        self.materializations += kind == "ASSET_MATERIALIZATION"
        return self.next_id - 1

    def check(self, key: AssetKey, name: str, partition: str, moment: datetime) -> None:
        storage_id = self.event(key, partition, moment, "ASSET_CHECK_EVALUATION", False)
        stamp = moment.strftime("%Y-%m-%d %H:%M:%S")
        row = (key.to_string(), name, partition, uuid.uuid4().hex, "SUCCEEDED", None, stamp)
        self.checks.write(_copy_line(*row, storage_id, None, stamp))
        self.evaluations += 1

    def copy(self, cursor: Any) -> None:
        self.events.seek(0)
        cursor.copy_expert(
            "COPY event_logs (id, run_id, event, dagster_event_type, timestamp, step_key, "
            "asset_key, partition) FROM STDIN",
            self.events,
        )
        self.checks.seek(0)
        cursor.copy_expert(
            "COPY asset_check_executions (asset_key, check_name, partition, run_id, "
            "execution_status, evaluation_event, evaluation_event_timestamp, "
            "evaluation_event_storage_id, materialization_event_storage_id, create_timestamp) "
            "FROM STDIN",
            self.checks,
        )


def load_history(
    instance: DagsterInstance,
    devices: list[str],
    end: datetime,
    days: int,
    retention_days: int,
    real_days: int | None = None,
) -> dict[str, int]:
    """COPY `days` days of a fleet's ledger ending at `end` (see the module's docstring). Only
    the last `real_days` days (all if None) carry real event bodies: a year of a large fleet's
    bodies is gigabytes that the partition status queries never read."""
    bodies = {key: template_event(instance, key) for key in (TELEMETRY_EXPORT, TELEMETRY_DAILY)}
    counts = {"materializations": 0, "evaluations": 0}
    connection = psycopg2.connect(dbname=database_of(instance), **POSTGRES)
    with connection, connection.cursor() as cursor:
        cursor.execute("SELECT nextval('event_logs_id_seq')")
        next_id = int(cursor.fetchone()[0]) + 1
        for day_index in range(days, -1, -1):
            day = (end - timedelta(days=day_index)).date()
            midnight = datetime(day.year, day.month, day.day, tzinfo=UTC)
            rows = _Day(next_id, bodies)
            real = real_days is None or day_index < real_days
            recorded = RECORDED_PER_DAY if day_index <= retention_days else 1
            if day_index == 0:
                recorded = max(1, RECORDED_PER_DAY * end.hour // 24)
            for n in range(recorded):
                moment = midnight + timedelta(seconds=(n + 1) * 86_400 // (RECORDED_PER_DAY + 1))
                if n == recorded - 1:
                    moment = midnight + timedelta(days=1) if day_index else end
                for device in devices:
                    partition = DeviceDay(device, day).key
                    rows.event(
                        TELEMETRY_EXPORT,
                        partition,
                        moment,
                        "ASSET_MATERIALIZATION",
                        real and n == recorded - 1,
                    )
            if day_index:  # closed: reconciled, then its day file written and reconciled
                later = midnight + timedelta(days=1, minutes=2)
                for device in devices:
                    rows.check(
                        TELEMETRY_EXPORT, RECONCILIATION.name, DeviceDay(device, day).key, later
                    )
                for device in devices:
                    partition = DeviceDay(device, day).key
                    rows.check(TELEMETRY_DAILY, DAILY_RECONCILIATION.name, partition, later)
                # The day files' partition is the date: one materialization sums up the fleet's.
                rows.event(TELEMETRY_DAILY, date_key(day), later, "ASSET_MATERIALIZATION", real)
            rows.copy(cursor)
            connection.commit()
            next_id = rows.next_id
            counts["materializations"] += rows.materializations
            counts["evaluations"] += rows.evaluations
        cursor.execute("SELECT setval('event_logs_id_seq', %s)", (next_id,))
        cursor.execute("ANALYZE event_logs")
        cursor.execute("ANALYZE asset_check_executions")
    through = end.replace(second=0, microsecond=0) - timedelta(minutes=1)
    totals = DayTotals(rows=3_600 * through.hour, files=60 * through.hour)
    record_progress(instance, {d: Progress(through, end.date(), totals) for d in devices})
    write_values(instance, {VERSION_KEY: str(RECORD_VERSION)})  # this release's: no migration
    return counts


def tick_seconds(instance: DagsterInstance, settings: Settings, now: datetime) -> list[float]:
    """A first tick (no cursor: searches the whole window), then three with the cursor it left,
    as the daemon runs them."""
    resources = {**build_resources(settings), "clock": ClockResource(frozen_at=now.isoformat())}
    sensor = build_continuous_export(settings)
    durations, cursor = [], None
    for _ in range(4):
        started = time.perf_counter()
        with build_sensor_context(instance=instance, resources=resources, cursor=cursor) as context:
            result = sensor(context)
        durations.append(time.perf_counter() - started)
        assert isinstance(result, SensorResult)
        cursor = result.cursor
    return durations


def p5(
    env: dict[str, str], results: dict[str, Any], fleet: int, days: int, retention_days: int = 7
) -> None:
    devices = [f"p5-{fleet}-{i:04d}" for i in range(fleet)]
    settings = Settings.from_env({**env, "DEVICE_IDS": ",".join(devices)})
    now = datetime(2026, 3, 10, 12, 0, 30, tzinfo=UTC)
    os.environ.update(env)  # dagster.yaml reads the CHECKPOINT_DB_* variables
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        instance.add_dynamic_partitions("devices", devices)
        started = time.perf_counter()
        loaded = load_history(instance, devices, now, days, retention_days)
        load_seconds = time.perf_counter() - started
        durations = tick_seconds(instance, settings, now)
    median = statistics.median(durations[1:])
    results[f"P5 sensor tick, {fleet} devices"] = {
        "history_days": days,
        "history_materializations": loaded["materializations"],
        "history_evaluations": loaded["evaluations"],
        "tick_seconds_median": round(median, 3),
        "first_tick_seconds": round(durations[0], 2),
        "tick_seconds_all": ", ".join(f"{d:.2f}" for d in durations),
        "load_seconds": round(load_seconds),
        "ratio": round(median / 2, 3),
        "target": "<= 2 s",
    }
