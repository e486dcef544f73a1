"""Memory, disk and Redis used together, as LMCache uses its tiers.

Write-through: every new chunk goes to every configured tier (fp16 ``raw`` blobs in the local
tiers, the ``remote_serde`` codec in Redis). Read-through: each chunk of the longest stored
prefix is read from the fastest tier that holds it, and what came from a slower tier is
promoted into memory, as it was stored (a lossy blob stays marked lossy). A tier that fails
(Redis down) is skipped and counted; a chunk that does not decode is counted, quarantined
and read from the next tier holding it; a completion never fails because a tier did.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvctl.codecs import CodecError, decode_blob, peek_blob
from kvctl.server.chunks import (
    DEFAULT_MAX_CHUNK_ELEMENTS,
    ChunkRef,
    ChunkShapeError,
    check_chunk_shape,
)
from kvctl.server.storage.base import StorageBackend, StorageError, StorageFullError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("kvctl.server")

# fastest first
TIER_ORDER = ("LocalCPUBackend", "LocalDiskBackend", "RemoteBackend")
MEMORY = TIER_ORDER[0]
REMOTE = TIER_ORDER[2]
# after a tier fails, the engine leaves it alone this long: a frozen Redis then costs one
# socket timeout per interval, not one per completion
RETRY_AFTER_S = 5.0


@dataclass
class TierCounters:
    """Per-tier counts since start, for /metrics."""

    hits: dict[str, int] = field(default_factory=dict)
    misses: dict[str, int] = field(default_factory=dict)
    stored: dict[str, int] = field(default_factory=dict)
    store_failures: dict[str, int] = field(default_factory=dict)
    read_failures: dict[str, int] = field(default_factory=dict)
    promotions: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, table: str, tier: str, n: int = 1) -> None:
        if n:
            with self.lock:
                d = getattr(self, table)
                d[tier] = d.get(tier, 0) + n


@dataclass
class Loaded:
    """The result of a read-through: tokens covered, their KV, chunks per tier."""

    num_tokens: int
    kv: Any  # torch.Tensor | None
    served_by: dict[str, int]


class TieredStore:
    """The configured tiers, fastest first, as the engine sees them."""

    def __init__(self, backends: dict[str, StorageBackend], raw_codec: Any, remote_codec: Any,
                 save_unfull_chunk: bool, chunk_size: int, device: str = "cpu",
                 max_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS) -> None:
        self.tiers = [(n, backends[n]) for n in TIER_ORDER if n in backends]
        self.tiers += [(n, b) for n, b in backends.items() if n not in TIER_ORDER]
        self.raw = raw_codec
        self.remote_codec = remote_codec
        self.save_unfull_chunk = save_unfull_chunk
        self.chunk_size = chunk_size
        self.device = device
        self.max_elements = max_elements
        self.counters = TierCounters()
        self._down_until: dict[str, float] = {}

    def available(self, tier: str) -> bool:
        """False for a while after ``tier`` failed (see RETRY_AFTER_S)."""
        return time.monotonic() >= self._down_until.get(tier, 0.0)

    def failed(self, tier: str, table: str, exc: Exception) -> None:
        self.counters.add(table, tier)
        self._down_until[tier] = time.monotonic() + RETRY_AFTER_S
        log.warning("%s skipped for %.0f s: %s", tier, RETRY_AFTER_S, exc)

    def corrupt(self, tier: str, key: str, exc: Exception) -> None:
        """A chunk that does not decode: counted as a read failure of ``tier``, taken out
        of it (quarantined) so that no lookup counts it again, and named in the log. The
        tier itself stays in use: one bad chunk says nothing about the others."""
        self.counters.add("read_failures", tier)
        backend = dict(self.tiers).get(tier)
        where = "dropped"
        if backend is not None:
            try:
                where = backend.quarantine(key)
            except StorageError as qexc:
                where = f"not quarantined ({qexc})"
        log.warning("%s: chunk %s is corrupt (%s); %s", tier, key, exc, where)

    def _read_slower(self, key: str, after: str) -> tuple[str, bytes, Any] | None:
        """The first tier slower than ``after`` that holds ``key`` in a decodable blob:
        (tier, blob, kv); None when none does."""
        names = [t for t, _ in self.tiers]
        for tier, backend in self.tiers[names.index(after) + 1:]:
            if not self.available(tier):
                continue
            try:
                blob = backend.get(key)
            except StorageError as exc:
                self.failed(tier, "read_failures", exc)
                continue
            if blob is None:
                continue
            try:
                check_chunk_shape(peek_blob(blob), self.chunk_size, self.max_elements)
                return tier, blob, decode_blob(blob, device=self.device)
            except (CodecError, ChunkShapeError) as exc:
                self.corrupt(tier, key, exc)
        return None

    def _codec_for(self, tier: str) -> Any:
        return self.remote_codec if tier == REMOTE else self.raw

    # ---- write-through --------------------------------------------------------------
    def store(self, refs: Sequence[ChunkRef], kv: torch.Tensor) -> dict[str, int]:
        """Store the chunks of ``kv`` (``[L, 2, T, H, D]``) that a tier lacks, in every tier.

        Returns chunks written per tier. A tier that is full stores the prefix that fits
        (never evicting this prompt's own chunks to make room); a tier that fails is logged
        and skipped.
        """
        import torch

        refs = [r for r in refs if r.end <= kv.shape[2]
                and (self.save_unfull_chunk or r.num_tokens == self.chunk_size)]
        written: dict[str, int] = {}
        if not refs:
            return written
        keys = [r.key for r in refs]
        encoded: dict[tuple[str, str], bytes] = {}
        for tier, backend in self.tiers:
            if not self.available(tier):
                continue
            codec = self._codec_for(tier)
            try:
                have = backend.contains_many(keys)
                # a prompt's chunks are stored in order: a gap would make later ones unreachable
                todo = []
                for ref, held in zip(refs, have, strict=True):
                    if held:
                        continue
                    ck = (codec.name, ref.key)
                    if ck not in encoded:
                        part = kv[:, :, ref.start:ref.end].to(torch.float16).contiguous()
                        encoded[ck] = codec.encode(part)
                    todo.append((ref.key, encoded[ck], ref.num_tokens))
                if todo:
                    written[tier] = backend.put_many(todo, protect=keys)
                    self.counters.add("stored", tier, written[tier])
            except StorageFullError as exc:
                self.counters.add("store_failures", tier)
                log.info("not stored in %s: %s", tier, exc)
            except StorageError as exc:
                self.failed(tier, "store_failures", exc)
        return written

    # ---- read-through ---------------------------------------------------------------
    def holders(self, refs: Sequence[ChunkRef]) -> list[str | None]:
        """For each chunk of the longest prefix held by any tier, the fastest tier holding
        it; the list ends at the first chunk no tier holds."""
        holder: list[str | None] = [None] * len(refs)
        limit = len(refs)
        for tier, backend in self.tiers:
            ask = [i for i in range(limit) if holder[i] is None]
            if not ask:
                break
            if not self.available(tier):
                continue
            try:
                have = backend.contains_many([refs[i].key for i in ask])
            except StorageError as exc:
                self.failed(tier, "read_failures", exc)
                continue
            for i, held in zip(ask, have, strict=True):
                if held:
                    holder[i] = tier
        end = next((i for i, h in enumerate(holder) if h is None), len(refs))
        return holder[:end]

    def load(self, refs: Sequence[ChunkRef], max_tokens: int | None = None) -> Loaded:
        """The KV of the longest stored prefix of ``refs``, each chunk from its fastest
        tier; chunks from slower tiers are promoted into memory."""
        import torch

        holder = self.holders(refs)
        if max_tokens is not None:
            # chunks wholly past max_tokens are not read at all
            holder = [h for h, r in zip(holder, refs, strict=False) if r.start < max_tokens]
        names = [t for t, _ in self.tiers]
        for tier in holder:
            self.counters.add("hits", tier)
            for faster in names[:names.index(tier)]:
                self.counters.add("misses", faster)
        if len(holder) < len(refs) and (max_tokens is None or refs[len(holder)].start
                                        < max_tokens):
            for t in names:  # the chunk that ends the prefix: no tier had it
                self.counters.add("misses", t)
        blobs: list[bytes | None] = [None] * len(holder)
        backends = dict(self.tiers)
        for tier in dict.fromkeys(holder):
            idx = [i for i, h in enumerate(holder) if h == tier]
            try:
                got = backends[tier].get_many([refs[i].key for i in idx])
            except StorageError as exc:
                self.failed(tier, "read_failures", exc)
                got = [None] * len(idx)
            for i, b in zip(idx, got, strict=True):
                blobs[i] = b
        parts = []
        served: dict[str, int] = {}
        promote = []
        for i, blob in enumerate(blobs):
            tier, part = holder[i], None
            if blob is not None:  # None: it left its tier between the check and the read
                try:
                    # a stored blob is input too (a file, Redis): its shape must fit first
                    check_chunk_shape(peek_blob(blob), self.chunk_size, self.max_elements,
                                      refs[i].num_tokens)
                    part = decode_blob(blob, device=self.device)
                except (CodecError, ChunkShapeError) as exc:
                    self.corrupt(tier, refs[i].key, exc)
            if part is None:
                # the next tier that holds a good copy serves it instead
                found = self._read_slower(refs[i].key, tier)
                if found is None:
                    break
                tier, blob, part = found
            parts.append(part)
            served[tier] = served.get(tier, 0) + 1
            if tier != names[0] and names[0] == MEMORY:
                promote.append((refs[i].key, blob, refs[i].num_tokens))
        if promote:
            try:
                n = backends[MEMORY].put_many(promote, protect=[r.key for r in refs])
                with self.counters.lock:
                    self.counters.promotions += n
            except StorageError as exc:
                log.info("not promoted into memory: %s", exc)
        if not parts:
            return Loaded(0, None, served)
        kv = torch.cat(parts, dim=2)
        n = refs[len(parts) - 1].end
        if max_tokens is not None and n > max_tokens:
            kv, n = kv[:, :, :max_tokens], max_tokens
        return Loaded(n, kv, served)
