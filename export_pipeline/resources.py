"""Dagster resources: thin, typed handles on InfluxDB, the S3 bucket and the export settings.

Built from `Settings` in one place (`build_resources`); secrets go in as `EnvVar`s, so the UI and
run config show the variable's name, never its value.
"""

from __future__ import annotations

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

    def source(self) -> InfluxSource:
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
            )
        )


class ExportBucketResource(S3Resource):
    """The bucket and prefix exports are written under, on AWS S3, MinIO or any S3 endpoint."""

    bucket: str
    prefix: str = "telemetry"

    def store(self) -> ObjectStore:
        return ObjectStore(self.get_client(), self.bucket)


class ExportResource(ConfigurableResource):
    """How device-days are cut and encoded."""

    interval_seconds: int = 300
    batch_size: int = 50_000
    format: ExportFormat = "parquet"
    layout: Layout = "seed"
    device_ids: list[str] = Field(default_factory=list)
    lookback_hours: int = 24

    def settings(self) -> ExportSettings:
        return ExportSettings(
            interval_seconds=self.interval_seconds,
            batch_size=self.batch_size,
            format=self.format,
            layout=self.layout,
            device_ids=tuple(self.device_ids),
            lookback_hours=self.lookback_hours,
        )


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
            interval_seconds=export.interval_seconds,
            batch_size=export.batch_size,
            format=export.format,
            layout=export.layout,
            device_ids=list(export.device_ids),
            lookback_hours=export.lookback_hours,
        ),
    }
