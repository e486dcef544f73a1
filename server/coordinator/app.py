"""`create_coordinator_app(settings)`: LMCache's MP coordinator contract, served by kvctl.

`lmcache server --coordinator-url http://HOST:PORT` joins it unchanged: the routes, bodies
and status codes are upstream 0.5.6's (``/instances``, heartbeats, ``POST /events``,
``/directory/*``, ``/cache/*``). kvctl adds what upstream hides: per-instance ingest state
(``GET /instances/ingest``, ``/metrics``), bounds on everything, and access control:

- ingest routes (what a server calls: register, heartbeat, deregister, ``GET /instances``,
  ``POST /events``, ``/healthz``) cannot carry a token, since LMCache servers send none; they
  answer only peers on loopback or in ``coordinator_allow`` (addresses or networks), or
  a request that does carry the right token. Anyone else gets 403.
- operator routes (lookup, keys, stats, usage, pins, delete, prefetch, metrics) require
  ``--auth-token`` when one is set, like every other kvctl port.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from kvctl import __version__
from kvctl.server.config import ServerSettings
from kvctl.server.coordinator import routes
from kvctl.server.coordinator.store import open_store
from kvctl.server.http.limits import ASGIApp, BodyLimit, HostCheck, Receive, Scope, Send, _answer
from kvctl.server.http.limits import _header as header

log = logging.getLogger("kvctl.coordinator")

# what an MP server calls (it cannot send a token)
INGEST_ROUTES = {("POST", "/instances"), ("GET", "/instances"), ("POST", "/events"),
                 ("GET", "/healthz")}


def is_ingest(method: str, path: str) -> bool:
    if (method, path) in INGEST_ROUTES:
        return True
    parts = path.split("/")
    # PUT /instances/{id}/heartbeat, DELETE /instances/{id}
    return (len(parts) == 4 and parts[1] == "instances" and parts[3] == "heartbeat"
            and method == "PUT") or (len(parts) == 3 and parts[1] == "instances"
                                     and method == "DELETE")


def parse_allow(entries: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Networks from ``coordinator_allow`` (an address is a /32 or /128)."""
    nets = []
    for e in entries:
        try:
            nets.append(ipaddress.ip_network(e.strip(), strict=False))
        except ValueError:
            raise ValueError(f"coordinator_allow: {e!r} is not an IP address or network"
                             ) from None
    return nets


class CoordinatorAccess:
    """ASGI middleware: the access model in the module docstring."""

    def __init__(self, app: ASGIApp, token: str | None, allow: list[str]) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.allow = parse_allow(allow)

    def _token_ok(self, scope: Scope) -> bool:
        if self.token is None:
            return False
        scheme, _, value = (header(scope, b"authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(),
                                                                  self.token)

    def _peer_allowed(self, scope: Scope) -> bool:
        client = scope.get("client")
        if not client:  # in-process (ASGI transport): no network peer at all
            return True
        try:
            addr = ipaddress.ip_address(str(client[0]).strip("[]"))
        except ValueError:
            return False
        if getattr(addr, "ipv4_mapped", None):
            addr = addr.ipv4_mapped  # type: ignore[union-attr]
        return addr.is_loopback or any(addr in net for net in self.allow)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if is_ingest(scope["method"], scope["path"]):
            if self._peer_allowed(scope) or self._token_ok(scope):
                await self.app(scope, receive, send)
                return
            peer = (scope.get("client") or ("?",))[0]
            await _answer(send, 403, f"{peer} may not report to this coordinator: MP servers "
                                     "are accepted from loopback and from the addresses in "
                                     "coordinator_allow (kvctl serve --coordinator-allow)")
            return
        if self.token is None or self._token_ok(scope):
            await self.app(scope, receive, send)
            return
        await _answer(send, 401, "no bearer token or a wrong one: this coordinator requires "
                                 "authentication on its operator routes; pass --auth-token "
                                 "or set KVCTL_AUTH_TOKEN",
                      headers=[(b"www-authenticate", b'Bearer realm="kvctl"')])


class Coordinator:
    """What the routes share: the store, settings, the HTTP client for servers."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.store = open_store(settings.state, settings.coordinator_max_keys,
                                settings.coordinator_keep_token_ids,
                                prefix=f"{settings.remote_key_prefix}:")
        self.http: Any = None
        self.timeout_s = settings.coordinator_instance_timeout_s
        self.evicted = 0
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        import httpx

        self.http = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=3.0))
        self._sweeper = asyncio.create_task(self._sweep_loop())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self.http is not None:
            await self.http.aclose()
        await self.store.close()

    async def sweep(self, now: float | None = None) -> list[str]:
        """Deregister instances silent for longer than the timeout (their L1 is fenced)."""
        now = time.time() if now is None else now
        gone = []
        for inst in await self.store.instances():
            if now - inst.last_heartbeat > self.timeout_s:
                if await self.store.deregister(inst.instance_id):
                    log.warning("MP server %s sent no heartbeat for %.0f s; deregistered",
                                inst.instance_id, now - inst.last_heartbeat)
                    gone.append(inst.instance_id)
        self.evicted += len(gone)
        return gone

    async def _sweep_loop(self) -> None:
        interval = min(2.0, self.timeout_s / 4)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep()
            except Exception:  # a Redis outage must not end the loop
                log.warning("instance sweep failed", exc_info=True)


def new_instance_id() -> str:
    return f"mp-{uuid.uuid4().hex}"


def create_coordinator_app(settings: ServerSettings | None = None) -> FastAPI:
    """The coordinator app; its lifespan owns the state and the client for servers."""
    from kvctl.server.http.app import install_error_handlers

    settings = settings or ServerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        coord = Coordinator(settings)
        app.state.coordinator = coord
        try:
            await coord.start()
            yield
        finally:
            await coord.close()

    app = FastAPI(title="kvctl coordinator", version=__version__, lifespan=lifespan,
                  description="LMCache MP coordinator (registry, key directory, pins, "
                              "delete, prefetch) with shared state and ingest accounting.",
                  docs_url=None, redoc_url=None)
    app.state.settings = settings
    for r in routes.routers:
        app.include_router(r)
    install_error_handlers(app)
    from kvctl.server import redact

    redact.install_logging()
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(CoordinatorAccess, token=settings.auth_token,
                       allow=settings.coordinator_allow)
    app.add_middleware(HostCheck, allowed_hosts=settings.allowed_hosts)
    app.add_middleware(redact.RedactResponses)
    return app
