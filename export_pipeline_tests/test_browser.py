"""The UI as the project serves it (`python -m export_pipeline.ui`), driven by a real browser:
Debian's Chromium, headless, through Playwright.

- A page of another site (http://evil.example:<port>, served by this test) makes Chromium send
  the UI what such a page can: an `<img>` GET, a form POST as text/plain and as
  application/x-www-form-urlencoded, `fetch` POSTs (no-cors, a "simple" CORS one, and one with a
  JSON content type, which needs a preflight) and a WebSocket, each asking Dagster to launch a
  backfill. What went over the wire is read from Chromium's own network log (DevTools protocol):
  each request that reached the UI was answered 403, and no backfill was made; the same mutation
  from the UI's own origin does make one, and a WebSocket from there is accepted.
- The UI still works in the browser: a backfill of `telemetry_daily` launched through its own
  pages (Catalog, the asset, Materialize…, a range of partitions, Launch backfill) is in the
  instance.

test_ui.py sends the same kinds of requests with `requests`; this checks that a browser sends
them as assumed there, and that the wrapped UI's own pages are not refused.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote

import pytest
from dagster import DagsterInstance
from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill
from playwright.sync_api import Browser, CDPSession, Page, expect, sync_playwright

from export_pipeline.record.keys import TELEMETRY_DAILY
from export_pipeline.settings import ExportSettings
from export_pipeline_tests import test_ui
from export_pipeline_tests.test_ui import UI

# test_ui's fixtures: the wrapped UI on this test's PostgreSQL storage (`ui`) and its environment.
ui_env = test_ui.ui_env
ui = test_ui.ui

CHROMIUM = "/usr/bin/chromium"  # Debian's; Playwright's own browser download is not reachable
EVIL = "evil.example"  # the other site's name, which Chromium resolves to 127.0.0.1 itself
CHROMIUM_ARGS = [
    "--no-sandbox",  # the tests run as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # Without these Chromium calls Google's hosts, which a closed network leaves hanging.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
    f"--host-resolver-rules=MAP {EVIL} 127.0.0.1",
]
TIMEOUT_MS = 60_000  # for any one wait on the browser: the CI machine is small and shared
TAG = "browser_test"  # every backfill this module asks for carries it, its value the sender
# Each HTTP request of the other site's page, by the tag it asks its backfill to carry.
ATTACKS = ("img", "form-plain", "form-urlencoded", "fetch-no-cors", "fetch-simple", "fetch-json")
# What the page's WebSocket asks for: subscriptions read (run logs, captured logs, the code
# locations' events), they do not change anything.
SUBSCRIPTION = "subscription { locationStateChangeEvents { event { message } } }"
# The other site's page. The mutation is in the URL of every request: dagster-webserver runs the
# query of a GET's URL, and of a POST's URL unless its body is JSON; the body carries it as well.
ATTACK_PAGE = """<!doctype html>
<title>another site</title>
<body>
<script>
const ui = __UI__, queries = __QUERIES__, outcomes = {};
const at = (name) => ui + "/graphql?query=" + encodeURIComponent(queries[name]);
const body = (name) => JSON.stringify({query: queries[name]});
const steps = [];
const record = (name, promise) => steps.push(promise.then(
  (value) => { outcomes[name] = value; },
  (error) => { outcomes[name] = "rejected " + error.name; },
));

// <img src>: a GET without Origin.
record("img", new Promise((settle) => {
  const image = new Image();
  image.onload = () => settle("loaded");
  image.onerror = () => settle("error");
  image.src = at("img");
}));

// Forms, each submitted into a frame of its own (so this page stays).
function submit(name, enctype, field, value) {
  const frame = document.createElement("iframe");
  frame.name = name;
  document.body.append(frame);
  const form = document.createElement("form");
  Object.assign(form, {method: "POST", enctype, target: name, action: at(name)});
  const input = document.createElement("input");
  Object.assign(input, {name: field, value});
  form.append(input);
  document.body.append(form);
  form.submit();
}
// text/plain sends `name=value`: split so the body is {"query": "...", "x": "="}, JSON.
const json = JSON.stringify({query: queries["form-plain"], x: ""});
submit("form-plain", "text/plain", json.slice(0, -2), '"}');
submit("form-urlencoded", "application/x-www-form-urlencoded", "query",
       queries["form-urlencoded"]);

// fetch: no-cors (the page cannot read the answer; a JSON content type is not allowed and is
// dropped), a simple CORS POST (text/plain), and a JSON one, which needs a preflight.
const post = (name, init) => fetch(at(name), {method: "POST", body: body(name), ...init})
  .then((answer) => answer.type + " " + answer.status);
record("fetch-no-cors", post("fetch-no-cors",
  {mode: "no-cors", headers: {"Content-Type": "application/json"}}));
record("fetch-simple", post("fetch-simple", {}));
record("fetch-json", post("fetch-json", {headers: {"Content-Type": "application/json"}}));

// The GraphQL WebSocket, with dagster-webserver's subprotocol, starting a subscription.
record("websocket", new Promise((settle) => {
  const socket = new WebSocket(ui.replace("http", "ws") + "/graphql", "graphql-ws");
  socket.onopen = () => {
    socket.send(JSON.stringify({type: "connection_init", payload: {}}));
    socket.send(JSON.stringify({id: "1", type: "start", payload: {query: queries.websocket}}));
  };
  socket.onmessage = (message) => settle(JSON.parse(message.data).type);
  socket.onclose = (event) => settle("closed " + event.code);
}));

Promise.all(steps).then(() => { window.outcomes = outcomes; });
</script>
"""
# The same page's requests as the UI's own origin sends them (run on a page of the UI).
OWN_FETCH = """async (query) => {
  const answer = await fetch("/graphql", {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({query}),
  });
  return [answer.status, await answer.json()];
}"""
OWN_WEBSOCKET = """() => new Promise((settle) => {
  const socket = new WebSocket(location.origin.replace("http", "ws") + "/graphql", "graphql-ws");
  socket.onopen = () => socket.send(JSON.stringify({type: "connection_init", payload: {}}));
  socket.onmessage = (message) => { settle(JSON.parse(message.data).type); socket.close(); };
  socket.onclose = (event) => settle("closed " + event.code);
})"""


def launch_backfill(sender: str) -> str:
    """A GraphQL mutation launching a backfill of telemetry_daily's first date, tagged with who
    sent it: a backfill is the change an attacker's page would want, and is easy to look for."""
    first_date = ExportSettings().start_date.isoformat()
    return (
        "mutation { launchPartitionBackfill(backfillParams: {"
        f'partitionNames: ["{first_date}"], assetSelection: [{{path: ["telemetry_daily"]}}], '
        f'tags: [{{key: "{TAG}", value: "{sender}"}}]'
        "}) { __typename ... on LaunchBackfillSuccess { backfillId } } }"
    )


@dataclass
class Exchange:
    """One request as Chromium's network log tells it."""

    id: str
    method: str = ""
    url: str = ""
    body: str = ""
    headers: dict[str, str] | None = None  # as sent on the wire; None if it never was
    status: int | None = None  # the server's answer, whether or not the page may read it

    def carries(self, sender: str) -> bool:
        """Whether it asks for the backfill of `sender` (in its URL or its body)."""
        return quote(f'"{sender}"') in self.url or f'\\"{sender}\\"' in self.body


class Wire:
    """Chromium's network log of one page, from the DevTools protocol: what was really sent,
    and what came back, including the answers and preflights Playwright's own events do not
    show (a CORS-failed response, a preflight)."""

    def __init__(self, cdp: CDPSession) -> None:
        self.cdp = cdp
        self.exchanges: dict[str, Exchange] = {}
        handlers: dict[str, Callable[[Any], None]] = {
            "Network.requestWillBeSent": self._request,
            "Network.requestWillBeSentExtraInfo": self._sent,
            "Network.responseReceivedExtraInfo": self._answered,
        }
        for event, handler in handlers.items():
            cdp.on(event, handler)
        cdp.send("Network.enable")

    def _of(self, event: dict[str, Any]) -> Exchange:
        request_id = event["requestId"]
        return self.exchanges.setdefault(request_id, Exchange(request_id))

    def _request(self, event: dict[str, Any]) -> None:
        exchange, request = self._of(event), event["request"]
        exchange.method, exchange.url = request["method"], request["url"]
        exchange.body = request.get("postData", "")

    def _sent(self, event: dict[str, Any]) -> None:
        self._of(event).headers = {k.lower(): v for k, v in event["headers"].items()}

    def _answered(self, event: dict[str, Any]) -> None:
        self._of(event).status = event["statusCode"]

    def to(self, url: str) -> list[Exchange]:
        return [e for e in self.exchanges.values() if e.url.startswith(url)]

    def answer(self, exchange: Exchange) -> str:
        """The body of the server's answer (Chromium keeps those the page could not read too,
        except for a CORS-failed one and a frame's document)."""
        return str(self.cdp.send("Network.getResponseBody", {"requestId": exchange.id})["body"])


def until(page: Page, check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Wait for `check`, letting Playwright deliver the browser's events meanwhile (a plain
    sleep would hold them back: the sync API dispatches them only inside its own calls)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        page.wait_for_timeout(100)


class AnotherSite:
    """A web server for the other site's page, on a port of its own."""

    def __init__(self, html: str) -> None:
        page = html.encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://{EVIL}:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (scripts/test does)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=TIMEOUT_MS
        )
        yield browser
        browser.close()


@pytest.fixture
def page(chromium: Browser) -> Iterator[Page]:
    """A page in a fresh browser context: no cookies, storage or cache from another test."""
    context = chromium.new_context(viewport={"width": 1400, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    yield context.new_page()
    context.close()


@pytest.fixture
def backfills(instance: DagsterInstance) -> Iterator[DagsterInstance]:
    """The instance; the backfills made during the test are canceled after it, so that no later
    test's backfill daemon (they share this storage) runs them."""
    before = {backfill.backfill_id for backfill in instance.get_backfills()}
    yield instance
    for backfill in instance.get_backfills(status=BulkActionStatus.REQUESTED):
        if backfill.backfill_id not in before:
            instance.update_backfill(backfill.with_status(BulkActionStatus.CANCELED))


def tagged(instance: DagsterInstance, *senders: str) -> list[PartitionBackfill]:
    """The backfills asked for by these senders (the tag `launch_backfill` gives them)."""
    return [b for b in instance.get_backfills() if b.tags.get(TAG) in senders]


def test_another_site_in_chromium_cannot_launch_a_backfill(
    ui: UI, page: Page, backfills: DagsterInstance
) -> None:
    """Every request the other site's page makes Chromium send is refused before Dagster sees
    it, and the page learns nothing. Control: the same mutation and WebSocket from the UI's own
    origin, in the same browser, do work (so the mutation is valid and the refusals are the
    wrapper's, for the origin)."""
    queries = {sender: launch_backfill(sender) for sender in ATTACKS}
    queries["websocket"] = SUBSCRIPTION
    site = AnotherSite(
        ATTACK_PAGE.replace("__UI__", json.dumps(ui.url)).replace(
            "__QUERIES__", json.dumps(queries)
        )
    )
    wire = Wire(page.context.new_cdp_session(page))
    socket_errors: list[str] = []
    page.on(
        "websocket",
        lambda socket: socket.on("socketerror", lambda error: socket_errors.append(error)),
    )
    graphql = ui.url + "/graphql"
    foreign_post = f"refused: a POST from Origin '{site.origin}' to Host '127.0.0.1:{ui.port}'"
    try:
        page.goto(site.origin + "/")
        seen = page.wait_for_function("window.outcomes").json_value()
        for form in ("form-plain", "form-urlencoded"):
            answer = page.frame_locator(f"iframe[name='{form}']").locator("body")
            expect(answer).to_contain_text(foreign_post, timeout=TIMEOUT_MS)
    finally:
        site.stop()

    def sent() -> dict[str, list[tuple[str, str | None, str | None, int | None]]]:
        """Each request that went out on the wire: method, Content-Type, Origin, answer."""
        return {
            sender: [
                (e.method, e.headers.get("content-type"), e.headers.get("origin"), e.status)
                for e in wire.to(graphql)
                if e.carries(sender) and e.headers is not None
            ]
            for sender in ATTACKS
        }

    until(
        page,
        lambda: all(any(status for *_, status in requests) for requests in sent().values()),
        "Chromium's log of the answers to the other site's requests",
    )
    form, text = "application/x-www-form-urlencoded", "text/plain;charset=UTF-8"
    assert sent() == {
        "img": [("GET", None, None, 403)],
        "form-plain": [("POST", "text/plain", site.origin, 403)],
        "form-urlencoded": [("POST", form, site.origin, 403)],
        # A no-cors fetch may not send a JSON Content-Type: Chromium sent text/plain.
        "fetch-no-cors": [("POST", text, site.origin, 403)],
        "fetch-simple": [("POST", text, site.origin, 403)],
        # Only the preflight: refused, so Chromium never sent the POST itself.
        "fetch-json": [("OPTIONS", None, site.origin, 403)],
    }
    (image,) = [e for e in wire.to(graphql) if e.carries("img")]
    assert wire.answer(image) == "refused: a GraphQL mutation must be a POST\n"
    (no_cors,) = [e for e in wire.to(graphql) if e.carries("fetch-no-cors")]
    assert wire.answer(no_cors) == foreign_post + "\n"
    # What the other site's page could tell: nothing but failures.
    assert seen == {
        "img": "error",
        "fetch-no-cors": "opaque 0",  # the answer is hidden from the page
        "fetch-simple": "rejected TypeError",
        "fetch-json": "rejected TypeError",
        "websocket": "closed 1006",  # refused before it opened: no message was received
    }
    # Chromium: "Error during WebSocket handshake: Unexpected response code: 403".
    assert socket_errors and all("403" in error for error in socket_errors), socket_errors
    assert tagged(backfills, *ATTACKS) == []

    # Control: the same mutation and WebSocket from a page of the UI itself.
    page.goto(ui.url + "/server_info")
    status, answer = page.evaluate(OWN_FETCH, launch_backfill("own-origin"))
    launched = answer["data"]["launchPartitionBackfill"]
    assert status == 200 and launched["__typename"] == "LaunchBackfillSuccess", answer
    assert [b.backfill_id for b in tagged(backfills, "own-origin")] == [launched["backfillId"]]
    assert page.evaluate(OWN_WEBSOCKET) == "connection_ack"


def test_a_backfill_launched_through_the_ui_in_chromium(
    ui: UI, page: Page, backfills: DagsterInstance
) -> None:
    """The wrapped UI's own pages work in a browser: from the front page, through the catalog,
    to telemetry_daily's Materialize… dialog, three dates typed as a range, Launch backfill;
    the UI reports the backfill, and it is in the instance as asked."""
    today = datetime.now(UTC).date()
    dates = [(today - timedelta(days=days)).isoformat() for days in (4, 3, 2)]
    page.goto(ui.url + "/")
    page.get_by_role("link", name="Catalog").click()
    page.get_by_role("link", name="telemetry_daily").click()
    page.get_by_role("button", name="Materialize…").click()
    dialog = page.get_by_role("dialog")
    partitions = dialog.get_by_role("textbox")
    partitions.fill(f"[{dates[0]}...{dates[-1]}]")
    partitions.press("Enter")
    expect(dialog).to_contain_text("3 partitions", timeout=TIMEOUT_MS)
    with page.expect_response(lambda answer: "op=LaunchPartitionBackfill" in answer.url) as launch:
        dialog.get_by_role("button", name="Launch backfill").click()
    answer = launch.value
    assert answer.status == 200
    backfill_id = answer.json()["data"]["launchPartitionBackfill"]["backfillId"]
    expect(page.get_by_text("Created backfill")).to_contain_text(backfill_id, timeout=TIMEOUT_MS)

    backfill = backfills.get_backfill(backfill_id)
    assert backfill is not None and backfill.status is BulkActionStatus.REQUESTED
    assert backfill.asset_selection == [TELEMETRY_DAILY]
    assert backfill.tags.get("dagster/from_ui") == "true"
    assert backfill.asset_backfill_data is not None
    target = backfill.asset_backfill_data.get_target_partitions_subset(TELEMETRY_DAILY)
    assert list(target.get_partition_keys()) == dates
