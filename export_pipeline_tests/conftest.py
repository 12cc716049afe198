"""Fixtures: the real InfluxDB, S3 and PostgreSQL servers, and a fresh stack for each test."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen
from typing import Any

import boto3
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance

from export_pipeline.defs.assets import build_telemetry_daily, build_telemetry_export
from export_pipeline.defs.partitions import closed_dates
from export_pipeline.defs.partitions import device_days as device_days_of
from export_pipeline.defs.resources import ExportBucketResource
from export_pipeline.engine.store import ObjectStore
from export_pipeline.engine.table import TABLE_FOLDER
from export_pipeline.settings import ExportSettings, Settings
from export_pipeline_tests.services import (
    POSTGRES,
    InfluxServer,
    S3Identity,
    SeaweedServer,
    dagster_command,
    drop_database,
    ensure_postgres,
    fresh_database,
)

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
# Where the tests start Dagster's CLI, daemons and the health service: an empty folder. The Dagster
# CLI loads a `.env` from its working directory over the environment it is given, so started in
# the checkout it would export with the demo's settings (scripts/run writes .env there).
CLI_CWD = Path(tempfile.mkdtemp(prefix="export-pipeline-cli-"))
# One database per test session, so concurrent sessions on one machine never share storage.
TEST_DATABASE = f"export_pipeline_test_{os.getpid()}"
# The assets as the code location builds them with EXPORT_PARTITION_DAYS=0 (every day from the
# default EXPORT_START_DATE, 2026-01-01).
device_days = device_days_of(ExportSettings())
telemetry_export = build_telemetry_export(device_days, ExportSettings())
telemetry_daily = build_telemetry_daily(closed_dates(ExportSettings()), ExportSettings())
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# The tests' S3 identity: the pipeline's keys, allowed everything (each test creates a bucket).
TEST_IDENTITY = S3Identity(
    "pipeline", AWS_ENV["AWS_ACCESS_KEY_ID"], AWS_ENV["AWS_SECRET_ACCESS_KEY"], ("Admin",)
)


def docs_example(name: str, language: str = "python") -> str:
    """The ```language block right after `<!-- example: {name} -->`, in whichever page of docs/
    (or the README) holds that marker (exactly one does, once)."""
    marker = f"<!-- example: {name} -->\n"
    pages = [path.read_text() for path in [REPO / "README.md", *sorted(DOCS.glob("*.md"))]]
    found = [page for page in pages if marker in page]
    assert len(found) == 1 and found[0].count(marker) == 1, f"{marker.strip()} is not once in docs/"
    after = found[0].split(marker, 1)[1]
    assert after.startswith(f"```{language}\n"), f"{marker.strip()}: no {language} block after it"
    return after.removeprefix(f"```{language}\n").split("\n```", 1)[0]


@pytest.fixture(scope="session")
def influx_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxServer]:
    server = InfluxServer(tmp_path_factory.mktemp("influxdb"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    os.environ.update(AWS_ENV)
    server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs"), [TEST_IDENTITY], many_buckets=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def checkpoint_env() -> Iterator[dict[str, str]]:
    ensure_postgres()
    fresh_database(TEST_DATABASE)
    yield {
        "CHECKPOINT_DB_HOST": str(POSTGRES["host"]),
        "CHECKPOINT_DB_PORT": str(POSTGRES["port"]),
        "CHECKPOINT_DB_NAME": TEST_DATABASE,
        "CHECKPOINT_DB_USER": str(POSTGRES["user"]),
        "CHECKPOINT_DB_PASSWORD": "",
    }
    drop_database(TEST_DATABASE)


@pytest.fixture(scope="session")
def dagster_home(tmp_path_factory: pytest.TempPathFactory, checkpoint_env: dict[str, str]) -> Path:
    """A DAGSTER_HOME holding the repo's own dagster.yaml, so tests use the shipped storage."""
    home = tmp_path_factory.mktemp("dagster_home")
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    os.environ.update(checkpoint_env)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def instance(dagster_home: Path) -> Iterator[DagsterInstance]:
    with DagsterInstance.from_config(str(dagster_home)) as dagster_instance:
        yield dagster_instance


@dataclass
class Stack:
    """One test's slice of the real services: its own InfluxDB database and S3 bucket."""

    influx: InfluxServer
    s3_url: str
    database: str
    bucket: str
    prefix: str = "telemetry"
    iceberg: bool = False

    def env(self, **overrides: str) -> dict[str, str]:
        """The environment a user would set to export from this stack."""
        values = {
            "INFLUXDB_URL": self.influx.url,
            "INFLUXDB_BUCKET": self.database,
            "S3_BUCKET": self.bucket,
            "S3_PREFIX": self.prefix,
            "S3_ENDPOINT_URL": self.s3_url,
            "S3_REGION": "us-east-1",
            "EXPORT_INTERVAL_SECONDS": "300",
            # The tests' days are in February 2026 (the clock resource is frozen there), and
            # telemetry_export's window of dates is taken from the real date: every day.
            "EXPORT_PARTITION_DAYS": "0",
            # The Iceberg catalog is in the tests' PostgreSQL database (`checkpoint_env`), shared:
            # each stack's table in its own namespace.
            "CHECKPOINT_DB_HOST": str(POSTGRES["host"]),
            "CHECKPOINT_DB_PORT": str(POSTGRES["port"]),
            "CHECKPOINT_DB_NAME": TEST_DATABASE,
            "CHECKPOINT_DB_USER": str(POSTGRES["user"]),
            "ICEBERG_NAMESPACE": self.database,
            # Off but where a test is about the table (`iceberg`): it costs each run that writes
            # day files about a second, and the other tests are about the files.
            "ICEBERG_ENABLED": str(self.iceberg).lower(),
            **AWS_ENV,
        }
        values.update(overrides)
        return values

    def settings(self, **overrides: str) -> Settings:
        return Settings.from_env(self.env(**overrides))

    @property
    def s3(self) -> Any:
        """A boto3 client: the tests' own look at the bucket, apart from the pipeline's."""
        return boto3.client("s3", endpoint_url=self.s3_url, region_name="us-east-1")

    def store(self, **overrides: str) -> ObjectStore:
        """The pipeline's own client on this stack's bucket, made as a run makes it."""
        return ExportBucketResource.from_settings(self.settings(**overrides).s3).store()

    def write(self, lines: Iterable[str]) -> None:
        self.influx.write(self.database, lines)

    def objects(self, *, table: bool = False) -> dict[str, bytes]:
        """Every object of the datasets in the bucket, key to content; with `table`, the
        Iceberg table's own files (`_iceberg/`: metadata, replaced copies) too."""
        found = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            for item in page.get("Contents", []):
                if not table and f"/{TABLE_FOLDER}/" in f"/{item['Key']}":
                    continue
                body = self.s3.get_object(Bucket=self.bucket, Key=item["Key"])["Body"].read()
                found[item["Key"]] = body
        return found

    def table(self, key: str) -> pa.Table:
        body = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        if key.endswith(".csv"):
            return pacsv.read_csv(io.BytesIO(body))
        return pq.read_table(io.BytesIO(body))


@pytest.fixture
def stack(influx_server: InfluxServer, s3_server: SeaweedServer) -> Stack:
    name = f"t{uuid.uuid4().hex[:12]}"
    influx_server.create_database(name)
    created = Stack(influx_server, s3_server.url, database=name, bucket=name)
    created.s3.create_bucket(Bucket=name)
    return created


class Daemons:
    """Real `dagster-daemon` processes serving this stack's code location; their runs are real
    processes launched through the run queue, as in production. Each daemon leads a process
    group of its own, so what it leaves behind (a code server, a run) is reaped after the test."""

    def __init__(self, stack: Stack, dagster_home: Path, checkpoint_env: dict[str, str]) -> None:
        self.stack, self.dagster_home, self.checkpoint_env = stack, dagster_home, checkpoint_env
        self.started: list[Popen[bytes]] = []

    def start(self, **env: str) -> Popen[bytes]:
        environment = {
            **os.environ,
            **self.stack.env(**{"DEVICE_IDS": "D1", **env}),
            **self.checkpoint_env,
            "DAGSTER_HOME": str(self.dagster_home),
        }
        daemon = subprocess.Popen(
            dagster_command("dagster-daemon", "run"),
            env=environment,
            cwd=CLI_CWD,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.started.append(daemon)
        return daemon

    def reap(self) -> None:
        for daemon in self.started:
            if daemon.poll() is None:
                stop_daemon(daemon)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(daemon.pid, signal.SIGKILL)


@pytest.fixture
def daemons(stack: Stack, dagster_home: Path, checkpoint_env: dict[str, str]) -> Iterator[Daemons]:
    started = Daemons(stack, dagster_home, checkpoint_env)
    yield started
    started.reap()


def stop_daemon(daemon: Popen[bytes]) -> int:
    daemon.send_signal(signal.SIGTERM)
    return daemon.wait(timeout=60)
