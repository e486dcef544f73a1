"""Guards every kvctl HTTP app wears (controller, monitor, worker, engine): one call,
``install_guards(app, settings)``.

* ``BodyLimit``: the body cap is enforced on the stream itself (and the request target is
  bounded too, so no route echoes a 100 KB path). ``Content-Length`` is
  checked first, but a chunked body has none, so every received chunk is counted and the
  request is answered 413 as soon as the count passes the cap; nothing past it is read.
* ``HostCheck``: a connection that arrived on a loopback address must name a loopback host
  (or one of ``allowed_hosts``). A web page whose DNS name was rebound to 127.0.0.1 sends
  its own name in ``Host`` and is refused, so a browser cannot be used to reach the API.
* ``BearerAuth`` (``auth.py``): with ``auth_token`` set, no request without it.
* ``RedactResponses`` (``redact.py``): no secret leaves in a response body.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from starlette.exceptions import HTTPException

from kvctl.server import redact

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
# Path plus query string: kvctl's longest is /events/<event id>; a longer target is refused
# (414) before a route could echo it back in a 404.
MAX_TARGET_BYTES = 512
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]", "localhost.localdomain"})


async def _answer(send: Send, status: int, detail: str,
                  headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when the body passes the cap: FastAPI reads bodies inside its
    exception middleware, which turns this into the 413 reply."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the {limit} B limit; send fewer tokens "
                              "per request")


class BodyTimeout(HTTPException):
    """Raised from ``receive`` when a body stalls longer than the body timeout."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(408, f"the request body stalled for {timeout_s:g} s; send it "
                              "without pausing")


class BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` by ``Content-Length`` or, for
    chunked bodies, by counting what arrives; answer 408 to a body that pauses longer than
    ``body_timeout_s`` (a slow-body client otherwise holds its request forever).
    ``max_passed`` is the most body bytes one request has handed to the app (tests read
    it): never more than ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 body_timeout_s: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout_s = body_timeout_s
        self.max_passed = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        target = len(scope.get("raw_path") or scope["path"].encode()) + len(
            scope.get("query_string", b""))
        if target > MAX_TARGET_BYTES:
            await _answer(send, 414, f"request target of {target} B exceeds the "
                                     f"{MAX_TARGET_BYTES} B limit")
            return
        length = _header(scope, b"content-length")
        if length is not None:
            if not length.strip().isdigit():
                await _answer(send, 400, f"invalid Content-Length {length[:40]!r}")
                return
            if int(length) > self.max_bytes:
                await _answer(send, 413, f"request body of {int(length)} B exceeds the "
                                         f"{self.max_bytes} B limit; send fewer tokens per "
                                         "request")
                return
        received = 0
        started = cut = body_done = False

        async def counted_receive() -> Message:
            nonlocal received, cut, body_done
            if body_done or self.body_timeout_s is None:
                message = await receive()  # after the body: waiting for a disconnect
            else:
                try:
                    message = await asyncio.wait_for(receive(), self.body_timeout_s)
                except TimeoutError:
                    cut = True
                    raise BodyTimeout(self.body_timeout_s) from None
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    cut = True
                    raise BodyTooLarge(self.max_bytes)
                self.max_passed = max(self.max_passed, received)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if cut:
                    # Otherwise the server drains the rest of the body to keep the
                    # connection alive: "close" makes it hang up instead.
                    headers = [(k, v) for k, v in message.get("headers", [])
                               if k.lower() != b"connection"]
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except (BodyTooLarge, BodyTimeout) as exc:
            # read outside the app's exception middleware: answer here
            if not started:
                await _answer(send, exc.status_code, str(exc.detail))


def _host_name(host: str) -> str:
    """``Host`` header value without its port, lower case (``[::1]:9000`` -> ``[::1]``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[:host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr.strip("[]")).is_loopback
    except ValueError:
        return False


class HostCheck:
    """ASGI middleware against DNS rebinding: on a loopback connection, ``Host`` must be a
    loopback name or address, or one of ``allowed_hosts``."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str] = ()) -> None:
        self.app = app
        # The machine's own name too: Debian maps it to 127.0.1.1, so local workers that
        # address this server by hostname arrive on loopback; a rebinding page cannot send
        # it (its Host is the attacker's domain).
        self.allowed = (LOOPBACK_NAMES | {socket.gethostname().lower()}
                        | {h.strip().lower() for h in allowed_hosts})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            server = scope.get("server") or ("", 0)
            if _is_loopback(str(server[0])):
                host = _host_name(_header(scope, b"host") or "")
                if host not in self.allowed and not _is_loopback(host):
                    if scope["type"] == "http":
                        await _answer(send, 421, (
                            f"Host {host[:100]!r} is not served here: this server listens on "
                            "loopback and answers only loopback names (DNS rebinding "
                            "protection); add the name to allowed_hosts to use it"))
                    return
        await self.app(scope, receive, send)


def install_guards(app: Any, settings: Any) -> None:
    """Wrap a FastAPI/Starlette ``app`` in every guard, configured from ``settings``
    (``max_body_bytes``, ``allowed_hosts``, ``auth_token``, and ``remote_url`` whose password
    is registered for redaction). Call once per app, before it starts."""
    from kvctl.server.http.auth import BearerAuth

    redact.install_logging()
    redact.register_url(settings.remote_url)
    # add_middleware puts the last one added outermost: Host, then the token, are checked
    # before a byte of the body is read
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes,
                       body_timeout_s=getattr(settings, "body_timeout_s", None))
    if settings.auth_token:
        app.add_middleware(BearerAuth, token=settings.auth_token)
    app.add_middleware(HostCheck, allowed_hosts=settings.allowed_hosts)
    app.add_middleware(redact.RedactResponses)
