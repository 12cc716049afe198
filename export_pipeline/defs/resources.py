"""Dagster resources: typed handles on InfluxDB, the S3 bucket and the export settings.

Each resource is made from its part of `Settings` (`from_settings`) and gives it back
(`settings()`), field for field: the settings dataclasses hold every default and every rule, the
resources none, so a value set in the environment always reaches the code that uses it (a test
round-trips every field). Secrets go in as `EnvVar`s, so the UI and run config show the
variable's name, never its value.

The InfluxDB, S3 and export resources take their values from the code location's environment
only: a run whose config sets one of their fields is refused before it connects anywhere
(`refuse_launch_config`). Whoever can launch a run could otherwise point the InfluxDB URL or the
S3 endpoint at a host of theirs with `token: {env: INFLUXDB_TOKEN}` and receive the secret, or
change the interval or layout under exports already made.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, fields
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import boto3
import pyarrow.fs as pafs
from botocore import UNSIGNED
from botocore.config import Config
from dagster import (
    ConfigurableResource,
    DagsterInvariantViolationError,
    EnvVar,
    InitResourceContext,
)
from dagster_aws.s3 import S3Resource

from export_pipeline.engine.day_files import DayFiles
from export_pipeline.engine.influx import InfluxSource, SharedReads
from export_pipeline.engine.retries import with_retries
from export_pipeline.engine.slice_files import UPLOAD_THREADS, Slices
from export_pipeline.engine.store import MultipartUploads, ObjectStore
from export_pipeline.engine.table import DailyTable, is_rest, open_catalog, sql_catalog_uri
from export_pipeline.settings import (
    CheckpointSettings,
    ExportFormat,
    ExportSettings,
    IcebergSettings,
    InfluxSettings,
    Layout,
    S3Settings,
    Settings,
    device_ids_of,
    without_password,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

T = TypeVar("T")
DayFilesT = TypeVar("DayFilesT", bound=DayFiles)

# Connect and request timeout of S3 calls: a PUT of an 8 MiB part has a minute.
S3_TIMEOUT_SECONDS = 60.0
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


class LaunchConfigRefused(ValueError):
    """A run's config set a resource field that only the code location's environment sets."""


def launch_overrides(
    resource: ConfigurableResource, bound: Mapping[str, Any], environ: Mapping[str, str]
) -> list[str]:
    """The fields of `resource` (as a run built it) that differ from `bound`, the values the
    code location gave it (Dagster's default config of the resource: `{"env": NAME}` for an
    `EnvVar`, absent for a field left at its default). A resource nested in another one is
    initialised with a default config of no values (None for its required fields): nothing to
    compare, and no run config reaches it but through the top-level resource, checked there."""
    declared = type(resource).model_fields
    if any(field.is_required() and bound.get(name) is None for name, field in declared.items()):
        return []
    changed = []
    for name, field in declared.items():
        value = bound.get(name, field.default)
        expected = environ.get(value["env"], "") if isinstance(value, Mapping) else value
        if getattr(resource, name) != expected:
            changed.append(name)
    return changed


def refuse_launch_config(
    resource: ConfigurableResource, key: str, context: InitResourceContext
) -> None:
    """Refuse a run whose config changed any field of the resource bound under `key`."""
    try:
        definition = context.resource_def
    except DagsterInvariantViolationError:  # built by hand (`build_init_resource_context`)
        return
    if definition is None or definition.config_schema is None:
        return
    field = definition.config_schema.as_field()
    if not field.default_provided:
        return
    changed = launch_overrides(resource, field.default_value, os.environ)
    if changed:
        names = ", ".join(f"resources.{key}.config.{name}" for name in changed)
        raise LaunchConfigRefused(
            f"run config may not set {names}: the {key} resource takes its values from the "
            "code location's environment only (see docs/configuration.md); launch without "
            "resource config, or change the setting where the code location runs"
        )


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
    fields: str
    tags: str
    field_types: str

    @classmethod
    def from_settings(cls, influx: InfluxSettings) -> InfluxDBResource:
        return cls(
            **_fields_of(
                influx,
                token=EnvVar("INFLUXDB_TOKEN") if influx.token else "",
                password=EnvVar("INFLUXDB_PASSWORD") if influx.password else "",
            )
        )

    def setup_for_execution(self, context: InitResourceContext) -> None:
        refuse_launch_config(self, "influxdb", context)

    def settings(self) -> InfluxSettings:
        return _settings_of(self, InfluxSettings)

    def source(self, connections: int = 10) -> InfluxSource:
        return InfluxSource(self.settings(), connections)


class ExportBucketResource(S3Resource):
    """The bucket and prefix exports are written under, on AWS S3, SeaweedFS or any S3 endpoint.

    dagster-aws's `S3Resource` fields say how to reach it (explicit keys, a profile, TLS
    verification, unsigned requests); left unset, the default credential chain applies. Data
    goes through obstore (`store()`); boto3 serves only the sweep's multipart listing.
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

    def setup_for_execution(self, context: InitResourceContext) -> None:
        refuse_launch_config(self, "s3", context)

    def settings(self) -> S3Settings:
        return _settings_of(self, S3Settings, region=self.region_name)

    def client(self, *, connections: int = 10, timeout_seconds: float | None = None) -> S3Client:
        """A boto3 client, for what obstore has no call for (listing open multipart uploads).
        No retries of its own: callers retry with `retries.with_retries`, as for obstore."""
        config = Config(
            max_pool_connections=connections,
            retries={"max_attempts": 1, "mode": "standard"},
            connect_timeout=timeout_seconds or S3_TIMEOUT_SECONDS,
            read_timeout=timeout_seconds or S3_TIMEOUT_SECONDS,
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
        run and sensor tick (~0.3 s of loading models) and nothing here uses: `store()` makes
        what an export needs."""
        return self

    def key_id(self) -> str | None:
        """The access key id requests are signed with, where one is set (for error messages;
        the secret is never shown)."""
        if self.use_unsigned_session:
            return "none: unsigned requests"
        return self.aws_access_key_id or os.environ.get("AWS_ACCESS_KEY_ID") or None

    def store(self, connections: int = 10, *, timeout_seconds: float | None = None) -> ObjectStore:
        """The bucket through obstore, with the credentials these fields name: explicit keys,
        a profile (resolved by boto3), or else obstore's default chain (AWS_* variables, web
        identity, ECS and EC2 instance credentials). obstore retries nothing itself: one retry
        policy, `retries.with_retries`, around whole exports."""
        from obstore.store import S3Store

        timeout = timedelta(seconds=timeout_seconds or S3_TIMEOUT_SECONDS)
        client_options: dict[str, Any] = {
            "connect_timeout": timeout,
            "timeout": timeout,
            "pool_max_idle_per_host": str(connections),
            "allow_http": True,
        }
        if self.verify is False:
            client_options["allow_invalid_certificates"] = True
        if ca_bundle := os.environ.get("AWS_CA_BUNDLE"):  # a private CA, as boto3 reads it
            client_options["root_certificate"] = Path(ca_bundle).read_text()
        config: dict[str, Any] = {
            "region": self.region_name or "us-east-1",
            "skip_signature": self.use_unsigned_session,
        }
        if self.endpoint_url:
            config |= {"endpoint": self.endpoint_url, "virtual_hosted_style_request": False}
        provider = None
        if self.aws_access_key_id:
            config |= {
                "access_key_id": self.aws_access_key_id,
                "secret_access_key": self.aws_secret_access_key or "",
            }
            if self.aws_session_token:
                config["session_token"] = self.aws_session_token
        elif profile := self.profile_name or (
            None if os.environ.get("AWS_ACCESS_KEY_ID") else os.environ.get("AWS_PROFILE")
        ):  # obstore reads no profile files: boto3 resolves (and refreshes) the profile
            from obstore.auth.boto3 import Boto3CredentialProvider

            with _SESSIONS_LOCK:
                provider = Boto3CredentialProvider(_session(profile))
        store = S3Store(
            self.bucket,
            config=config,  # type: ignore[arg-type]
            client_options=client_options,  # type: ignore[arg-type]
            retry_config={"max_retries": 0},
            credential_provider=provider,
        )
        return ObjectStore(store, self.bucket, endpoint=self.endpoint_url, key_id=self.key_id())

    def multipart_uploads(self) -> MultipartUploads:
        return MultipartUploads(self.client(), self.bucket)

    def _frozen_credentials(self) -> Any:
        """The credentials boto3 resolves from these fields (profile, keys, or the default
        chain), frozen; None for an unsigned session or none found."""
        session = boto3.session.Session(
            profile_name=self.profile_name,
            aws_access_key_id=self.aws_access_key_id,
            aws_secret_access_key=self.aws_secret_access_key,
            aws_session_token=self.aws_session_token,
        )
        credentials = None if self.use_unsigned_session else session.get_credentials()
        region = self.region_name or session.region_name or "us-east-1"
        return (credentials.get_frozen_credentials() if credentials else None), region

    def filesystem(self) -> pafs.S3FileSystem:
        """The bucket for pyarrow's own S3 reader, with the credentials boto3 resolves from
        these fields (profile, keys, or the default chain)."""
        endpoint = urlsplit(self.endpoint_url or "")
        frozen, region = self._frozen_credentials()
        return pafs.S3FileSystem(
            region=region,
            endpoint_override=endpoint.netloc or None,
            scheme=endpoint.scheme or ("https" if self.use_ssl else "http"),
            access_key=frozen.access_key if frozen else None,
            secret_key=frozen.secret_key if frozen else None,
            session_token=frozen.token if frozen else None,
            anonymous=frozen is None,
        )

    def iceberg_io(self) -> dict[str, str]:
        """pyiceberg's FileIO properties for this bucket: where the table's metadata is written
        and read. Keys set on the resource (or a profile) are passed on; otherwise none are, and
        Arrow's own AWS client takes the default chain (AWS_* variables, web identity, instance
        credentials), refreshing temporary credentials through a long run."""
        properties = {"s3.region": self.region_name or "us-east-1"}
        if self.endpoint_url:
            properties |= {"s3.endpoint": self.endpoint_url, "s3.force-virtual-addressing": "false"}
        if self.use_unsigned_session:
            return properties | {"s3.anonymous": "true"}
        if self.aws_access_key_id or self.profile_name:
            frozen, region = self._frozen_credentials()
            properties["s3.region"] = region
            if frozen:
                properties |= {
                    "s3.access-key-id": frozen.access_key,
                    "s3.secret-access-key": frozen.secret_key,
                }
                if frozen.token:
                    properties["s3.session-token"] = frozen.token
        return properties


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
    max_devices: int
    new_devices_per_tick: int
    device_id_pattern: str

    def setup_for_execution(self, context: InitResourceContext) -> None:
        refuse_launch_config(self, "export", context)

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


class IcebergResource(ConfigurableResource):
    """The Iceberg table of closed days (ICEBERG_*) and its catalog: by default a SQL catalog
    in the PostgreSQL database of CHECKPOINT_DB_* (the `db_*` fields)."""

    enabled: bool
    catalog_uri: str
    catalog_token: str
    warehouse: str
    catalog_signing_name: str
    namespace: str
    table: str
    snapshot_retention_days: int
    maintenance_cron: str
    db_host: str
    db_port: int
    db_name: str
    db_user: str
    db_password: str

    @classmethod
    def from_settings(
        cls, iceberg: IcebergSettings, checkpoint: CheckpointSettings
    ) -> IcebergResource:
        return cls(
            **_fields_of(
                iceberg,
                catalog_uri=EnvVar("ICEBERG_CATALOG_URI") if iceberg.catalog_uri else "",
                catalog_token=EnvVar("ICEBERG_CATALOG_TOKEN") if iceberg.catalog_token else "",
            ),
            db_host=checkpoint.host,
            db_port=checkpoint.port,
            db_name=checkpoint.name,
            db_user=checkpoint.user,
            db_password=EnvVar("CHECKPOINT_DB_PASSWORD") if checkpoint.password else "",
        )

    def setup_for_execution(self, context: InitResourceContext) -> None:
        refuse_launch_config(self, "iceberg", context)

    def settings(self) -> IcebergSettings:
        return _settings_of(self, IcebergSettings, catalog_uri=self.catalog_uri.strip())

    def catalog_url(self) -> str:
        return self.catalog_uri.strip() or sql_catalog_uri(
            host=self.db_host,
            port=self.db_port,
            name=self.db_name,
            user=self.db_user,
            password=self.db_password,
        )

    def shown_catalog(self) -> str:
        """The catalog's URL without its password, for messages."""
        return without_password(self.catalog_url())

    def daily_table(self, s3: ExportBucketResource, *, connections: int = 10) -> DailyTable | None:
        """The table on this bucket, or None when ICEBERG_ENABLED is false."""
        if not self.enabled:
            return None
        url = self.catalog_url()
        catalog = open_catalog(
            url,
            io=s3.iceberg_io(),
            token=self.catalog_token,
            warehouse=self.warehouse,
            signing_name=self.catalog_signing_name,
        )
        return DailyTable(
            catalog,
            (self.namespace, self.table),
            s3.store(connections=connections),
            s3.daily_prefix,
            placed=not is_rest(url),
        )


class ClockResource(ConfigurableResource):
    """Now, in UTC; `frozen_at` (ISO-8601) pins it, so tests drive ticks without sleeping.

    A run's config may set it (the tests' runs do), but never to a time still to come: a run
    whose clock is ahead would export slices that have not closed, and record the device as
    exported through them, so points written since would wait for the day's reconciliation."""

    frozen_at: str = ""

    def now(self) -> datetime:
        if not self.frozen_at:
            return datetime.now(UTC)
        frozen = datetime.fromisoformat(self.frozen_at).astimezone(UTC)
        if frozen > datetime.now(UTC) + CLOCK_SLACK:
            raise LaunchConfigRefused(
                f"resources.clock.config.frozen_at={self.frozen_at!r} is in the future: a run "
                "may pin its clock to a past moment only"
            )
        return frozen


# How far a pinned clock may run ahead of this host's (clocks of two hosts differ a little).
CLOCK_SLACK = timedelta(minutes=1)


def build_resources(settings: Settings) -> dict[str, ConfigurableResource]:
    return {
        "influxdb": InfluxDBResource.from_settings(settings.influx),
        "s3": ExportBucketResource.from_settings(settings.s3),
        "export": ExportResource.from_settings(settings.export),
        "iceberg": IcebergResource.from_settings(settings.iceberg, settings.checkpoint),
        "clock": ClockResource(),
    }


def answered(check: Callable[[], None], settings: ExportSettings) -> None:
    """A service's check, with retries; a failure names this host too: where runs execute on
    worker hosts, which host could not reach the service is half the answer."""
    try:
        with_retries(check, settings.retries)
    except Exception as error:
        error.add_note(f"(seen from host {socket.gethostname()})")
        raise


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
        answered(source.check, settings)
        answered(store.check, settings)
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
        answered(source.check, settings)
        answered(store.check, settings)
        shared = SharedReads(source, counts=shared_counts)
        yield kind(shared, store, s3.daily_prefix, settings.batch_size, staging)
