"""Cache operations of the seed API: compress, decompress, lookup, clear, pin, move.

Each is routed by `instance_id` to the worker of that instance; the reply comes as soon as the
worker has scheduled the job.
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request

from kvctl.common.events import Event
from kvctl.server.controller import Controller
from kvctl.server.http.schemas import (
    ClearRequest,
    CompressRequest,
    LookupRequest,
    LookupResponse,
    MoveRequest,
    OpResponse,
    PinRequest,
)

router = APIRouter(tags=["cache"])


def controller(request: Request) -> Controller:
    """The controller of the app serving ``request`` (the monitor app shares its parent's)."""
    state = request.app.state
    return state.controller if hasattr(state, "controller") else state.parent.state.controller


def _reply(ev: Event) -> OpResponse:
    return OpResponse(event_id=ev.event_id, num_tokens=ev.num_tokens)


@router.post("/compress", response_model=OpResponse)
async def compress(body: CompressRequest, request: Request) -> OpResponse:
    """Compress the stored chunks of `tokens` in `location` with `method`; answers at once."""
    return _reply(await controller(request).submit("compress", body.instance_id,
                                                   body.model_dump()))


@router.post("/decompress", response_model=OpResponse)
async def decompress(body: CompressRequest, request: Request) -> OpResponse:
    """Decompress the stored chunks of `tokens` in `location` back to fp16; answers at once."""
    return _reply(await controller(request).submit("decompress", body.instance_id,
                                                   body.model_dump()))


@router.post("/lookup", response_model=LookupResponse)
async def lookup(body: LookupRequest, request: Request) -> LookupResponse:
    """Where the longest stored prefix of `tokens` lives, per instance (`layout_info`, as
    LMCache answers; every live worker is asked), and how many tokens of it each location
    holds (`tiers`)."""
    layout, tiers, late = await controller(request).lookup(body.tokens)
    return LookupResponse(event_id=f"lookup-{uuid.uuid4().hex}", layout_info=layout,
                          tiers=tiers, late=late)


@router.post("/clear", response_model=OpResponse)
async def clear(body: ClearRequest, request: Request) -> OpResponse:
    """Remove every chunk from `location`."""
    return _reply(await controller(request).submit("clear", body.instance_id,
                                                   body.model_dump()))


@router.post("/pin", response_model=OpResponse)
async def pin(body: PinRequest, request: Request) -> OpResponse:
    """Protect the stored chunks of `tokens` from eviction."""
    return _reply(await controller(request).submit("pin", body.instance_id,
                                                   body.model_dump() | {"pinned": True}))


@router.post("/unpin", response_model=OpResponse)
async def unpin(body: PinRequest, request: Request) -> OpResponse:
    """Let the stored chunks of `tokens` be evicted again."""
    return _reply(await controller(request).submit("unpin", body.instance_id,
                                                   body.model_dump() | {"pinned": False},
                                                   worker_op="pin"))


@router.post("/move", response_model=OpResponse)
async def move(body: MoveRequest, request: Request) -> OpResponse:
    """Move (or copy) the stored chunks of `tokens` between locations, or between instances."""
    return _reply(await controller(request).move(body.old_position, body.new_position,
                                                 body.tokens, body.should_copy))
