"""The coordinator's state: registry, key directory, ingest cursors and pins.

Two implementations with one behaviour (the API tests run against both):

- `MemoryStore`: this process's memory. Every lookup is a dict access (O(1) per key);
  placements die with the process.
- `RedisStore` (``--state redis://...``, layout in ``redis_layout.lua``): every coordinator
  naming the same Redis shares one fleet view, and a coordinator killed and restarted
  finds every placement again. A batch is applied by one server-side script, atomically
  (cursor check, fencing and every entry), so two coordinators that receive one server's
  batches in turn apply each exactly once, in order; one ``POST /events`` is one pipeline.

Ingest rules (LMCache's, per instance): ``seq`` starts at 1 and rises by one per batch; at or
below the last one seen is a duplicate; a jump is admitted and counted as a gap (the
directory misses what the lost batches said); a lower incarnation is stale; a higher one
fences the instance's L1 placements (a restarted server's memory is empty) and starts a new
cursor. kvctl also drops (and counts) batches from instances that are not registered, and
store entries for new keys once ``max_keys`` keys are known: existing keys keep updating,
deletes make room, and ``dropped_entries`` says how many were refused.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from array import array
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvctl.server.coordinator.models import EventBatch, EventsResponse, EventType, key_from_id
from kvctl.server.errors import StateUnavailable

TIERS = ("l1", "l2")
SHARED_OWNER = "*"  # placements on a fleet-shared backend belong to no one instance


@dataclass
class Instance:
    """A registered MP server, as it registered, plus its last heartbeat (wall clock)."""

    instance_id: str
    ip: str
    http_port: int
    registration_time: float
    metadata: dict[str, str] = field(default_factory=dict)
    p2p_advertised_url: str = ""
    mq_port: int = 0
    last_heartbeat: float = 0.0

    def wire(self) -> dict[str, Any]:
        """Upstream's ``GET /instances`` row."""
        return {"instance_id": self.instance_id, "ip": self.ip, "http_port": self.http_port,
                "registration_time": self.registration_time, "metadata": self.metadata,
                "p2p_advertised_url": self.p2p_advertised_url, "mq_port": self.mq_port}

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Instance:
        return cls(**json.loads(raw))


@dataclass
class Cursor:
    """One instance's ingest stream as this state saw it, with what upstream does not count."""

    incarnation: int = 0
    last_seq: int = 0
    gap_detected: bool = False
    applied: int = 0
    duplicates: int = 0
    stale: int = 0
    gaps: int = 0
    dropped_entries: int = 0


def pack_tokens(ids: list[int]) -> bytes:
    return array("I", ids).tobytes()


def unpack_tokens(raw: bytes | None) -> list[int]:
    if not raw:
        return []
    a = array("I")
    a.frombytes(raw)
    return a.tolist()


def placement_wire(value: tuple[str, int, int, bool], tier: str, backend: str
                   ) -> dict[str, Any]:
    iid, inc, size, shared = value
    return {"instance_id": iid, "incarnation": inc, "tier": tier, "backend": backend,
            "size_bytes": size, "shared": shared}


class CoordinatorStore(ABC):
    """Registry, directory, cursors and pins, shared by every coordinator using the same state.
    """

    description: str
    max_keys: int
    keep_token_ids: bool

    # ---- registry ---------------------------------------------------------------------
    @abstractmethod
    async def register(self, inst: Instance) -> bool:
        """Add or replace; True when it replaced a registration."""

    @abstractmethod
    async def heartbeat(self, instance_id: str, now: float) -> bool: ...

    @abstractmethod
    async def deregister(self, instance_id: str) -> bool:
        """Remove; fence its L1 placements and forget its cursor. True if it was there."""

    @abstractmethod
    async def get_instance(self, instance_id: str) -> Instance | None: ...

    @abstractmethod
    async def instances(self) -> list[Instance]: ...

    # ---- ingest -----------------------------------------------------------------------
    @abstractmethod
    async def ingest(self, batches: list[EventBatch]) -> EventsResponse: ...

    @abstractmethod
    async def cursors(self) -> dict[str, Cursor]: ...

    @abstractmethod
    async def counters(self) -> dict[str, int]:
        """Fleet-wide: ``keys``, ``unregistered`` batches, ``dropped_entries`` (key limit)."""

    # ---- directory --------------------------------------------------------------------
    @abstractmethod
    async def lookup(self, key_ids: list[str]
                     ) -> list[tuple[list[dict[str, Any]], list[int], int]]:
        """Per key: placements, the chunk's token ids, access count (empty/0 if unknown)."""

    @abstractmethod
    async def list_keys(self, tier: str, instance_id: str, backend: str, offset: int,
                        limit: int) -> tuple[int, list[tuple[str, list[dict[str, Any]], int,
                                                             int]]]: ...

    @abstractmethod
    async def stats(self) -> dict[str, Any]: ...

    @abstractmethod
    async def usage(self) -> dict[str, dict[str, list[int]]]:
        """owner -> 'tier|backend|shared' -> [used_bytes, capacity_bytes, declared]."""

    # ---- pins -------------------------------------------------------------------------
    @abstractmethod
    async def pin(self, key_ids: list[str]) -> None: ...

    @abstractmethod
    async def unpin(self, key_ids: list[str]) -> None: ...

    @abstractmethod
    async def drop_pins(self, key_ids: list[str]) -> None: ...

    @abstractmethod
    async def pinned(self, key_ids: list[str]) -> set[str]: ...

    @abstractmethod
    async def pins(self, cache_salt: str, model_name: str, offset: int, limit: int
                   ) -> tuple[int, list[tuple[str, int]]]: ...

    async def ping(self) -> None:  # noqa: B027 - in memory there is nothing to reach
        """Raise StateUnavailable if the state cannot be reached."""

    async def close(self) -> None:  # noqa: B027
        """Release connections."""


def _matches(field_name: str, tier: str, instance_id: str, backend: str) -> bool:
    owner, t, b = field_name.rsplit("|", 2)
    return ((tier == "all" or t == tier) and (not backend or b == backend)
            and (not instance_id or owner == instance_id))


class _Key:
    """One directory key in memory: placements by identity, the chunk's tokens, accesses."""

    __slots__ = ("access", "placements", "tokens")

    def __init__(self) -> None:
        # "owner|tier|backend" -> (instance_id, incarnation, size_bytes, shared)
        self.placements: dict[str, tuple[str, int, int, bool]] = {}
        self.tokens: bytes = b""
        self.access = 0


class MemoryStore(CoordinatorStore):
    description = "memory"

    def __init__(self, max_keys: int = 1_000_000, keep_token_ids: bool = True) -> None:
        self.max_keys = max_keys
        self.keep_token_ids = keep_token_ids
        self._inst: dict[str, Instance] = {}
        self._keys: dict[str, _Key] = {}
        self._l1: dict[str, set[str]] = {}  # instance -> keys it holds in L1 (for fencing)
        self._cur: dict[str, Cursor] = {}
        self._tier = {t: [0, 0] for t in TIERS}  # placements, bytes
        self._used: dict[str, dict[str, int]] = {}  # owner -> "tier|backend|shared" -> bytes
        self._cap: dict[str, dict[str, tuple[int, int]]] = {}  # iid -> module -> (cap, rev)
        self._pins: dict[str, int] = {}
        self._unregistered = 0
        self._dropped = 0

    # ---- registry ---------------------------------------------------------------------
    async def register(self, inst: Instance) -> bool:
        again = inst.instance_id in self._inst
        self._inst[inst.instance_id] = inst
        return again

    async def heartbeat(self, instance_id: str, now: float) -> bool:
        inst = self._inst.get(instance_id)
        if inst is None:
            return False
        inst.last_heartbeat = now
        return True

    async def deregister(self, instance_id: str) -> bool:
        was = self._inst.pop(instance_id, None) is not None
        self._fence_l1(instance_id)
        self._cur.pop(instance_id, None)
        self._cap.pop(instance_id, None)
        return was

    async def get_instance(self, instance_id: str) -> Instance | None:
        return self._inst.get(instance_id)

    async def instances(self) -> list[Instance]:
        return list(self._inst.values())

    # ---- ingest -----------------------------------------------------------------------
    async def ingest(self, batches: list[EventBatch]) -> EventsResponse:
        out = EventsResponse()
        for b in batches:
            self._ingest_one(b, out)
        return out

    def _ingest_one(self, b: EventBatch, out: EventsResponse) -> None:
        iid = b.instance_id
        if iid not in self._inst:
            self._unregistered += 1
            out.unregistered += 1
            return
        cur = self._cur.get(iid)
        if cur is not None:
            if b.incarnation < cur.incarnation:
                cur.stale += 1
                out.stale += 1
                return
            if b.incarnation > cur.incarnation:
                self._fence_l1(iid)
                cur.incarnation, cur.last_seq, cur.gap_detected = b.incarnation, 0, False
            elif b.seq <= cur.last_seq:
                cur.duplicates += 1
                out.duplicates += 1
                return
        else:
            cur = self._cur[iid] = Cursor(incarnation=b.incarnation)
        if b.seq > cur.last_seq + 1:
            cur.gap_detected = True
            cur.gaps += 1
            out.gaps += 1
        cur.last_seq = b.seq
        cur.applied += 1
        out.applied += 1
        dropped = self._apply(b)
        cur.dropped_entries += dropped
        out.dropped_entries += dropped

    def _apply(self, b: EventBatch) -> int:
        tier, backend, shared, iid = b.tier.value, b.backend, b.shared, b.instance_id
        owner = SHARED_OWNER if shared else iid
        name = f"{owner}|{tier}|{backend}"
        module = f"{tier}|{backend}|{int(shared)}"
        kind = b.event_type
        keys = self._keys
        dropped = 0
        if kind == EventType.config:
            caps = self._cap.setdefault(iid, {})
            if any(rev < b.capacity_revision for _, rev in caps.values()):
                # a new declaration: compartments it does not repeat are gone
                caps = self._cap[iid] = {m: v for m, v in caps.items()
                                         if v[1] >= b.capacity_revision}
            caps[module] = (b.capacity_bytes, b.capacity_revision)
            self._used.setdefault(owner, {}).setdefault(module, 0)
            return 0
        if kind == EventType.store:
            used = self._used.setdefault(owner, {})
            stat = self._tier[tier]
            l1 = self._l1.setdefault(iid, set()) if tier == "l1" and not shared else None
            for e in b.entries:
                kid = e.key.key_id()
                rec = keys.get(kid)
                if rec is None:
                    if len(keys) >= self.max_keys:
                        dropped += 1
                        continue
                    rec = keys[kid] = _Key()
                old = rec.placements.get(name)
                rec.placements[name] = (iid, b.incarnation, e.size_bytes, shared)
                delta = e.size_bytes - (old[2] if old else 0)
                if old is None:
                    stat[0] += 1
                stat[1] += delta
                used[module] = used.get(module, 0) + delta
                if e.token_ids and self.keep_token_ids:
                    rec.tokens = pack_tokens(e.token_ids)
                if l1 is not None:
                    l1.add(kid)
        elif kind == EventType.delete:
            for e in b.entries:
                kid = e.key.key_id()
                rec = keys.get(kid)
                if rec is None:
                    continue
                old = rec.placements.pop(name, None)
                if old is None:
                    continue
                self._forget(kid, rec, tier, module, owner, old[2])
                if tier == "l1" and not shared:
                    self._l1.get(iid, set()).discard(kid)
        else:  # access
            for e in b.entries:
                rec = keys.get(e.key.key_id())
                if rec is not None:
                    rec.access += 1
        if dropped:
            self._dropped += dropped
        return dropped

    def _forget(self, kid: str, rec: _Key, tier: str, module: str, owner: str,
                size: int) -> None:
        stat = self._tier[tier]
        stat[0] -= 1
        stat[1] -= size
        used = self._used.setdefault(owner, {})
        used[module] = used.get(module, 0) - size
        if not rec.placements:
            del self._keys[kid]

    def _fence_l1(self, iid: str) -> None:
        for kid in self._l1.pop(iid, set()):
            rec = self._keys.get(kid)
            if rec is None:
                continue
            for name in [n for n in rec.placements if n.startswith(f"{iid}|l1|")]:
                old = rec.placements.pop(name)
                self._forget(kid, rec, "l1", f"l1|{name.rsplit('|', 1)[1]}|0", iid, old[2])

    async def cursors(self) -> dict[str, Cursor]:
        return {i: Cursor(**asdict(c)) for i, c in self._cur.items()}

    async def counters(self) -> dict[str, int]:
        return {"keys": len(self._keys), "unregistered": self._unregistered,
                "dropped_entries": self._dropped}

    # ---- directory --------------------------------------------------------------------
    async def lookup(self, key_ids: list[str]
                     ) -> list[tuple[list[dict[str, Any]], list[int], int]]:
        out = []
        for kid in key_ids:
            rec = self._keys.get(kid)
            if rec is None:
                out.append(([], [], 0))
                continue
            out.append((_placements(rec.placements.items()), unpack_tokens(rec.tokens),
                        rec.access))
        return out

    async def list_keys(self, tier: str, instance_id: str, backend: str, offset: int,
                        limit: int) -> tuple[int, list[tuple[str, list[dict[str, Any]], int,
                                                             int]]]:
        total = 0
        page = []
        for kid, rec in self._keys.items():
            hits = [(n, v) for n, v in rec.placements.items()
                    if _matches(n, tier, instance_id, backend)]
            if not hits:
                continue
            if offset <= total < offset + limit:
                page.append((kid, _placements(hits), len(rec.tokens) // 4, rec.access))
            total += 1
        return total, page

    async def stats(self) -> dict[str, Any]:
        ids = sorted(set(self._inst) | set(self._l1))
        return _stats(len(self._keys), self._tier,
                      {i: len(self._l1.get(i, ())) for i in ids})

    async def usage(self) -> dict[str, dict[str, list[int]]]:
        return _usage(self._used, {i: {m: c for m, (c, _) in caps.items()}
                                   for i, caps in self._cap.items()})

    # ---- pins -------------------------------------------------------------------------
    async def pin(self, key_ids: list[str]) -> None:
        for k in key_ids:
            self._pins[k] = self._pins.get(k, 0) + 1

    async def unpin(self, key_ids: list[str]) -> None:
        for k in key_ids:
            n = self._pins.get(k, 0)
            if n <= 1:
                self._pins.pop(k, None)
            else:
                self._pins[k] = n - 1

    async def drop_pins(self, key_ids: list[str]) -> None:
        for k in key_ids:
            self._pins.pop(k, None)

    async def pinned(self, key_ids: list[str]) -> set[str]:
        return {k for k in key_ids if k in self._pins}

    async def pins(self, cache_salt: str, model_name: str, offset: int, limit: int
                   ) -> tuple[int, list[tuple[str, int]]]:
        hits = [(k, n) for k, n in self._pins.items() if _pin_matches(k, cache_salt,
                                                                      model_name)]
        return len(hits), hits[offset:offset + limit]


def _pin_matches(key_id: str, cache_salt: str, model_name: str) -> bool:
    key = key_from_id(key_id)
    return ((not cache_salt or key["cache_salt"] == cache_salt)
            and (not model_name or key["model_name"] == model_name))


def _placements(items: Iterable[tuple[str, tuple[str, int, int, bool]]]
                ) -> list[dict[str, Any]]:
    out = []
    for name, value in items:
        _, tier, backend = name.rsplit("|", 2)
        out.append(placement_wire(value, tier, backend))
    # upstream lists a key's placements in report order; l1 before l2 reads the same here
    out.sort(key=lambda p: (p["tier"], p["instance_id"], p["backend"]))
    return out


def _stats(num_keys: int, tier: dict[str, list[int]], l1_by_instance: dict[str, int]
           ) -> dict[str, Any]:
    return {"num_keys": num_keys, "num_placements": tier["l1"][0] + tier["l2"][0],
            "l1_keys_by_instance": l1_by_instance,
            # kvctl keeps no CacheBlend index; the block keeps upstream's shape
            "blend": {"num_contents": 0, "num_chunks": 0, "num_claims": 0,
                      "num_namespaces": 0, "table_size": 0},
            "l1_count": tier["l1"][0], "l1_size_bytes": tier["l1"][1],
            "l2_count": tier["l2"][0], "l2_size_bytes": tier["l2"][1]}


def _usage(used: dict[str, dict[str, int]], caps: dict[str, dict[str, int]]
           ) -> dict[str, dict[str, list[int]]]:
    out: dict[str, dict[str, list[int]]] = {}
    for owner, modules in used.items():
        for m, n in modules.items():
            out.setdefault(owner, {})[m] = [n, 0, 0]
    for iid, modules in caps.items():
        for m, c in modules.items():
            owner = SHARED_OWNER if m.endswith("|1") else iid
            row = out.setdefault(owner, {}).setdefault(m, [0, 0, 0])
            row[1], row[2] = c, 1
    return out


# ------------------------------------------------------------------------- Redis ----
_LUA = (Path(__file__).with_name("redis_layout.lua")).read_text(encoding="utf-8")


class RedisStore(CoordinatorStore):
    """The state in Redis at ``url``; keys under ``<prefix>mp:`` (see redis_layout.lua)."""

    def __init__(self, url: str, max_keys: int = 1_000_000, keep_token_ids: bool = True,
                 prefix: str = "kvctl:") -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        from kvctl.server.controller.state import _redact

        self.url = url
        self.description = _redact(url)
        self.max_keys = max_keys
        self.keep_token_ids = keep_token_ids
        self.p = f"{prefix}mp:"
        self._r: Any = aioredis.Redis.from_url(
            url, socket_connect_timeout=0.5, socket_timeout=5.0, retry=Retry(NoBackoff(), 0))
        self._script = self._r.register_script(_LUA)

    async def _do(self, coro: Any) -> Any:
        import redis

        try:
            return await coro
        except (redis.RedisError, OSError) as exc:
            raise StateUnavailable(
                f"the coordinator's state store {self.description} is unreachable "
                f"({type(exc).__name__}: {exc}); nothing was changed") from None

    async def _call(self, op: str, *args: Any) -> Any:
        return await self._do(self._script(args=[self.p, op, *args]))

    async def ping(self) -> None:
        await self._do(self._r.ping())

    async def close(self) -> None:
        await self._r.aclose()

    # ---- registry ---------------------------------------------------------------------
    async def register(self, inst: Instance) -> bool:
        return bool(await self._call("register", inst.instance_id, inst.to_json(),
                                     repr(inst.last_heartbeat)))

    async def heartbeat(self, instance_id: str, now: float) -> bool:
        return bool(await self._call("heartbeat", instance_id, repr(now)))

    async def deregister(self, instance_id: str) -> bool:
        return bool(await self._call("deregister", instance_id))

    async def get_instance(self, instance_id: str) -> Instance | None:
        raw = await self._do(self._r.hmget(f"{self.p}inst:{instance_id}", "json", "hb"))
        return _instance(raw)

    async def instances(self) -> list[Instance]:
        ids = sorted(i.decode() for i in await self._do(self._r.smembers(f"{self.p}insts")))
        pipe = self._r.pipeline(transaction=False)
        for i in ids:
            pipe.hmget(f"{self.p}inst:{i}", "json", "hb")
        rows = await self._do(pipe.execute()) if ids else []
        return [inst for inst in map(_instance, rows) if inst is not None]

    # ---- ingest -----------------------------------------------------------------------
    async def ingest(self, batches: list[EventBatch]) -> EventsResponse:
        out = EventsResponse()
        if not batches:
            return out
        pipe = self._r.pipeline(transaction=False)
        keep = self.keep_token_ids
        for b in batches:
            args: list[Any] = [self.p, "ingest", b.instance_id, b.incarnation, b.seq,
                               b.event_type.value, b.tier.value, b.backend, int(b.shared),
                               self.max_keys, b.capacity_bytes, b.capacity_revision]
            if b.event_type == EventType.store:
                for e in b.entries:
                    args += (e.key.key_id(), e.size_bytes,
                             pack_tokens(e.token_ids) if keep and e.token_ids else b"")
            else:
                for e in b.entries:
                    args.append(e.key.key_id())
            # queued on the pipeline, which loads the script first if Redis lacks it
            await self._script(args=args, client=pipe)
        results = await self._do(pipe.execute())
        for code, gap, dropped in results:
            if code == 0:
                out.applied += 1
                out.gaps += int(gap)
                out.dropped_entries += int(dropped)
            elif code == 1:
                out.duplicates += 1
            elif code == 2:
                out.stale += 1
            else:
                out.unregistered += 1
        return out

    async def cursors(self) -> dict[str, Cursor]:
        ids = sorted(i.decode() for i in await self._do(self._r.smembers(f"{self.p}curs")))
        pipe = self._r.pipeline(transaction=False)
        for i in ids:
            pipe.hgetall(f"{self.p}cur:{i}")
        rows = await self._do(pipe.execute()) if ids else []
        out = {}
        names = {"inc": "incarnation", "seq": "last_seq", "gap": "gap_detected"}
        for i, row in zip(ids, rows, strict=True):
            if not row:
                continue
            c = Cursor()
            for k, v in row.items():
                attr = names.get(k.decode(), k.decode())
                if attr == "gap_detected":
                    c.gap_detected = v == b"1"
                elif hasattr(c, attr):
                    setattr(c, attr, int(v))
            out[i] = c
        return out

    async def counters(self) -> dict[str, int]:
        pipe = self._r.pipeline(transaction=False)
        pipe.get(f"{self.p}nkeys")
        pipe.hmget(f"{self.p}counters", "unregistered", "dropped_entries")
        nkeys, (unreg, dropped) = await self._do(pipe.execute())
        return {"keys": int(nkeys or 0), "unregistered": int(unreg or 0),
                "dropped_entries": int(dropped or 0)}

    # ---- directory --------------------------------------------------------------------
    async def lookup(self, key_ids: list[str]
                     ) -> list[tuple[list[dict[str, Any]], list[int], int]]:
        if not key_ids:
            return []
        pipe = self._r.pipeline(transaction=False)
        for kid in key_ids:
            pipe.hgetall(f"{self.p}p:{kid}")
            pipe.hmget(f"{self.p}m:{kid}", "t", "a")
        rows = await self._do(pipe.execute())
        out = []
        for i in range(0, len(rows), 2):
            pl, (tokens, access) = rows[i], rows[i + 1]
            if not pl:
                out.append(([], [], 0))
                continue
            out.append((_placements(_decode_placements(pl)), unpack_tokens(tokens),
                        int(access or 0)))
        return out

    async def list_keys(self, tier: str, instance_id: str, backend: str, offset: int,
                        limit: int) -> tuple[int, list[tuple[str, list[dict[str, Any]], int,
                                                             int]]]:
        if tier == "all" and not instance_id and not backend:
            # no filter: the page straight from the index, O(limit)
            pipe = self._r.pipeline(transaction=False)
            pipe.zcard(f"{self.p}keys")
            pipe.zrange(f"{self.p}keys", offset, offset + limit - 1)
            total, kids = await self._do(pipe.execute())
            ids = [k.decode() for k in kids]
            rows = await self.lookup(ids)
            return int(total), [(kid, pl, len(tokens), access) for kid, (pl, tokens, access)
                                in zip(ids, rows, strict=True) if pl]
        # filtered: a scan of the index in pages (an inspection tool, not a hot path)
        total = 0
        page = []
        start = 0
        step = 2000
        while True:
            kids = await self._do(self._r.zrange(f"{self.p}keys", start, start + step - 1))
            if not kids:
                break
            start += step
            pipe = self._r.pipeline(transaction=False)
            for kid in kids:
                pipe.hgetall(f"{self.p}p:{kid.decode()}")
            rows = await self._do(pipe.execute())
            wanted = []
            for kid, pl in zip(kids, rows, strict=True):
                hits = [(n, v) for n, v in _decode_placements(pl)
                        if _matches(n, tier, instance_id, backend)]
                if not hits:
                    continue
                if offset <= total < offset + limit:
                    wanted.append((kid.decode(), _placements(hits)))
                total += 1
            if wanted:
                pipe = self._r.pipeline(transaction=False)
                for kid, _ in wanted:
                    pipe.hmget(f"{self.p}m:{kid}", "t", "a")
                metas = await self._do(pipe.execute())
                for (kid, pls), (tokens, access) in zip(wanted, metas, strict=True):
                    page.append((kid, pls, len(tokens or b"") // 4, int(access or 0)))
        return total, page

    async def stats(self) -> dict[str, Any]:
        pipe = self._r.pipeline(transaction=False)
        pipe.get(f"{self.p}nkeys")
        pipe.hgetall(f"{self.p}tier")
        pipe.smembers(f"{self.p}insts")
        pipe.smembers(f"{self.p}l1s")
        nkeys, tier_raw, insts, l1s = await self._do(pipe.execute())
        tier = {t: [int(tier_raw.get(f"{t}_count".encode(), 0)),
                    int(tier_raw.get(f"{t}_size".encode(), 0))] for t in TIERS}
        ids = sorted({i.decode() for i in insts} | {i.decode() for i in l1s})
        pipe = self._r.pipeline(transaction=False)
        for i in ids:
            pipe.scard(f"{self.p}l1:{i}")
        counts = await self._do(pipe.execute()) if ids else []
        return _stats(int(nkeys or 0), tier, dict(zip(ids, map(int, counts), strict=True)))

    async def usage(self) -> dict[str, dict[str, list[int]]]:
        owners = sorted(o.decode() for o in await self._do(self._r.smembers(f"{self.p}users")))
        pipe = self._r.pipeline(transaction=False)
        for o in owners:
            pipe.hgetall(f"{self.p}use:{o}")
            pipe.hgetall(f"{self.p}cap:{o}")
        rows = await self._do(pipe.execute()) if owners else []
        used: dict[str, dict[str, int]] = {}
        caps: dict[str, dict[str, int]] = {}
        for n, o in enumerate(owners):
            used[o] = {k.decode(): int(v) for k, v in rows[2 * n].items()}
            cap_rows = {k.decode(): v.decode().split("|") for k, v in rows[2 * n + 1].items()}
            if cap_rows:
                top = max(int(r[1]) for r in cap_rows.values())
                caps[o] = {m: int(r[0]) for m, r in cap_rows.items() if int(r[1]) >= top}
        return _usage(used, caps)

    # ---- pins -------------------------------------------------------------------------
    async def pin(self, key_ids: list[str]) -> None:
        if key_ids:
            await self._call("pin", *key_ids)

    async def unpin(self, key_ids: list[str]) -> None:
        if key_ids:
            await self._call("unpin", *key_ids)

    async def drop_pins(self, key_ids: list[str]) -> None:
        if key_ids:
            await self._call("droppins", *key_ids)

    async def pinned(self, key_ids: list[str]) -> set[str]:
        if not key_ids:
            return set()
        counts = await self._do(self._r.hmget(f"{self.p}pins", key_ids))
        return {k for k, n in zip(key_ids, counts, strict=True) if n is not None}

    async def pins(self, cache_salt: str, model_name: str, offset: int, limit: int
                   ) -> tuple[int, list[tuple[str, int]]]:
        pipe = self._r.pipeline(transaction=False)
        pipe.zrange(f"{self.p}pinorder", 0, -1)
        pipe.hgetall(f"{self.p}pins")
        order, counts = await self._do(pipe.execute())
        hits = [(k.decode(), int(counts[k])) for k in order
                if k in counts and _pin_matches(k.decode(), cache_salt, model_name)]
        return len(hits), hits[offset:offset + limit]


def _instance(row: list[bytes | None]) -> Instance | None:
    raw, hb = row
    if raw is None:
        return None
    inst = Instance.from_json(raw)
    inst.last_heartbeat = float(hb or inst.last_heartbeat)
    return inst


def _decode_placements(row: dict[bytes, bytes]
                       ) -> list[tuple[str, tuple[str, int, int, bool]]]:
    out = []
    for name, value in row.items():
        iid, inc, size, shared = value.decode().rsplit("|", 3)
        out.append((name.decode(), (iid, int(inc), int(size), shared == "1")))
    return out


def open_store(url: str | None, max_keys: int, keep_token_ids: bool = True,
               prefix: str = "kvctl:") -> CoordinatorStore:
    if url:
        return RedisStore(url, max_keys, keep_token_ids, prefix)
    return MemoryStore(max_keys, keep_token_ids)


def now() -> float:
    return time.time()
