"""`kvctl serve` and `kvctl worker`: uvicorn servers (and a heartbeat) in one process each."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from fastapi import FastAPI

from kvctl.server.config import ServerSettings
from kvctl.server.http.app import create_app, install_error_handlers
from kvctl.server.http.auth import check_exposure, client_headers, is_loopback
from kvctl.server.http.limits import install_guards
from kvctl.server.http.metrics import install_request_metrics
from kvctl.server.http.routers import cluster, events
from kvctl.server.worker.runtime import WorkerRuntime

log = logging.getLogger("kvctl.server")


def create_monitor_app(controller_app: FastAPI) -> FastAPI:
    """Where workers register (`controller_url` in their config) and dashboards read.

    It serves the controller app's controller: events, workers, health, metrics.
    """
    app = FastAPI(title="kvctl monitor", docs_url=None, redoc_url=None)
    app.state.parent = controller_app
    install_guards(app, controller_app.state.settings)
    # one histogram with the controller's: both are the controller, on two ports
    install_request_metrics(app, "monitor", controller_app.state.request_metrics)
    app.include_router(events.router)
    app.include_router(cluster.router)
    install_error_handlers(app)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _bind(host: str, port: int, what: str) -> socket.socket:
    """Bind early so a busy port is one clear message, before the model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit this. Without it, a response written in two parts waits for
    # the client's delayed ACK: 40 ms per request on a keep-alive connection.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        flag = "--port" if what == "controller" else f"--{what}-port"
        raise OSError(f"cannot listen on {host}:{port} for the {what}: {exc.strerror}; "
                      f"pick another port ({flag})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _port(sock: socket.socket) -> int:
    return sock.getsockname()[1]


@contextlib.contextmanager
def _no_signal_capture() -> Iterator[None]:
    yield


def _url(host: str, sock: socket.socket) -> str:
    return f"http://{host}:{_port(sock)}"


def _check_exposure(settings: ServerSettings) -> None:
    """Refuse a non-loopback address without a token (unless --insecure); warn if insecure."""
    check_exposure(settings.host, settings.auth_token, settings.insecure)
    if not settings.auth_token and not is_loopback(settings.host):
        log.warning("binding %s with --insecure: the API has no authentication; anyone who "
                    "can reach this address can read and delete cached KV", settings.host)


def _torch_threads(settings: ServerSettings) -> None:
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)


def run_stack(settings: ServerSettings, access_log: bool = False) -> None:
    """`kvctl serve`: the controller (with its embedded worker unless disabled), the monitor
    and the engine. Serves until SIGINT/SIGTERM. Raises OSError for a port that cannot be
    bound, StateUnavailable for a state Redis that cannot be reached."""
    _torch_threads(settings)
    _check_exposure(settings)
    _check_state(settings)
    socks: list[tuple[str, socket.socket]] = []
    try:
        socks.append(("controller", _bind(settings.host, settings.port, "controller")))
        if settings.monitor_port is not None:
            socks.append(("monitor", _bind(settings.host, settings.monitor_port, "monitor")))
        if settings.coordinator_port is not None:
            socks.append(("coordinator", _bind(settings.host, settings.coordinator_port,
                                               "coordinator")))
        serve_engine = settings.model != "none" and settings.embedded_worker
        if serve_engine:
            socks.append(("engine", _bind(settings.host, settings.engine_port, "engine")))
    except OSError:
        for _, sk in socks:
            sk.close()
        raise
    # ports chosen by the OS (0) are known only now; the worker registers with real ones
    settings = settings.model_copy(update={"port": _port(socks[0][1]),
                                           "engine_port": _port(socks[-1][1]) if serve_engine
                                           else settings.engine_port})
    runtime = WorkerRuntime(settings) if settings.embedded_worker else None
    controller_app = create_app(settings, runtime=runtime,
                                self_url=_url(settings.public_host, socks[0][1]))
    apps: dict[str, FastAPI] = {"controller": controller_app}
    if settings.monitor_port is not None:
        apps["monitor"] = create_monitor_app(controller_app)
    if settings.coordinator_port is not None:
        from kvctl.server.coordinator.app import create_coordinator_app

        apps["coordinator"] = create_coordinator_app(settings)
    if serve_engine:
        from kvctl.server.engine.core import create_engine_app

        apps["engine"] = create_engine_app(runtime, settings.model)  # type: ignore[arg-type]
    try:
        serve_apps([(name, apps[name], sk) for name, sk in socks], access_log,
                   header_timeout_s=settings.header_timeout_s)
    finally:
        if runtime is not None:
            runtime.close()


def _check_state(settings: ServerSettings) -> None:
    """One clear error at start for a state Redis that is not there."""
    if not settings.state:
        return
    from kvctl.server.controller import RedisState

    async def ping() -> None:
        st = RedisState(settings.state, settings.max_events, settings.event_retention_s)
        try:
            await st.ping()
        finally:
            await st.close()

    asyncio.run(ping())


def run_worker(settings: ServerSettings, access_log: bool = False) -> None:
    """`kvctl worker`: one instance (store, codec pool, engine unless model is none) that
    registers with the controller(s) of its config and heartbeats until SIGINT/SIGTERM."""
    from kvctl.server.worker.app import create_worker_app

    _torch_threads(settings)
    _check_exposure(settings)
    urls = settings.controller_urls
    if not urls:
        raise ValueError("a worker needs its controller's address: set controller_url (the "
                         "controller's monitor port, host:port) in the config or pass "
                         "--controller")
    port = settings.worker_port
    socks = [("worker", _bind(settings.host, port if port is not None else 0, "worker"))]
    try:
        if settings.model != "none":
            socks.append(("engine", _bind(settings.host, settings.engine_port, "engine")))
    except OSError:
        socks[0][1].close()
        raise
    host = advertised_host(settings, urls[0])
    runtime = WorkerRuntime(settings)
    worker_app = create_worker_app(runtime)
    plan: list[tuple[str, FastAPI, socket.socket]] = [("worker", worker_app, socks[0][1])]
    engine_url = None
    if settings.model != "none":
        from kvctl.server.engine.core import create_engine_app

        plan.append(("engine", create_engine_app(runtime, settings.model), socks[1][1]))
        engine_url = _url(host, socks[1][1])
    beat = Heartbeat(runtime, urls, _url(host, socks[0][1]), engine_url,
                     settings.heartbeat_interval_s)
    worker_app.state.heartbeat = beat  # its liveness counters, on the worker's /metrics
    try:
        serve_apps(plan, access_log, background=beat.run, on_stop=beat.deregister,
                   header_timeout_s=settings.header_timeout_s)
    finally:
        runtime.close()


WILDCARDS = ("0.0.0.0", "::", "")


def advertised_host(settings: ServerSettings, controller: str) -> str:
    """The host a worker registers under: ``advertise_host``; else ``--host`` unless it is
    a wildcard; else this machine's address on the route to the controller (the address
    the controller sees it at), so a worker bound to 0.0.0.0 is reachable as registered."""
    if settings.advertise_host:
        return settings.advertise_host
    if settings.host not in WILDCARDS:
        return settings.host
    from urllib.parse import urlsplit

    target = urlsplit(controller)
    family = socket.AF_INET6 if settings.host == "::" else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((target.hostname or "127.0.0.1", target.port or 80))  # no packet
            host = probe.getsockname()[0]
    except OSError:
        host = "127.0.0.1" if family == socket.AF_INET else "::1"
    log.info("listening on %s: registering as %s, this machine's address towards %s (set "
             "advertise_host to register another)", settings.host or "*", host, controller)
    return f"[{host}]" if ":" in host else host


class Heartbeat:
    """A worker's side of the registry: register, renew, re-register after an outage.

    The worker keeps serving its engine whatever happens here; only the controller's view of
    it depends on these calls.
    """

    def __init__(self, runtime: WorkerRuntime, controllers: list[str], url: str,
                 engine_url: str | None, interval_s: float) -> None:
        self.runtime = runtime
        self.controllers = controllers
        self.url = url
        self.engine_url = engine_url
        self.interval_s = interval_s
        self.registered_with: str | None = None
        # this worker's credential for its instance, issued by the controller at
        # registration and proven on every heartbeat (see Controller.heartbeat)
        self.lease: str | None = None
        self._refused: str | None = None
        self.beats_ok = 0  # for /metrics
        self.beats_failed = 0

    async def run(self) -> None:
        import httpx

        # one token for the cluster: the worker presents its own to the controller
        headers = client_headers(self.runtime.settings.auth_token)
        async with httpx.AsyncClient(timeout=httpx.Timeout(3.0, connect=1.0),
                                     headers=headers) as http:
            while True:
                try:
                    await self.beat(http)
                except Exception:  # never let the loop die: the engine must keep serving
                    log.exception("heartbeat failed")
                await asyncio.sleep(self.interval_s)

    async def deregister(self) -> None:
        """Tell the controller this worker is stopping, so it is shown dead at once (and
        not alive until dead_after_s has passed). Best effort: a controller that does not
        answer within a second learns it from the missing heartbeats instead."""
        import httpx

        base = self.registered_with
        if base is None:
            return
        headers = client_headers(self.runtime.settings.auth_token)
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(1.0),
                                         headers=headers) as http:
                r = await http.post(base + "/workers/deregister",
                                    json={"instance_id": self.runtime.instance_id,
                                          "url": self.url, "lease": self.lease})
            if r.status_code == 200:
                log.info("instance %s deregistered from the controller at %s",
                         self.runtime.instance_id, base)
                return
            why = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            why = type(exc).__name__
        log.warning("could not deregister from %s (%s); it will see the worker dead after "
                    "its heartbeats stop", base, why)

    async def beat(self, http: Any) -> None:
        import httpx

        info = await asyncio.to_thread(self.runtime.info)
        body = {"instance_id": self.runtime.instance_id, "worker_id": self.runtime.worker_id,
                "url": self.url, "engine_url": self.engine_url,
                "chunk_size": info["chunk_size"], "locations": info["locations"],
                "error_code": info["error_code"], "pid": os.getpid(), "lease": self.lease}
        path = "/workers/heartbeat" if self.registered_with else "/workers/register"
        # the controller we are registered with first, then the others sharing its state
        order = sorted(self.controllers, key=lambda u: u != self.registered_with)
        errors = []
        for base in order:
            try:
                r = await http.post(base + path, json=body)
            except httpx.HTTPError as exc:
                errors.append(f"{base}: {type(exc).__name__}")
                continue
            if r.status_code == 409:
                # the instance id is another live worker's: say so once, keep trying (it is
                # ours once that one is dead or deregistered)
                detail = r.text[:300]
                if self._refused != detail:
                    log.warning("the controller at %s refuses this worker: %s", base, detail)
                    self._refused = detail
                self.registered_with = None
                return
            if r.status_code != 200:
                errors.append(f"{base}: HTTP {r.status_code} {r.text[:200]}")
                continue
            reply = r.json()
            self._refused = None
            self.lease = reply.get("lease") or self.lease
            self.interval_s = float(reply.get("heartbeat_interval_s", self.interval_s))
            if self.registered_with != base:
                log.info("instance %s registered with the controller at %s",
                         self.runtime.instance_id, base)
            self.registered_with = base
            self.beats_ok += 1
            return
        self.beats_failed += 1
        if self.registered_with is not None or not errors:
            log.warning("no controller reachable (%s); still serving, will register again "
                        "when one answers", "; ".join(errors))
        self.registered_with = None


async def _freeze_heap(apps: list[FastAPI]) -> None:
    """Move what start-up allocated (torch, transformers, the model) out of the collector's
    reach, now and again once an engine has loaded its model.

    Otherwise every full collection walks those millions of long-lived objects while holding
    the interpreter lock: measured as request stalls of hundreds of milliseconds.
    """
    gc.collect()
    gc.freeze()
    for app in apps:
        ready = getattr(app.state, "ready", None)
        if ready is not None:
            await asyncio.to_thread(ready.wait)
            gc.collect()
            gc.freeze()


def serve_apps(plan: list[tuple[str, FastAPI, socket.socket]], access_log: bool,
               background: Callable[[], Awaitable[None]] | None = None,
               on_stop: Callable[[], Awaitable[None]] | None = None,
               header_timeout_s: float = 10.0) -> None:
    """Run uvicorn servers (and a background coroutine) in one loop until SIGINT/SIGTERM;
    then ``on_stop`` runs, once the background coroutine has been cancelled."""
    import uvicorn

    from kvctl.server.http.protocol import guarded_protocol

    protocol = guarded_protocol(header_timeout_s)
    servers = []
    for name, app, sock in plan:
        # uvicorn's own start/stop lines repeat once per server; ours name each URL once.
        config = uvicorn.Config(app, log_level="info" if access_log else "warning",
                                access_log=access_log, http=protocol,
                                timeout_graceful_shutdown=5)
        server = uvicorn.Server(config)
        # One process-wide handler stops every server; uvicorn's own would stop only one.
        server.capture_signals = _no_signal_capture  # type: ignore[method-assign]
        servers.append((name, server, sock))

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def stop() -> None:
            for _, srv, _ in servers:
                if srv.should_exit:
                    srv.force_exit = True
                srv.should_exit = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        for name, _, sock in servers:
            host, port = sock.getsockname()[:2]
            print(f"kvctl {name:<10} http://{host}:{port}", file=sys.stderr, flush=True)
        print("kvctl: press Ctrl-C to stop", file=sys.stderr, flush=True)
        tasks = [asyncio.create_task(_freeze_heap([app for _, app, _ in plan]))]
        if background:
            tasks.append(asyncio.create_task(background()))
        try:
            await asyncio.gather(*(srv.serve(sockets=[sock]) for _, srv, sock in servers))
        finally:
            for t in tasks:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            if on_stop is not None:
                await on_stop()

    try:
        import uvloop  # libuv's loop: less CPU per request than asyncio's own
    except ImportError:  # pragma: no cover - a dependency; absent on Windows
        asyncio.run(main())
    else:
        uvloop.run(main())
