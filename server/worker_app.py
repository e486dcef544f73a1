"""A worker's command API over HTTP: what the controller's `HttpTransport` talks to.

Mounted by `kvctl worker` (on `lmcache_worker_port`) and, for the embedded worker, by
`kvctl serve` itself, so that other controllers sharing its state can reach that worker too.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response

from kvctl.server.errors import BadRequest, TooLarge, UnknownInstance, UnknownMethod
from kvctl.server.transport import CHECKSUM_HEADER, NUM_TOKENS_HEADER, InProcessTransport
from kvctl.server.worker import WorkerRuntime
from kvctl.server.worker_ops import WORKER_OPS

router = APIRouter(prefix="/worker", tags=["worker"], include_in_schema=False)

MAX_CHUNK_BYTES = 256 * 1024 * 1024


def _transport(request: Request) -> InProcessTransport:
    rt: WorkerRuntime | None = getattr(request.app.state, "runtime", None)
    if rt is None:
        raise UnknownInstance("this controller runs no worker of its own")
    return InProcessTransport(rt, str(request.base_url))


@router.post("/ops/{op}")
async def op(op: str, request: Request) -> Any:
    if op not in WORKER_OPS:
        raise UnknownMethod(f"unknown worker command {op!r}; known: {', '.join(WORKER_OPS)}")
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("worker command body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("worker command body must be a JSON object")
    try:
        return await _transport(request).call(op, body)
    except (KeyError, TypeError, ValueError) as exc:
        raise BadRequest(f"malformed {op} command: {type(exc).__name__}: {exc}") from None


@router.get("/chunks/{location}/{key}")
async def get_chunk(location: str, key: str, request: Request) -> Response:
    blob, ntok, digest = await _transport(request).get_chunk(location, key)
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
    from kvctl.server.app import install_error_handlers
    from kvctl.server.limits import install_guards

    app = FastAPI(title="kvctl worker", version=__version__, docs_url=None, redoc_url=None)
    app.state.runtime = runtime
    app.include_router(router)
    install_error_handlers(app)
    install_guards(app, runtime.settings)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return await asyncio.to_thread(runtime.info)

    return app
