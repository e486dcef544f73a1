"""The controller: routes each command to the worker of its instance and tracks events.

It never runs codec work: a command is validated, handed to a worker through a
`WorkerTransport` and answered; the worker's job advances the event, and reads of an event
that has not ended ask its worker (so every controller sharing the state sees the same
progress). The one job a controller runs itself is relaying chunk bytes between two workers
for a cross-instance /move.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from kvctl.common.events import FAILED, FINISHED, RUNNING, Event
from kvctl.server.config import ServerSettings
from kvctl.server.controller.state import ControlState, EventRow, WorkerRecord
from kvctl.server.controller.transport import HttpTransport, InProcessTransport, WorkerTransport
from kvctl.server.errors import (
    BadRequest,
    ChecksumMismatch,
    Conflict,
    DomainError,
    StateUnavailable,
    TooLarge,
    UnknownEvent,
    UnknownInstance,
    UnknownLocation,
    WorkerUnavailable,
)
from kvctl.server.events import AmbiguousEventId, new_event_id, resolve_prefix
from kvctl.server.worker.runtime import WorkerRuntime

log = logging.getLogger("kvctl.controller")

ALIVE, DEAD = "alive", "dead"
# /health error codes per worker
HEALTHY, STORE_ERROR, UNAVAILABLE = 0, 1, 2


class Controller:
    """Routing, the worker registry and events, over a `ControlState`."""

    def __init__(self, settings: ServerSettings, state: ControlState,
                 runtime: WorkerRuntime | None = None, self_url: str | None = None) -> None:
        self.settings = settings
        self.state = state
        self.runtime = runtime
        self.self_url = self_url or f"http://{settings.public_host}:{settings.port}"
        self.controller_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._local = InProcessTransport(runtime, self.self_url) if runtime else None
        self._http: dict[str, HttpTransport] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._relays: dict[str, asyncio.Task[None]] = {}
        self._beat: asyncio.Task[None] | None = None
        # LMCache 0.5.6 instances (kvctl.server.lmcache): with their sockets bound, or with a
        # shared state where another controller may hold them
        self.lmcache: Any = None

    async def _start_lmcache(self) -> None:
        s = self.settings
        if s.lmcache_monitor_ports is None and not s.state:
            return
        from kvctl.server.lmcache.fleet import LMCacheFleet

        self.lmcache = LMCacheFleet(s, self.state, self.controller_id, self._spawn)
        await self.lmcache.start()

    async def _lmcache_instance(self, instance_id: str) -> bool:
        """Whether ``instance_id`` is an LMCache instance (a kvctl worker's id wins)."""
        if self.lmcache is None or not await self.lmcache.has_instance(instance_id):
            return False
        return await self.state.get_worker(instance_id) is None

    # ---- life cycle -------------------------------------------------------------------
    async def start(self) -> None:
        await self._start_lmcache()
        if self.runtime is None:
            return
        try:
            await self._local_heartbeat(registering=True)
        except StateUnavailable as exc:  # the loop below keeps trying
            log.warning("embedded worker not registered yet: %s", exc.detail)
        self._beat = asyncio.create_task(self._local_heartbeat_loop())

    async def close(self) -> None:
        tasks = [*self._tasks, *([self._beat] if self._beat else [])]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for t in self._http.values():
            await t.close()
        if self.lmcache is not None:
            await self.lmcache.close()
        await self.state.close()

    async def _local_heartbeat(self, registering: bool = False) -> None:
        assert self.runtime is not None
        info = await asyncio.to_thread(self.runtime.info)
        s = self.settings
        await self.heartbeat({
            "instance_id": self.runtime.instance_id, "worker_id": self.runtime.worker_id,
            "url": self.self_url, "chunk_size": info["chunk_size"],
            "engine_url": (f"http://{s.public_host}:{s.engine_port}"
                           if s.model != "none" else None),
            "locations": info["locations"], "error_code": info["error_code"],
            "pid": os.getpid()}, registering=registering)

    async def _local_heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            try:
                await self._local_heartbeat()
            except DomainError as exc:
                log.warning("embedded worker heartbeat: %s", exc.detail)
            except Exception:  # keep beating; the next one may work
                log.exception("embedded worker heartbeat failed")

    # ---- registry -----------------------------------------------------------------------
    async def heartbeat(self, body: dict[str, Any], registering: bool) -> dict[str, Any]:
        """Register a worker or renew its lease; a heartbeat from an unknown one registers it."""
        now = time.time()
        iid = str(body["instance_id"])
        old = await self.state.get_worker(iid)
        same = (old is not None and old.url == body["url"] and old.pid == body.get("pid")
                and not registering)
        if old is not None and old.url != body["url"] and old.alive(self.settings.dead_after_s):
            log.warning("instance %s: worker at %s replaces the live one at %s", iid,
                        body["url"], old.url)
        rec = WorkerRecord(
            instance_id=iid, worker_id=int(body.get("worker_id", 0)), url=str(body["url"]),
            engine_url=body.get("engine_url"), chunk_size=int(body["chunk_size"]),
            registered_at=old.registered_at if same and old else now, last_heartbeat=now,
            locations=list(body.get("locations") or []),
            error_code=int(body.get("error_code", 0)), pid=body.get("pid"))
        await self.state.put_worker(rec)
        if not same:
            log.info("instance %s registered: worker at %s", iid, rec.url)
        return {"heartbeat_interval_s": self.settings.heartbeat_interval_s,
                "dead_after_s": self.settings.dead_after_s,
                "registered_at": rec.registered_at, "controller_id": self.controller_id}

    async def deregister(self, body: dict[str, Any]) -> bool:
        """A worker stopping cleanly: shown dead from now on (not after dead_after_s).
        Only the worker registered at that URL may say so; False when it is not the one."""
        rec = await self.state.get_worker(str(body["instance_id"]))
        if rec is None or rec.url != body["url"] or rec.stopped_at is not None:
            return False
        rec.stopped_at = time.time()
        await self.state.put_worker(rec)
        log.info("instance %s: worker at %s stopped (deregistered)", rec.instance_id, rec.url)
        return True

    def transport(self, rec: WorkerRecord) -> WorkerTransport:
        if (self._local is not None and self.runtime is not None
                and rec.instance_id == self.runtime.instance_id and rec.url == self.self_url):
            return self._local
        t = self._http.get(rec.url)
        if t is None or t.instance_id != rec.instance_id:
            t = HttpTransport(rec.url, rec.instance_id, self.settings.worker_timeout_s,
                              self.settings.auth_token)
            old = self._http.pop(rec.url, None)
            if old is not None:
                self._spawn(old.close())
            self._http[rec.url] = t
        return t

    def _dead_reason(self, rec: WorkerRecord) -> str:
        if rec.stopped_at is not None:
            return (f"the worker of instance {rec.instance_id!r} at {rec.url} was stopped "
                    f"{time.time() - rec.stopped_at:.0f} s ago (it deregistered)")
        age = time.time() - rec.last_heartbeat
        return (f"the worker of instance {rec.instance_id!r} at {rec.url} is dead: no "
                f"heartbeat for {age:.0f} s (dead after {self.settings.dead_after_s:g} s)")

    async def route(self, instance_id: str) -> tuple[WorkerRecord, WorkerTransport]:
        rec = await self.state.get_worker(instance_id)
        if rec is None:
            known = await self._known_instances()
            raise UnknownInstance(f"unknown instance_id {instance_id!r}; registered instances: "
                                  f"{', '.join(known) or 'none'}")
        if not rec.alive(self.settings.dead_after_s):
            raise WorkerUnavailable(self._dead_reason(rec))
        return rec, self.transport(rec)

    async def _known_instances(self) -> list[str]:
        known = {w.instance_id for w in await self.state.list_workers()}
        if self.lmcache is not None:
            await self.lmcache.refresh()
            known.update(self.lmcache.instances())
        return sorted(known)

    def check_tokens(self, tokens: Sequence[int]) -> None:
        if len(tokens) > self.settings.max_request_tokens:
            raise TooLarge(f"{len(tokens)} tokens is more than the "
                           f"{self.settings.max_request_tokens} a request may carry")

    # ---- commands -----------------------------------------------------------------------
    async def submit(self, op: str, instance_id: str, body: dict[str, Any],
                     worker_op: str | None = None) -> Event:
        """Route a command to the instance's worker; the event is recorded before it runs."""
        if "tokens" in body:
            self.check_tokens(body["tokens"])
        if await self._lmcache_instance(instance_id):
            # an LMCache worker keeps no events: this controller runs and tracks the job
            return await self.lmcache.submit(worker_op or op, instance_id, body)
        _, transport = await self.route(instance_id)
        event_id = new_event_id(op)
        # Recorded first, so a state store that is gone refuses before any work starts.
        await self.state.put_event(EventRow(Event(event_id, op, instance_id, body.get("method"),
                                                  body.get("location"), 0, 0)))
        try:
            reply = await transport.call(worker_op or op, {**body, "event_id": event_id})
        except WorkerUnavailable as exc:
            # The worker may or may not have taken the job; the event says we do not know.
            with contextlib.suppress(StateUnavailable):
                [row] = await self.state.get_events([event_id])
                if row is not None:
                    _fail(row.event, f"the worker did not confirm the job: {exc.detail}")
                    await self.state.put_event(row)
            raise
        except DomainError:
            # refused: no job exists, so no event either
            with contextlib.suppress(StateUnavailable):
                await self.state.delete_event(event_id)
            raise
        ev = Event.from_dict(reply)
        await self.state.put_event(EventRow(ev))
        return ev

    async def move(self, old: tuple[str, str], new: tuple[str, str], tokens: Sequence[int],
                   should_copy: bool) -> Event:
        if await self._lmcache_instance(old[0]) or await self._lmcache_instance(new[0]):
            self.check_tokens(tokens)
            return await self.lmcache.move(old, new, list(tokens), should_copy)
        if old[0] == new[0]:
            return await self.submit("move", old[0], {
                "old_position": list(old), "new_position": list(new), "tokens": list(tokens),
                "should_copy": should_copy})
        self.check_tokens(tokens)
        src_rec, src = await self.route(old[0])
        dst_rec, dst = await self.route(new[0])
        if src_rec.chunk_size != dst_rec.chunk_size:
            raise BadRequest(f"instances {old[0]!r} and {new[0]!r} use different chunk sizes "
                             f"({src_rec.chunk_size} and {dst_rec.chunk_size}); their chunks "
                             "are not interchangeable")
        dst_locations = [loc["location"] for loc in dst_rec.locations]
        if new[1] not in dst_locations:
            raise UnknownLocation(f"unknown location {new[1]!r} on instance {new[0]!r}; "
                                  f"configured locations: {', '.join(dst_locations) or 'none'}")
        plan = await src.call("chunk_plan", {"location": old[1], "tokens": list(tokens)})
        ev = Event(new_event_id("move"), "move", old[0], None,
                   f"{old[0]}/{old[1]}->{new[0]}/{new[1]}",
                   num_tokens=sum(int(c["num_tokens"]) for c in plan), chunks_total=len(plan))
        row = EventRow(ev, owner=self.controller_id)
        await self.state.put_event(row)
        task = self._spawn(self._relay(row, plan, src, dst, old[1], new[1], should_copy))
        self._relays[ev.event_id] = task
        task.add_done_callback(lambda _: self._relays.pop(ev.event_id, None))
        return ev

    async def _relay(self, row: EventRow, plan: list[dict[str, Any]], src: WorkerTransport,
                     dst: WorkerTransport, src_loc: str, dst_loc: str, should_copy: bool
                     ) -> None:
        """Copy chunk bytes from one worker to another; each arrives checked against its digest."""
        ev = row.event
        ev.status, ev.started_at = RUNNING, time.time()
        try:
            await self._save(row)
            for c in plan:
                blob, ntok, digest = await src.get_chunk(src_loc, c["key"])
                got = await dst.put_chunk(dst_loc, c["key"], blob, ntok, digest)
                if got != digest:
                    raise ChecksumMismatch(f"chunk {c['key']}: destination stored bytes that "
                                           f"hash to {got}, the source's hash to {digest}")
                if not should_copy:
                    await src.call("delete_chunk", {"location": src_loc, "key": c["key"]})
                ev.chunks_done += 1
                ev.bytes_before += len(blob)
                ev.bytes_after += len(blob)
                await self._save(row)
        except DomainError as exc:
            ev.status, ev.error = FAILED, f"{exc.detail} ({ev.chunks_done} of " \
                                          f"{ev.chunks_total} chunks copied)"
        except Exception as exc:  # a bug: the event says so instead of hanging
            log.exception("move %s failed", ev.event_id)
            ev.status, ev.error = FAILED, f"internal error: {type(exc).__name__}: {exc}"
        else:
            ev.status = FINISHED
        ev.finished_at = time.time()
        with contextlib.suppress(StateUnavailable):
            await self._save(row)

    async def _save(self, row: EventRow) -> None:
        row.touched_at = time.time()
        await self.state.put_event(row)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def lookup(self, tokens: Sequence[int]
                     ) -> tuple[dict[str, list[Any]], dict[str, dict[str, int]]]:
        """Ask every live worker at once: ``layout_info`` (one entry per instance that holds
        a prefix) and ``tiers`` (tokens per location, per instance)."""
        self.check_tokens(tokens)
        recs = [r for r in await self.state.list_workers()
                if r.alive(self.settings.dead_after_s)]
        replies = await asyncio.gather(
            *(self.transport(r).call("lookup", {"tokens": list(tokens)}) for r in recs),
            return_exceptions=True)
        layout: dict[str, list[Any]] = {}
        tiers: dict[str, dict[str, int]] = {}
        for rec, reply in zip(recs, replies, strict=True):
            if isinstance(reply, WorkerUnavailable):
                log.warning("lookup skipped instance %s: %s", rec.instance_id, reply.detail)
            elif isinstance(reply, BaseException):
                raise reply
            else:
                layout.update(reply["layout_info"])
                tiers.update(reply["tiers"])
        if self.lmcache is not None:
            # LMCache instances: from the directory their admit/evict streams keep, no fan-out
            lm_layout, lm_tiers = await self.lmcache.lookup(tokens)
            for iid, entry in lm_layout.items():
                layout.setdefault(iid, entry)
                tiers.setdefault(iid, lm_tiers.get(iid, {}))
        return layout, tiers

    # ---- events -------------------------------------------------------------------------
    async def get_event(self, event_id: str) -> Event:
        """The event with this id, or with the one id this prefix names (the CLI's short
        ids); Conflict when several do."""
        [row] = await self.state.get_events([event_id])
        if row is None:
            try:
                full = resolve_prefix(event_id, await self.state.event_ids())
            except AmbiguousEventId as exc:
                more = (f" and {exc.count - len(exc.candidates)} more"
                        if exc.count > len(exc.candidates) else "")
                raise Conflict(f"event id prefix {exc.prefix!r} matches {exc.count} events "
                               f"({', '.join(exc.candidates)}{more}); give more "
                               "characters") from None
            if full is not None:
                [row] = await self.state.get_events([full])
        if row is None:
            where = ("state is in memory, so a restart forgets events; run the controller with "
                     "--state redis://... to keep them" if self.settings.state is None else
                     f"ended events are kept {self.settings.event_retention_s:g} s")
            raise UnknownEvent(f"unknown event_id {event_id!r} ({where})")
        return (await self._refresh([row]))[0].event

    async def list_events(self, status: str | None, limit: int | None,
                          instance_id: str | None = None, method: str | None = None
                          ) -> list[Event]:
        filtered = bool(status or instance_id or method)
        rows = await self.state.list_events(self.settings.max_events if filtered or not limit
                                            else limit)
        evs = [r.event for r in await self._refresh(rows)
               if status in (None, r.event.status)
               and instance_id in (None, r.event.instance_id)
               and (method is None or method_matches(r.event.method, method))]
        return evs[-limit:] if limit else evs

    async def _refresh(self, rows: list[EventRow]) -> list[EventRow]:
        """Bring events that have not ended up to date from their workers."""
        groups: dict[str, list[EventRow]] = {}
        for r in rows:
            if r.event.ended:
                continue
            if r.owner is not None:
                self._check_relay(r)
            else:
                groups.setdefault(r.event.instance_id, []).append(r)
        updates = await asyncio.gather(*(self._refresh_instance(i, g)
                                         for i, g in groups.items()))
        changed = [r for group in updates for r in group]
        for r in changed:
            await self.state.put_event(r)
        return rows

    def _check_relay(self, row: EventRow) -> None:
        # A relay is advanced by the controller that started it; one that stopped touching it
        # (killed, restarted) will never finish it.
        if row.event.event_id in self._relays or (
                self.lmcache is not None and row.event.event_id in self.lmcache.jobs):
            return
        idle = time.time() - row.touched_at
        if idle > self.settings.dead_after_s:
            _fail(row.event, f"the controller relaying this move stopped (no progress for "
                             f"{idle:.0f} s) after {row.event.chunks_done} of "
                             f"{row.event.chunks_total} chunks")
            self._spawn(self.state.put_event(row))

    async def _refresh_instance(self, instance_id: str, rows: list[EventRow]
                                ) -> list[EventRow]:
        rec = await self.state.get_worker(instance_id)
        changed: list[EventRow] = []
        if rec is None or not rec.alive(self.settings.dead_after_s):
            why = (self._dead_reason(rec) if rec else
                   f"instance {instance_id!r} is no longer registered")
            for r in rows:
                _fail(r.event, f"{why}; the event was {r.event.status} and cannot end")
                changed.append(r)
            return changed
        try:
            fresh = await self.transport(rec).call(
                "events", {"ids": [r.event.event_id for r in rows]})
        except WorkerUnavailable as exc:
            # dead within dead_after_s at most; then the branch above fails these events
            log.warning("event refresh: %s", exc.detail)
            return changed
        now = time.time()
        for r in rows:
            d = fresh.get(r.event.event_id)
            if d is not None:
                new = Event.from_dict(d)
                if new != r.event:
                    r.event = new
                    changed.append(r)
            elif now - r.event.created_at > self.settings.worker_timeout_s:
                # (younger: the worker may not have been handed the job yet)
                _fail(r.event, f"the worker of instance {instance_id!r} no longer knows this "
                               f"event (restarted at {_clock(rec.registered_at)}); its job "
                               "was lost")
                changed.append(r)
        return changed

    # ---- workers ------------------------------------------------------------------------
    async def workers(self, instance_id: str | None = None) -> list[dict[str, Any]]:
        """Each worker: address, last heartbeat, alive/dead, chunks and bytes per location,
        kvctl workers and LMCache workers alike (``kind``). ``"all"`` is every instance, as
        LMCache's /query_worker_info takes it."""
        if instance_id == "all":
            instance_id = None
        recs = await self.state.list_workers()
        if instance_id is not None:
            recs = [r for r in recs if r.instance_id == instance_id]
        views = list(await asyncio.gather(*(self._view(r) for r in recs)))
        if self.lmcache is not None:
            kvctl_ids = {r.instance_id for r in recs}
            views += [v for v in await self.lmcache.views(instance_id)
                      if v["instance_id"] not in kvctl_ids]
        if instance_id is not None and not views:
            known = await self._known_instances()
            raise UnknownInstance(f"unknown instance_id {instance_id!r}; registered "
                                  f"instances: {', '.join(known) or 'none'}")
        return views

    async def health_codes(self, instance_id: str) -> tuple[dict[int, int],
                                                            list[dict[str, Any]]]:
        """Per worker of the instance its health code (an LMCache worker is asked)."""
        views = await self.workers(instance_id)
        codes = {v["worker_id"]: v["error_code"] for v in views}
        if await self._lmcache_instance(instance_id):
            codes = await self.lmcache.health(instance_id)
        return codes, views

    async def _view(self, rec: WorkerRecord) -> dict[str, Any]:
        now = time.time()
        alive = rec.alive(self.settings.dead_after_s, now)
        locations, code = rec.locations, rec.error_code
        if not alive:
            code = UNAVAILABLE
        else:
            try:  # live numbers; the heartbeat's are up to one interval old
                info = await asyncio.wait_for(self.transport(rec).call("info", {}),
                                              self.settings.worker_timeout_s)
                locations, code = info["locations"], int(info["error_code"])
            except (WorkerUnavailable, TimeoutError):
                code = UNAVAILABLE
        u = urlsplit(rec.url)
        return {"instance_id": rec.instance_id, "worker_id": rec.worker_id, "kind": "kvctl",
                "ip": u.hostname or "", "port": u.port or 0, "url": rec.url,
                "engine_url": rec.engine_url, "distributed_url": None,
                "state": ALIVE if alive else DEAD, "error_code": code,
                "registration_time": rec.registered_at,
                "last_heartbeat_time": rec.last_heartbeat,
                "heartbeat_age_s": round(now - rec.last_heartbeat, 3),
                "chunk_size": rec.chunk_size, "locations": locations}


def method_matches(have: str | None, want: str) -> bool:
    """``want`` names the method exactly (``kivi-2``) or its codec, every level (``kivi``)."""
    return have is not None and (have == want or have.startswith(want + "-"))


def _fail(ev: Event, reason: str) -> None:
    ev.status, ev.error, ev.finished_at = FAILED, reason, time.time()
    if ev.started_at is None:
        ev.started_at = ev.finished_at


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
