"""Event status, which upstream LMCache never implemented."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from kvctl.common.events import STATUS_PATTERN, Event
from kvctl.server.http.routers.cache import controller
from kvctl.server.http.schemas import (
    MAX_NAME_CHARS,
    CheckFinishRequest,
    CheckFinishResponse,
    EventList,
)

router = APIRouter(tags=["events"])


@router.post("/check_finish", response_model=CheckFinishResponse)
async def check_finish(body: CheckFinishRequest, request: Request) -> CheckFinishResponse:
    """Status of an event: queued, running, finished or failed."""
    ev = await controller(request).get_event(body.event_id)
    return CheckFinishResponse(event_id=ev.event_id, status=ev.status)


@router.get("/events", response_model=EventList)
async def list_events(
    request: Request,
    status: Annotated[str | None, Query(pattern=STATUS_PATTERN)] = None,
    limit: Annotated[int | None, Query(ge=1, le=10_000)] = None,
    instance: Annotated[str | None, Query(min_length=1, max_length=MAX_NAME_CHARS)] = None,
    method: Annotated[str | None, Query(min_length=1, max_length=MAX_NAME_CHARS)] = None,
) -> EventList:
    """Recent events, oldest first; only those of ``instance``, in ``status``, or with
    ``method`` (a method string, or a codec name for all of its levels) if given."""
    return EventList(events=await controller(request).list_events(status, limit, instance,
                                                                  method))


@router.get("/events/{event_id}", response_model=Event)
async def get_event(event_id: str, request: Request) -> Event:
    """The whole event: progress, bytes before and after, error, timestamps."""
    return await controller(request).get_event(event_id)
