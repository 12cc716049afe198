"""docker-compose.yml applies least privilege: each service gets the variables its process reads
and the secrets it uses, the administrators' secrets reach only their server and its init step,
every secret is required and generated per installation, the simulator and its write access
exist under `demo` only, and the code server answers on a socket only Dagster's processes mount.

No Docker engine runs here: the file is read as compose reads it (export_pipeline_tests/compose),
and the parts that can run without Docker run for real: `scripts/env`, the PostgreSQL init script
against the tests' PostgreSQL, and the code server on its socket with the stack's workspace.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import yaml
from dagster import DagsterInstance
from dotenv import dotenv_values

from export_pipeline.settings import Settings, parse_influx, parse_ui_hosts
from export_pipeline_tests.compose import (
    COMPOSE,
    DOT_ENV,
    ENV_EXAMPLE,
    RecordingEnv,
    compose_strings,
    environment,
    interpolate,
    uses,
)
from export_pipeline_tests.conftest import REPO, Stack
from export_pipeline_tests.services import POSTGRES, ensure_postgres

SERVICES: dict[str, Any] = COMPOSE["services"]
# The variables .env.example marks "# generated": scripts/env gives each a random value.
GENERATED = re.findall(
    r"^# generated\n([A-Z_][A-Z0-9_]*)=", (REPO / ".env.example").read_text(), re.M
)
ADMIN_SECRETS = {"INFLUXDB_ADMIN_PASSWORD", "INFLUXDB_ADMIN_TOKEN", "POSTGRES_ADMIN_PASSWORD"}
DAGSTER_YAML_VARIABLES = set(re.findall(r"\{env: ([A-Z_]+)\}", (REPO / "dagster.yaml").read_text()))
# Every Dagster process reads one of the two instances (EXPORT_DAGSTER_HOME picks): the repo's,
# or the workers' (docs/workers.md), which reads the broker and the queue's limit besides.
WORKERS_YAML = REPO / "deploy" / "workers" / "dagster.yaml"
INSTANCE_VARIABLES = (
    {"DAGSTER_HOME"}
    | DAGSTER_YAML_VARIABLES
    | set(re.findall(r"\{env: ([A-Z_]+)\}", WORKERS_YAML.read_text()))
)


def read_by(parse: Callable[[Mapping[str, str]], object]) -> set[str]:
    env = RecordingEnv({})
    with contextlib.suppress(ValueError):  # required settings missing: what was read matters
        parse(env)
    return env.read


# What each process of the stack reads from its environment: the settings parser it calls, and
# Dagster's instance (dagster.yaml) for every Dagster process. The code server's runs and the
# health service talk to S3 with the AWS_* keys, which the S3 client reads.
AWS_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
EVERY_SETTING = read_by(Settings.from_env)
READS: dict[str, set[str]] = {
    "code-server": EVERY_SETTING | INSTANCE_VARIABLES | AWS_KEYS,
    "health": EVERY_SETTING | INSTANCE_VARIABLES | AWS_KEYS,
    "webserver": INSTANCE_VARIABLES | read_by(parse_ui_hosts),
    "webserver-operator": INSTANCE_VARIABLES | read_by(parse_ui_hosts),
    "daemon": INSTANCE_VARIABLES,
    "worker-1": EVERY_SETTING | INSTANCE_VARIABLES | AWS_KEYS | {"EXPORT_WORKER_CONCURRENCY"},
    "worker-2": EVERY_SETTING | INSTANCE_VARIABLES | AWS_KEYS | {"EXPORT_WORKER_CONCURRENCY"},
    "simulator": read_by(parse_influx),
}


def test_the_processes_read_what_the_table_says() -> None:
    # The table above is computed from the parsers; this keeps it from going empty unnoticed.
    assert {"S3_BUCKET", "EXPORT_INTERVAL_SECONDS", "INFLUXDB_PASSWORD"} <= EVERY_SETTING
    assert read_by(parse_ui_hosts) == {"UI_ALLOWED_HOSTS"}
    assert "CHECKPOINT_DB_PASSWORD" in DAGSTER_YAML_VARIABLES
    assert "S3_BUCKET" not in read_by(parse_influx)


def test_no_service_is_handed_a_whole_env_file() -> None:
    assert [name for name, service in SERVICES.items() if "env_file" in service] == []


@pytest.mark.parametrize("name", sorted(READS))
def test_each_pipeline_service_gets_only_variables_its_process_reads(name: str) -> None:
    given = set(SERVICES[name].get("environment", {}))
    assert given - READS[name] == set(), f"{name} is given variables its process never reads"


@pytest.mark.parametrize("name", ["code-server", "health", "worker-1", "worker-2"])
def test_what_the_exporting_services_are_given_is_complete_and_valid(name: str) -> None:
    # Their settings parse from what compose gives them, with the stack's own hosts.
    settings = Settings.from_env(environment(SERVICES[name], DOT_ENV))
    assert settings.influx.url == "http://influxdb:8086"
    assert settings.influx.password == DOT_ENV["INFLUXDB_PASSWORD"]
    assert settings.influx.token == ""  # the read-only authorization, not a token
    assert settings.s3.endpoint_url == "http://seaweedfs:8333"
    assert settings.checkpoint.host == "postgres"
    assert settings.checkpoint.user == "export_pipeline"  # postgres-init's role, not the admin
    assert settings.export.interval_seconds == int(DOT_ENV["EXPORT_INTERVAL_SECONDS"])


def test_the_simulator_writes_as_its_own_user_with_its_own_password() -> None:
    influx = parse_influx(environment(SERVICES["simulator"], DOT_ENV))
    assert influx.username == "simulator"
    assert influx.password == DOT_ENV["SIMULATOR_INFLUXDB_PASSWORD"] != DOT_ENV["INFLUXDB_PASSWORD"]
    assert influx.token == ""


def holders(value: str) -> set[str]:
    """The services whose process is given `value` in its environment or command."""
    found = set()
    for name, service in SERVICES.items():
        texts = [*environment(service, DOT_ENV).values()]
        texts += [interpolate(str(part), DOT_ENV) for part in service.get("command", [])]
        if any(value in text for text in texts):
            found.add(name)
    return found


@pytest.mark.parametrize(
    ("secret", "services"),
    [
        # The administrators': their server and its init steps only.
        ("INFLUXDB_ADMIN_TOKEN", {"influxdb", "influxdb-init", "influxdb-demo-init"}),
        ("INFLUXDB_ADMIN_PASSWORD", {"influxdb"}),
        ("POSTGRES_ADMIN_PASSWORD", {"postgres", "postgres-init"}),
        # The pipeline's: the processes that use them, and the step that creates them.
        ("INFLUXDB_PASSWORD", {"influxdb-init", "code-server", "health", "worker-1", "worker-2"}),
        ("AWS_SECRET_ACCESS_KEY", {"seaweedfs", "code-server", "health", "worker-1", "worker-2"}),
        (
            "CHECKPOINT_DB_PASSWORD",
            {"postgres-init", "code-server", "health", "daemon", "webserver", "webserver-operator"}
            | {"worker-1", "worker-2"},
        ),
        ("SIMULATOR_INFLUXDB_PASSWORD", {"influxdb-demo-init", "simulator"}),
        # The workers' Redis: the processes whose instance may be the workers' one.
        (
            "REDIS_PASSWORD",
            {"redis", "code-server", "health", "daemon", "webserver", "webserver-operator"}
            | {"worker-1", "worker-2"},
        ),
    ],
)
def test_each_secret_reaches_only_the_services_that_use_it(secret: str, services: set[str]) -> None:
    assert holders(DOT_ENV[secret]) == services


def test_no_admin_secret_is_in_a_pipeline_service() -> None:
    pipeline = set(READS)
    for secret in ADMIN_SECRETS:
        assert not any(uses(SERVICES[name], secret) for name in pipeline), secret
        assert holders(DOT_ENV[secret]) & pipeline == set(), secret


def test_every_secret_is_generated_and_required() -> None:
    assert set(GENERATED) >= ADMIN_SECRETS | {
        "INFLUXDB_PASSWORD",
        "CHECKPOINT_DB_PASSWORD",
        "AWS_SECRET_ACCESS_KEY",
        "SIMULATOR_INFLUXDB_PASSWORD",
    }
    for name in GENERATED:
        assert ENV_EXAMPLE[name] == "", f".env.example holds a value for the secret {name}"
        forms = {
            match[1]
            for text in compose_strings(COMPOSE)
            for match in re.finditer(r"\$\{" + name + r"([^}]*)\}", text)
        }
        assert forms, f"{name} is generated but the stack never uses it"
        assert all(form.startswith(":?") for form in forms), f"{name} is not required: {forms}"


def test_a_secret_left_empty_stops_compose_naming_it() -> None:
    # .env.example copied as it is, without scripts/env: compose refuses to interpolate.
    with pytest.raises(ValueError, match="POSTGRES_ADMIN_PASSWORD is required: run scripts/env"):
        environment(SERVICES["postgres"], ENV_EXAMPLE)


def test_the_simulator_and_its_write_access_exist_only_under_demo() -> None:
    writers = {name for name, s in SERVICES.items() if uses(s, "SIMULATOR_INFLUXDB_PASSWORD")}
    assert writers == {"simulator", "influxdb-demo-init"}
    for name in writers:
        assert SERVICES[name]["profiles"] == ["demo"], name
    assert environment(SERVICES["influxdb-init"], DOT_ENV)["GRANT"] == "read"
    assert environment(SERVICES["influxdb-demo-init"], DOT_ENV)["GRANT"] == "write"
    # Both grant on the one bucket, by its id, through the same command.
    command = SERVICES["influxdb-init"]["command"][0]
    assert SERVICES["influxdb-demo-init"]["command"][0] == command
    assert '--"$$GRANT"-bucket "$$id"' in command
    assert "--all-access" not in command and "--operator" not in command


def test_the_code_server_answers_only_on_a_socket_dagsters_processes_mount() -> None:
    code_server = SERVICES["code-server"]
    command = code_server["command"]
    # The pipeline's code server, whose runs fork from a warm process (test_code_server.py).
    assert command[:3] == ["python", "-m", "export_pipeline.code_server"]
    socket = command[command.index("--socket") + 1]
    assert "-p" not in command and "--port" not in command
    assert "ports" not in code_server and "expose" not in code_server
    workspace = yaml.safe_load((REPO / "deploy" / "workspace.yaml").read_text())
    assert workspace["load_from"] == [
        {"grpc_server": {"socket": socket, "location_name": "export_pipeline"}}
    ]
    assert socket in code_server["healthcheck"]["test"]
    volume = f"grpc:{Path(socket).parent}"
    mounting = {name for name, s in SERVICES.items() if volume in s.get("volumes", [])}
    assert mounting == {"code-server"}  # the one that serves it may write there
    connecting = {name for name, s in SERVICES.items() if f"{volume}:ro" in s.get("volumes", [])}
    assert connecting == {"daemon", "webserver", "webserver-operator"}


def test_each_store_is_reached_only_by_the_services_that_use_it() -> None:
    members: dict[str, set[str]] = {}
    for name, service in SERVICES.items():
        for network in service.get("networks", []):
            members.setdefault(network, set()).add(name)
    assert all("networks" in service for service in SERVICES.values())  # none on `default`
    assert members["postgres"] == {
        "postgres",
        "postgres-init",
        "code-server",
        "daemon",
        "webserver",
        "webserver-operator",
        "health",
        "worker-1",
        "worker-2",
    }
    assert members["influxdb"] == {
        "influxdb",
        "influxdb-init",
        "influxdb-demo-init",
        "code-server",
        "health",
        "simulator",
        "inspect",
        "worker-1",
        "worker-2",
    }
    assert members["s3"] == {
        "seaweedfs",
        "code-server",
        "health",
        "inspect",
        "worker-1",
        "worker-2",
    }
    # The workers' broker: who publishes runs (the daemon), terminates them (the operators' UI),
    # checks it (health) and takes them (the workers).
    assert members["broker"] == {
        "redis", "daemon", "webserver-operator", "health", "worker-1", "worker-2"
    }  # fmt: skip


# scripts/env, run. ----------------------------------------------------------------------------


def test_scripts_env_writes_fresh_secrets_and_fills_only_what_is_missing(tmp_path: Path) -> None:
    first, second = tmp_path / "a.env", tmp_path / "b.env"
    for path in (first, second):
        subprocess.run(["bash", REPO / "scripts" / "env", path], check=True, capture_output=True)
    a, b = dotenv_values(first), dotenv_values(second)
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    for name in GENERATED:
        assert re.fullmatch(r"[A-Za-z0-9]{32}", a[name] or ""), name
        assert a[name] != b[name], f"{name} is the same on two installations"
    assert len({a[name] for name in GENERATED}) == len(GENERATED)
    assert {k: v for k, v in a.items() if k not in GENERATED} == {
        k: v for k, v in ENV_EXAMPLE.items() if k not in GENERATED
    }
    # Run again: nothing changes; a secret removed or emptied (an older .env) gets a value.
    text = first.read_text()
    subprocess.run(["bash", REPO / "scripts" / "env", first], check=True, capture_output=True)
    assert first.read_text() == text
    edited = re.sub(r"^POSTGRES_ADMIN_PASSWORD=.*\n", "", text, flags=re.M)
    edited = re.sub(r"^INFLUXDB_PASSWORD=.*$", "INFLUXDB_PASSWORD=", edited, flags=re.M)
    first.write_text(edited)
    subprocess.run(["bash", REPO / "scripts" / "env", first], check=True, capture_output=True)
    c = dotenv_values(first)
    assert c["POSTGRES_ADMIN_PASSWORD"] and c["INFLUXDB_PASSWORD"]
    assert c["INFLUXDB_PASSWORD"] != a["INFLUXDB_PASSWORD"]
    assert {
        k: v for k, v in c.items() if k not in ("POSTGRES_ADMIN_PASSWORD", "INFLUXDB_PASSWORD")
    } == {k: v for k, v in a.items() if k not in ("POSTGRES_ADMIN_PASSWORD", "INFLUXDB_PASSWORD")}


# deploy/postgres-init.sql, run as postgres-init runs it. -----------------------------------------


def postgres_init(role: str, password: str, database: str) -> subprocess.CompletedProcess[str]:
    """psql with the script, as the administrator, given the pipeline's settings in its
    environment as postgres-init is."""
    return subprocess.run(
        [
            *("psql", "-q", "-h", str(POSTGRES["host"]), "-p", str(POSTGRES["port"])),
            *("-U", "postgres", "-d", "postgres", "-f", str(REPO / "deploy" / "postgres-init.sql")),
        ],
        env={
            **os.environ,
            "CHECKPOINT_DB_USER": role,
            "CHECKPOINT_DB_PASSWORD": password,
            "CHECKPOINT_DB_NAME": database,
        },
        capture_output=True,
        text=True,
    )


def as_administrator(*statements: str) -> list[tuple[Any, ...]]:
    connection = psycopg2.connect(dbname="postgres", **POSTGRES)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
            return cursor.fetchall() if cursor.description else []
    finally:
        connection.close()


def test_the_postgres_init_script_matches_what_postgres_init_runs() -> None:
    service = SERVICES["postgres-init"]
    assert "./deploy/postgres-init.sql:/postgres-init.sql:ro" in service["volumes"]
    assert service["command"] == ["psql", "-q", "-f", "/postgres-init.sql"]
    env = environment(service, DOT_ENV)
    pipeline = environment(SERVICES["code-server"], DOT_ENV)
    for name in ("CHECKPOINT_DB_USER", "CHECKPOINT_DB_NAME", "CHECKPOINT_DB_PASSWORD"):
        assert env[name] == pipeline[name], name
    assert env["PGUSER"] == "postgres" != env["CHECKPOINT_DB_USER"]


def test_the_postgres_init_script_makes_a_role_that_owns_dagsters_database_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ensure_postgres()
    name = f"export_pipeline_role_{os.getpid()}"
    try:
        for password in ("first one", "it's changed"):  # run twice: every start runs it
            done = postgres_init(name, password, name)
            assert done.returncode == 0, done.stderr
        rights = as_administrator(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls "
            f"FROM pg_roles WHERE rolname = '{name}'"
        )
        assert rights == [(False, False, False, False, False)]
        owned = as_administrator(
            f"SELECT datname FROM pg_database WHERE datdba = (SELECT oid FROM pg_roles "
            f"WHERE rolname = '{name}')"
        )
        assert owned == [(name,)]
        assert as_administrator(
            f"SELECT has_database_privilege('public', '{name}', 'CONNECT')"
        ) == [(False,)]
        with dagster_storage(tmp_path, monkeypatch, database=name, user=name) as instance:
            instance.add_dynamic_partitions("devices", ["device-001"])  # creates Dagster's tables
            assert instance.get_dynamic_partitions("devices") == ["device-001"]
    finally:
        as_administrator(
            f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'DROP ROLE IF EXISTS "{name}"'
        )


def test_the_postgres_init_script_hands_an_earlier_stacks_storage_to_the_role(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stack that ran the pipeline as the administrator left Dagster's tables owned by it: the
    script hands them to the pipeline's role, which goes on with the record it finds."""
    ensure_postgres()
    name = f"export_pipeline_upgrade_{os.getpid()}"
    as_administrator(f'CREATE DATABASE "{name}"')
    try:
        with dagster_storage(tmp_path, monkeypatch, database=name, user="postgres") as instance:
            instance.add_dynamic_partitions("devices", ["device-001"])
        done = postgres_init(name, "new password", name)
        assert done.returncode == 0, done.stderr
        with dagster_storage(tmp_path, monkeypatch, database=name, user=name) as instance:
            instance.add_dynamic_partitions("devices", ["device-002"])
            assert instance.get_dynamic_partitions("devices") == ["device-001", "device-002"]
        with (
            psycopg2.connect(**{**POSTGRES, "user": name}, dbname=name) as connection,
            connection.cursor() as cursor,
        ):
            cursor.execute(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' "
                "AND tableowner <> current_user"
            )
            assert cursor.fetchone() == (0,)
    finally:
        as_administrator(
            f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'DROP ROLE IF EXISTS "{name}"'
        )


@contextlib.contextmanager
def dagster_storage(
    home: Path, monkeypatch: pytest.MonkeyPatch, *, database: str, user: str
) -> Iterator[DagsterInstance]:
    """Dagster's instance (the repo's dagster.yaml) on `database`, connecting as `user`."""
    (home / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    for variable, value in {
        "CHECKPOINT_DB_HOST": POSTGRES["host"],
        "CHECKPOINT_DB_PORT": POSTGRES["port"],
        "CHECKPOINT_DB_NAME": database,
        "CHECKPOINT_DB_USER": user,
        "CHECKPOINT_DB_PASSWORD": "",
    }.items():
        monkeypatch.setenv(variable, str(value))
    with DagsterInstance.from_config(str(home)) as instance:
        yield instance


def test_the_postgres_init_script_refuses_to_demote_the_administrator() -> None:
    ensure_postgres()
    name = f"export_pipeline_never_{os.getpid()}"
    refused = postgres_init("postgres", "x", name)
    assert refused.returncode != 0
    assert "CHECKPOINT_DB_USER= postgres is the administrator" in refused.stderr
    assert as_administrator("SELECT rolsuper FROM pg_roles WHERE rolname = 'postgres'") == [(True,)]
    assert as_administrator(f"SELECT 1 FROM pg_database WHERE datname = '{name}'") == []


# The code server on its socket, as the stack starts it. ----------------------------------------


def test_the_code_server_serves_the_stacks_workspace_on_its_socket(
    stack: Stack, dagster_home: Path, checkpoint_env: dict[str, str], tmp_path: Path
) -> None:
    """The stack's code-server command, healthcheck and workspace, with the socket moved into a
    temporary folder: the daemon and webservers find the code location through it."""
    # A socket's path is limited to 107 bytes: a short folder of its own, whatever --basetemp.
    folder = Path(tempfile.mkdtemp(prefix="cs-", dir="/tmp"))
    socket = str(folder / "code-server.sock")
    stack_socket = SERVICES["code-server"]["command"][
        SERVICES["code-server"]["command"].index("--socket") + 1
    ]

    def here(parts: list[str]) -> list[str]:
        return [socket if part == stack_socket else part for part in parts]

    env = {**os.environ, **stack.env(), **checkpoint_env, "DAGSTER_HOME": str(dagster_home)}
    server = subprocess.Popen(
        here(SERVICES["code-server"]["command"]),
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "code-server.log").open("w"),  # read only if it fails: no pipe to fill
        start_new_session=True,  # its group holds the server it starts: stopped together
    )
    try:
        health = here(SERVICES["code-server"]["healthcheck"]["test"][1:])
        deadline = time.monotonic() + 120
        while subprocess.run(health, env=env, capture_output=True).returncode != 0:
            assert server.poll() is None, (tmp_path / "code-server.log").read_text()
            assert time.monotonic() < deadline, "the code server never answered on its socket"
            time.sleep(0.5)
        workspace = tmp_path / "workspace.yaml"
        workspace.write_text(
            (REPO / "deploy" / "workspace.yaml").read_text().replace(stack_socket, socket)
        )
        listed = subprocess.run(
            ["dagster", "sensor", "list", "-w", str(workspace)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert listed.returncode == 0, listed.stderr
        assert "continuous_export" in listed.stdout
    finally:
        stop_group(server)
        shutil.rmtree(folder, ignore_errors=True)


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process's group, SIGKILL to what is left after 30 s: nothing outlives the
    test, however slowly the code server shuts down."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def test_the_workers_profile_puts_every_dagster_process_on_the_workers_instance() -> None:
    dagster_processes = ["code-server", "daemon", "webserver", "webserver-operator", "health"]
    for name in dagster_processes:
        assert environment(SERVICES[name], DOT_ENV)["DAGSTER_HOME"] == "/opt/dagster/home", name
    chosen = {**DOT_ENV, "EXPORT_DAGSTER_HOME": "/opt/dagster/workers"}
    for name in [*dagster_processes, "worker-1", "worker-2"]:
        assert environment(SERVICES[name], chosen)["DAGSTER_HOME"] == "/opt/dagster/workers", name
    # The image holds that instance; the workers and their broker exist under `workers` only.
    assert (
        "cp deploy/workers/dagster.yaml /opt/dagster/workers/" in (REPO / "Dockerfile").read_text()
    )
    profiled = {name for name, s in SERVICES.items() if s.get("profiles") == ["workers"]}
    assert profiled == {"redis", "worker-1", "worker-2"}
    worker = environment(SERVICES["worker-1"], DOT_ENV)
    assert worker["CELERY_BROKER_URL"] == f"redis://:{DOT_ENV['REDIS_PASSWORD']}@redis:6379/0"
    assert worker["CELERY_RESULT_BACKEND"].endswith("@redis:6379/1")
    assert {SERVICES[name]["hostname"] for name in ("worker-1", "worker-2")} == {
        "worker-1",
        "worker-2",
    }
