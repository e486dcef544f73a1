"""The controller app: `create_app(settings)` builds it; its lifespan owns the worker runtime."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from kvctl import __version__
from kvctl.server.config import ServerSettings
from kvctl.server.limits import install_guards
from kvctl.server.routers import cache, cluster, events
from kvctl.server.storage import StorageError
from kvctl.server.worker import RequestError, WorkerRuntime

log = logging.getLogger("kvctl.server")

MAX_BODY_BYTES = 64 * 1024 * 1024


def describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        parts.append(f"{where}: {err.get('msg')}")
    return "invalid request: " + "; ".join(parts)


def create_app(settings: ServerSettings | None = None, runtime: WorkerRuntime | None = None
               ) -> FastAPI:
    """Build the controller. Pass ``runtime`` to share one worker with the engine."""
    settings = settings or ServerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = runtime is None
        app.state.runtime = runtime or WorkerRuntime(settings)
        try:
            yield
        finally:
            if owned:
                app.state.runtime.close()

    # No /docs or /redoc: FastAPI's pages load their JavaScript from a CDN, blank on an
    # offline machine. The API description is /openapi.json (README, "HTTP API").
    app = FastAPI(title="kvctl controller", version=__version__, lifespan=lifespan,
                  description="LMCache-compatible cache controller with tracked events.",
                  docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.include_router(cache.router)
    app.include_router(events.router)
    app.include_router(cluster.router)
    install_guards(app, settings)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(StorageError)
    async def _storage_error(_: Request, exc: StorageError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": describe_validation(exc)}, status_code=422)

    @app.middleware("http")
    async def _limit_body(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return JSONResponse({"detail": f"request body of {length} B exceeds the "
                                           f"{MAX_BODY_BYTES} B limit; send fewer tokens"},
                                status_code=413)
        return await call_next(request)

    return app
