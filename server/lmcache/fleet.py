"""LMCache 0.5.6 instances as seen by kvctl's controller: registry, liveness, directory,
full sync, commands and their events.

Who holds what (also in the README, "Running kvctl in front of an LMCache 0.5.6 fleet"):

- The controller whose pull/reply addresses a worker's config names *holds* that worker: it
  receives its registration, heartbeats and admit/evict stream, keeps its directory in memory
  and, with ``--state redis://``, writes registry and directory through to Redis in stream
  order (`RedisFleetStore`).
- Any controller on the same state *reaches* every worker without holding it: it reads the
  registry and, for lookups, the directory from Redis, and sends commands over a REQ socket
  of its own to the worker's REP port (a REP socket serves several REQ peers, one request at
  a time, so two controllers never overlap on a worker).
- A controller restarted with its state loads registry and directory and needs no full sync;
  one without state (or meeting a worker it has no directory for) asks that worker for one
  in its next heartbeat answer.

Every compress, decompress, pin, clear and move sent to an LMCache instance is an event this
controller runs (LMCache workers keep none): queued until the worker's queue reaches it,
running while on the wire, then finished with the worker's ``num_tokens`` or failed with its
ErrorMsg. Workers of one instance (tensor-parallel ranks) all get the command and must agree
on ``num_tokens``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from kvctl.common.events import FAILED, FINISHED, RUNNING, Event
from kvctl.server.config import ServerSettings
from kvctl.server.controller.state import ControlState, EventRow
from kvctl.server.errors import (
    BadRequest,
    Conflict,
    DomainError,
    StateUnavailable,
    UnknownInstance,
    UnknownMethod,
    WorkerUnavailable,
)
from kvctl.server.events import new_event_id
from kvctl.server.lmcache import wire
from kvctl.server.lmcache.directory import Directory, chunk_hashes
from kvctl.server.lmcache.endpoint import BadFrames, ControllerSockets
from kvctl.server.lmcache.transport import WorkerRefused, ZmqWorkerTransport

log = logging.getLogger("kvctl.lmcache")

KIND = "lmcache"
# the only method an LMCache 0.5.6 worker compresses with
LMCACHE_METHODS = ("cachegen",)
# a requested full sync that has not started after this long is asked for again
SYNC_RETRY_S = 30.0
MAX_SYNC_BATCHES = 100_000
JOB_OPS = ("compress", "decompress", "pin", "clear", "move")
REFRESH_S = 0.5
# a worker heard from this recently before the controller started gets dead_after_s after the
# start to be heard again: a restart's own downtime does not make every worker dead
RESTART_GRACE_S = 300.0


@dataclass
class LMWorker:
    """One registered LMCache worker (an instance's tensor-parallel rank)."""

    instance_id: str
    worker_id: int
    ip: str
    port: int
    peer_init_url: str | None
    registered_at: float
    last_heartbeat: float
    holder: str | None = None   # controller_id of the controller that holds its sockets

    def alive(self, dead_after_s: float, now: float | None = None) -> bool:
        return ((now or time.time()) - self.last_heartbeat) <= dead_after_s

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> LMWorker:
        return cls(**json.loads(raw))


@dataclass
class SyncSession:
    sync_id: str
    location: str
    total_keys: int
    batch_count: int
    batches: dict[int, list[int]] = field(default_factory=dict)
    ended: bool = False
    committed: bool = False   # in the directory; the worker learns it at its next status

    def missing(self) -> list[int]:
        return [b for b in range(self.batch_count) if b not in self.batches]


class FleetStore:
    """Where registry and directory persist: nowhere (memory state) by default."""

    persistent = False

    async def put_worker(self, w: LMWorker) -> None: ...

    async def drop_worker(self, iid: str, wid: int) -> None: ...

    async def apply(self, iid: str, wid: int, loc: str, ops: list[tuple[str, int]],
                    last_seq: int) -> None: ...

    async def replace(self, iid: str, wid: int, loc: str, keys: set[int]) -> None: ...

    async def reset(self, iid: str, wid: int) -> None: ...

    async def workers(self) -> list[LMWorker]:
        return []

    async def load_directory(self, directory: Directory) -> None: ...

    async def matched(self, iid: str, wid: int, hashes: list[tuple[int, int]]
                      ) -> dict[str, int]:
        return {}

    async def close(self) -> None: ...


class RedisFleetStore(FleetStore):
    """Registry and directory in the controller's state Redis (keys under ``prefix``):
    ``lmcache:workers`` (set of ``[instance, worker]``), ``lmcache:worker:[i,w]`` (JSON),
    ``lmcache:locs:[i,w]`` (set of locations), ``lmcache:dir:[i,w,loc]`` (set of chunk
    hashes), ``lmcache:seq:[i,w]`` (last applied seq_num)."""

    persistent = True

    def __init__(self, url: str, prefix: str = "kvctl:ctl:") -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self._p = prefix + "lmcache:"
        self._r: Any = aioredis.Redis.from_url(
            url, socket_connect_timeout=0.5, socket_timeout=2.0, retry=Retry(NoBackoff(), 0))

    @staticmethod
    def _id(*parts: Any) -> str:
        return json.dumps(list(parts), separators=(",", ":"))

    async def _do(self, coro: Any) -> Any:
        import redis

        try:
            return await coro
        except (redis.RedisError, OSError) as exc:
            raise StateUnavailable(f"the controller's state store is unreachable "
                                   f"({type(exc).__name__}); LMCache registry and directory "
                                   "cannot be read or written") from None

    async def put_worker(self, w: LMWorker) -> None:
        pipe = self._r.pipeline(transaction=False)
        wid = self._id(w.instance_id, w.worker_id)
        pipe.set(f"{self._p}worker:{wid}", w.to_json())
        pipe.sadd(f"{self._p}workers", wid)
        await self._do(pipe.execute())

    async def drop_worker(self, iid: str, wid: int) -> None:
        await self.reset(iid, wid)
        i = self._id(iid, wid)
        pipe = self._r.pipeline(transaction=False)
        pipe.delete(f"{self._p}worker:{i}")
        pipe.srem(f"{self._p}workers", i)
        await self._do(pipe.execute())

    async def apply(self, iid: str, wid: int, loc: str, ops: list[tuple[str, int]],
                    last_seq: int) -> None:
        pipe = self._r.pipeline(transaction=True)
        key = f"{self._p}dir:{self._id(iid, wid, loc)}"
        pipe.sadd(f"{self._p}locs:{self._id(iid, wid)}", loc)
        for op, k in ops:  # in stream order: an admit then evict of one key ends evicted
            (pipe.sadd if op == "admit" else pipe.srem)(key, k)
        pipe.set(f"{self._p}seq:{self._id(iid, wid)}", last_seq)
        await self._do(pipe.execute())

    async def replace(self, iid: str, wid: int, loc: str, keys: set[int]) -> None:
        pipe = self._r.pipeline(transaction=True)
        key = f"{self._p}dir:{self._id(iid, wid, loc)}"
        pipe.delete(key)
        pipe.sadd(f"{self._p}locs:{self._id(iid, wid)}", loc)
        ks = list(keys)
        for i in range(0, len(ks), 10_000):
            pipe.sadd(key, *ks[i:i + 10_000])
        await self._do(pipe.execute())

    async def reset(self, iid: str, wid: int) -> None:
        locs = await self._do(self._r.smembers(f"{self._p}locs:{self._id(iid, wid)}"))
        pipe = self._r.pipeline(transaction=True)
        for loc in locs:
            pipe.delete(f"{self._p}dir:{self._id(iid, wid, loc.decode())}")
        pipe.delete(f"{self._p}locs:{self._id(iid, wid)}", f"{self._p}seq:{self._id(iid, wid)}")
        await self._do(pipe.execute())

    async def workers(self) -> list[LMWorker]:
        ids = sorted(i.decode() for i in await self._do(self._r.smembers(f"{self._p}workers")))
        if not ids:
            return []
        raws = await self._do(self._r.mget([f"{self._p}worker:{i}" for i in ids]))
        return [LMWorker.from_json(r) for r in raws if r is not None]

    async def load_directory(self, directory: Directory) -> None:
        for w in await self.workers():
            i = self._id(w.instance_id, w.worker_id)
            locs = await self._do(self._r.smembers(f"{self._p}locs:{i}"))
            if not locs and not await self._do(self._r.exists(f"{self._p}seq:{i}")):
                continue  # never had a directory: a full sync will build it
            wk = directory.get(w.instance_id, w.worker_id)
            seq = await self._do(self._r.get(f"{self._p}seq:{i}"))
            wk.last_seq = int(seq) if seq is not None else -1
            for loc in locs:
                loc_s = loc.decode()
                keys = await self._do(self._r.smembers(
                    f"{self._p}dir:{self._id(w.instance_id, w.worker_id, loc_s)}"))
                directory.replace(w.instance_id, w.worker_id, loc_s, (int(k) for k in keys))

    async def matched(self, iid: str, wid: int, hashes: list[tuple[int, int]]
                      ) -> dict[str, int]:
        locs = await self._do(self._r.smembers(f"{self._p}locs:{self._id(iid, wid)}"))
        out: dict[str, int] = {}
        for loc in locs:
            loc_s = loc.decode()
            held = await self._do(self._r.smismember(
                f"{self._p}dir:{self._id(iid, wid, loc_s)}", [h for _, h in hashes]))
            n = 0
            for (end, _), ok in zip(hashes, held, strict=True):
                if not ok:
                    break
                n = end
            if n:
                out[loc_s] = n
        return out

    async def close(self) -> None:
        await self._r.aclose()


class LMCacheFleet:
    """Every LMCache worker this controller knows; see the module docstring."""

    def __init__(self, settings: ServerSettings, state: ControlState, controller_id: str,
                 spawn: Callable[[Awaitable[Any]], asyncio.Task[Any]]) -> None:
        self.settings = settings
        self.state = state
        self.controller_id = controller_id
        self._spawn = spawn
        self.ctx = zmq.asyncio.Context()
        self.directory = Directory(settings.lmcache_max_keys)
        self.store: FleetStore = (RedisFleetStore(settings.state) if settings.state
                                  else FleetStore())
        self.workers: dict[tuple[str, int], LMWorker] = {}
        self.local: set[tuple[str, int]] = set()   # workers whose traffic reaches us
        self.transports: dict[tuple[str, int], ZmqWorkerTransport] = {}
        self.sessions: dict[tuple[str, int], SyncSession] = {}
        self.sync_requested: dict[tuple[str, int], float] = {}
        self.bad = BadFrames()
        self.sockets: ControllerSockets | None = None
        self.jobs: set[str] = set()
        # chunks this controller compressed (in memory only): LMCache 0.5.6 fails a second
        # compress of them and leaves them pinned, so kvctl refuses it first. A compress or
        # decompress shows as evict + admit of its keys; ``expected`` counts the admits a job
        # of ours will cause, any other admit of a marked key is a fresh (fp16) store.
        self.compressed: dict[tuple[str, int, str], set[int]] = {}
        self.expected: dict[tuple[str, int], Counter[int]] = {}
        self.full_syncs_requested = 0
        self._writes: asyncio.Queue[Awaitable[Any]] = asyncio.Queue(maxsize=10_000)
        self._writer: asyncio.Task[None] | None = None
        self._refreshed = -REFRESH_S
        self.started_at = time.time()

    # ---- life cycle -------------------------------------------------------------------
    async def start(self) -> None:
        self.started_at = time.time()
        if self.store.persistent:
            for w in await self.store.workers():
                self.workers[(w.instance_id, w.worker_id)] = w
            await self.store.load_directory(self.directory)
            if self.workers:
                log.info("LMCache: %d worker(s) and their directories loaded from state",
                         len(self.workers))
        self._writer = asyncio.create_task(self._write_loop())
        ports = self.settings.lmcache_monitor_ports
        if ports is not None:
            self.sockets = ControllerSockets(self.ctx, self.settings.lmcache_monitor_host,
                                             ports, self, self.bad)
            self.sockets.start()
            log.info("LMCache controller sockets on %s: %s", self.settings.lmcache_monitor_host,
                     ", ".join(f"{k} {v}" for k, v in self.sockets.ports.items()))

    async def close(self) -> None:
        if self.sockets is not None:
            await self.sockets.close_async()
        if self._writer is not None:
            # what the stream said is written before the state closes
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(self._writes.join(), 2.0)
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        for t in self.transports.values():
            await t.close()
        await self.store.close()
        self.ctx.term()

    def _persist(self, coro: Awaitable[Any]) -> None:
        if not self.store.persistent:
            _discard(coro)
            return
        try:
            self._writes.put_nowait(coro)
        except asyncio.QueueFull:
            _discard(coro)
            self.bad.add("state writes behind", "the state Redis is too slow; the stored "
                         "directory will be rebuilt by a full sync")

    async def _write_loop(self) -> None:
        while True:
            coro = await self._writes.get()
            try:
                await coro
            except StateUnavailable as exc:
                self.bad.add("state write failed", exc.detail)
            except Exception:
                log.exception("LMCache state write failed")
            finally:
                self._writes.task_done()

    async def flush(self) -> None:
        """Wait until every directory change so far is in the state store (tests, bench)."""
        await self._writes.join()

    # ---- frames from workers -----------------------------------------------------------
    def on_push(self, msg: wire.PushMsg) -> None:
        k = (msg.instance_id, msg.worker_id)
        w = self.workers.get(k)
        if w is None:
            # until it registers (or heartbeats) here, its keys are nobody's: the full sync
            # that follows brings them
            self.bad.add("push from an unregistered worker",
                         f"{type(msg).__name__} from {msg.instance_id}/{msg.worker_id}")
            return
        # a worker known from the state (a restart) streams on where it was: its seq_num
        # says whether anything was lost meanwhile
        self.local.add(k)
        w.last_heartbeat = time.time()
        if isinstance(msg, wire.BatchedKVOperationMsg):
            self._apply(k, msg.location, msg.operations)
        elif isinstance(msg, wire.KVAdmitMsg | wire.KVEvictMsg):
            op = wire.OpType.ADMIT if isinstance(msg, wire.KVAdmitMsg) else wire.OpType.EVICT
            self._apply(k, msg.location, [wire.KVOpEvent(op, msg.key, msg.seq_num)])
        elif isinstance(msg, wire.DeRegisterMsg):
            self._forget(k, "deregistered")
        elif isinstance(msg, wire.FullSyncBatchMsg):
            s = self.sessions.get(k)
            if s is None or s.sync_id != msg.sync_id or not 0 <= msg.batch_id < s.batch_count:
                self.bad.add("full-sync batch outside a session", f"{msg.sync_id}/{msg.batch_id}")
                return
            have = sum(len(b) for i, b in s.batches.items() if i != msg.batch_id)
            if have + len(msg.keys) > s.total_keys or have + len(msg.keys) > \
                    self.settings.lmcache_max_keys:
                self.bad.add("full-sync batch beyond its announced keys", msg.sync_id)
                return
            s.batches[msg.batch_id] = list(msg.keys)
        elif isinstance(msg, wire.FullSyncEndMsg):
            s = self.sessions.get(k)
            if s is None or s.sync_id != msg.sync_id:
                self.bad.add("full-sync end outside a session", msg.sync_id)
                return
            s.ended = True
            self._maybe_commit(k, s)

    def _apply(self, k: tuple[str, int], location: str, ops: Sequence[wire.KVOpEvent]) -> None:
        res = self.directory.apply(k[0], k[1], location, ops)
        if res.dropped:
            self.bad.add("admits beyond the directory bound",
                         f"{k[0]}/{k[1]} {location}: {self.settings.lmcache_max_keys} keys")
        if res.stale:
            self.bad.add("repeated or old seq_num", f"{k[0]}/{k[1]}")
        if res.gap:
            log.warning("LMCache %s/%s: seq_num gap, operations were lost; asking for a full "
                        "sync", *k)
        marked = self.compressed.get((k[0], k[1], location))
        if marked:
            expected = self.expected.get(k, Counter())
            for op, key in res.applied:
                if op != "admit" or key not in marked:
                    continue
                if expected[key] > 0:
                    expected[key] -= 1
                else:
                    marked.discard(key)
        if res.applied:
            last = self.directory.get(*k).last_seq
            self._persist(self.store.apply(k[0], k[1], location, res.applied, last))

    def _maybe_commit(self, k: tuple[str, int], s: SyncSession) -> None:
        if not s.ended or s.missing():
            return
        s.committed = True
        keys = [key for b in sorted(s.batches) for key in s.batches[b]]
        n = self.directory.replace(k[0], k[1], s.location, keys)
        self.sync_requested.pop(k, None)
        log.info("LMCache %s/%s: full sync %s done, %d keys in %s", k[0], k[1], s.sync_id, n,
                 s.location)
        self._persist(self.store.replace(k[0], k[1], s.location,
                                         set(self.directory.get(*k).locations[s.location])))

    async def on_request(self, msg: wire.RequestMsg, sock: str) -> msgspec.Struct:
        if isinstance(msg, wire.RegisterMsg | wire.HeartbeatMsg):
            if isinstance(msg, wire.RegisterMsg) and sock != "reply":
                return wire.ErrorMsg(error="register on the reply socket")
            return await self._join(msg)
        k = (msg.instance_id, msg.worker_id)
        if k not in self.workers or k not in self.local:
            return wire.ErrorMsg(error=f"worker {msg.instance_id}/{msg.worker_id} is not "
                                       "registered with this controller")
        if isinstance(msg, wire.FullSyncStartMsg):
            if msg.batch_count > MAX_SYNC_BATCHES or msg.total_keys > \
                    self.settings.lmcache_max_keys or msg.batch_count < 0 or msg.total_keys < 0:
                self.bad.add("full sync too large", f"{msg.total_keys} keys")
                return wire.FullSyncStartRetMsg(sync_id=msg.sync_id, accepted=False,
                                                error_msg="more keys than the controller "
                                                "keeps per worker")
            self.sessions[k] = SyncSession(msg.sync_id, msg.location, msg.total_keys,
                                           max(msg.batch_count, 1) if msg.total_keys else
                                           msg.batch_count)
            return wire.FullSyncStartRetMsg(sync_id=msg.sync_id, accepted=True)
        if isinstance(msg, wire.FullSyncStatusMsg):
            s = self.sessions.get(k)
            if s is None or s.sync_id != msg.sync_id:
                return wire.ErrorMsg(error=f"unknown sync_id {msg.sync_id!r}")
            missing = s.missing() if s.ended else []
            done = s.ended and not missing
            if done:
                self.sessions.pop(k, None)
            got = len(s.batches)
            return wire.FullSyncStatusRetMsg(
                sync_id=s.sync_id, is_complete=done,
                global_progress=1.0 if done else (got / s.batch_count if s.batch_count else 0.0),
                can_exit_freeze=done, missing_batches=missing)
        return wire.ErrorMsg(error=f"{type(msg).__name__} is not supported by kvctl's controller")

    async def _join(self, msg: wire.RegisterMsg | wire.HeartbeatMsg) -> msgspec.Struct:
        k = (msg.instance_id, msg.worker_id)
        now = time.time()
        old = self.workers.get(k)
        if old is not None and (old.ip, old.port) != (msg.ip, msg.port) and \
                old.alive(self.settings.dead_after_s, now):
            self.bad.add("identity claimed from another address",
                         f"{msg.instance_id}/{msg.worker_id} from {msg.ip}:{msg.port}")
            return wire.ErrorMsg(error=f"worker {msg.worker_id} of instance "
                                       f"{msg.instance_id!r} is registered from "
                                       f"{old.ip}:{old.port} and alive; not replaced")
        if old is None and len(self.workers) >= self.settings.lmcache_max_workers:
            self.bad.add("registrations beyond lmcache_max_workers",
                         f"{msg.instance_id}/{msg.worker_id}")
            return wire.ErrorMsg(error=f"the controller keeps at most "
                                       f"{self.settings.lmcache_max_workers} LMCache workers")
        registering = isinstance(msg, wire.RegisterMsg)
        moved = old is not None and (old.ip, old.port) != (msg.ip, msg.port)
        w = LMWorker(msg.instance_id, msg.worker_id, msg.ip, msg.port, msg.peer_init_url,
                     registered_at=now if registering or old is None or moved
                     else old.registered_at,
                     last_heartbeat=now, holder=self.controller_id)
        self.workers[k] = w
        fresh = k not in self.local
        self.local.add(k)
        if registering or moved:
            # a new worker process: its cache starts empty, its stream at seq 0
            self.directory.reset(*k)
            self._unmark(k)
            self._persist(self.store.reset(*k))
            t = self.transports.pop(k, None)
            if t is not None:
                await t.close()
        if registering or fresh or moved:
            log.info("LMCache instance %s worker %d %s at %s:%d", msg.instance_id,
                     msg.worker_id, "registered" if registering else "joined by heartbeat",
                     msg.ip, msg.port)
        # every beat: other controllers on the same state judge liveness from it
        self._persist(self.store.put_worker(w))
        if registering:
            return wire.RegisterRetMsg(extra_config={"heartbeat_url": self._heartbeat_url(msg)})
        return wire.HeartbeatRetMsg(commands=self._commands(k, now))

    def _commands(self, k: tuple[str, int], now: float) -> list[wire.FullSyncCommand]:
        """A full sync only where the directory is missing or lost operations."""
        missing = not self.directory.has(*k)
        if not missing and not self.directory.get(*k).needs_sync:
            return []
        if k in self.sessions or now - self.sync_requested.get(k, 0.0) < SYNC_RETRY_S:
            return []
        self.sync_requested[k] = now
        self.full_syncs_requested += 1
        reason = "kvctl_directory_missing" if missing else "kvctl_operations_lost"
        log.info("LMCache %s/%s: asking for a full sync (%s)", k[0], k[1], reason)
        return [wire.FullSyncCommand(reason=reason)]

    def _heartbeat_url(self, msg: wire.RegisterMsg) -> str:
        assert self.sockets is not None
        host = self.settings.advertise_host or self.settings.lmcache_monitor_host
        if host in ("0.0.0.0", "", "*"):
            host = _route_to(msg.ip)
        return f"{host}:{self.sockets.ports['heartbeat']}"

    def _unmark(self, k: tuple[str, int]) -> None:
        for key in [m for m in self.compressed if m[:2] == k]:
            del self.compressed[key]
        self.expected.pop(k, None)

    def _forget(self, k: tuple[str, int], why: str) -> None:
        self._unmark(k)
        self.workers.pop(k, None)
        self.local.discard(k)
        self.directory.drop(*k)
        t = self.transports.pop(k, None)
        if t is not None:
            self._spawn(t.close())
        self._persist(self.store.drop_worker(*k))
        log.info("LMCache instance %s worker %d %s", k[0], k[1], why)

    # ---- reads ------------------------------------------------------------------------
    async def refresh(self) -> None:
        """With shared state, see workers another controller holds (and their beats); read
        at most every REFRESH_S, a fraction of any liveness window."""
        if not self.store.persistent:
            return
        now = time.monotonic()
        if now - self._refreshed < REFRESH_S:
            return
        self._refreshed = now
        for w in await self.store.workers():
            k = (w.instance_id, w.worker_id)
            if k not in self.local:
                self.workers[k] = w

    def _alive(self, w: LMWorker, now: float) -> bool:
        dead_after = self.settings.dead_after_s
        if w.alive(dead_after, now):
            return True
        if ((w.instance_id, w.worker_id) not in self.local
                and now - self.started_at <= dead_after
                and self.started_at - w.last_heartbeat <= RESTART_GRACE_S):
            return True
        # a worker runs a command on its only thread: no heartbeat while it compresses
        t = self.transports.get((w.instance_id, w.worker_id))
        return t is not None and t.in_flight_since is not None

    async def instance_workers(self, instance_id: str) -> list[LMWorker]:
        await self.refresh()
        return sorted((w for w in self.workers.values() if w.instance_id == instance_id),
                      key=lambda w: w.worker_id)

    def instances(self) -> list[str]:
        return sorted({w.instance_id for w in self.workers.values()})

    async def has_instance(self, instance_id: str) -> bool:
        return bool(await self.instance_workers(instance_id))

    async def _matched(self, w: LMWorker, hashes: list[tuple[int, int]]) -> dict[str, int]:
        k = (w.instance_id, w.worker_id)
        if k in self.local or not self.store.persistent:
            return self.directory.best(*k, hashes)[2]
        return await self.store.matched(*k, hashes)

    async def lookup(self, tokens: Sequence[int]
                     ) -> tuple[dict[str, list[Any]], dict[str, dict[str, int]]]:
        """From the directory, no worker asked: per instance the location with the longest
        prefix (held by every worker of it) and tokens per location."""
        await self.refresh()
        now = time.time()
        hashes = self._hashes(tokens)
        layout: dict[str, list[Any]] = {}
        tiers: dict[str, dict[str, int]] = {}
        by_inst: dict[str, list[LMWorker]] = {}
        for w in self.workers.values():
            if self._alive(w, now):
                by_inst.setdefault(w.instance_id, []).append(w)
        for iid, ws in by_inst.items():
            per: dict[str, int] | None = None
            for w in ws:
                m = await self._matched(w, hashes)
                per = m if per is None else {loc: min(n, m.get(loc, 0)) for loc, n in
                                             per.items() if m.get(loc, 0)}
            if per:
                loc = max(per, key=lambda x: per[x])
                layout[iid] = [loc, per[loc]]
                tiers[iid] = per
        return layout, tiers

    def _hashes(self, tokens: Sequence[int]) -> list[tuple[int, int]]:
        return chunk_hashes(tokens, self.settings.chunk_size, self.settings.lmcache_none_hash)

    def _transport(self, w: LMWorker) -> ZmqWorkerTransport:
        k = (w.instance_id, w.worker_id)
        t = self.transports.get(k)
        if t is None or t.address != (w.ip, w.port):
            if t is not None:
                self._spawn(t.close())

            def seen(k: tuple[str, int] = k) -> None:
                rec = self.workers.get(k)
                if rec is not None and k in self.local:
                    rec.last_heartbeat = time.time()

            t = ZmqWorkerTransport(self.ctx, w.instance_id, w.worker_id, w.ip, w.port,
                                   self.settings.worker_timeout_s,
                                   self.settings.lmcache_job_timeout_s, on_reply=seen)
            self.transports[k] = t
        return t

    async def _live_workers(self, instance_id: str) -> list[LMWorker]:
        ws = await self.instance_workers(instance_id)
        if not ws:
            raise UnknownInstance(f"unknown instance_id {instance_id!r}")
        now = time.time()
        dead = [w for w in ws if not self._alive(w, now)]
        if dead:
            w = dead[0]
            raise WorkerUnavailable(
                f"LMCache worker {w.worker_id} of instance {instance_id!r} at {w.ip}:{w.port} "
                f"is dead: no heartbeat for {now - w.last_heartbeat:.0f} s (dead after "
                f"{self.settings.dead_after_s:g} s); commands to it fail until it is back")
        return ws

    # ---- commands ---------------------------------------------------------------------
    async def move(self, old: tuple[str, str], new: tuple[str, str], tokens: list[int],
                   should_copy: bool) -> Event:
        """Between two LMCache instances, over their P2P transfer (worker i to worker i)."""
        for iid in (old[0], new[0]):
            if not await self.has_instance(iid):
                raise BadRequest(f"instance {iid!r} is not an LMCache instance; chunks move "
                                 "between two kvctl instances or two LMCache instances only")
        if old[0] == new[0]:
            raise BadRequest(f"LMCache 0.5.6 cannot move chunks within instance {old[0]!r} "
                             "(its worker has no prefetch); move to another instance")
        dst = {w.worker_id: w for w in await self._live_workers(new[0])}
        bodies = []
        for w in await self._live_workers(old[0]):
            d = dst.get(w.worker_id)
            if d is None or not d.peer_init_url:
                raise BadRequest(f"instance {new[0]!r} worker {w.worker_id} has no P2P address "
                                 "(enable_p2p, p2p_host, p2p_init_ports in its config)")
            bodies.append({"old_location": old[1], "target_url": d.peer_init_url,
                           "new_location": new[1], "tokens": tokens,
                           "should_copy": should_copy})
        return await self.submit("move", old[0], {
            "location": old[1], "tokens": tokens,
            "location_desc": f"{old[0]}/{old[1]}->{new[0]}/{new[1]}"}, bodies)

    async def submit(self, op: str, instance_id: str, body: dict[str, Any],
                     bodies: list[dict[str, Any]] | None = None) -> Event:
        """Queue a command to every worker of the instance; the event is returned at once."""
        if op not in JOB_OPS:
            raise BadRequest(f"LMCache instances run {', '.join(JOB_OPS)}; not {op!r}")
        if op == "pin" and body.get("pinned") is False:
            raise BadRequest(f"LMCache 0.5.6 instances cannot unpin (instance {instance_id!r})"
                             "; its pins end with clear or eviction of the location")
        if op in ("compress", "decompress") and body.get("method") not in LMCACHE_METHODS:
            raise UnknownMethod(f"LMCache instance {instance_id!r} can {op} with "
                                f"{', '.join(LMCACHE_METHODS)} only, not "
                                f"{body.get('method')!r}")
        ws = await self._live_workers(instance_id)
        location = body.get("location")
        tokens = list(body.get("tokens") or [])
        hashes = self._hashes(tokens)
        if op == "compress":
            for w in ws:
                marked = self.compressed.get((w.instance_id, w.worker_id, str(location)), set())
                held = self._keys(w, location)
                again = [h for _, h in hashes if h in marked and h in held]
                if again:
                    raise Conflict(
                        f"{len(again)} chunk(s) of these tokens on instance {instance_id!r} "
                        f"({location}) are already compressed with cachegen; LMCache 0.5.6 "
                        "fails a second compress and leaves the chunks pinned: decompress "
                        "them first")
        if op == "clear":
            est = min([self._held(w, location) for w in ws] or [0]) * self.settings.chunk_size
        else:
            est = min([(await self._matched(w, hashes)).get(str(location), 0) for w in ws]
                      or [0])
        ev = Event(new_event_id(op), op, instance_id, body.get("method"),
                   location if op != "move" else body.get("location_desc"), est,
                   chunks_total=-(-est // self.settings.chunk_size))
        row = EventRow(ev, owner=self.controller_id)
        await self.state.put_event(row)
        self.jobs.add(ev.event_id)
        transports = [self._transport(w) for w in ws]
        task = self._spawn(self._run(row, op, bodies or [body] * len(ws), transports))
        task.add_done_callback(lambda _: self.jobs.discard(ev.event_id))
        return ev

    def _keys(self, w: LMWorker, location: Any) -> set[int]:
        k = (w.instance_id, w.worker_id)
        if not self.directory.has(*k):
            return set()
        return self.directory.get(*k).locations.get(str(location), set())

    def _held(self, w: LMWorker, location: Any) -> int:
        k = (w.instance_id, w.worker_id)
        if not self.directory.has(*k):
            return 0
        return len(self.directory.get(*k).locations.get(str(location), ()))

    async def _run(self, row: EventRow, op: str, bodies: list[dict[str, Any]],
                   transports: list[ZmqWorkerTransport]) -> None:
        ev = row.event

        def started() -> None:
            if ev.status != RUNNING:
                ev.status, ev.started_at = RUNNING, time.time()
                self._spawn(self._save(row))

        if op in ("compress", "decompress"):
            # the admits this job will cause (one per chunk it rewrites), on each worker
            for t in transports:
                exp = self.expected.setdefault((t.instance_id, t.worker_id), Counter())
                exp.clear()   # what an earlier job did not cause, it never will
                for _, h in self._hashes(bodies[0].get("tokens") or []):
                    exp[h] += 1
        ticker = self._spawn(self._touch(row))
        try:
            results = await asyncio.gather(
                *(t.call(op, {**b, "_started": started})
                  for t, b in zip(transports, bodies, strict=True)),
                return_exceptions=True)
        finally:
            ticker.cancel()
        errors = [(t, r) for t, r in zip(transports, results, strict=True)
                  if isinstance(r, BaseException)]
        if ev.started_at is None:
            ev.started_at = time.time()
        if errors:
            t, exc = errors[0]
            detail = exc.detail if isinstance(exc, DomainError) else \
                f"internal error: {type(exc).__name__}: {exc}"
            if not isinstance(exc, DomainError):
                log.error("LMCache %s %s failed", op, ev.event_id, exc_info=exc)
            who = f"worker {t.worker_id}" if len(transports) > 1 else "the worker"
            ev.status = FAILED
            ev.error = (f"{who} refused: {detail}" if isinstance(exc, WorkerRefused)
                        else detail)
        else:
            nums = sorted({int(r["num_tokens"]) for r in results})  # type: ignore[index]
            if len(nums) > 1:
                ev.status = FAILED
                ev.error = ("the workers of this instance disagree on the tokens done: " +
                            ", ".join(f"worker {t.worker_id}: {r['num_tokens']}"  # type: ignore[index]
                                      for t, r in zip(transports, results, strict=True)))
            else:
                ev.status = FINISHED
                ev.num_tokens = nums[0] if nums else 0
                self._mark(op, ev, bodies[0], transports)
                ev.chunks_total = -(-ev.num_tokens // self.settings.chunk_size)
                ev.chunks_done = ev.chunks_total
        ev.finished_at = time.time()
        with contextlib.suppress(StateUnavailable):
            await self._save(row)

    def _mark(self, op: str, ev: Event, body: dict[str, Any],
              transports: list[ZmqWorkerTransport]) -> None:
        """After a finished job: which chunks are compressed now."""
        loc = str(ev.location)
        for t in transports:
            key = (t.instance_id, t.worker_id, loc)
            if op == "clear":
                # pinned chunks survive a clear; the rest are gone
                held = self._keys(self.workers[(t.instance_id, t.worker_id)], loc) \
                    if (t.instance_id, t.worker_id) in self.workers else set()
                self.compressed[key] = self.compressed.get(key, set()) & held
                continue
            if op not in ("compress", "decompress"):
                continue
            done = [h for end, h in self._hashes(body.get("tokens") or [])
                    if end <= ev.num_tokens]
            marked = self.compressed.setdefault(key, set())
            (marked.update if op == "compress" else marked.difference_update)(done)

    async def _save(self, row: EventRow) -> None:
        row.touched_at = time.time()
        await self.state.put_event(row)

    async def _touch(self, row: EventRow) -> None:
        # other controllers fail an owned event nobody touched for dead_after_s
        while True:
            await asyncio.sleep(max(0.5, self.settings.dead_after_s / 3))
            with contextlib.suppress(StateUnavailable):
                await self._save(row)

    async def health(self, instance_id: str) -> dict[int, int]:
        """Per worker: its own health code, 2 when dead or unreachable."""
        ws = await self.instance_workers(instance_id)
        now = time.time()

        async def one(w: LMWorker) -> int:
            if not self._alive(w, now):
                return 2
            try:
                r = await self._transport(w).call("health", {})
            except WorkerRefused:
                return 1
            except WorkerUnavailable:
                return 2
            return int(r["error_code"])

        codes = await asyncio.gather(*(one(w) for w in ws))
        return {w.worker_id: c for w, c in zip(ws, codes, strict=True)}

    async def views(self, instance_id: str | None = None) -> list[dict[str, Any]]:
        await self.refresh()
        now = time.time()
        out = []
        for (iid, wid), w in sorted(self.workers.items()):
            if instance_id is not None and iid != instance_id:
                continue
            alive = self._alive(w, now)
            wk = self.directory.get(iid, wid) if self.directory.has(iid, wid) else None
            locs = [{"location": loc, "chunks": len(keys), "bytes": 0, "capacity_bytes": None,
                     "pinned_chunks": 0} for loc, keys in (wk.locations.items() if wk else ())]
            t = self.transports.get((iid, wid))
            out.append({
                "instance_id": iid, "worker_id": wid, "kind": KIND, "ip": w.ip,
                "port": w.port, "url": f"tcp://{w.ip}:{w.port}", "engine_url": None,
                "distributed_url": None, "peer_init_url": w.peer_init_url,
                "state": "alive" if alive else "dead", "error_code": 0 if alive else 2,
                "registration_time": w.registered_at, "last_heartbeat_time": w.last_heartbeat,
                "heartbeat_age_s": round(now - w.last_heartbeat, 3),
                "chunk_size": self.settings.chunk_size, "locations": locs,
                "key_count": wk.count() if wk else 0,
                "directory": "missing" if wk is None else
                             ("syncing" if (iid, wid) in self.sessions and
                              not self.sessions[(iid, wid)].committed else "ok"),
                "queued_commands": t.queued if t else 0,
                "held_here": (iid, wid) in self.local})
        return out

    def stats(self) -> dict[str, Any]:
        return {"bad_frames": dict(self.bad.counts), "full_syncs_requested":
                self.full_syncs_requested,
                "dropped_admits": sum(self.directory.get(*k).dropped_admits
                                      for k in self.directory.workers())}


def _route_to(ip: str) -> str:
    """This host's address on the route to ``ip`` (a UDP connect sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((ip, 9))
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def _discard(coro: Awaitable[Any]) -> None:
    close = getattr(coro, "close", None)
    if close is not None:
        close()
