"""LocalCPUBackend: chunks in process memory, bounded in bytes, least recently used evicted."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from kvctl.server.storage.base import BackendStats, StorageBackend, codec_label
from kvctl.server.storage.lru import IndexedTier, LruIndex


class LocalCPUBackend(IndexedTier, StorageBackend):
    name = "LocalCPUBackend"

    def __init__(self, capacity_bytes: int) -> None:
        self._index = LruIndex(capacity_bytes, self.name, "max_local_cpu_size")
        self._blobs: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            if self._index.touch(key) is None:
                return None
            return self._blobs[key]

    def put(self, key: str, blob: bytes, num_tokens: int) -> None:
        self.put_protected(key, blob, num_tokens, ())

    def put_protected(self, key: str, blob: bytes, num_tokens: int,
                      protect: Sequence[str]) -> None:
        label = codec_label(blob)
        with self._lock:
            for victim in self._index.admit(key, len(blob), num_tokens, label, protect):
                del self._blobs[victim]
            self._blobs[key] = blob

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._index

    def delete(self, key: str) -> int:
        with self._lock:
            e = self._index.remove(key)
            if e is None:
                return 0
            del self._blobs[key]
            return e.num_tokens

    def set_pinned_many(self, keys: Sequence[str], pinned: bool) -> int:
        with self._lock:
            return sum(self._index.set_pinned(k, pinned) for k in keys)

    def stats(self) -> BackendStats:
        with self._lock:
            return self._index.stats()

    def clear(self) -> int:
        with self._lock:
            tokens = sum(e.num_tokens for e in self._index.entries.values())
            for k in list(self._index.entries):
                self._index.remove(k)
            self._blobs.clear()
            return tokens
