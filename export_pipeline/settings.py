"""The environment, parsed once into typed, validated settings.

Every setting the pipeline reads is named here, with its default and its rule, so that a bad value
fails at start-up with a message naming the variable and the fix, never half-way through a run.
Secrets (INFLUXDB_TOKEN, INFLUXDB_PASSWORD) are kept out of `repr` so they never reach a log.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Literal, TypeVar, cast
from urllib.parse import urlsplit

from export_pipeline.layout import devices_root

ExportFormat = Literal["parquet", "csv"]
Layout = Literal["seed", "hive"]
FORMATS: tuple[ExportFormat, ...] = ("parquet", "csv")
LAYOUTS: tuple[Layout, ...] = ("seed", "hive")
SECONDS_PER_DAY = 86_400
# A run logs a heartbeat every 5 s whatever it exports: one silent this long (nine heartbeats, or
# one InfluxDB request timing out) is presumed dead.
STALE_RUN_SECONDS = 45
T = TypeVar("T")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class SettingsError(ValueError):
    """One or more settings are invalid; the message names each variable and what it expects."""


@dataclass(frozen=True)
class InfluxSettings:
    url: str = "http://localhost:8086"
    bucket: str = "telemetry"
    measurement: str = "telemetry"
    org: str = ""
    username: str = ""
    token: str = field(default="", repr=False)
    password: str = field(default="", repr=False)
    timeout_seconds: float = 30.0


@dataclass(frozen=True)
class S3Settings:
    bucket: str
    prefix: str = "telemetry"  # the slices (telemetry_export)
    daily_prefix: str = "telemetry_daily"  # one file per closed device-day (telemetry_daily)
    region: str = "us-east-1"
    endpoint_url: str | None = None


@dataclass(frozen=True)
class CheckpointSettings:
    """PostgreSQL holding Dagster's storage; dagster.yaml reads the same variables."""

    host: str = "127.0.0.1"
    port: int = 5432
    name: str = "export_pipeline"
    user: str = "postgres"
    password: str = field(default="", repr=False)


MIN_PARTITION_DAYS = 8


@dataclass(frozen=True)
class ExportSettings:
    interval_seconds: int = 300
    batch_size: int = 50_000
    format: ExportFormat = "parquet"
    layout: Layout = "seed"
    start_date: date = date(2026, 1, 1)
    device_ids: tuple[str, ...] = ()
    lookback_hours: int = 24
    lateness_seconds: int = 30
    devices_per_run: int = 1_000
    concurrency: int = 8
    retries: int = 4
    stale_run_seconds: int = 0  # 0: STALE_RUN_SECONDS
    sweep_cron: str = "20 * * * *"  # when closed days are searched for late data (UTC)
    slice_retention_days: int = 0  # 0: keep slices; N: delete them N days after a daily file
    partition_days: int = 14  # telemetry_export's dates: the last N (0: all from start_date)
    ledger_retention_days: int = 7  # how long Dagster keeps superseded events and run logs
    retention_cron: str = "40 3 * * *"  # when the ledger's retention runs (UTC)

    @property
    def stale_run_after(self) -> int:
        return self.stale_run_seconds or STALE_RUN_SECONDS

    @property
    def partition_window_days(self) -> int:
        """telemetry_export's dates, today included (0: every day from start_date): at least
        EXPORT_PARTITION_DAYS, and longer than what the sensor, the sweep and slice retention
        read of the slices' ledger (the lookback, a week, retention's week past its days)."""
        if not self.partition_days:
            return 0
        retention = self.slice_retention_days + 8 if self.slice_retention_days else 0
        return max(self.partition_days, retention, self.lookback_hours // 24 + 9)


@dataclass(frozen=True)
class Settings:
    influx: InfluxSettings
    s3: S3Settings
    export: ExportSettings
    checkpoint: CheckpointSettings = CheckpointSettings()
    port: int = 8080
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Parse `env` (default: os.environ); raise SettingsError naming every culprit."""
        return _Parser(os.environ if env is None else env).settings()


def load_env_file() -> None:
    """Read a `.env` in the working directory into the environment; variables already set win.

    Only the working directory's, as the Dagster CLI reads it (which lets it win): python-dotenv's
    default search walks up from the calling module's folder, and would find a checkout's `.env`
    wherever the process was started.
    """
    from dotenv import load_dotenv

    load_dotenv(Path.cwd() / ".env")


def parse_influx(env: Mapping[str, str]) -> InfluxSettings:
    """The INFLUXDB_* settings alone, for tools that only talk to InfluxDB (the simulator)."""
    parser = _Parser(env)
    influx = parser.influx()
    parser.finish()
    return influx


class _Parser:
    """Collects every problem before raising, so one start-up shows all that is wrong."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def text(self, name: str, default: str = "") -> str:
        return self.env.get(name, "").strip() or default

    def converted(self, name: str, convert: Callable[[str], T], what: str) -> T | None:
        """The variable converted, or None when it is unset or not `what` (noted)."""
        raw = self.text(name)
        if not raw:
            return None
        try:
            return convert(raw)
        except ValueError:
            self.problems.append(f"{name}={raw!r} is not {what}")
            return None

    def integer(self, name: str, default: int, minimum: int, maximum: int | None = None) -> int:
        value = self.converted(name, int, "a whole number")
        if value is None:
            return default
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and at most {maximum}" if maximum is not None else ""
            self.problems.append(f"{name}={value} must be at least {minimum}{upper}")
        return value

    def number(self, name: str, default: float) -> float:
        value = self.converted(name, float, "a number")
        if value is None:
            return default
        if not value > 0:
            self.problems.append(f"{name}={self.text(name)} must be a positive number of seconds")
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(name, default).lower()
        if value not in choices:
            self.problems.append(f"{name}={self.text(name)!r} is not one of {', '.join(choices)}")
            return default
        return value

    def url(self, name: str, default: str = "") -> str:
        value = self.text(name, default)
        if not value:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            self.problems.append(
                f"{name}={value!r} is not an http(s) URL such as http://localhost:8086"
            )
        return value.rstrip("/")

    def cron(self, name: str, default: str) -> str:
        value = self.text(name, default)
        # Dagster's own rule (five fields or an alias such as @hourly, no seconds), so the
        # schedule can always be built; imported here to keep this module light for the tools
        # that only need INFLUXDB_* (the simulator).
        from export_pipeline.internals import is_valid_cron

        if not is_valid_cron(value):
            self.problems.append(
                f"{name}={value!r} is not a five-field cron expression such as '20 * * * *'"
            )
            return default
        return value

    def required(self, name: str, hint: str) -> str:
        value = self.text(name)
        if not value:
            self.problems.append(f"{name} is not set: {hint}")
        return value

    def finish(self) -> None:
        if self.problems:
            raise SettingsError("Invalid configuration: " + "; ".join(self.problems))

    def influx(self) -> InfluxSettings:
        return InfluxSettings(
            url=self.url("INFLUXDB_URL", InfluxSettings.url),
            bucket=self.text("INFLUXDB_BUCKET", InfluxSettings.bucket),
            measurement=self.text("INFLUXDB_MEASUREMENT", InfluxSettings.measurement),
            org=self.text("INFLUXDB_ORG"),
            username=self.text("INFLUXDB_USERNAME"),
            token=self.text("INFLUXDB_TOKEN"),
            password=self.env.get("INFLUXDB_PASSWORD", ""),
            timeout_seconds=self.number("INFLUXDB_TIMEOUT_SECONDS", InfluxSettings.timeout_seconds),
        )

    def settings(self) -> Settings:
        influx = self.influx()
        prefix = self.prefix("S3_PREFIX", S3Settings.prefix)
        s3 = S3Settings(
            bucket=self.bucket(),
            prefix=prefix,
            daily_prefix=self.daily_prefix(prefix),
            region=self.text("S3_REGION", S3Settings.region),
            endpoint_url=self.url("S3_ENDPOINT_URL") or None,
        )
        export = ExportSettings(
            interval_seconds=self.interval(),
            batch_size=self.integer("EXPORT_BATCH_SIZE", ExportSettings.batch_size, 1, 10_000_000),
            format=cast(ExportFormat, self.choice("EXPORT_FORMAT", "parquet", FORMATS)),
            layout=cast(Layout, self.choice("EXPORT_LAYOUT", "seed", LAYOUTS)),
            start_date=self.start_date(),
            device_ids=self.device_ids(),
            lookback_hours=self.integer("LOOKBACK_HOURS", ExportSettings.lookback_hours, 1),
            lateness_seconds=self.integer(
                "EXPORT_LATENESS_SECONDS", ExportSettings.lateness_seconds, 0, 86_400
            ),
            devices_per_run=self.integer(
                "EXPORT_DEVICES_PER_RUN", ExportSettings.devices_per_run, 1, 100_000
            ),
            concurrency=self.integer("EXPORT_CONCURRENCY", ExportSettings.concurrency, 1, 64),
            retries=self.integer("EXPORT_RETRIES", ExportSettings.retries, 0, 20),
            stale_run_seconds=self.integer("EXPORT_STALE_RUN_SECONDS", 0, 0),
            sweep_cron=self.cron("EXPORT_SWEEP_CRON", ExportSettings.sweep_cron),
            slice_retention_days=self.integer("EXPORT_SLICE_RETENTION_DAYS", 0, 0, 36_500),
            partition_days=self.partition_days(),
            ledger_retention_days=self.integer(
                "EXPORT_LEDGER_RETENTION_DAYS", ExportSettings.ledger_retention_days, 1, 36_500
            ),
            retention_cron=self.cron("EXPORT_RETENTION_CRON", ExportSettings.retention_cron),
        )
        checkpoint = CheckpointSettings(
            host=self.text("CHECKPOINT_DB_HOST", CheckpointSettings.host),
            port=self.integer("CHECKPOINT_DB_PORT", CheckpointSettings.port, 1, 65_535),
            name=self.text("CHECKPOINT_DB_NAME", CheckpointSettings.name),
            user=self.text("CHECKPOINT_DB_USER", CheckpointSettings.user),
            password=self.env.get("CHECKPOINT_DB_PASSWORD", ""),
        )
        port = self.integer("PORT", 8080, 1, 65_535)
        log_level = self.choice("LOG_LEVEL", "info", tuple(x.lower() for x in LOG_LEVELS)).upper()
        self.finish()
        return Settings(
            influx=influx,
            s3=s3,
            export=export,
            checkpoint=checkpoint,
            port=port,
            log_level=log_level,
        )

    def interval(self) -> int:
        value = self.integer("EXPORT_INTERVAL_SECONDS", ExportSettings.interval_seconds, 1)
        if value >= 1 and SECONDS_PER_DAY % value:
            self.problems.append(
                f"EXPORT_INTERVAL_SECONDS={value} does not divide a day (86400 s) evenly; "
                "choose a divisor such as 60, 300, 900 or 3600"
            )
        return value

    def partition_days(self) -> int:
        value = self.integer("EXPORT_PARTITION_DAYS", ExportSettings.partition_days, 0, 36_500)
        if 0 < value < MIN_PARTITION_DAYS:
            self.problems.append(
                f"EXPORT_PARTITION_DAYS={value} is shorter than the week the sensor and the "
                f"late-data sweep look back: use 0 (every day since EXPORT_START_DATE) or at "
                f"least {MIN_PARTITION_DAYS}"
            )
        return value

    def start_date(self) -> date:
        value = self.converted("EXPORT_START_DATE", date.fromisoformat, "a date like 2026-01-01")
        return value or ExportSettings.start_date

    def bucket(self) -> str:
        value = self.required("S3_BUCKET", "name the bucket the exports are written to")
        # The S3 bucket naming rules, so a typo fails here rather than as an opaque S3 error.
        if value and not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", value):
            self.problems.append(
                f"S3_BUCKET={value!r} is not a valid bucket name "
                "(3-63 lowercase letters, digits, dots and hyphens)"
            )
        return value

    def prefix(self, name: str, default: str) -> str:
        value = self.text(name, default).strip("/")
        if any(part in ("", ".", "..") for part in value.split("/")) and value:
            self.problems.append(f"{name}={value!r} has an empty, '.' or '..' path segment")
        if "\\" in value:
            self.problems.append(f"{name}={value!r} has a '\\', which some S3 servers read as '/'")
        return value

    def daily_prefix(self, slices: str) -> str:
        value = self.prefix("S3_DAILY_PREFIX", S3Settings.daily_prefix)
        ours, theirs = devices_root(value), devices_root(slices)
        if ours.startswith(theirs) or theirs.startswith(ours):
            self.problems.append(
                f"S3_DAILY_PREFIX={value!r} shares keys with S3_PREFIX={slices!r}: the daily "
                "files and the slices would overwrite each other; choose another prefix"
            )
        return value

    def device_ids(self) -> tuple[str, ...]:
        return device_ids_of(self.env.get("DEVICE_IDS", ""))


def device_ids_of(raw: str) -> tuple[str, ...]:
    """DEVICE_IDS as ids: comma-separated, trimmed, first occurrence kept; "*" or nothing means
    every device found. Ids are validated where they are registered, so one bad id is refused
    by name without stopping the code location from loading."""
    ids = [part.strip() for part in raw.split(",") if part.strip()]
    return () if ids == ["*"] else tuple(dict.fromkeys(ids))
