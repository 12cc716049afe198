"""The deployment keeps Dagster's UI (which has no login) on the host unless told otherwise."""

from __future__ import annotations

from typing import Any

import pytest
from dagster_webserver.cli import cli as webserver_cli

from export_pipeline_tests.compose import (
    COMPOSE,
    ENV_EXAMPLE,
    Env,
    is_loopback,
    published_addresses,
)
from export_pipeline_tests.conftest import REPO

SERVICES: dict[str, Any] = COMPOSE["services"]
WIDENED = {**ENV_EXAMPLE, "PUBLISH_ADDRESS": "0.0.0.0"}
# A .env copied from .env.example, and one copied before PUBLISH_ADDRESS existed.
DEFAULT_ENVS: dict[str, Env] = {
    "env-example": ENV_EXAMPLE,
    "env-without-publish-address": {k: v for k, v in ENV_EXAMPLE.items() if k != "PUBLISH_ADDRESS"},
}


@pytest.mark.parametrize(
    ("port", "env", "address"),
    [
        ("3000", {}, ""),  # a random host port, on every interface
        ("3000:3000", {}, ""),
        (3000, {}, ""),
        ("0.0.0.0:3000:3000", {}, "0.0.0.0"),
        ("127.0.0.1:3000:3000", {}, "127.0.0.1"),
        ("127.0.0.1::3000", {}, "127.0.0.1"),
        ("[::1]:3000:3000/tcp", {}, "::1"),
        ("${ADDRESS:-0.0.0.0}:3000:3000", {}, "0.0.0.0"),
        ("${ADDRESS:-127.0.0.1}:3000:3000", {"ADDRESS": ""}, "127.0.0.1"),
        ("${ADDRESS-127.0.0.1}:3000:3000", {"ADDRESS": ""}, ""),  # set, though empty
        ("${ADDRESS}:3000:3000", {"ADDRESS": "10.0.0.5"}, "10.0.0.5"),
        ({"target": 3000, "published": 3000}, {}, ""),
        ({"target": 3000, "published": 3000, "host_ip": "${ADDRESS:-127.0.0.1}"}, {}, "127.0.0.1"),
    ],
)
def test_a_published_port_is_read_as_compose_reads_it(port: object, env: Env, address: str) -> None:
    assert published_addresses({"ports": [port]}, env) == [address]


def reachable_from_other_machines(env: Env) -> dict[str, list[str]]:
    """Each service's published addresses that are not loopback ("" is every interface)."""
    found = {}
    for name, service in SERVICES.items():
        wide = [
            address for address in published_addresses(service, env) if not is_loopback(address)
        ]
        if wide:
            found[name] = wide
    return found


@pytest.mark.parametrize("env", DEFAULT_ENVS.values(), ids=DEFAULT_ENVS.keys())
def test_no_service_publishes_a_port_beyond_this_host_by_default(env: Env) -> None:
    # Every service, whatever its profile: `--profile operator` and `--profile inspect` too.
    assert reachable_from_other_machines(env) == {}
    assert [name for name, s in SERVICES.items() if s.get("network_mode") == "host"] == []


def test_publish_address_opens_the_read_only_ui_and_the_health_service_and_nothing_else() -> None:
    assert reachable_from_other_machines(WIDENED) == {
        "webserver": ["0.0.0.0"],
        "health": ["0.0.0.0"],
    }


def test_postgresql_and_the_code_server_are_never_published() -> None:
    publishing = {name for name, service in SERVICES.items() if service.get("ports")}
    assert publishing == {"webserver", "webserver-operator", "health", "inspect"}
    forwarded = " ".join(SERVICES["inspect"]["command"])
    assert "postgres" not in forwarded and "code-server" not in forwarded
    assert SERVICES["inspect"]["profiles"] == ["inspect"]


def test_everyone_gets_the_read_only_ui_and_operators_the_full_one_on_this_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(REPO)  # the commands name the workspace file relative to it

    def read_only(service: str) -> bool:
        command = SERVICES[service]["command"]
        assert command[0] == "dagster-webserver"
        return bool(webserver_cli.make_context(command[0], command[1:]).params["read_only"])

    assert read_only("webserver")
    assert "profiles" not in SERVICES["webserver"]
    assert not read_only("webserver-operator")
    assert SERVICES["webserver-operator"]["profiles"] == ["operator"]
    assert published_addresses(SERVICES["webserver-operator"], WIDENED) == ["127.0.0.1"]
