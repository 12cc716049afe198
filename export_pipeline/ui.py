"""Dagster's UI, refusing what another web page can make a browser send.

dagster-webserver has no login and no cross-site request checks: it executes a GraphQL mutation
sent as a GET (what an `<img src>` on any page sends) or as a form POST, so any page its user
opens could launch runs or wipe the export record, and binding to 127.0.0.1 does not help (the
user's own browser sends the request). `python -m export_pipeline.ui` takes dagster-webserver's
own arguments (`--read-only`, `-h`, `-p`, `-w`/`-m`) and serves its app behind `SameOriginOnly`:

- every request's Host must be one of UI_ALLOWED_HOSTS (a DNS-rebinding page names its own);
- a change (any method but GET, HEAD and OPTIONS) needs a JSON body, which a form cannot send
  and a foreign `fetch` cannot without a preflight, and an Origin (or, without one, a Referer)
  of this very host and port;
- a GET to the GraphQL endpoint may only read: a mutation or a subscription is refused;
- the GraphQL WebSocket (subscriptions) needs an Origin of this host and port.

A script that calls the GraphQL API sends `Origin: http://<the host it calls>` and a JSON body.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

import graphql

from export_pipeline.settings import load_env_file, parse_ui_hosts

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

READS = frozenset({"GET", "HEAD", "OPTIONS"})
JSON = "application/json"
_DEFAULT_PORTS = {"http": ":80", "https": ":443"}
_SHOWN = 120  # characters of a refused header value repeated in a message

log = logging.getLogger(__name__)


def _shown(value: str) -> str:
    return repr(value if len(value) <= _SHOWN else value[:_SHOWN] + "…")


def hostname(host: str) -> str:
    """The name in a Host header, without its port (`[::1]:3000` -> `[::1]`)."""
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0]


def _netloc(url: str) -> str:
    """An Origin's or Referer's host and port as a Host header carries them (the scheme's
    default port left out); empty for `null` or anything unparsable."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return ""
    netloc = parts.netloc.lower()
    default = _DEFAULT_PORTS.get(parts.scheme, "")
    return netloc.removesuffix(default) if default else netloc


def _graphql_writes(query_string: str) -> str | None:
    """Why a GET's GraphQL document is not a plain read, or None when it is (or has none)."""
    documents = parse_qs(query_string).get("query", [])
    for text in documents:
        try:
            document = graphql.parse(text)
        except graphql.GraphQLError:
            return "its GraphQL query does not parse"
        for definition in document.definitions:
            if isinstance(definition, graphql.OperationDefinitionNode) and (
                definition.operation is not graphql.OperationType.QUERY
            ):
                return f"a GraphQL {definition.operation.value} must be a POST"
    return None


def refusal(
    *,
    kind: str,
    method: str,
    path: str,
    query_string: str,
    headers: Mapping[str, str],
    allowed_hosts: Iterable[str],
) -> str | None:
    """Why this request is refused, or None to serve it. `kind` is the ASGI scope's type
    (`http` or `websocket`); `headers` lowercase names to values."""
    host = headers.get("host", "").lower()
    if hostname(host) not in set(allowed_hosts):
        return f"Host {_shown(host)} is not one of UI_ALLOWED_HOSTS"
    own = host.removesuffix(":80").removesuffix(":443")
    origin = headers.get("origin")
    if kind == "websocket":
        if origin is None or _netloc(origin) != own:
            return f"a WebSocket from Origin {_shown(origin or '(none)')} to Host {_shown(host)}"
        return None
    if method in READS:
        if origin is not None and _netloc(origin) != own and method == "OPTIONS":
            return f"a preflight from Origin {_shown(origin)} to Host {_shown(host)}"
        if path.rstrip("/").endswith("/graphql"):
            return _graphql_writes(query_string)
        return None
    source = origin if origin is not None else headers.get("referer")
    if source is None:
        return f"a {method} without Origin or Referer (a script sends Origin: http://{host})"
    if _netloc(source) != own:
        which = "Origin" if origin is not None else "Referer"
        return f"a {method} from {which} {_shown(source)} to Host {_shown(host)}"
    media_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != JSON:
        return f"a {method} of {_shown(media_type or '(no type)')}: only {JSON} is accepted"
    return None


class SameOriginOnly:
    """ASGI middleware: `refusal` decides; a refused HTTP request gets 403 and the reason, a
    refused WebSocket is closed before it is accepted (the browser sees 403)."""

    def __init__(self, app: App, allowed_hosts: Iterable[str]) -> None:
        self.app = app
        self.allowed_hosts = frozenset(allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in scope.get("headers", [])
        }
        reason = refusal(
            kind=scope["type"],
            method=scope.get("method", "GET"),
            path=scope.get("path", ""),
            query_string=scope.get("query_string", b"").decode("latin-1"),
            headers=headers,
            allowed_hosts=self.allowed_hosts,
        )
        if reason is None:
            await self.app(scope, receive, send)
            return
        log.warning("refused %s %s: %s", scope["type"], _shown(scope.get("path", "")), reason)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = f"refused: {reason}\n".encode()
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def main() -> None:
    """dagster-webserver's command line, its app wrapped in `SameOriginOnly`. The wrap goes
    through the one function dagster-webserver's CLI builds its app with (pinned by
    `test_ui.py`)."""
    import dagster_webserver.cli as webserver_cli

    load_env_file()
    hosts = parse_ui_hosts(os.environ)
    build = webserver_cli.create_app_from_workspace_process_context

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return SameOriginOnly(build(*args, **kwargs), hosts)

    webserver_cli.create_app_from_workspace_process_context = wrapped
    webserver_cli.main()


if __name__ == "__main__":
    main()
