"""Where the controller keeps its events and its worker registry: memory or Redis.

In memory (the default) state lives and dies with the process, as for local use. With
``state: redis://...`` every controller pointed at the same Redis shares one set of events
and workers, and a controller killed and restarted finds them again:

- event ``E``: ``kvctl:ctl:event:E`` (JSON). Once ended it expires after
  ``event_retention_s``; while queued or running it is kept for ``UNENDED_TTL_S`` at most.
  ``kvctl:ctl:events`` (sorted by creation time) indexes them for listing.
- worker of instance ``I``: ``kvctl:ctl:worker:I`` (JSON), a lease that each heartbeat
  renews for ``WORKER_LEASE_S``; a worker silent for longer is forgotten. Whether it is
  alive is decided from its last heartbeat (``dead_after_s``), so a dead worker stays listed
  as ``dead`` until its lease runs out.

A Redis that cannot be reached is a `StateUnavailable` (HTTP 503) at once: no retries, short
timeouts. One that stops answering (frozen, SIGSTOP) costs one short socket timeout; from then
on every request gets the same 503 at once (the state is marked down) while a background
ping waits for it to come back. The last outage is remembered (``outage``) so that the
controller does not call a worker dead for heartbeats it could not write down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from kvctl.common.events import ENDED, Event
from kvctl.server.errors import StateUnavailable

UNENDED_TTL_S = 7 * 86_400
WORKER_LEASE_S = 86_400


@dataclass
class WorkerRecord:
    """A registered worker as the controller last heard of it."""

    instance_id: str
    worker_id: int
    url: str
    engine_url: str | None
    chunk_size: int
    registered_at: float
    last_heartbeat: float
    locations: list[dict[str, Any]] = field(default_factory=list)
    error_code: int = 0
    pid: int | None = None
    # SHA-256 of the worker's lease (its credential for the instance), never the lease
    lease_hash: str | None = None
    # when the worker said it was stopping (a clean stop deregisters at once)
    stopped_at: float | None = None

    def alive(self, dead_after_s: float, now: float | None = None) -> bool:
        if self.stopped_at is not None:
            return False
        return ((now or time.time()) - self.last_heartbeat) <= dead_after_s

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerRecord:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class EventRow:
    """An event plus who advances it: a worker (``owner`` None) or a controller's relay."""

    event: Event
    owner: str | None = None
    touched_at: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps({"event": self.event.to_dict(), "owner": self.owner,
                           "touched_at": self.touched_at})

    @classmethod
    def from_json(cls, raw: str | bytes) -> EventRow:
        d = json.loads(raw)
        return cls(Event.from_dict(d["event"]), d.get("owner"), float(d.get("touched_at", 0)))


class ControlState(ABC):
    """Events and workers, shared by every controller that uses the same state."""

    description: str

    @abstractmethod
    async def put_event(self, row: EventRow) -> None: ...

    @abstractmethod
    async def get_events(self, event_ids: list[str]) -> list[EventRow | None]: ...

    @abstractmethod
    async def delete_event(self, event_id: str) -> None: ...

    @abstractmethod
    async def event_ids(self) -> list[str]:
        """Every indexed event id (bounded by max_events), to resolve a short id."""

    @abstractmethod
    async def list_events(self, limit: int) -> list[EventRow]:
        """The ``limit`` most recent events, oldest first."""

    @abstractmethod
    async def put_worker(self, rec: WorkerRecord) -> None: ...

    @abstractmethod
    async def get_worker(self, instance_id: str) -> WorkerRecord | None: ...

    @abstractmethod
    async def list_workers(self) -> list[WorkerRecord]: ...

    @abstractmethod
    async def delete_worker(self, instance_id: str) -> None: ...

    # (start, end) wall-clock times of the last outage of this state store, if any
    outage: tuple[float, float] | None = None

    async def ping(self) -> None:  # noqa: B027 - in memory there is nothing to reach
        """Raise StateUnavailable if the state cannot be reached."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class MemoryState(ControlState):
    """This process's memory; bounded to ``max_events`` (ended events are dropped first)."""

    description = "memory"

    def __init__(self, max_events: int) -> None:
        self.max_events = max_events
        self._events: OrderedDict[str, EventRow] = OrderedDict()
        self._workers: dict[str, WorkerRecord] = {}

    async def put_event(self, row: EventRow) -> None:
        self._events[row.event.event_id] = row
        if len(self._events) > self.max_events:
            for eid in [i for i, r in self._events.items() if r.event.status in ENDED]:
                if len(self._events) <= self.max_events:
                    break
                del self._events[eid]

    async def get_events(self, event_ids: list[str]) -> list[EventRow | None]:
        return [self._events.get(i) for i in event_ids]

    async def delete_event(self, event_id: str) -> None:
        self._events.pop(event_id, None)

    async def event_ids(self) -> list[str]:
        return list(self._events)

    async def list_events(self, limit: int) -> list[EventRow]:
        return list(self._events.values())[-limit:]

    async def put_worker(self, rec: WorkerRecord) -> None:
        self._workers[rec.instance_id] = rec

    async def get_worker(self, instance_id: str) -> WorkerRecord | None:
        return self._workers.get(instance_id)

    async def list_workers(self) -> list[WorkerRecord]:
        return list(self._workers.values())

    async def delete_worker(self, instance_id: str) -> None:
        self._workers.pop(instance_id, None)


# a frozen Redis costs this once, then the state is down (503 at once) until a ping answers
SOCKET_TIMEOUT_S = 1.0
PROBE_INTERVAL_S = 0.25


class RedisState(ControlState):
    """Redis (or Valkey) at ``url``; see the module docstring for the keys."""

    def __init__(self, url: str, max_events: int, retention_s: float,
                 prefix: str = "kvctl:ctl:") -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = url
        self.description = _redact(url)
        self.max_events = max_events
        self.retention_s = retention_s
        self._p = prefix
        # No retries and short timeouts: a request that needs state answers 503 at once
        # instead of waiting for a Redis that is gone.
        self._r: Any = aioredis.Redis.from_url(
            url, socket_connect_timeout=SOCKET_TIMEOUT_S, socket_timeout=SOCKET_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0))
        self._down: str | None = None  # why, while the state is down
        self._down_since = 0.0
        self._probe: asyncio.Task[None] | None = None

    def _unavailable(self, why: str) -> StateUnavailable:
        return StateUnavailable(f"the controller's state store {self.description} is "
                                f"unreachable ({why}); events and workers cannot be read or "
                                "changed until it is back")

    async def _do(self, coro: Any) -> Any:
        import redis

        if self._down is not None:
            with contextlib.suppress(Exception):
                coro.close()  # never awaited: the state is down
            raise self._unavailable(self._down)
        try:
            return await coro
        except (redis.RedisError, OSError) as exc:
            why = f"{type(exc).__name__}: {exc}"
            self._mark_down(why)
            raise self._unavailable(why) from None

    def _mark_down(self, why: str) -> None:
        if self._down is None:
            self._down, self._down_since = why, time.time()
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._wait_until_back())

    async def _wait_until_back(self) -> None:
        import redis

        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            try:
                await self._r.ping()
            except (redis.RedisError, OSError) as exc:
                self._down = f"{type(exc).__name__}: {exc}"
                continue
            self.outage = (self._down_since, time.time())
            self._down = None
            return

    def _ek(self, event_id: str) -> str:
        return f"{self._p}event:{event_id}"

    def _wk(self, instance_id: str) -> str:
        return f"{self._p}worker:{instance_id}"

    async def ping(self) -> None:
        await self._do(self._r.ping())

    async def put_event(self, row: EventRow) -> None:
        ev = row.event
        ttl = self.retention_s if ev.status in ENDED else UNENDED_TTL_S
        pipe = self._r.pipeline(transaction=False)
        pipe.set(self._ek(ev.event_id), row.to_json(), px=int(ttl * 1000))
        pipe.zadd(f"{self._p}events", {ev.event_id: ev.created_at})
        # the index stays bounded; the oldest names go first (their bodies expire anyway)
        pipe.zremrangebyrank(f"{self._p}events", 0, -self.max_events - 1)
        await self._do(pipe.execute())

    async def get_events(self, event_ids: list[str]) -> list[EventRow | None]:
        if not event_ids:
            return []
        raws = await self._do(self._r.mget([self._ek(i) for i in event_ids]))
        return [EventRow.from_json(r) if r is not None else None for r in raws]

    async def delete_event(self, event_id: str) -> None:
        pipe = self._r.pipeline(transaction=False)
        pipe.delete(self._ek(event_id))
        pipe.zrem(f"{self._p}events", event_id)
        await self._do(pipe.execute())

    async def event_ids(self) -> list[str]:
        return [i.decode() for i in await self._do(self._r.zrange(f"{self._p}events", 0, -1))]

    async def list_events(self, limit: int) -> list[EventRow]:
        ids = [i.decode() for i in await self._do(
            self._r.zrange(f"{self._p}events", -limit, -1))]
        rows = await self.get_events(ids)
        gone = [i for i, r in zip(ids, rows, strict=True) if r is None]
        if gone:  # expired events leave the index lazily
            await self._do(self._r.zrem(f"{self._p}events", *gone))
        return [r for r in rows if r is not None]

    async def put_worker(self, rec: WorkerRecord) -> None:
        pipe = self._r.pipeline(transaction=False)
        pipe.set(self._wk(rec.instance_id), json.dumps(rec.to_dict()), ex=WORKER_LEASE_S)
        pipe.sadd(f"{self._p}workers", rec.instance_id)
        await self._do(pipe.execute())

    async def delete_worker(self, instance_id: str) -> None:
        pipe = self._r.pipeline(transaction=False)
        pipe.delete(self._wk(instance_id))
        pipe.srem(f"{self._p}workers", instance_id)
        await self._do(pipe.execute())

    async def get_worker(self, instance_id: str) -> WorkerRecord | None:
        raw = await self._do(self._r.get(self._wk(instance_id)))
        return WorkerRecord.from_dict(json.loads(raw)) if raw is not None else None

    async def list_workers(self) -> list[WorkerRecord]:
        ids = sorted(i.decode() for i in await self._do(self._r.smembers(f"{self._p}workers")))
        if not ids:
            return []
        raws = await self._do(self._r.mget([self._wk(i) for i in ids]))
        gone = [i for i, r in zip(ids, raws, strict=True) if r is None]
        if gone:
            await self._do(self._r.srem(f"{self._p}workers", *gone))
        return [WorkerRecord.from_dict(json.loads(r)) for r in raws if r is not None]

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._probe
        await self._r.aclose()


def _redact(url: str) -> str:
    """The URL without a password, for messages."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


def open_state(url: str | None, max_events: int, retention_s: float) -> ControlState:
    return RedisState(url, max_events, retention_s) if url else MemoryState(max_events)
