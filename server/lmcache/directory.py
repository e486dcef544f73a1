"""Which chunk hashes each LMCache worker holds, per location, kept from its admit/evict
stream: `/lookup` is answered from here, without asking any worker.

A worker numbers its operations (``seq_num``, one counter per worker); they are applied in
that order, a repeated or older number is dropped, and a gap (operations lost on the way)
marks the directory as needing a full sync. A worker-location holds at most ``max_keys``
hashes: admits beyond it are dropped and counted (a flood cannot grow memory without bound),
and lookups of that worker may then under-report, never over-report.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kvctl.server.lmcache.wire import KVOpEvent, OpType

# LMCache's prefix-chain seed without vLLM (token_database.NONE_HASH)
NONE_HASH = 0


def chunk_hashes(tokens: Sequence[int], chunk_size: int, none_hash: int = NONE_HASH
                 ) -> list[tuple[int, int]]:
    """LMCache 0.5.6's chunk keys for ``tokens``: (end offset, signed 64-bit hash) per chunk,
    the last partial chunk included.

    Each hash is Python's builtin hash of (previous hash, the chunk's tokens, no extra keys),
    the chain LMCache's ChunkedTokenDatabase builds with its default ``builtin`` algorithm.
    Tuples of ints hash the same in every process (only str/bytes hashing is salted).
    ``none_hash`` seeds the chain: 0 without vLLM; with vLLM >= PR#20511 LMCache logs the
    value it took from vLLM ("Initialized NONE_HASH=...").
    """
    out: list[tuple[int, int]] = []
    prefix = none_hash
    for start in range(0, len(tokens), chunk_size):
        chunk = tuple(int(t) for t in tokens[start:start + chunk_size])
        prefix = hash((prefix, chunk, ()))
        out.append((start + len(chunk), prefix))
    return out


@dataclass
class WorkerKeys:
    """One worker's keys, per location, and where its op stream stands."""

    locations: dict[str, set[int]] = field(default_factory=dict)
    last_seq: int = -1
    needs_sync: bool = False
    dropped_admits: int = 0
    stale_ops: int = 0

    def count(self) -> int:
        return sum(len(s) for s in self.locations.values())


@dataclass
class ApplyResult:
    applied: list[tuple[str, int]] = field(default_factory=list)   # (op, key) in order
    stale: int = 0
    dropped: int = 0
    gap: bool = False


class Directory:
    """Keys per (instance, worker, location), in memory. `RedisFleetState` persists it."""

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self._w: dict[tuple[str, int], WorkerKeys] = {}

    def has(self, instance_id: str, worker_id: int) -> bool:
        return (instance_id, worker_id) in self._w

    def get(self, instance_id: str, worker_id: int) -> WorkerKeys:
        return self._w.setdefault((instance_id, worker_id), WorkerKeys())

    def drop(self, instance_id: str, worker_id: int) -> None:
        self._w.pop((instance_id, worker_id), None)

    def reset(self, instance_id: str, worker_id: int) -> WorkerKeys:
        self._w[(instance_id, worker_id)] = WorkerKeys()
        return self._w[(instance_id, worker_id)]

    def workers(self) -> list[tuple[str, int]]:
        return list(self._w)

    def apply(self, instance_id: str, worker_id: int, location: str,
              ops: Iterable[KVOpEvent]) -> ApplyResult:
        """Apply one batch in seq_num order (a batch is sorted first)."""
        wk = self.get(instance_id, worker_id)
        keys = wk.locations.setdefault(location, set())
        res = ApplyResult()
        for op in sorted(ops, key=lambda o: o.seq_num):
            if op.seq_num <= wk.last_seq:
                res.stale += 1
                continue
            if op.seq_num > wk.last_seq + 1 and wk.last_seq >= 0:
                res.gap = True
            wk.last_seq = op.seq_num
            if op.op_type is OpType.ADMIT:
                if op.key not in keys and len(keys) >= self.max_keys:
                    res.dropped += 1
                    continue
                keys.add(op.key)
                res.applied.append(("admit", op.key))
            else:
                keys.discard(op.key)
                res.applied.append(("evict", op.key))
        wk.stale_ops += res.stale
        wk.dropped_admits += res.dropped
        if res.gap:
            wk.needs_sync = True
        return res

    def replace(self, instance_id: str, worker_id: int, location: str,
                keys: Iterable[int]) -> int:
        """A full sync's result for one location: exactly these keys (bounded)."""
        wk = self.get(instance_id, worker_id)
        new: set[int] = set()
        for k in keys:
            if len(new) >= self.max_keys:
                wk.dropped_admits += 1
                continue
            new.add(int(k))
        wk.locations[location] = new
        wk.needs_sync = False
        return len(new)

    def matched(self, instance_id: str, worker_id: int, location: str,
                hashes: list[tuple[int, int]]) -> int:
        """Tokens of the longest prefix whose chunks all sit in ``location``."""
        keys = self._w.get((instance_id, worker_id))
        held = keys.locations.get(location) if keys else None
        n = 0
        for end, h in hashes:
            if not held or h not in held:
                break
            n = end
        return n

    def best(self, instance_id: str, worker_id: int, hashes: list[tuple[int, int]]
             ) -> tuple[str, int, dict[str, int]]:
        """(location with the longest prefix, its tokens, tokens per location)."""
        wk = self._w.get((instance_id, worker_id))
        per: dict[str, int] = {}
        for loc in (wk.locations if wk else {}):
            n = self.matched(instance_id, worker_id, loc, hashes)
            if n:
                per[loc] = n
        if not per:
            return "", 0, {}
        loc = max(per, key=lambda k: per[k])
        return loc, per[loc], per
