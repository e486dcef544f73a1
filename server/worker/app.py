"""A worker's command API over HTTP: what the controller's `HttpTransport` talks to.

Mounted by `kvctl worker` (on `lmcache_worker_port`) and, for the embedded worker, by
`kvctl serve` itself, so that other controllers sharing its state can reach that worker too.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from kvctl.server.chunks import check_chunk_key
from kvctl.server.controller.transport import CHECKSUM_HEADER, NUM_TOKENS_HEADER, InProcessTransport
from kvctl.server.errors import (
    BadRequest,
    DomainError,
    TooLarge,
    UnknownInstance,
    UnknownMethod,
)
from kvctl.server.http.app import describe_errors, error_response
from kvctl.server.http.limits import ASGIApp, Receive, Scope, Send
from kvctl.server.http.metrics import ROUTE_KEY
from kvctl.server.http.schemas import WORKER_COMMANDS
from kvctl.server.storage import StorageError
from kvctl.server.worker.ops import WORKER_OPS
from kvctl.server.worker.runtime import WorkerRuntime

router = APIRouter(prefix="/worker", tags=["worker"], include_in_schema=False)

MAX_CHUNK_BYTES = 256 * 1024 * 1024


def _transport(request: Request) -> InProcessTransport:
    rt: WorkerRuntime | None = getattr(request.app.state, "runtime", None)
    if rt is None:
        raise UnknownInstance("this controller runs no worker of its own")
    return InProcessTransport(rt, str(request.base_url))


class WorkerOps:
    """ASGI middleware serving ``POST /worker/ops/{op}``: the controller's commands to this
    worker, on every routed request of a cluster (one per /compress, one per worker per
    /lookup, one per read of a running event).

    A plain ASGI handler: body in, `WORKER_OPS` call, JSON out, errors through the same
    `error_response` as the apps' handlers. FastAPI's routing, dependency solving and
    exception middleware were almost a third of the cheapest command (the worker's median
    time for ``events`` under the cluster benchmark: 0.61 ms through FastAPI, 0.42 ms
    here), on the path of every acknowledgement a controller gives. Installed inside the
    guards (host, token, body cap, redaction), so they hold here too.
    """

    PREFIX = "/worker/ops/"

    def __init__(self, app: ASGIApp, owner: Any) -> None:
        self.app = app
        self.owner = owner  # the FastAPI app whose state holds the runtime
        self._transport: InProcessTransport | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.PREFIX):
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            await JSONResponse({"detail": "Method Not Allowed"}, status_code=405,
                               headers={"Allow": "POST"})(scope, receive, send)
            return
        body = await _read_all(receive)
        if body is None:  # the client went away
            return
        op = scope["path"][len(self.PREFIX):]
        # the request histogram's route: known commands by name, the rest as one
        scope[ROUTE_KEY] = self.PREFIX + (op if op in WORKER_OPS else "{op}")
        try:
            result = await self._run(op, body)
        except (DomainError, StorageError) as exc:
            response = error_response(exc)
        except ValidationError as exc:
            # the controller's own schemas, the controller's own answer: 422 and what to fix
            response = JSONResponse({"detail": describe_errors(exc.errors()),
                                     "kind": BadRequest.kind}, status_code=422)
        else:
            response = JSONResponse(result)
        await response(scope, receive, send)

    async def _run(self, op: str, raw: bytes) -> Any:
        if op not in WORKER_OPS:
            raise UnknownMethod(f"unknown worker command {op[:100]!r}; known: "
                                f"{', '.join(WORKER_OPS)}")
        # parsed and checked exactly as the controller checks the same request (nesting
        # depth, token ids, names, keys): ValidationError -> 422
        body = WORKER_COMMANDS[op].model_validate_json(raw).model_dump()
        rt: WorkerRuntime | None = getattr(self.owner.state, "runtime", None)
        if rt is None:
            raise UnknownInstance("this controller runs no worker of its own")
        if self._transport is None or self._transport.runtime is not rt:
            self._transport = InProcessTransport(rt, "")
        try:
            return await self._transport.call(op, body)
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequest(f"malformed {op} command: {type(exc).__name__}: {exc}") from None


async def _read_all(receive: Receive) -> bytes | None:
    """The whole request body (the body cap is enforced on ``receive`` by `BodyLimit`);
    None if the client disconnected first."""
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


def install_ops(app: FastAPI) -> None:
    """Serve the worker command API of ``app``'s runtime (``app.state.runtime``). Call
    before `install_guards`, so that the guards wrap it."""
    app.add_middleware(WorkerOps, owner=app)


def _key(key: str) -> str:
    try:
        return check_chunk_key(key)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


@router.get("/chunks/{location}/{key}")
async def get_chunk(location: str, key: str, request: Request) -> Response:
    blob, ntok, digest = await _transport(request).get_chunk(location, _key(key))
    return Response(blob, media_type="application/octet-stream",
                    headers={NUM_TOKENS_HEADER: str(ntok), CHECKSUM_HEADER: digest})


async def _read_body(request: Request, limit: int) -> bytes:
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise TooLarge(f"chunk body exceeds {limit} B")
        parts.append(part)
    return b"".join(parts)


@router.put("/chunks/{location}/{key}")
async def put_chunk(location: str, key: str, request: Request) -> dict[str, Any]:
    key = _key(key)
    try:
        ntok = int(request.headers[NUM_TOKENS_HEADER])
        digest = request.headers[CHECKSUM_HEADER]
    except (KeyError, ValueError):
        raise BadRequest(f"a chunk needs the {NUM_TOKENS_HEADER} (integer) and "
                         f"{CHECKSUM_HEADER} headers") from None
    blob = await _read_body(request, MAX_CHUNK_BYTES)
    got = await _transport(request).put_chunk(location, key, blob, ntok, digest)
    return {"checksum": got, "bytes": len(blob)}


def create_worker_app(runtime: WorkerRuntime) -> FastAPI:
    """The HTTP app of a `kvctl worker` process."""
    from kvctl import __version__
    from kvctl.server.http.app import install_error_handlers
    from kvctl.server.http.limits import install_guards
    from kvctl.server.http.metrics import install_request_metrics

    app = FastAPI(title="kvctl worker", version=__version__, docs_url=None, redoc_url=None)
    app.state.runtime = runtime
    app.include_router(router)
    install_error_handlers(app)
    install_ops(app)
    install_guards(app, runtime.settings)
    requests = install_request_metrics(app, "worker")

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return await asyncio.to_thread(runtime.info)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        """This worker's tiers, codecs, queue, requests and liveness (Prometheus text)."""
        from prometheus_client import CONTENT_TYPE_LATEST

        from kvctl.server.worker.metrics import (
            HeartbeatCollector,
            RuntimeCollector,
            process_collectors,
            render,
        )

        beat = getattr(app.state, "heartbeat", None)
        parts = [RuntimeCollector(runtime), requests.latency, *process_collectors("worker"),
                 *([HeartbeatCollector(beat)] if beat is not None else [])]
        body = await asyncio.to_thread(render, *parts)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app
