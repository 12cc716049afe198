"""The environment, parsed once into typed, validated settings.

Every setting the pipeline reads is named here, with its default and its rule, so that a bad value
fails at start-up with a message naming the variable and the fix, never half-way through a run.
Secrets (INFLUXDB_TOKEN, INFLUXDB_PASSWORD) are kept out of `repr` so they never reach a log.

The parser records how it reads each variable (its default and what it accepts), and
`DESCRIPTIONS` says what each one is for: `configuration_reference()` renders both as
docs/configuration.md (`python -m export_pipeline.settings > docs/configuration.md`), and a test
fails when that file differs.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Literal, NamedTuple, TypeVar, cast
from urllib.parse import urlsplit

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


def devices_root(prefix: str) -> str:
    """What every device folder's key starts with (`device_id=` under the prefix): here, below
    the layout (`engine/layout.py`), because the prefixes are checked for overlap as they are
    parsed."""
    return f"{prefix}/device_id=" if prefix else "device_id="


def is_valid_cron(expression: str) -> bool:
    """Dagster's own rule for a schedule's cron string (five fields or an alias such as
    @hourly, no seconds), so a schedule can always be built. Dagster's non-public API (pinned by
    `test_internals.py`), imported here to keep this module light for the tools that only need
    INFLUXDB_* (the simulator)."""
    from dagster._utils.schedules import is_valid_cron_string

    return bool(is_valid_cron_string(expression))


# A host name, an IPv4 address, or an IPv6 address in brackets, as a Host header carries it.
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOST = re.compile(rf"{_LABEL}(\.{_LABEL})*|\[[0-9a-f:.]+\]")


class SettingsError(ValueError):
    """One or more settings are invalid; the message names each variable and what it expects."""


# The seed's fields and tags: what is exported unless EXPORT_FIELDS and EXPORT_TAGS say otherwise.
SEED_FIELDS = ("voltage", "current", "power", "temperature")
SEED_TAGS = ("device_type", "location")
# InfluxDB's field types (`SHOW FIELD KEYS`), the names EXPORT_FIELD_TYPES declares them by.
FIELD_TYPES = ("float", "integer", "unsigned", "boolean", "string")
# Names no field or tag may take: the columns the export makes itself, InfluxDB's `time`, and the
# datasets' partition keys (`device_id=…/date=…` in every path: a reader of the hive layout would
# see two columns of that name).
RESERVED_NAMES = frozenset(
    {"time", "timestamp", "device_id", "date", "hour", "day_of_week", "is_weekend", "power_factor"}
)


def listed(text: str) -> tuple[str, ...] | None:
    """A comma-separated setting's names (trimmed, empty ones dropped); None for `*` (every one)."""
    if text.strip() == "*":
        return None
    return tuple(name.strip() for name in text.split(",") if name.strip())


def name_problems(*, fields: Sequence[str], tags: Sequence[str]) -> list[str]:
    """Why these fields and tags cannot each become a column of their own name: a name the
    export's own columns take, a control character, or two names that only case tells apart
    (Athena, Trino, DuckDB and Hive read column names in any case). Quotes, spaces, dots and
    other characters are kept as they are: InfluxQL quotes them, Parquet and CSV hold them."""
    problems = []
    seen: dict[str, str] = {}
    for kind, names in (("field", fields), ("tag", tags)):
        for name in names:
            shown = name if len(name) <= 80 else name[:80] + "…"
            if name.lower() in RESERVED_NAMES:
                problems.append(
                    f"{kind} {shown!r} would be a column the export makes itself "
                    f"({', '.join(sorted(RESERVED_NAMES))}): leave it out of EXPORT_FIELDS and "
                    "EXPORT_TAGS"
                )
            elif any(ord(character) < 32 or character == "\x7f" for character in name):
                problems.append(f"{kind} {shown!r} has a control character")
            elif name.lower() in seen:
                problems.append(f"{kind} {shown!r} and {seen[name.lower()]} would be one column")
            seen.setdefault(name.lower(), f"{kind} {shown!r}")
    return problems


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
    # What is exported: comma-separated names, or `*` for every one InfluxDB lists; and the
    # fields read as another type than InfluxDB's (`name:float`), where shards disagree.
    fields: str = ",".join(SEED_FIELDS)
    tags: str = ",".join(SEED_TAGS)
    field_types: str = ""


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


ICEBERG_SCHEMES = ("postgresql", "postgresql+psycopg2", "sqlite", "http", "https")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


@dataclass(frozen=True)
class IcebergSettings:
    """The Iceberg table of closed days (`engine/table.py`)."""

    enabled: bool = True
    # A SQLAlchemy URL (SQL catalog) or an http(s) REST catalog; "": the SQL catalog in the
    # PostgreSQL database of CHECKPOINT_DB_*.
    catalog_uri: str = field(default="", repr=False)
    catalog_token: str = field(default="", repr=False)  # a REST catalog's bearer token
    warehouse: str = ""  # a REST catalog's warehouse
    # A REST catalog that takes requests signed with the S3 credentials (SigV4): its service
    # name (`s3tables` for S3 Tables and SeaweedFS, `glue` for Glue); "": a token or nothing.
    catalog_signing_name: str = ""
    namespace: str = "telemetry"
    table: str = "daily"
    snapshot_retention_days: int = 7
    maintenance_cron: str = "50 4 * * *"


# The closed days the sensor, the late-data sweep and the `reconciled` checks look back over, and
# slice retention considers a day for after it falls out of retention: a week.
WEEK_DAYS = 7
MIN_PARTITION_DAYS = WEEK_DAYS + 1  # the week and today


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
    # Discovery's bounds (DEVICE_IDS empty): every tag value anyone writes would be a partition.
    max_devices: int = 50_000
    new_devices_per_tick: int = 1_000
    device_id_pattern: str = ""  # a regular expression discovered ids must match; "": any

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
        retention = self.slice_retention_days + WEEK_DAYS + 1 if self.slice_retention_days else 0
        return max(self.partition_days, retention, self.lookback_hours // 24 + 9)


@dataclass(frozen=True)
class Settings:
    influx: InfluxSettings
    s3: S3Settings
    export: ExportSettings
    checkpoint: CheckpointSettings = CheckpointSettings()
    iceberg: IcebergSettings = IcebergSettings()
    port: int = 8080
    log_level: str = "INFO"
    ui_hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "[::1]")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Parse `env` (default: os.environ); raise SettingsError naming every culprit."""
        return _Parser(os.environ if env is None else env).settings()


def without_password(url: str) -> str:
    """A service URL as messages may show it: its password left out, the rest as it is (each
    of a broker's failover URLs, `a;b`)."""
    if ";" in url:
        return ";".join(without_password(part) for part in url.split(";"))
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    return f"{parts.scheme}://{user}{parts.netloc.rpartition('@')[2]}{parts.path}"


def load_env_file() -> None:
    """Read a `.env` in the working directory into the environment; variables already set win.

    Only the working directory's, as the Dagster CLI reads it (which lets it win): python-dotenv's
    default search walks up from the calling module's folder, and would find a checkout's `.env`
    wherever the process was started.
    """
    from dotenv import load_dotenv

    load_dotenv(Path.cwd() / ".env")


def parse_ui_hosts(env: Mapping[str, str]) -> tuple[str, ...]:
    """UI_ALLOWED_HOSTS alone, for the UI's process (`export_pipeline.ui`), which needs no other
    setting."""
    parser = _Parser(env)
    hosts = parser.ui_hosts()
    parser.finish()
    return hosts


def parse_influx(env: Mapping[str, str]) -> InfluxSettings:
    """The INFLUXDB_* settings alone, for tools that only talk to InfluxDB (the simulator)."""
    parser = _Parser(env)
    influx = parser.influx()
    parser.finish()
    return influx


@dataclass(frozen=True)
class Rule:
    """How the parser reads one variable, as docs/configuration.md shows it: its default (None:
    required) and what it accepts."""

    default: str | None
    accepts: str


def _shown(default: object) -> str | None:
    """A default as it would be written in the environment."""
    if default is None or isinstance(default, str):
        return default
    if isinstance(default, float):
        return f"{default:g}"
    if isinstance(default, date):
        return default.isoformat()
    return str(default)


class _Parser:
    """Collects every problem before raising, so one start-up shows all that is wrong.

    Each read also records its variable's rule in `rules` (the first, most specific, wins:
    `interval` reads through `integer`, which reads through `text`), so the reference
    documentation comes from the code that applies the rules."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []
        self.rules: dict[str, Rule] = {}

    def note(self, name: str, default: object, accepts: str) -> None:
        self.rules.setdefault(name, Rule(_shown(default), accepts))

    def text(self, name: str, default: str = "") -> str:
        self.note(name, default, "text")
        return self.env.get(name, "").strip() or default

    def secret(self, name: str) -> str:
        """A password, taken as given: not trimmed."""
        self.note(name, "", "text, taken as given (not trimmed)")
        return self.env.get(name, "")

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
        bounds = f"at least {minimum:,}" if maximum is None else f"{minimum:,} to {maximum:,}"
        self.note(name, default, f"a whole number, {bounds}")
        value = self.converted(name, int, "a whole number")
        if value is None:
            return default
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and at most {maximum}" if maximum is not None else ""
            self.problems.append(f"{name}={value} must be at least {minimum}{upper}")
        return value

    def number(self, name: str, default: float) -> float:
        self.note(name, default, "a positive number")
        value = self.converted(name, float, "a number")
        if value is None:
            return default
        if not value > 0:
            self.problems.append(f"{name}={self.text(name)} must be a positive number of seconds")
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        *others, last = (f"`{choice}`" for choice in choices)
        self.note(name, default, f"{', '.join(others)} or {last}" if others else last)
        value = self.text(name, default).lower()
        if value not in choices:
            self.problems.append(f"{name}={self.text(name)!r} is not one of {', '.join(choices)}")
            return default
        return value

    def url(self, name: str, default: str = "") -> str:
        self.note(name, default, "an http(s) URL")
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
        self.note(name, default, "a cron expression (five fields, UTC)")
        value = self.text(name, default)
        if not is_valid_cron(value):
            self.problems.append(
                f"{name}={value!r} is not a five-field cron expression such as '20 * * * *'"
            )
            return default
        return value

    def required(self, name: str, hint: str) -> str:
        self.note(name, None, "text")
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
            password=self.secret("INFLUXDB_PASSWORD"),
            timeout_seconds=self.number("INFLUXDB_TIMEOUT_SECONDS", InfluxSettings.timeout_seconds),
            **self.columns(),
        )

    def columns(self) -> dict[str, str]:
        """EXPORT_FIELDS, EXPORT_TAGS and EXPORT_FIELD_TYPES, each checked, as InfluxSettings
        holds them (names joined by commas, or `*`)."""
        self.note("EXPORT_FIELDS", InfluxSettings.fields, "field names separated by commas, or `*`")
        self.note("EXPORT_TAGS", InfluxSettings.tags, "tag names separated by commas, or `*`")
        self.note("EXPORT_FIELD_TYPES", "", "`name:type` pairs separated by commas")
        chosen = {}
        for name, default in (
            ("EXPORT_FIELDS", InfluxSettings.fields),
            ("EXPORT_TAGS", InfluxSettings.tags),
        ):
            raw = self.env.get(name, "").strip()
            names = listed(raw or default)
            if names == ():
                self.problems.append(f"{name}={raw!r} names nothing: list names, or `*`")
            chosen[name] = names
        fields, tags = chosen["EXPORT_FIELDS"], chosen["EXPORT_TAGS"]
        for problem in name_problems(fields=fields or (), tags=tags or ()):
            self.problems.append(f"EXPORT_FIELDS/EXPORT_TAGS: {problem}")
        types = {}
        for pair in listed(self.env.get("EXPORT_FIELD_TYPES", "")) or ():
            name, _, kind = pair.rpartition(":")
            name, kind = name.strip(), kind.strip().lower()
            if kind not in FIELD_TYPES:
                self.problems.append(
                    f"EXPORT_FIELD_TYPES: {pair!r} is not `field:type` with a type of "
                    f"{', '.join(FIELD_TYPES)}"
                )
            elif fields is not None and name not in fields:
                self.problems.append(f"EXPORT_FIELD_TYPES: {name!r} is not in EXPORT_FIELDS")
            else:
                types[name] = kind
        return {
            "fields": "*" if fields is None else ",".join(fields or ()),
            "tags": "*" if tags is None else ",".join(tags or ()),
            "field_types": ",".join(f"{name}:{kind}" for name, kind in sorted(types.items())),
        }

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
            max_devices=self.integer("EXPORT_MAX_DEVICES", ExportSettings.max_devices, 1),
            new_devices_per_tick=self.integer(
                "EXPORT_NEW_DEVICES_PER_TICK", ExportSettings.new_devices_per_tick, 1
            ),
            device_id_pattern=self.pattern("DEVICE_ID_PATTERN"),
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
            password=self.secret("CHECKPOINT_DB_PASSWORD"),
        )
        iceberg = self.iceberg()
        port = self.integer("PORT", 8080, 1, 65_535)
        log_level = self.choice("LOG_LEVEL", "info", tuple(x.lower() for x in LOG_LEVELS)).upper()
        ui_hosts = self.ui_hosts()
        self.finish()
        return Settings(
            influx=influx,
            s3=s3,
            export=export,
            checkpoint=checkpoint,
            iceberg=iceberg,
            port=port,
            log_level=log_level,
            ui_hosts=ui_hosts,
        )

    def boolean(self, name: str, default: bool) -> bool:
        self.note(name, "true" if default else "false", "`true` or `false`")
        raw = self.text(name).lower()
        if not raw:
            return default
        if raw not in ("true", "false"):
            self.problems.append(f"{name}={raw!r} is not true or false")
            return default
        return raw == "true"

    def identifier(self, name: str, default: str) -> str:
        self.note(name, default, "a name of letters, digits and `_`, not starting with a digit")
        value = self.text(name, default)
        if not _IDENTIFIER.fullmatch(value):
            self.problems.append(
                f"{name}={value!r} is not a name of letters, digits and _ (at most 63, not "
                "starting with a digit)"
            )
        return value

    def iceberg(self) -> IcebergSettings:
        enabled = self.boolean("ICEBERG_ENABLED", IcebergSettings.enabled)
        self.note("ICEBERG_CATALOG_URI", "", f"a URL: {', '.join(ICEBERG_SCHEMES)}")
        uri = self.secret("ICEBERG_CATALOG_URI").strip()
        scheme = urlsplit(uri).scheme
        if uri and (scheme not in ICEBERG_SCHEMES or "://" not in uri):
            # The URL may hold a password: only its scheme is named.
            self.problems.append(
                f"ICEBERG_CATALOG_URI (scheme {scheme or 'none'!r}) is not a SQLAlchemy URL "
                "of PostgreSQL or SQLite, nor an http(s) REST catalog"
            )
        return IcebergSettings(
            enabled=enabled,
            catalog_uri=uri,
            catalog_token=self.secret("ICEBERG_CATALOG_TOKEN"),
            warehouse=self.text("ICEBERG_WAREHOUSE"),
            catalog_signing_name=self.text("ICEBERG_CATALOG_SIGNING_NAME"),
            namespace=self.identifier("ICEBERG_NAMESPACE", IcebergSettings.namespace),
            table=self.identifier("ICEBERG_TABLE", IcebergSettings.table),
            snapshot_retention_days=self.integer(
                "ICEBERG_SNAPSHOT_RETENTION_DAYS", IcebergSettings.snapshot_retention_days, 1, 3_650
            ),
            maintenance_cron=self.cron(
                "ICEBERG_MAINTENANCE_CRON", IcebergSettings.maintenance_cron
            ),
        )

    def ui_hosts(self) -> tuple[str, ...]:
        default = ",".join(Settings.ui_hosts)
        self.note("UI_ALLOWED_HOSTS", default, "comma-separated host names or IP addresses")
        hosts = tuple(
            host.strip().lower() for host in self.text("UI_ALLOWED_HOSTS", default).split(",")
        )
        bad = [host for host in hosts if not _HOST.fullmatch(host)]
        if bad:
            self.problems.append(
                f"UI_ALLOWED_HOSTS has {', '.join(repr(host) for host in bad)}: each must be a "
                "host name or an IP address without a port, such as dagster.example.com"
            )
        return tuple(host for host in hosts if host not in bad)

    def interval(self) -> int:
        self.note(
            "EXPORT_INTERVAL_SECONDS",
            ExportSettings.interval_seconds,
            "a whole number of seconds that divides 86,400",
        )
        value = self.integer("EXPORT_INTERVAL_SECONDS", ExportSettings.interval_seconds, 1)
        if value >= 1 and SECONDS_PER_DAY % value:
            self.problems.append(
                f"EXPORT_INTERVAL_SECONDS={value} does not divide a day (86400 s) evenly; "
                "choose a divisor such as 60, 300, 900 or 3600"
            )
        return value

    def partition_days(self) -> int:
        self.note(
            "EXPORT_PARTITION_DAYS",
            ExportSettings.partition_days,
            f"`0`, or a whole number, {MIN_PARTITION_DAYS} to 36,500",
        )
        value = self.integer("EXPORT_PARTITION_DAYS", ExportSettings.partition_days, 0, 36_500)
        if 0 < value < MIN_PARTITION_DAYS:
            self.problems.append(
                f"EXPORT_PARTITION_DAYS={value} is shorter than the week the sensor and the "
                f"late-data sweep look back: use 0 (every day since EXPORT_START_DATE) or at "
                f"least {MIN_PARTITION_DAYS}"
            )
        return value

    def start_date(self) -> date:
        self.note("EXPORT_START_DATE", ExportSettings.start_date, "a date, YYYY-MM-DD")
        value = self.converted("EXPORT_START_DATE", date.fromisoformat, "a date like 2026-01-01")
        return value or ExportSettings.start_date

    def bucket(self) -> str:
        self.note("S3_BUCKET", None, "a bucket name: 3-63 lowercase letters, digits, `.` and `-`")
        value = self.required("S3_BUCKET", "name the bucket the exports are written to")
        # The S3 bucket naming rules, so a typo fails here rather than as an opaque S3 error.
        if value and not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", value):
            self.problems.append(
                f"S3_BUCKET={value!r} is not a valid bucket name "
                "(3-63 lowercase letters, digits, dots and hyphens)"
            )
        return value

    def prefix(self, name: str, default: str) -> str:
        self.note(name, default, "a key prefix: no empty, `.` or `..` segment, no `\\`")
        value = self.text(name, default).strip("/")
        if any(part in ("", ".", "..") for part in value.split("/")) and value:
            self.problems.append(f"{name}={value!r} has an empty, '.' or '..' path segment")
        if "\\" in value:
            self.problems.append(f"{name}={value!r} has a '\\', which some S3 servers read as '/'")
        return value

    def daily_prefix(self, slices: str) -> str:
        self.note(
            "S3_DAILY_PREFIX",
            S3Settings.daily_prefix,
            "a key prefix as S3_PREFIX's, whose keys cannot meet the slices'",
        )
        value = self.prefix("S3_DAILY_PREFIX", S3Settings.daily_prefix)
        ours, theirs = devices_root(value), devices_root(slices)
        if ours.startswith(theirs) or theirs.startswith(ours):
            self.problems.append(
                f"S3_DAILY_PREFIX={value!r} shares keys with S3_PREFIX={slices!r}: the daily "
                "files and the slices would overwrite each other; choose another prefix"
            )
        return value

    def pattern(self, name: str) -> str:
        self.note(name, "", "a regular expression (Python's `re`), matched against the whole id")
        value = self.text(name)
        try:
            re.compile(value)
        except re.error as error:
            self.problems.append(f"{name}={value!r} is not a regular expression: {error}")
            return ""
        return value

    def device_ids(self) -> tuple[str, ...]:
        self.note("DEVICE_IDS", "", "comma-separated device ids, or `*`")
        return device_ids_of(self.env.get("DEVICE_IDS", ""))


def device_ids_of(raw: str) -> tuple[str, ...]:
    """DEVICE_IDS as ids: comma-separated, trimmed, first occurrence kept; "*" or nothing means
    every device found. Ids are validated where they are registered, so one bad id is refused
    by name without stopping the code location from loading."""
    ids = [part.strip() for part in raw.split(",") if part.strip()]
    return () if ids == ["*"] else tuple(dict.fromkeys(ids))


# --- The configuration reference (docs/configuration.md) ----------------------------------------

# What each variable the parser reads is for, one line each, in the order the reference lists
# them. Defaults and rules are not repeated here: the parser records them as it reads
# (`variables_read`), and a test checks that this table names exactly the variables it reads.
DESCRIPTIONS: dict[str, str] = {
    "INFLUXDB_URL": "InfluxDB's base URL; with `https://` its certificate is verified",
    "INFLUXDB_BUCKET": "the database (1.x), or the bucket (2.x, through its DBRP mapping)",
    "INFLUXDB_MEASUREMENT": (
        "the measurement: tags `device_id`, `device_type`, `location`; fields `voltage`, "
        "`current`, `power`, `temperature`"
    ),
    "INFLUXDB_TOKEN": "sent as `Authorization: Token …` (2.x, 3.x); empty: no token",
    "INFLUXDB_USERNAME": "basic authentication (1.x, or a 2.x v1 authorization), used when "
    "there is no token",
    "INFLUXDB_PASSWORD": "the password of INFLUXDB_USERNAME",
    "INFLUXDB_ORG": "the 2.x organisation (informational: the v1 API does not use it)",
    "INFLUXDB_TIMEOUT_SECONDS": "the timeout of each request to InfluxDB",
    "EXPORT_FIELDS": "the fields exported, each a column typed as InfluxDB types it; `*`: every "
    "field of the measurement (docs/datasets.md#schema)",
    "EXPORT_TAGS": "the tags exported, each a string column; `*`: every tag but `device_id`",
    "EXPORT_FIELD_TYPES": "the type to read a field as where InfluxDB's shards disagree: "
    "`rpm:float` reads its integers and floats as floats",
    "S3_BUCKET": "the bucket both datasets are written to",
    "S3_PREFIX": "the key prefix of the slices (`telemetry_export`); `/`: the bucket's root",
    "S3_DAILY_PREFIX": "the key prefix of the day files (`telemetry_daily`)",
    "S3_REGION": "the bucket's region",
    "S3_ENDPOINT_URL": "an S3 endpoint other than AWS's (SeaweedFS, MinIO, …); empty: AWS",
    "EXPORT_INTERVAL_SECONDS": "the length of a slice: one file per device and interval",
    "EXPORT_FORMAT": "the slices' file format (day files are always Parquet)",
    "EXPORT_LAYOUT": "the slices' keys: `seed` (`date=YYYY/MM/DD`) or `hive` (`date=YYYY-MM-DD`)",
    "EXPORT_BATCH_SIZE": "rows read and encoded at a time: bounds a run's memory whatever the day",
    "EXPORT_START_DATE": "the first date of `telemetry_daily`, and of `telemetry_export` within "
    "its window",
    "EXPORT_PARTITION_DAYS": "`telemetry_export`'s dates are the last N days (lengthened past "
    "slice retention and the lookback); `0`: every day since EXPORT_START_DATE",
    "DEVICE_IDS": "the devices to export; empty or `*`: every `device_id` InfluxDB lists",
    "EXPORT_MAX_DEVICES": "with DEVICE_IDS empty, the most devices discovery registers: past it, "
    "new ids are not exported, and the sensor's log and `/ready` say so",
    "EXPORT_NEW_DEVICES_PER_TICK": "with DEVICE_IDS empty, the most new devices one tick "
    "registers; the others wait for the next ticks",
    "DEVICE_ID_PATTERN": "with DEVICE_IDS empty, discovered ids must match it whole (e.g. "
    "`dev-[0-9]{4}`); others are refused and logged once; empty: any safe id",
    "LOOKBACK_HOURS": "how far back continuous export starts for a device never exported",
    "EXPORT_LATENESS_SECONDS": "a slice is exported once it has been closed this long, so late "
    "points land in it",
    "EXPORT_DEVICES_PER_RUN": "devices per continuous run (more when a tick would otherwise "
    "need more runs than can run at once)",
    "EXPORT_CONCURRENCY": "devices exported at once within a run",
    "EXPORT_RETRIES": "retries of a transient InfluxDB or S3 failure, with backoff and jitter",
    "EXPORT_STALE_RUN_SECONDS": f"a run silent this long is presumed dead (four times as long "
    f"for a run of an asset); `0`: {STALE_RUN_SECONDS} s",
    "EXPORT_SWEEP_CRON": "when `late_data_sweep` looks for late data, abandoned uploads and "
    "slices past retention",
    "EXPORT_SLICE_RETENTION_DAYS": "delete a day's slices this many days after it, once its day "
    "file is written and reconciled; `0`: keep them",
    "EXPORT_LEDGER_RETENTION_DAYS": "how long Dagster's storage keeps superseded events and the "
    "logs of finished runs",
    "EXPORT_RETENTION_CRON": "when `ledger_retention` prunes Dagster's storage",
    "CHECKPOINT_DB_HOST": "PostgreSQL holding Dagster's storage, the export record (dagster.yaml "
    "reads the CHECKPOINT_DB_* variables too)",
    "CHECKPOINT_DB_PORT": "its port",
    "CHECKPOINT_DB_NAME": "its database",
    "CHECKPOINT_DB_USER": "its role (least privilege: docs/security.md)",
    "CHECKPOINT_DB_PASSWORD": "the role's password",
    "ICEBERG_ENABLED": "every day file is also in an Apache Iceberg table (docs/datasets.md)",
    "ICEBERG_CATALOG_URI": "the table's catalog: a SQLAlchemy URL (`postgresql+psycopg2://...`) "
    "or an `http(s)://` REST catalog (S3 Tables, Polaris, Glue); empty: a SQL catalog in the "
    "CHECKPOINT_DB_* database",
    "ICEBERG_CATALOG_TOKEN": "the bearer token of a REST catalog",
    "ICEBERG_WAREHOUSE": "the warehouse a REST catalog asks for (e.g. an S3 Tables bucket ARN)",
    "ICEBERG_CATALOG_SIGNING_NAME": "a REST catalog that takes requests signed with the S3 "
    "credentials (SigV4): its service name, `s3tables` (AWS S3 Tables, SeaweedFS) or `glue`",
    "ICEBERG_NAMESPACE": "the table's namespace",
    "ICEBERG_TABLE": "the table's name in it",
    "ICEBERG_SNAPSHOT_RETENTION_DAYS": "snapshots older than this are expired, and files no "
    "retained snapshot needs are deleted, by `iceberg_maintenance`",
    "ICEBERG_MAINTENANCE_CRON": "when `iceberg_maintenance` runs (UTC)",
    "PORT": "the port of the health service (`python -m export_pipeline.health`)",
    "LOG_LEVEL": "the level of the package's loggers, in its processes and in the run logs",
    "UI_ALLOWED_HOSTS": "the names the Dagster UI (`python -m export_pipeline.ui`) is reached "
    "by: a request for another Host is refused (DNS rebinding), and a change must come from a "
    "page of the same one (docs/security.md)",
}


class ReadElsewhere(NamedTuple):
    """A variable the deployment uses that the settings parser does not read."""

    reader: str
    default: str
    description: str


S3_CLIENTS = "obstore, boto3"
# The variables read by the libraries, Dagster, docker-compose and the scripts.
READ_ELSEWHERE: dict[str, ReadElsewhere] = {
    "AWS_ACCESS_KEY_ID": ReadElsewhere(
        S3_CLIENTS,
        "",
        "S3 credentials; unset: the rest of the default chain (web identity, ECS or EC2 "
        "instance credentials, AWS_PROFILE)",
    ),
    "AWS_SECRET_ACCESS_KEY": ReadElsewhere(S3_CLIENTS, "", "the secret of AWS_ACCESS_KEY_ID"),
    "AWS_SESSION_TOKEN": ReadElsewhere(
        S3_CLIENTS, "", "the session token of temporary credentials"
    ),
    "AWS_PROFILE": ReadElsewhere(
        "boto3", "", "a profile of `~/.aws`, used when AWS_ACCESS_KEY_ID is not set"
    ),
    "AWS_CA_BUNDLE": ReadElsewhere(
        S3_CLIENTS, "", "a PEM file of the private CA of an `https://` S3_ENDPOINT_URL"
    ),
    "REQUESTS_CA_BUNDLE": ReadElsewhere(
        "requests", "", "a PEM file of the private CA of an `https://` INFLUXDB_URL"
    ),
    "PGSSLMODE": ReadElsewhere("libpq", "", "`verify-full` verifies PostgreSQL's certificate"),
    "PGSSLROOTCERT": ReadElsewhere("libpq", "", "a PEM file of the CA of PostgreSQL's certificate"),
    "DAGSTER_HOME": ReadElsewhere("Dagster", "", "the folder holding `dagster.yaml`"),
    "DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS": ReadElsewhere(
        "Dagster",
        "`true` in the image and scripts/run",
        "one planned event per run rather than one per partition (docs/operations.md)",
    ),
    "INFLUXDB_ADMIN_USER": ReadElsewhere(
        "docker-compose.yml", "", "the InfluxDB 2.x server's administrator"
    ),
    "INFLUXDB_ADMIN_PASSWORD": ReadElsewhere(
        "docker-compose.yml", "generated", "that administrator's password"
    ),
    "INFLUXDB_ADMIN_TOKEN": ReadElsewhere(
        "docker-compose.yml",
        "generated",
        "that administrator's token: InfluxDB's init steps alone hold it",
    ),
    "SIMULATOR_INFLUXDB_PASSWORD": ReadElsewhere(
        "docker-compose.yml",
        "generated",
        "the password of the simulator's write-only authorization (`--profile demo`)",
    ),
    "POSTGRES_ADMIN_PASSWORD": ReadElsewhere(
        "docker-compose.yml",
        "generated",
        "PostgreSQL's administrator: its init step alone holds it",
    ),
    "PUBLISH_ADDRESS": ReadElsewhere(
        "docker-compose.yml",
        "`127.0.0.1`",
        "the host address the read-only UI and the health service are published on",
    ),
    "DAGSTER_WEBSERVER_PORT": ReadElsewhere("scripts/run", "`3000`", "the demo's Dagster UI"),
    "INFLUXDB_BIND_ADDRESS": ReadElsewhere(
        "scripts/services", "`127.0.0.1:8088`", "the demo influxd's backup service"
    ),
    "EXPORT_PIPELINE_VENV": ReadElsewhere(
        "scripts/install",
        "",
        "a virtual environment that has the project already: `.venv` links to it",
    ),
    "EXPORT_DAGSTER_HOME": ReadElsewhere(
        "docker-compose.yml",
        "`/opt/dagster/home`",
        "the instance every Dagster process of the stack reads: `/opt/dagster/workers` for "
        "runs on the workers of `--profile workers` (docs/workers.md)",
    ),
    "REDIS_PASSWORD": ReadElsewhere(
        "docker-compose.yml",
        "generated",
        "the password of the workers' Redis (`--profile workers`)",
    ),
    "CELERY_BROKER_URL": ReadElsewhere(
        "Celery, deploy/workers/dagster.yaml, the health service",
        "",
        "with worker hosts (docs/workers.md): the broker runs are published to, e.g. "
        "`redis://:password@redis:6379/0` or `pyamqp://user:password@rabbitmq//`, which "
        "`/ready` checks where DAGSTER_HOME holds the workers' instance",
    ),
    "CELERY_RESULT_BACKEND": ReadElsewhere(
        "Celery, deploy/workers/dagster.yaml",
        "",
        "with worker hosts: where each run's task state is kept (Redis, `redis://…/1`), which "
        "Dagster reads to see a run whose worker failed",
    ),
    "EXPORT_WORKER_SLOTS": ReadElsewhere(
        "deploy/workers/dagster.yaml",
        "required there",
        "with worker hosts: the runs the workers take at once, all hosts together (the "
        "hosts times EXPORT_WORKER_CONCURRENCY): the run queue's limit, and how many runs a "
        "tick is split into",
    ),
    "EXPORT_WORKER_CONCURRENCY": ReadElsewhere(
        "`python -m export_pipeline.workers`",
        "`2`",
        "the runs one worker host executes at once (1 to 64), each in a process of its own",
    ),
}

# Variables whose values are secrets: kept out of ConfigMaps, logs and the UI (docs/security.md).
SECRETS: frozenset[str] = frozenset(
    {
        "INFLUXDB_TOKEN",
        "INFLUXDB_PASSWORD",
        "CHECKPOINT_DB_PASSWORD",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "INFLUXDB_ADMIN_PASSWORD",
        "INFLUXDB_ADMIN_TOKEN",
        "SIMULATOR_INFLUXDB_PASSWORD",
        "POSTGRES_ADMIN_PASSWORD",
        "ICEBERG_CATALOG_URI",
        "ICEBERG_CATALOG_TOKEN",
        "CELERY_BROKER_URL",
        "CELERY_RESULT_BACKEND",
        "REDIS_PASSWORD",
    }
)

REFERENCE_INTRO = """\
# Configuration

<!-- Generated from export_pipeline/settings.py, which holds each variable's rule and
description: `python -m export_pipeline.settings > docs/configuration.md` writes this file, and a
test fails when the two differ. -->

The pipeline reads the environment, or a `.env` file in the working directory: the Dagster CLI
reads it and lets the file win over the environment; the health service and the simulator let the
environment win. `.env.example` lists the variables with the demo's values and no secret:
`scripts/env` writes `.env` from it, generating each secret marked *generated*.

Every setting is validated when the code location loads: a bad value stops it with a message that
names the variable, e.g. `EXPORT_FORMAT='xml' is not one of parquet, csv`, listing every problem at
once. Values are trimmed, an empty value means the default, and choices are read in any case.
Variables marked *secret* belong in a Secret, never a ConfigMap (docs/security.md); Dagster's UI
and run config only ever show their names.
"""


def variables_read(env: Mapping[str, str] | None = None) -> dict[str, Rule]:
    """Every variable the settings parser reads, with its default and what it accepts, as the
    parser records them while parsing `env` (default: an empty environment, which lacks the one
    required variable, S3_BUCKET: the problems found are not this function's business)."""
    parser = _Parser(env or {})
    with contextlib.suppress(SettingsError):
        parser.settings()
    return parser.rules


def _name(variable: str) -> str:
    return f"`{variable}`" + (" *secret*" if variable in SECRETS else "")


def configuration_reference() -> str:
    """docs/configuration.md: every variable, its default, what it accepts and what it is for.
    Made from the code and the declarations above only, never from the environment, so no value
    (a secret's least of all) can reach it."""
    rules = variables_read()

    def default(rule: Rule) -> str:
        if rule.default is None:
            return "required"
        return f"`{rule.default}`" if rule.default else "empty"

    lines = [
        REFERENCE_INTRO,
        "## Read by the pipeline (`export_pipeline/settings.py`)",
        "",
        "| variable | default | accepts | what it is for |",
        "|---|---|---|---|",
    ]
    for variable, description in DESCRIPTIONS.items():
        rule = rules[variable]
        lines.append(f"| {_name(variable)} | {default(rule)} | {rule.accepts} | {description} |")
    lines += [
        "",
        "## Read by the libraries, Dagster and the scripts",
        "",
        "| variable | read by | default | what it is for |",
        "|---|---|---|---|",
    ]
    for variable, other in READ_ELSEWHERE.items():
        lines.append(
            f"| {_name(variable)} | {other.reader} | {other.default or 'empty'} | "
            f"{other.description} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(configuration_reference())
