"""The one LRU-with-pins index the memory and disk tiers share.

It holds what a tier knows about each chunk (size, tokens, codec, pin) in access order and
owns the tier's one byte counter and its one capacity check. It does no I/O and takes no
lock: the backend that owns it calls it under its own lock, and performs the evictions the
index decides (dropping a blob from memory, unlinking a file).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass

from kvctl.server.storage.base import BackendStats, StorageFullError


@dataclass
class IndexEntry:
    size: int
    num_tokens: int
    codec: str
    pinned: bool = False


class LruIndex:
    """Chunks of one tier, least recently used first, bounded in bytes."""

    def __init__(self, capacity_bytes: int, tier: str, size_setting: str) -> None:
        self.capacity = capacity_bytes
        self.tier = tier
        # the config key an operator raises when the tier is too small
        self.size_setting = size_setting
        self.entries: OrderedDict[str, IndexEntry] = OrderedDict()
        self.bytes = 0
        self.evictions = 0

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str) -> IndexEntry | None:
        return self.entries.get(key)

    def touch(self, key: str) -> IndexEntry | None:
        """Mark a chunk as just used."""
        e = self.entries.get(key)
        if e is not None:
            self.entries.move_to_end(key)
        return e

    def admit(self, key: str, size: int, num_tokens: int, codec: str,
              protect: Collection[str] = ()) -> list[str]:
        """Record ``key`` with ``size`` bytes, evicting least recently used unpinned chunks
        (never ``key`` itself nor any in ``protect``) until it fits. Returns the evicted keys,
        whose data the caller drops. Raises StorageFullError, changing nothing, when it cannot
        fit."""
        if size > self.capacity:
            raise StorageFullError(
                f"{self.tier}: a {size} B chunk exceeds the whole capacity ({self.capacity} B);"
                f" raise {self.size_setting}")
        old = self.entries.get(key)
        freed = old.size if old else 0
        need = self.bytes - freed + size - self.capacity
        victims: list[str] = []
        if need > 0:
            for k, e in self.entries.items():
                if need <= 0:
                    break
                if e.pinned or k == key or k in protect:
                    continue
                victims.append(k)
                need -= e.size
            if need > 0:
                raise StorageFullError(
                    f"{self.tier}: full of pinned or in-use chunks ({self.bytes} of "
                    f"{self.capacity} B); unpin or clear some, or raise {self.size_setting}")
        for k in victims:
            self.bytes -= self.entries.pop(k).size
        self.evictions += len(victims)
        pinned = old.pinned if old else False
        self.bytes += size - freed
        self.entries[key] = IndexEntry(size, num_tokens, codec, pinned)
        self.entries.move_to_end(key)
        return victims

    def remove(self, key: str) -> IndexEntry | None:
        e = self.entries.pop(key, None)
        if e is not None:
            self.bytes -= e.size
        return e

    def set_pinned(self, key: str, pinned: bool) -> bool:
        e = self.entries.get(key)
        if e is None:
            return False
        e.pinned = pinned
        return True

    def pinned_keys(self) -> list[str]:
        return [k for k, e in self.entries.items() if e.pinned]

    def stats(self) -> BackendStats:
        by_codec: dict[str, int] = {}
        pinned = 0
        for e in self.entries.values():
            by_codec[e.codec] = by_codec.get(e.codec, 0) + e.size
            pinned += e.pinned
        return BackendStats(len(self.entries), self.bytes, self.capacity, pinned, by_codec,
                            self.evictions)


class IndexedTier:
    """Lookups of a tier that keeps its chunks in one `LruIndex` under one lock (memory and
    disk): the index is the only record of what the tier holds."""

    _index: LruIndex
    _lock: threading.Lock

    @property
    def capacity(self) -> int:
        return self._index.capacity

    @property
    def evictions(self) -> int:
        return self._index.evictions

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._index.entries)

    def num_tokens(self, key: str) -> int:
        with self._lock:
            e = self._index.get(key)
            return e.num_tokens if e else 0

    def codec_of(self, key: str) -> str | None:
        with self._lock:
            e = self._index.get(key)
            return e.codec if e else None
