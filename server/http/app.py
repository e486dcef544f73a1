"""The controller app: `create_app(settings)` builds it; its lifespan owns the controller.

`error_response` answers a domain error with the HTTP status its class declares
(`ERROR_STATUS`), for the controller, the monitor and the worker apps alike.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from kvctl import __version__
from kvctl.server import errors
from kvctl.server.config import ServerSettings
from kvctl.server.controller import Controller, open_state
from kvctl.server.http.limits import install_guards
from kvctl.server.http.metrics import install_request_metrics
from kvctl.server.http.routers import cache, cluster, events, lmcache
from kvctl.server.storage import StorageError
from kvctl.server.worker.runtime import WorkerRuntime

log = logging.getLogger("kvctl.server")


# derived from the classes (each declares its status): one table, never out of step
ERROR_STATUS: dict[type[errors.DomainError], int] = {
    cls: cls.http_status for cls in errors.ERRORS}


def status_of(exc: errors.DomainError) -> int:
    return exc.http_status


def error_response(exc: errors.DomainError | StorageError) -> JSONResponse:
    """The reply for a domain error (its status from `ERROR_STATUS`) or a storage failure
    (503). `kind` lets an HTTP transport raise the same error class on the other side."""
    if isinstance(exc, StorageError):
        return JSONResponse({"detail": str(exc), "kind": errors.StoreUnavailable.kind},
                            status_code=503)
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, errors.Busy) else None
    return JSONResponse({"detail": exc.detail, "kind": exc.kind}, status_code=status_of(exc),
                        headers=headers)


def describe_validation(exc: RequestValidationError) -> str:
    return describe_errors(exc.errors())


def describe_errors(errs: Any) -> str:
    """Pydantic's errors as one sentence (``where: what; ...``), the first few only."""
    parts = []
    for err in list(errs)[:10]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        parts.append(f"{where}: {err.get('msg')}")
    return "invalid request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    """Domain errors, storage failures and invalid bodies, as JSON (body size, host and
    token checks are `kvctl.server.http.limits.install_guards`)."""

    @app.exception_handler(errors.DomainError)
    async def _domain_error(_: Request, exc: errors.DomainError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StorageError)
    async def _storage_error(_: Request, exc: StorageError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": describe_validation(exc)}, status_code=422)



def create_app(settings: ServerSettings | None = None, runtime: WorkerRuntime | None = None,
               self_url: str | None = None) -> FastAPI:
    """Build the controller.

    With ``settings.embedded_worker`` (the default) it runs one worker in-process, or uses
    ``runtime`` when given (shared with the engine); without, it only routes to workers that
    register. ``self_url`` is where other processes reach this app.
    """
    from kvctl.server.worker import app as worker_app

    settings = settings or ServerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = runtime is None and settings.embedded_worker
        rt = runtime if runtime is not None else (
            WorkerRuntime(settings) if settings.embedded_worker else None)
        app.state.runtime = rt
        ctl = Controller(settings, open_state(settings.state, settings.max_events,
                                              settings.event_retention_s),
                         rt, self_url=self_url)
        app.state.controller = ctl
        try:
            await ctl.start()
            yield
        finally:
            await ctl.close()
            if owned and rt is not None:
                rt.close()

    # No /docs or /redoc: FastAPI's pages load their JavaScript from a CDN, blank on an
    # offline machine. The API description is /openapi.json (README, "HTTP API").
    app = FastAPI(title="kvctl controller", version=__version__, lifespan=lifespan,
                  description="LMCache-compatible cache controller with tracked events.",
                  docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.include_router(cache.router)
    app.include_router(events.router)
    app.include_router(cluster.router)
    app.include_router(lmcache.router)
    # the embedded worker's command API, for other controllers that share this one's state
    app.include_router(worker_app.router)
    install_error_handlers(app)
    worker_app.install_ops(app)
    install_guards(app, settings)
    install_request_metrics(app, "controller")
    return app
