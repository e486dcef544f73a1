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
import hashlib
import hmac
import logging
import os
import secrets
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from kvctl.common.events import FAILED, FINISHED, RUNNING, Event
from kvctl.server.config import ServerSettings
from kvctl.server.controller import answers
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
# A worker that stopped answering (hung, SIGSTOP) but whose port still accepts keeps its
# unended events this many dead_after_s before they are failed: it may finish them yet.
HUNG_EVENTS_AFTER = 6


def lease_hash(lease: str) -> str:
    return hashlib.sha256(lease.encode()).hexdigest()


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
        self._local_lease: str | None = None
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
        except (StateUnavailable, Conflict) as exc:  # the loop below keeps trying
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
        reply = await self.heartbeat({
            "instance_id": self.runtime.instance_id, "worker_id": self.runtime.worker_id,
            "url": self.self_url, "chunk_size": info["chunk_size"],
            "engine_url": (f"http://{s.public_host}:{s.engine_port}"
                           if s.model != "none" else None),
            "locations": info["locations"], "error_code": info["error_code"],
            "pid": os.getpid(), "lease": self._local_lease}, registering=registering)
        self._local_lease = reply["lease"]

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
        """Register a worker or renew its lease; a heartbeat from an unknown one registers it.

        Identity: registering issues the worker a lease (a random credential; the state
        keeps only its hash) and every heartbeat must present it. An instance id belongs to
        the worker holding its lease until that worker is dead (silent for dead_after_s,
        or its port refuses connections) or its record is gone; another claimant gets a
        409 naming the holder. ``registering`` only says which endpoint was used: a
        worker presenting its lease re-registers as itself (same registration time).
        """
        now = time.time()
        iid = str(body["instance_id"])
        old = await self.state.get_worker(iid)
        lease = body.get("lease")
        holds = bool(old is not None and old.lease_hash and isinstance(lease, str)
                     and hmac.compare_digest(old.lease_hash, lease_hash(lease)))
        if old is not None and old.lease_hash is None and old.url == body["url"]:
            holds = True  # a record from before leases (an upgrade): its worker gets one now
        if old is not None and not holds:
            if self._is_alive(old, now) and not await self._holder_gone(old, body):
                raise Conflict(
                    f"instance {iid!r} is held by the worker at {old.url} (pid {old.pid}, "
                    f"registered {_clock(old.registered_at)}, last heartbeat "
                    f"{max(0.0, now - old.last_heartbeat):.1f} s ago); an instance id "
                    "belongs to its first worker until that one is dead (silent for "
                    f"{self.settings.dead_after_s:g} s) or deregistered. Give this worker "
                    "its own lmcache_instance_id, or stop the other one first")
            log.warning("instance %s: worker at %s takes over from the dead one at %s", iid,
                        body["url"], old.url)
        if old is None:
            await self._make_room(iid, now)
        if not holds:
            lease = secrets.token_urlsafe(32)
        assert isinstance(lease, str)
        rec = WorkerRecord(
            instance_id=iid, worker_id=int(body.get("worker_id", 0)), url=str(body["url"]),
            engine_url=body.get("engine_url"), chunk_size=int(body["chunk_size"]),
            registered_at=old.registered_at if holds and old else now, last_heartbeat=now,
            locations=list(body.get("locations") or []),
            error_code=int(body.get("error_code", 0)), pid=body.get("pid"),
            lease_hash=lease_hash(lease))
        await self.state.put_worker(rec)
        if not holds:
            log.info("instance %s registered: worker at %s", iid, rec.url)
        return {"heartbeat_interval_s": self.settings.heartbeat_interval_s,
                "dead_after_s": self.settings.dead_after_s,
                "registered_at": rec.registered_at, "controller_id": self.controller_id,
                "lease": lease}

    async def _make_room(self, iid: str, now: float) -> None:
        """Registrations are bounded (max_workers): a dead worker's record makes room for a
        new one; with none dead, the newcomer is refused."""
        recs = await self.state.list_workers()
        if len(recs) < self.settings.max_workers:
            return
        dead = sorted((r for r in recs if not self._is_alive(r, now)),
                      key=lambda r: r.last_heartbeat)
        if not dead:
            raise Conflict(f"cannot register instance {iid!r}: the registry holds "
                           f"{len(recs)} live workers, its limit (max_workers = "
                           f"{self.settings.max_workers}); raise max_workers or stop one")
        for r in dead[:len(recs) - self.settings.max_workers + 1]:
            await self.state.delete_worker(r.instance_id)

    def _is_alive(self, rec: WorkerRecord, now: float | None = None) -> bool:
        """Alive by its last heartbeat; or, right after an outage of the state store, alive
        if it was alive when the outage began: its heartbeats came, the controller could
        not write them down, and it gets dead_after_s from the state's return to beat."""
        now = now or time.time()
        d = self.settings.dead_after_s
        if rec.alive(d, now):
            return True
        outage = self.state.outage
        return bool(outage and rec.last_heartbeat >= outage[0] - d and now - outage[1] <= d)

    async def _holder_gone(self, rec: WorkerRecord, claim: dict[str, Any] | None = None
                           ) -> bool:
        """Whether the worker holding an instance is gone, so that waiting for its
        registration to lapse would only delay its successor: its port refuses connections
        (a crash, a restart on another port), or the process now answering at its address
        is the claimant (a restart on the same port: the worker there reports the
        claimant's pid, not the holder's; an impostor cannot make the real worker say
        that). A hung worker still accepts, and answers nothing: not gone."""
        if claim is not None and claim.get("url") == rec.url and claim.get("pid") not in (
                None, rec.pid):
            try:
                info = await self._ask(rec, "info", {})
            except (WorkerUnavailable, TimeoutError):
                info = None
            if isinstance(info, dict) and info.get("pid") == claim["pid"]:
                return True
        try:
            u = urlsplit(rec.url)
            host, port = u.hostname, u.port
        except ValueError:
            return True
        if not host or not port:
            return True
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                               min(1.0, self.settings.fanout_timeout_s))
        except (ConnectionRefusedError, OSError):
            return True
        except TimeoutError:
            return False
        writer.close()
        return False

    async def deregister(self, body: dict[str, Any]) -> bool:
        """A worker stopping cleanly: shown dead from now on (not after dead_after_s), and
        its instance id free for another worker. Only the holder may say so: its lease (a
        record from before leases: its URL); False when it is not the one."""
        rec = await self.state.get_worker(str(body["instance_id"]))
        if rec is None or rec.url != body["url"] or rec.stopped_at is not None:
            return False
        lease = body.get("lease")
        if rec.lease_hash is not None and not (isinstance(lease, str) and hmac.compare_digest(
                rec.lease_hash, lease_hash(lease))):
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
            # bounded like the registry: addresses of workers long gone do not pile up
            while len(self._http) >= 2 * self.settings.max_workers:
                self._spawn(self._http.pop(next(iter(self._http))).close())
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
        if not self._is_alive(rec):
            raise WorkerUnavailable(self._dead_reason(rec))
        return rec, self._transport_or_unavailable(rec)

    def _transport_or_unavailable(self, rec: WorkerRecord) -> WorkerTransport:
        try:
            return self.transport(rec)
        except ValueError as exc:  # a record whose address cannot be used (not from us)
            raise WorkerUnavailable(f"the worker of instance {rec.instance_id!r} has an "
                                    f"unusable address {rec.url[:100]!r} ({exc})") from None

    async def _ask(self, rec: WorkerRecord, op: str, body: dict[str, Any],
                   timeout_s: float | None = None) -> Any:
        """One command to one worker, bounded by the fan-out deadline; any failure (no
        answer, a bad address) is a WorkerUnavailable, TimeoutError when it was late."""
        transport = self._transport_or_unavailable(rec)
        return await asyncio.wait_for(transport.call(op, body),
                                      timeout_s or self.settings.fanout_timeout_s)

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
        rec, transport = await self.route(instance_id)
        event_id = new_event_id(op)
        # Recorded first, so a state store that is gone refuses before any work starts.
        await self.state.put_event(EventRow(Event(event_id, op, instance_id, body.get("method"),
                                                  body.get("location"), 0, 0)))
        try:
            reply = answers.submitted(rec, await transport.call(
                worker_op or op, {**body, "event_id": event_id}), event_id, instance_id)
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
        await self.state.put_event(EventRow(reply))
        return reply

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
        plan = answers.chunk_plan(src_rec, await src.call(
            "chunk_plan", {"location": old[1], "tokens": list(tokens)}), tokens)
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
                if ntok != c["num_tokens"]:
                    raise WorkerUnavailable(f"the source sent chunk {c['key']} as {ntok} "
                                            f"tokens; it covers {c['num_tokens']}")
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
                     ) -> tuple[dict[str, list[Any]], dict[str, dict[str, int]], list[str]]:
        """Ask every live worker at once: ``layout_info`` (one entry per instance that holds
        a prefix), ``tiers`` (tokens per location, per instance) and the instances that did
        not answer by the fan-out deadline (``late``): one hung worker slows no lookup."""
        self.check_tokens(tokens)
        now = time.time()
        recs = [r for r in await self.state.list_workers() if self._is_alive(r, now)]
        replies = await asyncio.gather(
            *(self._ask(r, "lookup", {"tokens": list(tokens)}) for r in recs),
            return_exceptions=True)
        layout: dict[str, list[Any]] = {}
        tiers: dict[str, dict[str, int]] = {}
        late: list[str] = []
        for rec, reply in zip(recs, replies, strict=True):
            if isinstance(reply, TimeoutError):
                late.append(rec.instance_id)
                continue
            try:
                if isinstance(reply, BaseException):
                    raise reply
                got_layout, got_tiers = answers.lookup(rec, reply)
            except WorkerUnavailable as exc:
                log.warning("lookup skipped instance %s: %s", rec.instance_id, exc.detail)
                continue
            layout.update(got_layout)
            tiers.update(got_tiers)
        if self.lmcache is not None:
            # LMCache instances: from the directory their admit/evict streams keep, no fan-out
            lm_layout, lm_tiers = await self.lmcache.lookup(tokens)
            for iid, entry in lm_layout.items():
                layout.setdefault(iid, entry)
                tiers.setdefault(iid, lm_tiers.get(iid, {}))
        return layout, tiers, sorted(late)

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
            # a move is relayed (or, to an LMCache instance, driven) by its controller; any
            # other owned event is a command this controller ran on an LMCache instance
            what = ("relaying this move" if row.event.op == "move" else
                    f"running this {row.event.op} on an LMCache instance")
            _fail(row.event, f"the controller {what} stopped (no progress for "
                             f"{idle:.0f} s) after {row.event.chunks_done} of "
                             f"{row.event.chunks_total} chunks")
            self._spawn(self.state.put_event(row))

    async def _refresh_instance(self, instance_id: str, rows: list[EventRow]
                                ) -> list[EventRow]:
        rec = await self.state.get_worker(instance_id)
        changed: list[EventRow] = []
        now = time.time()
        dead = rec is not None and not self._is_alive(rec, now)
        fresh: dict[str, Event] | None = None
        if rec is not None:
            # asked even when it looks dead: a worker that hung and resumed finishes its
            # jobs, and its events must say so rather than "failed" (re-check first)
            try:
                fresh = answers.events(rec, await self._ask(
                    rec, "events", {"ids": [r.event.event_id for r in rows]}),
                    {r.event.event_id: r.event for r in rows})
            except (WorkerUnavailable, TimeoutError) as exc:
                if not dead:  # dead within dead_after_s at most; then see below
                    log.warning("event refresh: %s", getattr(exc, "detail", "no answer by "
                                "the fan-out deadline"))
                    return changed
        if rec is None or (fresh is None and (await self._holder_gone(rec) or now
                           - rec.last_heartbeat > HUNG_EVENTS_AFTER
                           * self.settings.dead_after_s)):
            why = (self._dead_reason(rec) if rec else
                   f"instance {instance_id!r} is no longer registered")
            for r in rows:
                _fail(r.event, f"{why}; the event was {r.event.status} and cannot end")
                changed.append(r)
            return changed
        if fresh is None:  # hung, not gone: its events wait for it
            return changed
        for r in rows:
            new = fresh.get(r.event.event_id)
            if new is not None:
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
        alive = self._is_alive(rec, now)
        locations, code, late = rec.locations, rec.error_code, False
        if not alive:
            code = UNAVAILABLE
        else:
            try:  # live numbers; the heartbeat's are up to one interval old
                locations, code = answers.info(rec, await self._ask(rec, "info", {}))
            except TimeoutError:
                code, late = UNAVAILABLE, True
            except WorkerUnavailable:
                code = UNAVAILABLE
        try:
            u = urlsplit(rec.url)
            ip, port = u.hostname or "", u.port or 0
        except ValueError:
            ip, port = "", 0
        return {"instance_id": rec.instance_id, "worker_id": rec.worker_id, "kind": "kvctl",
                "ip": ip, "port": port, "url": rec.url, "late": late,
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
