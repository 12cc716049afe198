"""Dagster resources: thin, typed handles on InfluxDB, the S3 bucket and the export settings.

Built from `Settings` in one place (`build_resources`); secrets go in as `EnvVar`s, so the UI and
run config show the variable's name, never its value.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, date, datetime

import boto3
from botocore.config import Config
from dagster import ConfigurableResource, EnvVar
from dagster_aws.s3 import S3Resource
from pydantic import Field

from export_pipeline.influx import InfluxSource
from export_pipeline.settings import (
    ExportFormat,
    ExportSettings,
    InfluxSettings,
    Layout,
    Settings,
)
from export_pipeline.writers import ObjectStore


class InfluxDBResource(ConfigurableResource):
    """InfluxDB's v1 `/query` endpoint (1.x, 2.x compatibility API, 3.x)."""

    url: str
    bucket: str
    measurement: str = "telemetry"
    org: str = ""
    username: str = ""
    token: str = ""
    password: str = ""
    timeout_seconds: float = 30.0

    def source(self, connections: int = 10) -> InfluxSource:
        return InfluxSource(
            InfluxSettings(
                url=self.url,
                bucket=self.bucket,
                measurement=self.measurement,
                org=self.org,
                username=self.username,
                token=self.token,
                password=self.password,
                timeout_seconds=self.timeout_seconds,
            ),
            connections,
        )


class ExportBucketResource(S3Resource):
    """The bucket and prefix exports are written under, on AWS S3, MinIO or any S3 endpoint."""

    bucket: str
    prefix: str = "telemetry"

    def store(self, connections: int = 10) -> ObjectStore:
        """A client with a connection pool as large as the uploads that share it."""
        client = boto3.client(
            "s3",
            region_name=self.region_name,
            endpoint_url=self.endpoint_url,
            config=Config(
                max_pool_connections=connections,
                retries={"max_attempts": self.max_attempts, "mode": "standard"},
            ),
        )
        return ObjectStore(client, self.bucket)


class ExportResource(ConfigurableResource):
    """How device-days are cut and encoded."""

    interval_seconds: int = 300
    batch_size: int = 50_000
    format: ExportFormat = "parquet"
    layout: Layout = "seed"
    device_ids: list[str] = Field(default_factory=list)
    lookback_hours: int = 24
    start_date: str = "2026-01-01"
    lateness_seconds: int = 30
    devices_per_run: int = 1_000
    concurrency: int = 8
    retries: int = 4
    stale_run_seconds: int = 0

    def settings(self) -> ExportSettings:
        values = self.model_dump()
        values["device_ids"] = tuple(self.device_ids)
        values["start_date"] = date.fromisoformat(self.start_date)
        return ExportSettings(**values)


class ClockResource(ConfigurableResource):
    """Now, in UTC; `frozen_at` (ISO-8601) pins it, so tests drive ticks without sleeping."""

    frozen_at: str = ""

    def now(self) -> datetime:
        if self.frozen_at:
            return datetime.fromisoformat(self.frozen_at).astimezone(UTC)
        return datetime.now(UTC)


def build_resources(settings: Settings) -> dict[str, ConfigurableResource]:
    influx, s3, export = settings.influx, settings.s3, settings.export
    return {
        "influxdb": InfluxDBResource(
            url=influx.url,
            bucket=influx.bucket,
            measurement=influx.measurement,
            org=influx.org,
            username=influx.username,
            token=EnvVar("INFLUXDB_TOKEN") if influx.token else "",
            password=EnvVar("INFLUXDB_PASSWORD") if influx.password else "",
            timeout_seconds=influx.timeout_seconds,
        ),
        "s3": ExportBucketResource(
            bucket=s3.bucket,
            prefix=s3.prefix,
            region_name=s3.region,
            endpoint_url=s3.endpoint_url,
        ),
        "export": ExportResource(
            **{
                **asdict(export),
                "device_ids": list(export.device_ids),
                "start_date": export.start_date.isoformat(),
            }
        ),
        "clock": ClockResource(),
    }
