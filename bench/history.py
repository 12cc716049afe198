"""P5: a sensor tick over a large fleet with weeks of materialization history in PostgreSQL.

History is bulk-loaded with COPY into Dagster's own event_logs table: one materialization per
device per tick for every past day. Only the latest event of each partition is ever read back,
so those carry a real serialized event (a template recorded through Dagster, with partition and
timestamps substituted); the older rows carry a placeholder body and exist for their index
entries, which is what the sensor's queries scan.
"""

from __future__ import annotations

import io
import os
import statistics
import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg2
from dagster import (
    AssetMaterialization,
    DagsterInstance,
    MetadataValue,
    SensorResult,
    build_sensor_context,
)

from export_pipeline.metadata import COVERED_THROUGH, EXPORTED_THROUGH, TELEMETRY_EXPORT
from export_pipeline.partitions import DeviceDay
from export_pipeline.resources import ClockResource, build_resources
from export_pipeline.sensors import build_continuous_export
from export_pipeline.settings import Settings
from export_pipeline_tests.services import POSTGRES

TEMPLATE_PARTITION = DeviceDay("template-device", date(2000, 1, 1)).key
TEMPLATE_TIME = 946_684_800.0  # 2000-01-01T00:00:00Z


def template_event(instance: DagsterInstance) -> str:
    instance.report_runless_asset_event(
        AssetMaterialization(
            asset_key=TELEMETRY_EXPORT,
            partition=TEMPLATE_PARTITION,
            metadata={
                EXPORTED_THROUGH: MetadataValue.timestamp(TEMPLATE_TIME),
                COVERED_THROUGH: MetadataValue.timestamp(TEMPLATE_TIME),
            },
        )
    )
    record = instance.fetch_materializations(TELEMETRY_EXPORT, limit=1).records[0]
    connection = psycopg2.connect(dbname=database_of(instance), **POSTGRES)
    with connection, connection.cursor() as cursor:
        cursor.execute("SELECT event FROM event_logs WHERE id = %s", (record.storage_id,))
        return str(cursor.fetchone()[0])


def database_of(instance: DagsterInstance) -> str:
    return str(instance.event_log_storage.postgres_url.rsplit("/", 1)[1])  # type: ignore[attr-defined]


def load_history(
    instance: DagsterInstance, devices: list[str], end: datetime, days: int, ticks_per_day: int
) -> int:
    """COPY `days` x `ticks_per_day` x len(devices) materializations ending at `end`."""
    template = template_event(instance)
    asset_key_column = TELEMETRY_EXPORT.to_string()
    rows = 0
    connection = psycopg2.connect(dbname=database_of(instance), **POSTGRES)
    with connection, connection.cursor() as cursor:
        for day_index in range(days, -1, -1):
            day = (end - timedelta(days=day_index)).date()
            buffer = io.StringIO()
            ticks = ticks_per_day if day_index else max(1, ticks_per_day * end.hour // 24)
            for tick in range(ticks):
                moment = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(
                    seconds=(tick + 1) * 86_400 // ticks_per_day
                )
                stamp = moment.strftime("%Y-%m-%d %H:%M:%S")
                last = tick == ticks - 1
                for device in devices:
                    partition = DeviceDay(device, day).key
                    body = (
                        template.replace(TEMPLATE_PARTITION, partition).replace(
                            str(TEMPLATE_TIME), str(moment.timestamp())
                        )
                        if last
                        else "{}"
                    )
                    body = body.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
                    buffer.write(
                        f"\t{body}\tASSET_MATERIALIZATION\t{stamp}\t\t{asset_key_column}"
                        f"\t{partition}\n"
                    )
                    rows += 1
            buffer.seek(0)
            cursor.copy_expert(
                "COPY event_logs (run_id, event, dagster_event_type, timestamp, step_key, "
                "asset_key, partition) FROM STDIN",
                buffer,
            )
            connection.commit()
        cursor.execute("ANALYZE event_logs")
    return rows


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


def p5(env: dict[str, str], results: dict[str, Any], fleet: int, days: int, ticks: int) -> None:
    devices = [f"p5-{i:04d}" for i in range(fleet)]
    settings = Settings.from_env({**env, "DEVICE_IDS": ",".join(devices)})
    now = datetime(2026, 3, 10, 12, 0, 30, tzinfo=UTC)
    os.environ.update(env)  # dagster.yaml reads the CHECKPOINT_DB_* variables
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        instance.add_dynamic_partitions("devices", devices)
        started = time.perf_counter()
        rows = load_history(instance, devices, now, days, ticks)
        loaded = time.perf_counter() - started
        durations = tick_seconds(instance, settings, now)
    median = statistics.median(durations[1:])
    results[f"P5 sensor tick, {fleet} devices"] = {
        "history_materializations": rows,
        "history_days": days,
        "tick_seconds_median": round(median, 3),
        "first_tick_seconds": round(durations[0], 2),
        "tick_seconds_all": ", ".join(f"{d:.2f}" for d in durations),
        "load_seconds": round(loaded),
        "ratio": round(median / 60, 4),
        "target": "<= 2 s (Dagster's tick timeout: 60 s)",
    }
