"""Event status, which upstream LMCache never implemented."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request

from kvctl.server.events import FAILED, FINISHED, QUEUED, RUNNING, AmbiguousEventId
from kvctl.server.schemas import CheckFinishRequest, CheckFinishResponse, EventList, EventModel

router = APIRouter(tags=["events"])


def _get(request: Request, event_id: str) -> dict:
    """The event an id or an unambiguous prefix of it names; 409 when several match."""
    try:
        ev = request.app.state.runtime.events.get(event_id)
    except AmbiguousEventId as exc:
        more = f" and {exc.count - len(exc.candidates)} more" if exc.count > len(
            exc.candidates) else ""
        raise HTTPException(409, f"event id prefix {exc.prefix!r} matches {exc.count} events "
                                 f"({', '.join(exc.candidates)}{more}); give more "
                                 "characters") from None
    if ev is None:
        raise HTTPException(404, f"unknown event_id {event_id!r} (events are kept in memory "
                                 "and forgotten when the server restarts)")
    return ev


@router.post("/check_finish", response_model=CheckFinishResponse)
async def check_finish(body: CheckFinishRequest, request: Request) -> CheckFinishResponse:
    """Status of an event: queued, running, finished or failed."""
    ev = _get(request, body.event_id)
    return CheckFinishResponse(event_id=ev["event_id"], status=ev["status"])


@router.get("/events", response_model=EventList)
async def list_events(
    request: Request,
    status: Annotated[str | None, Query(pattern=f"^({QUEUED}|{RUNNING}|{FINISHED}|{FAILED})$")
                      ] = None,
    limit: Annotated[int | None, Query(ge=1, le=10_000)] = None,
) -> EventList:
    """Recent events, oldest first."""
    return EventList(events=request.app.state.runtime.events.list(status, limit))


@router.get("/events/{event_id}", response_model=EventModel)
async def get_event(event_id: str, request: Request) -> dict:
    """The whole event: progress, bytes before and after, error, timestamps."""
    return _get(request, event_id)
