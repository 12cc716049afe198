"""Tokens, passwords and AWS secrets never reach logs, run config, events, metadata or the UI.

An export runs through the real CLI with recognisable fake secrets (the servers here do not
authenticate, so any value works), once successfully and once failing, and every log line,
stored event, run record and the code location's snapshot are searched for them.
"""

import importlib
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from dagster import DagsterInstance
from dagster._core.remote_representation.external_data import RepositorySnap
from dagster._serdes import serialize_value

from export_pipeline.defs.continuous import export_due_slices, export_slices
from export_pipeline.defs.planning import WorkItem
from export_pipeline.defs.resources import build_resources
from export_pipeline.defs.run_config import run_config_for
from export_pipeline.engine.grid import DayRange
from export_pipeline.settings import Settings
from export_pipeline_tests.conftest import CLI_CWD, Stack
from export_pipeline_tests.services import dagster_command, free_port, point
from export_pipeline_tests.test_export import DAY, at

SECRETS = {
    "INFLUXDB_TOKEN": "tok-FAKESECRET-1a2b",
    "INFLUXDB_PASSWORD": "pw-FAKESECRET-3c4d",
    "AWS_SECRET_ACCESS_KEY": "aws-FAKESECRET-5e6f",
    "CHECKPOINT_DB_PASSWORD": "pg-FAKESECRET-7a8b",
}


def cli(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(
        dagster_command("dagster", *args),
        env={**os.environ, **env},
        cwd=CLI_CWD,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.stdout + done.stderr


def test_no_secret_appears_in_logs_events_run_records_or_the_ui(
    stack: Stack,
    instance: DagsterInstance,
    dagster_home: Path,
    checkpoint_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    device = f"dev-{uuid.uuid4().hex[:8]}"
    stack.write([point(at(12), device, {"voltage": 230.0})])
    env = {
        **stack.env(DEVICE_IDS=device, LOG_LEVEL="DEBUG"),
        **checkpoint_env,
        **SECRETS,
        "DAGSTER_HOME": str(dagster_home),
    }
    before = {run.run_id for run in instance.get_runs()}
    output = cli(["job", "execute", "-j", "register_devices"], env)
    partition = ["--partition", f"2026-02-07|{device}"]
    output += cli(["asset", "materialize", "--select", "telemetry_export", *partition], env)
    unreachable = {**env, "INFLUXDB_URL": f"http://127.0.0.1:{free_port()}", "EXPORT_RETRIES": "0"}
    output += cli(["asset", "materialize", "--select", "telemetry_export", *partition], unreachable)

    runs = [run for run in instance.get_runs() if run.run_id not in before]
    assert len(runs) == 3 and {run.status.value for run in runs} == {"SUCCESS", "FAILURE"}
    assert "is unreachable" in output  # the failure was logged, with its message
    stored = [serialize_value(run) for run in runs]
    for run in runs:
        stored += [serialize_value(entry) for entry in instance.all_logs(run.run_id)]
    # The UI's view of the code location, loaded from this environment as the server would.
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    definitions = importlib.reload(importlib.import_module("export_pipeline.definitions"))
    snapshot = serialize_value(RepositorySnap.from_def(definitions.defs.get_repository_def()))
    resources = repr(build_resources(Settings.from_env(env)))
    haystacks = {
        "cli output": output,
        "events and runs": "\n".join(stored),
        "repository snapshot": snapshot,
        "resources": resources,
    }
    for where, text in haystacks.items():
        for name, secret in SECRETS.items():
            assert secret not in text, f"{name} leaked into the {where}"
    assert "INFLUXDB_TOKEN" in snapshot  # the UI shows the variable's name instead


class Listener:
    """A TCP port that counts the connections made to it (a host an attacker controls)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.connections = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.done.is_set():
            try:
                connection, _ = self.server.accept()
            except TimeoutError:
                continue
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self.done.set()
        self.thread.join()
        self.server.close()


@pytest.mark.parametrize(
    ("key", "config"),
    [
        ("influxdb", lambda url: {"url": url, "token": {"env": "INFLUXDB_TOKEN"}}),
        ("s3", lambda url: {"endpoint_url": url, "bucket": "telemetry-exports"}),
        ("export", lambda url: {"layout": "hive"}),
    ],
)
def test_a_launch_that_sets_a_resource_field_is_refused_and_connects_nowhere(
    stack: Stack,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
    key: str,
    config: Callable[[str], dict[str, object]],
) -> None:
    """`{env: INFLUXDB_TOKEN}` supplies the secret without knowing it: a launch that could set
    the URL beside it would send the token to any host. The run fails before its op, naming the
    field, and the listener sees no connection."""
    device = f"dev-{uuid.uuid4().hex[:8]}"
    stack.write([point(at(12), device, {"voltage": 230.0})])
    monkeypatch.setenv("INFLUXDB_TOKEN", SECRETS["INFLUXDB_TOKEN"])
    settings = stack.settings(DEVICE_IDS=device, INFLUXDB_TOKEN=SECRETS["INFLUXDB_TOKEN"])
    resources = build_resources(settings)
    work = run_config_for([WorkItem(device, DayRange(DAY, 43_200, 43_500))], export_slices.name)
    listener = Listener()
    try:
        url = f"http://127.0.0.1:{listener.port}"
        # Dagster asks for every field once one is given: the bound ones, with the change.
        bound = resources[key].get_resource_definition().config_schema.as_field().default_value
        result = export_due_slices.execute_in_process(
            run_config={**work, "resources": {key: {"config": {**bound, **config(url)}}}},
            instance=instance,
            resources=resources,
            raise_on_error=False,
        )
        assert not result.success
        failure = next(event for event in result.all_events if event.is_failure)
        message = str(failure.event_specific_data)
        assert f"run config may not set resources.{key}.config." in message
        assert SECRETS["INFLUXDB_TOKEN"] not in message
        time.sleep(0.3)
        assert listener.connections == 0
    finally:
        listener.close()
    # The same run without resource config exports the slice.
    assert export_due_slices.execute_in_process(
        run_config=work, instance=instance, resources=resources
    ).success
    assert [key for key in stack.objects() if f"device_id={device}/" in key]
