"""Cache operations of the seed API: compress, decompress, lookup, clear, pin, move."""

from __future__ import annotations

import asyncio
import uuid

from fastapi import APIRouter, Request

from kvctl.server.schemas import (
    ClearRequest,
    CompressRequest,
    LookupRequest,
    LookupResponse,
    MoveRequest,
    OpResponse,
    PinRequest,
)
from kvctl.server.worker import WorkerRuntime

router = APIRouter(tags=["cache"])


def runtime(request: Request) -> WorkerRuntime:
    return request.app.state.runtime


def _reply(ev: object) -> OpResponse:
    return OpResponse(event_id=ev.event_id, num_tokens=ev.num_tokens)  # type: ignore[attr-defined]


# Scheduling checks which chunks a location holds; for Redis that is network I/O, so it
# runs in a thread and the loop keeps answering.
@router.post("/compress", response_model=OpResponse)
async def compress(body: CompressRequest, request: Request) -> OpResponse:
    """Compress the stored chunks of `tokens` in `location` with `method`; answers at once."""
    rt = runtime(request)
    return _reply(await asyncio.to_thread(rt.compress, body.instance_id, body.method,
                                          body.location, body.tokens, body.force))


@router.post("/decompress", response_model=OpResponse)
async def decompress(body: CompressRequest, request: Request) -> OpResponse:
    """Decompress the stored chunks of `tokens` in `location` back to fp16; answers at once."""
    rt = runtime(request)
    return _reply(await asyncio.to_thread(rt.decompress, body.instance_id, body.method,
                                          body.location, body.tokens))


@router.post("/lookup", response_model=LookupResponse)
async def lookup(body: LookupRequest, request: Request) -> LookupResponse:
    """Where the longest stored prefix of `tokens` lives, per instance (`layout_info`, as
    LMCache answers), and how many tokens of it each location holds (`tiers`)."""
    rt = runtime(request)
    tiers = await asyncio.to_thread(rt.lookup_tiers, body.tokens)
    return LookupResponse(event_id=f"lookup-{uuid.uuid4().hex}",
                          layout_info=rt.layout_info(tiers),
                          tiers={rt.instance_id: tiers} if tiers else {})


@router.post("/clear", response_model=OpResponse)
async def clear(body: ClearRequest, request: Request) -> OpResponse:
    """Remove every chunk from `location`."""
    rt = runtime(request)
    return _reply(await asyncio.to_thread(rt.clear, body.instance_id, body.location))


@router.post("/pin", response_model=OpResponse)
async def pin(body: PinRequest, request: Request) -> OpResponse:
    """Protect the stored chunks of `tokens` from eviction."""
    rt = runtime(request)
    return _reply(await asyncio.to_thread(rt.pin, body.instance_id, body.location, body.tokens))


@router.post("/unpin", response_model=OpResponse)
async def unpin(body: PinRequest, request: Request) -> OpResponse:
    """Let the stored chunks of `tokens` be evicted again."""
    rt = runtime(request)
    return _reply(await asyncio.to_thread(rt.pin, body.instance_id, body.location, body.tokens,
                                          False))


@router.post("/move", response_model=OpResponse)
async def move(body: MoveRequest, request: Request) -> OpResponse:
    """Move (or copy) the stored chunks of `tokens` between locations."""
    rt = runtime(request)
    return _reply(await asyncio.to_thread(rt.move, body.old_position, body.new_position,
                                          body.tokens, body.should_copy))
