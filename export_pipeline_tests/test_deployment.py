"""docker-compose.yml, .env.example, dagster.yaml and the Dockerfile agree with the code.

No Docker engine runs here, so the stack is checked by reading it: every variable the code reads
is in .env.example, every ${VAR} the stack uses is defined there, and every command starts
something that exists.
"""

import importlib.util
import re
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import DagsterInstance
from dagster._core.definitions.run_request import InstigatorType
from dagster._core.scheduler.instigation import TickStatus

from export_pipeline.settings import Settings
from export_pipeline_tests.compose import COMPOSE, ENV_EXAMPLE, compose_strings, variables_used
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


class RecordingEnv(dict[str, str]):
    """An environment that remembers every variable read from it."""

    def __init__(self, values: dict[str, str]) -> None:
        super().__init__(values)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return super().__getitem__(key)


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
    assert {"INFLUXDB_TOKEN", "PORT", "PUBLISH_ADDRESS"} <= COMPOSE_VARIABLES
    assert COMPOSE_VARIABLES - set(ENV_EXAMPLE) == set()


def test_the_stack_has_every_service_of_the_deployment() -> None:
    services = COMPOSE["services"]
    assert {"influxdb", "postgres", "minio"} | PIPELINE_SERVICES <= set(services)
    assert services["influxdb"]["image"].startswith("influxdb:2.7")
    assert services["postgres"]["image"].startswith("postgres:16")
    for name in PIPELINE_SERVICES:
        assert services[name]["env_file"] == ".env"


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


def test_the_webserver_reaches_the_code_server_on_the_port_it_serves() -> None:
    workspace = yaml.safe_load((REPO / "deploy" / "workspace.yaml").read_text())
    grpc = workspace["load_from"][0]["grpc_server"]
    command = COMPOSE["services"]["code-server"]["command"]
    assert grpc["host"] == "code-server"
    assert str(grpc["port"]) == command[command.index("-p") + 1]


def test_the_health_service_publishes_port_and_the_read_only_webserver_3000_on_this_host() -> None:
    services = COMPOSE["services"]
    assert services["health"]["ports"] == ["${PUBLISH_ADDRESS:-127.0.0.1}:${PORT}:${PORT}"]
    assert ENV_EXAMPLE["PORT"] == "8080"
    assert services["webserver"]["ports"] == ["${PUBLISH_ADDRESS:-127.0.0.1}:3000:3000"]
    assert ENV_EXAMPLE["PUBLISH_ADDRESS"] == "127.0.0.1"
    assert "/health" in " ".join(services["health"]["healthcheck"]["test"])


def test_the_stack_points_the_pipeline_at_its_own_services() -> None:
    environment = COMPOSE["x-pipeline"]["environment"]
    assert environment["INFLUXDB_URL"] == "http://influxdb:8086"
    assert environment["CHECKPOINT_DB_HOST"] == "postgres"
    assert environment["S3_ENDPOINT_URL"] == "http://minio:9000"
    influx = COMPOSE["services"]["influxdb"]["environment"]
    assert influx["DOCKER_INFLUXDB_INIT_BUCKET"] == "${INFLUXDB_BUCKET}"
    assert influx["DOCKER_INFLUXDB_INIT_ADMIN_TOKEN"] == "${INFLUXDB_TOKEN}"


def test_the_image_installs_the_package_and_ships_the_instance_config() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "COPY export_pipeline ./export_pipeline" in dockerfile
    assert "pip install --no-cache-dir ." in dockerfile
    assert 'cp dagster.yaml "$DAGSTER_HOME/dagster.yaml"' in dockerfile
    assert Path(REPO / "deploy" / "workspace.yaml").is_file()


def test_the_instance_keeps_sensor_ticks_a_day_not_forever(instance: DagsterInstance) -> None:
    # continuous_export ticks every 10 s and a tick that requests runs stores their config.
    retention = instance.get_tick_retention_settings(InstigatorType.SENSOR)
    assert retention[TickStatus.SUCCESS] == retention[TickStatus.SKIPPED] == 1
    assert retention[TickStatus.FAILURE] == 30
