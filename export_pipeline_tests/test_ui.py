"""The UI as the project serves it (`python -m export_pipeline.ui`) refuses what a page of
another origin can make a browser send, and still works for its own pages.

A real dagster-webserver, wrapped, on this test's PostgreSQL storage, is sent the requests a
browser sends for an `<img>`, a form, a `fetch` and a WebSocket from another origin (and from a
DNS-rebinding name), and the same-origin requests its own pages send."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from export_pipeline.ui import refusal
from export_pipeline_tests.conftest import CLI_CWD, Stack
from export_pipeline_tests.services import free_port, wait_until

MUTATION = "mutation { reloadWorkspace { __typename } }"
READ = "{ version }"
EVIL = "http://evil.example"
HOSTS = ("localhost", "127.0.0.1", "[::1]")


def decide(
    method: str = "GET", kind: str = "http", query: str = "", path: str = "/graphql", **headers: str
) -> str | None:
    return refusal(
        kind=kind,
        method=method,
        path=path,
        query_string=query,
        headers={"host": "localhost:3000", **{k.replace("_", "-"): v for k, v in headers.items()}},
        allowed_hosts=HOSTS,
    )


def test_the_rules_of_a_request() -> None:
    own = "http://localhost:3000"
    assert decide(query="query=%7B+version+%7D") is None  # a read may be a GET
    assert decide(path="/runs") is None
    assert "must be a POST" in str(
        decide(query="query=mutation%7BreloadWorkspace%7B__typename%7D%7D")
    )
    assert "does not parse" in str(decide(query="query=%7B"))
    assert decide("POST", origin=own, content_type="application/json; charset=utf-8") is None
    assert decide("POST", referer=own + "/runs", content_type="application/json") is None
    assert "Origin 'http://evil.example'" in str(
        decide("POST", origin=EVIL, content_type="application/json")
    )
    assert "only application/json" in str(decide("POST", origin=own, content_type="text/plain"))
    assert "without Origin or Referer" in str(decide("POST", content_type="application/json"))
    assert decide("POST", origin="null", content_type="application/json") is not None
    assert decide("POST", origin="http://localhost:3001", content_type="application/json")
    assert "preflight" in str(decide("OPTIONS", origin=EVIL))
    assert decide(kind="websocket", origin=own) is None
    assert decide(kind="websocket", origin=EVIL) is not None
    assert decide(kind="websocket") is not None
    rebound = refusal(
        kind="http",
        method="GET",
        path="/",
        query_string="",
        headers={"host": "evil.example:3000"},
        allowed_hosts=HOSTS,
    )
    assert "is not one of UI_ALLOWED_HOSTS" in str(rebound)
    long = "http://" + "a" * 5000
    assert len(str(decide("POST", origin=long, content_type="application/json"))) < 400


class UI:
    """`python -m export_pipeline.ui` on the code location, as scripts/run starts it."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable,
            "-m",
            "export_pipeline.ui",
            *args,
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-m",
            "export_pipeline.definitions",
        ]
        self.process = subprocess.Popen(
            command, env=env, cwd=CLI_CWD, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        wait_until(self.up, "the wrapped Dagster UI", timeout=120)

    def up(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"the UI exited: {self.process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        return requests.get(self.url + "/server_info", timeout=5).ok

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def post(self, body: object, **headers: str) -> requests.Response:
        return requests.post(self.url + "/graphql", json=body, headers=headers, timeout=30)

    def handshake(self, origin: str) -> int:
        """The status of a GraphQL WebSocket handshake sent with `origin`."""
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /graphql HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: graphql-ws\r\nOrigin: {origin}\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as connection:
            connection.sendall(request.encode())
            status_line = connection.recv(4096).split(b"\r\n", 1)[0]
        return int(status_line.split()[1])


@pytest.fixture
def ui_env(stack: Stack, dagster_home: Path, checkpoint_env: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **stack.env(), **checkpoint_env, "DAGSTER_HOME": str(dagster_home)}


@pytest.fixture
def ui(ui_env: dict[str, str]) -> Iterator[UI]:
    served = UI(ui_env)
    yield served
    served.stop()


def test_another_origin_cannot_change_anything_and_the_ui_still_can(ui: UI) -> None:
    own = ui.url
    # <img src="http://127.0.0.1:3000/graphql?query=mutation..."> sends no Origin.
    image = requests.get(ui.url + "/graphql", params={"query": MUTATION}, timeout=30)
    assert image.status_code == 403 and "must be a POST" in image.text
    # <form enctype="text/plain"> and a plain form, posted from another site.
    for content_type, body in [
        ("text/plain", '{"query": "' + MUTATION + '", "x": "="}'),
        ("application/x-www-form-urlencoded", "query=" + MUTATION),
    ]:
        form = requests.post(
            ui.url + "/graphql",
            data=body,
            headers={"Origin": EVIL, "Content-Type": content_type},
            timeout=30,
        )
        assert form.status_code == 403, content_type
    # fetch() from another origin, and from a DNS-rebinding name (Host and Origin agree).
    assert ui.post({"query": MUTATION}, Origin=EVIL).status_code == 403
    rebound = f"evil.example:{ui.port}"
    assert ui.post({"query": MUTATION}, Origin=f"http://{rebound}", Host=rebound).status_code == 403
    assert ui.handshake(EVIL) == 403
    # What the UI's own pages send is served: a read by GET, a change by a same-origin POST.
    read = requests.get(ui.url + "/graphql", params={"query": READ}, timeout=30)
    assert read.ok and read.json()["data"]["version"]
    changed = ui.post({"query": MUTATION}, Origin=own)
    assert changed.ok and changed.json()["data"]["reloadWorkspace"]["__typename"] == "Workspace"
    assert ui.handshake(own) == 101
    page = requests.get(ui.url + "/runs", timeout=30)
    assert page.ok and "<html" in page.text.lower()


def test_the_read_only_ui_stays_read_only(ui_env: dict[str, str]) -> None:
    served = UI(ui_env, "--read-only")
    try:
        answer = served.post({"query": MUTATION}, Origin=served.url).json()
        assert answer["data"]["reloadWorkspace"]["__typename"] == "UnauthorizedError"
        assert served.post({"query": MUTATION}, Origin=EVIL).status_code == 403
    finally:
        served.stop()
