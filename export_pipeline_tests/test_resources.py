"""One configuration source: every setting reaches the resource that carries it, unchanged."""

from dataclasses import fields
from datetime import UTC, date, datetime, timedelta

import pytest
from botocore import UNSIGNED
from botocore.exceptions import ProfileNotFound
from dagster_aws.s3 import S3Resource

from export_pipeline.defs.resources import (
    ClockResource,
    ExportBucketResource,
    ExportResource,
    InfluxDBResource,
    LaunchConfigRefused,
    build_resources,
)
from export_pipeline.settings import (
    CheckpointSettings,
    ExportSettings,
    InfluxSettings,
    S3Settings,
    Settings,
)

# A value other than the default for every variable the settings read.
EVERY_SETTING = {
    "INFLUXDB_URL": "https://influx.example:8443",
    "INFLUXDB_BUCKET": "fleet",
    "INFLUXDB_MEASUREMENT": "meters",
    "INFLUXDB_ORG": "acme",
    "INFLUXDB_USERNAME": "reader",
    "INFLUXDB_TOKEN": "tok",
    "INFLUXDB_PASSWORD": "pw",
    "INFLUXDB_TIMEOUT_SECONDS": "12.5",
    "EXPORT_FIELDS": "voltage,rpm",
    "EXPORT_TAGS": "*",
    "EXPORT_FIELD_TYPES": "rpm:float",
    "S3_BUCKET": "exports",
    "S3_PREFIX": "raw/telemetry",
    "S3_DAILY_PREFIX": "days",
    "S3_REGION": "eu-west-3",
    "S3_ENDPOINT_URL": "https://minio.example:9000",
    "EXPORT_INTERVAL_SECONDS": "60",
    "EXPORT_BATCH_SIZE": "1234",
    "EXPORT_FORMAT": "csv",
    "EXPORT_LAYOUT": "hive",
    "EXPORT_START_DATE": "2025-03-04",
    "DEVICE_IDS": "a,b",
    "LOOKBACK_HOURS": "6",
    "EXPORT_LATENESS_SECONDS": "7",
    "EXPORT_DEVICES_PER_RUN": "50",
    "EXPORT_CONCURRENCY": "3",
    "EXPORT_RETRIES": "2",
    "EXPORT_STALE_RUN_SECONDS": "90",
    "EXPORT_SWEEP_CRON": "5 */6 * * *",
    "EXPORT_SLICE_RETENTION_DAYS": "30",
    "EXPORT_PARTITION_DAYS": "45",
    "EXPORT_LEDGER_RETENTION_DAYS": "3",
    "EXPORT_RETENTION_CRON": "0 1 * * *",
    "EXPORT_MAX_DEVICES": "500",
    "EXPORT_NEW_DEVICES_PER_TICK": "20",
    "DEVICE_ID_PATTERN": "dev-[0-9]+",
    "CHECKPOINT_DB_HOST": "db.example",
    "CHECKPOINT_DB_PORT": "6543",
    "CHECKPOINT_DB_NAME": "ledger",
    "CHECKPOINT_DB_USER": "dagster",
    "CHECKPOINT_DB_PASSWORD": "secret",
    "PORT": "9090",
    "LOG_LEVEL": "DEBUG",
    "UI_ALLOWED_HOSTS": "dagster.example.com,10.0.0.5",
}
DEFAULTS = {
    InfluxSettings: InfluxSettings(),
    S3Settings: S3Settings(bucket=""),
    ExportSettings: ExportSettings(),
    CheckpointSettings: CheckpointSettings(),
}


def test_every_setting_is_read_from_the_environment() -> None:
    settings = Settings.from_env(EVERY_SETTING)
    for part in (settings.influx, settings.s3, settings.export, settings.checkpoint):
        default = DEFAULTS[type(part)]
        unchanged = [
            f.name for f in fields(part) if getattr(part, f.name) == getattr(default, f.name)
        ]
        assert unchanged == [], f"{type(part).__name__} fields not set by any variable: {unchanged}"
    assert (settings.port, settings.log_level) == (9090, "DEBUG")
    assert settings.ui_hosts == ("dagster.example.com", "10.0.0.5")


def test_every_setting_reaches_its_resource_and_comes_back_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Secrets reach the resources as EnvVars, resolved from the environment at run time.
    monkeypatch.setenv("INFLUXDB_TOKEN", EVERY_SETTING["INFLUXDB_TOKEN"])
    monkeypatch.setenv("INFLUXDB_PASSWORD", EVERY_SETTING["INFLUXDB_PASSWORD"])
    settings = Settings.from_env(EVERY_SETTING)
    resources = build_resources(settings)
    influxdb, s3, export = resources["influxdb"], resources["s3"], resources["export"]
    assert isinstance(influxdb, InfluxDBResource)
    assert isinstance(s3, ExportBucketResource)
    assert isinstance(export, ExportResource)
    assert influxdb.process_config_and_initialize().settings() == settings.influx
    assert s3.settings() == settings.s3
    assert export.settings() == settings.export
    assert export.settings().sweep_cron == "5 */6 * * *"
    assert export.settings().start_date == date(2025, 3, 4)


def test_resources_hold_no_defaults_of_their_own() -> None:
    """A default in a resource would be a second one, silently used when a field is left out."""
    for resource, kind in (
        (InfluxDBResource, InfluxSettings),
        (ExportResource, ExportSettings),
    ):
        model = resource.model_fields
        assert set(model) == {f.name for f in fields(kind)}
        assert all(field.is_required() for field in model.values())
    own = set(ExportBucketResource.model_fields) - set(S3Resource.model_fields)
    assert own == {"bucket", "prefix", "daily_prefix"}


def test_the_bucket_resource_honours_the_s3resource_fields_it_inherits() -> None:
    base = ExportBucketResource.from_settings(Settings.from_env(EVERY_SETTING).s3)
    keys = base.model_copy(
        update={"aws_access_key_id": "AKIDEXAMPLE", "aws_secret_access_key": "wJalr"}
    ).client()
    credentials = keys._request_signer._credentials  # type: ignore[attr-defined]
    assert (credentials.access_key, credentials.secret_key) == ("AKIDEXAMPLE", "wJalr")
    assert keys.meta.endpoint_url == "https://minio.example:9000"
    assert keys.meta.region_name == "eu-west-3"
    unsigned = base.model_copy(update={"use_unsigned_session": True}).client()
    assert unsigned.meta.config.signature_version is UNSIGNED  # type: ignore[attr-defined]
    plain = base.model_copy(
        update={"use_ssl": False, "endpoint_url": None, "region_name": "us-east-1"}
    ).client()
    assert plain.meta.endpoint_url.startswith("http://")
    with pytest.raises(ProfileNotFound):
        base.model_copy(update={"profile_name": "no-such-profile"}).client()


def test_a_runs_clock_may_be_pinned_to_the_past_never_to_the_future() -> None:
    # A clock ahead would export slices that have not closed and record them as done.
    past = datetime.now(UTC) - timedelta(days=3)
    assert ClockResource(frozen_at=past.isoformat()).now() == past
    future = datetime.now(UTC) + timedelta(hours=1)
    with pytest.raises(LaunchConfigRefused, match=r"frozen_at=.* is in the future"):
        ClockResource(frozen_at=future.isoformat()).now()
    assert abs(ClockResource().now() - datetime.now(UTC)) < timedelta(seconds=5)
