"""docker-compose.yml read as compose reads it: its ${VAR} interpolation and published ports.

No Docker engine runs here, so tests read the file; this module resolves what compose would.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from dotenv import dotenv_values

from export_pipeline_tests.conftest import REPO

COMPOSE: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
ENV_EXAMPLE = dotenv_values(REPO / ".env.example")
Env = Mapping[str, str | None]

# $$ (a literal $), $NAME, ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}
VARIABLE = re.compile(
    r"\$\$|\$(?P<bare>[A-Za-z_]\w*)|\$\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
)


def compose_strings(node: object) -> Iterator[str]:
    """Every string value in the parsed file (compose interpolates values, not keys)."""
    if isinstance(node, dict):
        for value in node.values():
            yield from compose_strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from compose_strings(value)
    elif isinstance(node, str):
        yield node


def variables_used(text: str) -> set[str]:
    """The variables `text` interpolates, in any of compose's forms."""
    return {m["bare"] or m["name"] for m in VARIABLE.finditer(text) if m[0] != "$$"}


def interpolate(text: str, env: Env) -> str:
    """`text` with its variables replaced as compose does from `env` (.env's values): `:-` and
    `:?` treat an empty value as missing, `-` and `?` only an unset one."""

    def value(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        name, op, arg = match["bare"] or match["name"], match["op"], match["arg"]
        current = env.get(name)
        missing = current is None or (current == "" and op is not None and op.startswith(":"))
        if op is None or not missing:
            return current or ""
        if op.endswith("-"):
            return str(arg)
        raise ValueError(f"{name} is required: {arg}")

    return VARIABLE.sub(value, text)


def published_addresses(service: Mapping[str, Any], env: Env) -> list[str]:
    """The host address of each port `service` publishes; "" means every interface.

    Short syntax: `3000` (a random host port) and `3000:3000` are published on every interface,
    `127.0.0.1:3000:3000`, `127.0.0.1::3000` and `[::1]:3000:3000` on the address named; the long
    syntax names it in `host_ip`.
    """
    addresses = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            addresses.append(interpolate(str(entry.get("host_ip", "")), env))
            continue
        parts = interpolate(str(entry), env).split("/")[0].rsplit(":", 2)
        addresses.append(parts[0].strip("[]") if len(parts) == 3 else "")
    return addresses


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # "" (every interface) or a name
        return False


def generated_env() -> dict[str, str]:
    """A .env as `scripts/env` writes it from .env.example (its secrets generated), read as
    compose reads it."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / ".env"
        subprocess.run(
            ["bash", str(REPO / "scripts" / "env"), str(path)], check=True, capture_output=True
        )
        return {name: value or "" for name, value in dotenv_values(path).items()}


DOT_ENV = generated_env()


def environment(service: Mapping[str, Any], env: Env) -> dict[str, str]:
    """The variables a service's process is started with (`environment` alone: the stack has no
    env_file), interpolated from `env`."""
    return {
        name: interpolate(str(value), env) for name, value in service.get("environment", {}).items()
    }


def uses(service: Mapping[str, Any], variable: str) -> bool:
    """Whether any value of `service` interpolates `variable`."""
    return any(variable in variables_used(text) for text in compose_strings(service))


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
