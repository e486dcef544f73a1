"""`kvctl serve`: controller, monitor and engine as uvicorn servers in one process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Iterator

from fastapi import FastAPI, Request, Response

from kvctl.server.app import create_app
from kvctl.server.auth import check_exposure, is_loopback
from kvctl.server.config import ServerSettings
from kvctl.server.limits import install_guards
from kvctl.server.routers import events
from kvctl.server.worker import WorkerRuntime

log = logging.getLogger("kvctl.server")


def create_monitor_app(runtime: WorkerRuntime) -> FastAPI:
    """Read-only views for dashboards and scrapers: metrics and events."""
    from prometheus_client import CONTENT_TYPE_LATEST

    from kvctl.server.metrics import render_metrics

    app = FastAPI(title="kvctl monitor")
    app.state.runtime = runtime
    install_guards(app, runtime.settings)
    app.include_router(events.router)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        body = await asyncio.to_thread(render_metrics, runtime)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

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


def run_stack(settings: ServerSettings, access_log: bool = False) -> None:
    """Serve until SIGINT/SIGTERM. Raises OSError for a port that cannot be bound."""
    import uvicorn

    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)

    check_exposure(settings.host, settings.auth_token, settings.insecure)
    if not settings.auth_token and not is_loopback(settings.host):
        log.warning("binding %s with --insecure: the API has no authentication; anyone who "
                    "can reach this address can read and delete cached KV", settings.host)
    runtime = WorkerRuntime(settings)
    plan: list[tuple[str, FastAPI, socket.socket]] = []
    try:
        plan.append(("controller", create_app(settings, runtime=runtime),
                     _bind(settings.host, settings.port, "controller")))
        if settings.monitor_port is not None:
            plan.append(("monitor", create_monitor_app(runtime),
                         _bind(settings.host, settings.monitor_port, "monitor")))
        if settings.model != "none":
            from kvctl.server.engine import create_engine_app

            plan.append(("engine", create_engine_app(runtime, settings.model),
                         _bind(settings.host, settings.engine_port, "engine")))
    except OSError:
        for _, _, s in plan:
            s.close()
        runtime.close()
        raise

    servers = []
    for name, app, sock in plan:
        # uvicorn's own start/stop lines repeat once per server; ours name each URL once.
        config = uvicorn.Config(app, log_level="info" if access_log else "warning",
                                access_log=access_log,
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
        print("kvctl serve: press Ctrl-C to stop", file=sys.stderr, flush=True)
        await asyncio.gather(*(srv.serve(sockets=[sock]) for _, srv, sock in servers))

    try:
        asyncio.run(main())
    finally:
        runtime.close()
