"""Dagster resources: typed handles on InfluxDB, the S3 bucket and the export settings.

Each resource is made from its part of `Settings` (`from_settings`) and gives it back
(`settings()`), field for field: the settings dataclasses hold every default and every rule, the
resources none, so a value set in the environment always reaches the code that uses it (a test
round-trips every field). Secrets go in as `EnvVar`s, so the UI and run config show the
variable's name, never its value.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, fields
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import boto3
import pyarrow.fs as pafs
from botocore import UNSIGNED
from botocore.config import Config
from dagster import ConfigurableResource, EnvVar
from dagster_aws.s3 import S3Resource

from export_pipeline.daily import DayFiles
from export_pipeline.influx import InfluxSource, SharedReads
from export_pipeline.retries import with_retries
from export_pipeline.settings import (
    ExportFormat,
    ExportSettings,
    InfluxSettings,
    Layout,
    S3Settings,
    Settings,
    device_ids_of,
)
from export_pipeline.slices import UPLOAD_THREADS, Slices
from export_pipeline.writers import ObjectStore

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

T = TypeVar("T")
DayFilesT = TypeVar("DayFilesT", bound=DayFiles)

_SESSIONS: dict[str | None, boto3.session.Session] = {}
_SESSIONS_LOCK = threading.Lock()


def _session(profile_name: str | None) -> boto3.session.Session:
    """The process's boto3 session of a profile: a session loads S3's service model once for
    all the clients it makes (~0.1 s each otherwise, several a run), and resolves and refreshes
    credentials once. Callers hold `_SESSIONS_LOCK`: a session is not safe to share between
    threads while it makes clients (its clients are)."""
    session = _SESSIONS.get(profile_name)
    if session is None:
        session = _SESSIONS[profile_name] = boto3.session.Session(profile_name=profile_name)
    return session


def _fields_of(settings: Any, **converted: Any) -> dict[str, Any]:
    """A resource's fields from a settings dataclass of the same names."""
    return {**asdict(settings), **converted}


def _settings_of(resource: ConfigurableResource, kind: type[T], **converted: Any) -> T:
    """The settings dataclass `kind` from the resource's fields of the same names."""
    names = [field.name for field in fields(kind)]  # type: ignore[arg-type]
    values = {
        name: converted[name] if name in converted else getattr(resource, name) for name in names
    }
    return kind(**values)


class InfluxDBResource(ConfigurableResource):
    """InfluxDB's v1 `/query` endpoint (1.x, 2.x compatibility API, 3.x)."""

    url: str
    bucket: str
    measurement: str
    org: str
    username: str
    token: str
    password: str
    timeout_seconds: float

    @classmethod
    def from_settings(cls, influx: InfluxSettings) -> InfluxDBResource:
        return cls(
            **_fields_of(
                influx,
                token=EnvVar("INFLUXDB_TOKEN") if influx.token else "",
                password=EnvVar("INFLUXDB_PASSWORD") if influx.password else "",
            )
        )

    def settings(self) -> InfluxSettings:
        return _settings_of(self, InfluxSettings)

    def source(self, connections: int = 10) -> InfluxSource:
        return InfluxSource(self.settings(), connections)


class ExportBucketResource(S3Resource):
    """The bucket and prefix exports are written under, on AWS S3, MinIO or any S3 endpoint.

    Every field of dagster-aws's `S3Resource` is honoured (profile, explicit keys, TLS
    verification, unsigned requests); left unset, boto3's default credential chain applies.
    """

    bucket: str
    prefix: str
    daily_prefix: str

    @classmethod
    def from_settings(cls, s3: S3Settings) -> ExportBucketResource:
        return cls(
            bucket=s3.bucket,
            prefix=s3.prefix,
            daily_prefix=s3.daily_prefix,
            region_name=s3.region,
            endpoint_url=s3.endpoint_url,
        )

    def settings(self) -> S3Settings:
        return _settings_of(self, S3Settings, region=self.region_name)

    def client(
        self, *, connections: int = 10, timeout_seconds: float | None = None, attempts: int = 0
    ) -> S3Client:
        """A client with a connection pool as large as the uploads that share it."""
        config = Config(
            max_pool_connections=connections,
            retries={"max_attempts": attempts or self.max_attempts, "mode": "standard"},
            connect_timeout=timeout_seconds or 60,
            read_timeout=timeout_seconds or 60,
        )
        if self.use_unsigned_session:
            config = config.merge(Config(signature_version=UNSIGNED))
        with _SESSIONS_LOCK:
            return _session(self.profile_name).client(
                "s3",
                region_name=self.region_name,
                endpoint_url=self.endpoint_url,
                use_ssl=self.use_ssl,
                verify=self.verify,
                aws_access_key_id=self.aws_access_key_id,
                aws_secret_access_key=self.aws_secret_access_key,
                aws_session_token=self.aws_session_token,
                config=config,
            )

    def get_object_to_set_on_execution_context(self) -> Any:
        """The resource itself, not S3Resource's boto3 resource, which it would build for every
        run and sensor tick (~0.3 s of loading models) and nothing here uses: `client()` and
        `store()` make what an export needs."""
        return self

    def store(self, connections: int = 10) -> ObjectStore:
        return ObjectStore(self.client(connections=connections), self.bucket)

    def filesystem(self) -> pafs.S3FileSystem:
        """The bucket for pyarrow's own S3 reader, with the credentials boto3 resolves from
        these fields (profile, keys, or the default chain)."""
        endpoint = urlsplit(self.endpoint_url or "")
        session = boto3.session.Session(
            profile_name=self.profile_name,
            aws_access_key_id=self.aws_access_key_id,
            aws_secret_access_key=self.aws_secret_access_key,
            aws_session_token=self.aws_session_token,
        )
        credentials = None if self.use_unsigned_session else session.get_credentials()
        frozen = credentials.get_frozen_credentials() if credentials else None
        return pafs.S3FileSystem(
            region=self.region_name or session.region_name or "us-east-1",
            endpoint_override=endpoint.netloc or None,
            scheme=endpoint.scheme or ("https" if self.use_ssl else "http"),
            access_key=frozen.access_key if frozen else None,
            secret_key=frozen.secret_key if frozen else None,
            session_token=frozen.token if frozen else None,
            anonymous=frozen is None,
        )


class ExportResource(ConfigurableResource):
    """How device-days are cut, encoded and scheduled (EXPORT_*, DEVICE_IDS, LOOKBACK_HOURS)."""

    interval_seconds: int
    batch_size: int
    format: ExportFormat
    layout: Layout
    start_date: str
    # Comma-separated, as DEVICE_IDS: Dagster validates a list field element by element every
    # time the resource is built (each sensor tick), ~0.2 ms an id (1 s at 5,000 devices).
    device_ids: str
    lookback_hours: int
    lateness_seconds: int
    devices_per_run: int
    concurrency: int
    retries: int
    stale_run_seconds: int
    sweep_cron: str
    slice_retention_days: int
    partition_days: int
    ledger_retention_days: int
    retention_cron: str

    def settings(self) -> ExportSettings:
        return _settings_of(
            self,
            ExportSettings,
            device_ids=device_ids_of(self.device_ids),
            start_date=date.fromisoformat(self.start_date),
        )

    @classmethod
    def from_settings(cls, export: ExportSettings) -> ExportResource:
        dates_and_lists = {
            "device_ids": ",".join(export.device_ids),
            "start_date": export.start_date.isoformat(),
        }
        return cls(**_fields_of(export, **dates_and_lists))


class ClockResource(ConfigurableResource):
    """Now, in UTC; `frozen_at` (ISO-8601) pins it, so tests drive ticks without sleeping."""

    frozen_at: str = ""

    def now(self) -> datetime:
        if self.frozen_at:
            return datetime.fromisoformat(self.frozen_at).astimezone(UTC)
        return datetime.now(UTC)


def build_resources(settings: Settings) -> dict[str, ConfigurableResource]:
    return {
        "influxdb": InfluxDBResource.from_settings(settings.influx),
        "s3": ExportBucketResource.from_settings(settings.s3),
        "export": ExportResource.from_settings(settings.export),
        "clock": ClockResource(),
    }


@contextmanager
def slices_of(
    influxdb: InfluxDBResource,
    s3: ExportBucketResource,
    settings: ExportSettings,
    devices_at_once: int = 1,
    *,
    shared_reads: Iterable[tuple[list[str], int, int]] = (),
    shared_counts: Iterable[tuple[list[str], int, int]] = (),
) -> Iterator[Slices]:
    """The slice dataset on these resources, once InfluxDB and the bucket have answered (with
    retries): a wrong INFLUXDB_BUCKET or S3_BUCKET fails here, by name, before any export.
    `shared_reads`, `shared_counts`: groups of devices whose one range is read, or counted,
    with one query (`SharedReads`)."""
    store = s3.store(connections=devices_at_once * UPLOAD_THREADS)
    with influxdb.source(connections=devices_at_once) as source:
        with_retries(source.check, settings.retries)
        with_retries(store.check, settings.retries)
        shared = SharedReads(source, shared_reads, counts=shared_counts)
        yield Slices(shared, store, s3.prefix, settings)


@contextmanager
def day_files_of(
    influxdb: InfluxDBResource,
    s3: ExportBucketResource,
    settings: ExportSettings,
    staging: Path,
    kind: type[DayFilesT],
    *,
    shared_counts: Iterable[tuple[list[str], int, int]] = (),
) -> Iterator[DayFilesT]:
    """The daily dataset on these resources, once InfluxDB and the bucket have answered;
    `shared_counts` as for `slices_of`."""
    store = s3.store(connections=settings.concurrency * UPLOAD_THREADS)
    with influxdb.source(connections=settings.concurrency) as source:
        with_retries(source.check, settings.retries)
        with_retries(store.check, settings.retries)
        shared = SharedReads(source, counts=shared_counts)
        yield kind(shared, store, s3.daily_prefix, settings.batch_size, staging)
