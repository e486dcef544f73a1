"""Background operations and their life cycle: queued -> running -> finished | failed."""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

from kvctl.common.events import ENDED, FAILED, FINISHED, QUEUED, RUNNING, Event

TERMINAL = ENDED
MAX_CANDIDATES = 5  # ids named in an "ambiguous prefix" answer
__all__ = ["FAILED", "FINISHED", "QUEUED", "RUNNING", "TERMINAL", "AmbiguousEventId", "Event",
           "EventTable", "new_event_id", "resolve_prefix"]


def new_event_id(op: str) -> str:
    return f"{op}-{uuid.uuid4().hex}"


class AmbiguousEventId(LookupError):
    """A prefix that more than one event id starts with; ``candidates`` names a few."""

    def __init__(self, prefix: str, candidates: list[str], count: int) -> None:
        super().__init__(prefix)
        self.prefix = prefix
        self.candidates = candidates
        self.count = count


def resolve_prefix(prefix: str, ids: Any) -> str | None:
    """The full id that ``prefix`` names among ``ids``: the id itself, or the only id that
    starts with it, whole (``compress-3f2a``) or after its op (``3f2a``, the short id the CLI
    shows). None when no id matches; AmbiguousEventId when several do."""
    if prefix in ids:
        return prefix
    if not prefix:
        return None
    hits = [eid for eid in ids
            if eid.startswith(prefix) or eid.partition("-")[2].startswith(prefix)]
    if len(hits) > 1:
        raise AmbiguousEventId(prefix, hits[:MAX_CANDIDATES], len(hits))
    return hits[0] if hits else None


class EventTable:
    """Thread-safe table of recent events.

    Retention: an event that has not ended is always kept (the job queue bounds how many
    there are). An ended one is dropped once it ended more than ``retention_s`` ago, and the
    oldest ended ones go first whenever the table holds more than ``max_events``."""

    def __init__(self, max_events: int, retention_s: float = 3600.0) -> None:
        self.max_events = max_events
        self.retention_s = retention_s
        self._events: OrderedDict[str, Event] = OrderedDict()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # cumulative (op, status) transition counts, for /metrics
        self.transitions: dict[tuple[str, str], int] = {}

    def create(self, op: str, instance_id: str, method: str | None, location: str | None,
               num_tokens: int, chunks_total: int, event_id: str | None = None) -> Event:
        # The controller names the event; a worker's table keeps that name for its job.
        ev = Event(event_id=event_id or new_event_id(op), op=op, instance_id=instance_id,
                   method=method, location=location, num_tokens=num_tokens,
                   chunks_total=chunks_total)
        with self._lock:
            self._events[ev.event_id] = ev
            self._count(ev.op, QUEUED)
            self._trim()
        return ev

    def _count(self, op: str, status: str) -> None:
        self.transitions[(op, status)] = self.transitions.get((op, status), 0) + 1

    def _trim(self) -> None:
        cutoff = time.time() - self.retention_s
        # Oldest first, and no further than the first event created after the cutoff: it
        # cannot have ended before it, so a call costs the expired events, not the table.
        expired = []
        for eid, e in self._events.items():
            if e.created_at >= cutoff:
                break
            if e.status in TERMINAL and (e.finished_at or 0.0) < cutoff:
                expired.append(eid)
        for eid in expired:
            del self._events[eid]
        if len(self._events) <= self.max_events:
            return
        for eid in [e.event_id for e in self._events.values() if e.status in TERMINAL]:
            if len(self._events) <= self.max_events:
                break
            del self._events[eid]

    def start(self, ev: Event) -> None:
        with self._lock:
            ev.status = RUNNING
            ev.started_at = time.time()
            self._count(ev.op, RUNNING)
            self._cond.notify_all()

    def progress(self, ev: Event, before: int, after: int) -> None:
        with self._lock:
            ev.chunks_done += 1
            ev.bytes_before += before
            ev.bytes_after += after

    def record(self, ev: Event, **fields: Any) -> None:
        """Set event fields under the table's lock (readers never see half an update)."""
        with self._lock:
            for k, v in fields.items():
                setattr(ev, k, v)

    def finish(self, ev: Event, error: str | None = None) -> None:
        with self._lock:
            if ev.started_at is None:
                ev.started_at = time.time()
            ev.status = FAILED if error else FINISHED
            ev.error = error
            ev.finished_at = time.time()
            self._count(ev.op, ev.status)
            self._cond.notify_all()

    def get(self, event_id: str) -> dict[str, Any] | None:
        """The event with this id, or with the one id this prefix names (see `_resolve`)."""
        with self._lock:
            self._trim()
            full = self._resolve(event_id)
            ev = self._events.get(full) if full else None
            return ev.to_dict() if ev else None

    def get_many(self, event_ids: list[str]) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {i: self._events[i].to_dict() for i in event_ids if i in self._events}

    def _resolve(self, prefix: str) -> str | None:
        """See `resolve_prefix`; the table is bounded (max_events), so the scan is too."""
        return resolve_prefix(prefix, self._events)

    def list(self, status: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        with self._lock:
            self._trim()
            evs = [e.to_dict() for e in self._events.values() if status in (None, e.status)]
        return evs[-limit:] if limit else evs

    def active(self) -> int:
        with self._lock:
            return sum(1 for e in self._events.values() if e.status not in TERMINAL)

    def wait(self, event_id: str, timeout: float | None = None) -> dict[str, Any] | None:
        """Block until the event ends (for tests and in-process callers)."""
        with self._cond:
            self._cond.wait_for(
                lambda: event_id not in self._events or self._events[event_id].status in TERMINAL,
                timeout=timeout)
            ev = self._events.get(event_id)
            return ev.to_dict() if ev else None
