"""Storage locations for KV chunks: bounded CPU memory, a local disk directory, Redis.

Backends store opaque, self-describing blobs (a `raw` blob for an uncompressed chunk, a
codec's blob once compressed) together with the number of tokens each chunk covers. Pinned
chunks are never evicted. Every backend is safe to call from several threads.
"""

from __future__ import annotations

import contextlib
import json
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvctl.common.paths import atomic_write


class StorageError(RuntimeError):
    """A storage operation failed for a reason the operator can act on."""


class StorageFullError(StorageError):
    """A chunk does not fit even after evicting every unpinned chunk."""


@dataclass(frozen=True)
class BackendStats:
    chunks: int
    bytes: int
    capacity_bytes: int | None
    pinned_chunks: int


class StorageBackend(ABC):
    """A place that holds KV chunk blobs by key."""

    name: str

    @abstractmethod
    def get(self, key: str) -> bytes | None: ...

    @abstractmethod
    def put(self, key: str, blob: bytes, num_tokens: int) -> None:
        """Store (or replace) a chunk; evicts unpinned chunks as needed."""

    @abstractmethod
    def contains(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> int:
        """Remove a chunk; returns the tokens it covered (0 if absent)."""

    @abstractmethod
    def keys(self) -> list[str]: ...

    @abstractmethod
    def num_tokens(self, key: str) -> int: ...

    @abstractmethod
    def set_pinned(self, key: str, pinned: bool) -> bool:
        """Pin or unpin a present chunk; False if the chunk is absent."""

    @abstractmethod
    def stats(self) -> BackendStats: ...

    def clear(self) -> int:
        """Remove every chunk; returns the tokens they covered."""
        return sum(self.delete(k) for k in self.keys())

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and files."""


@dataclass
class _Entry:
    blob: bytes
    num_tokens: int
    pinned: bool = False


class LocalCPUBackend(StorageBackend):
    """Chunks in process memory, bounded in bytes, evicting the least recently used."""

    name = "LocalCPUBackend"

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evictions = 0

    def get(self, key: str) -> bytes | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry.blob

    def put(self, key: str, blob: bytes, num_tokens: int) -> None:
        size = len(blob)
        with self._lock:
            old = self._entries.get(key)
            pinned = old.pinned if old else False
            freed = len(old.blob) if old else 0
            if size > self.capacity:
                raise StorageFullError(
                    f"{self.name}: a {size} B chunk exceeds the whole capacity "
                    f"({self.capacity} B); raise max_local_cpu_size")
            self._evict_for(size - freed, keep=key)
            if old is not None:
                self._bytes -= freed
            self._entries[key] = _Entry(blob, num_tokens, pinned)
            self._entries.move_to_end(key)
            self._bytes += size

    def _evict_for(self, need: int, keep: str) -> None:
        if self._bytes + need <= self.capacity:
            return
        for k in list(self._entries):
            if self._bytes + need <= self.capacity:
                return
            e = self._entries[k]
            if e.pinned or k == keep:
                continue
            del self._entries[k]
            self._bytes -= len(e.blob)
            self.evictions += 1
        if self._bytes + need > self.capacity:
            raise StorageFullError(
                f"{self.name}: full of pinned chunks ({self._bytes} of {self.capacity} B); "
                "unpin or clear some, or raise max_local_cpu_size")

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def delete(self, key: str) -> int:
        with self._lock:
            e = self._entries.pop(key, None)
            if e is None:
                return 0
            self._bytes -= len(e.blob)
            return e.num_tokens

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def num_tokens(self, key: str) -> int:
        with self._lock:
            e = self._entries.get(key)
            return e.num_tokens if e else 0

    def set_pinned(self, key: str, pinned: bool) -> bool:
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                return False
            e.pinned = pinned
            return True

    def stats(self) -> BackendStats:
        with self._lock:
            return BackendStats(len(self._entries), self._bytes, self.capacity,
                                sum(e.pinned for e in self._entries.values()))


class LocalDiskBackend(StorageBackend):
    """Chunks as files in a directory: written atomically, found again after a restart."""

    name = "LocalDiskBackend"
    _SUFFIX = ".kvc"

    def __init__(self, root: Path, capacity_bytes: int) -> None:
        self.root = Path(root)
        self.capacity = capacity_bytes
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"local_disk {self.root}: cannot create it ({exc.strerror})") from None
        self._lock = threading.Lock()
        # key -> (num_tokens, size); ordered oldest access first
        self._index: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._pins: set[str] = set()
        self._bytes = 0
        self._load()

    def _path(self, key: str, num_tokens: int) -> Path:
        return self.root / f"{key}-{num_tokens}{self._SUFFIX}"

    def _load(self) -> None:
        found = []
        for p in self.root.glob(f"*{self._SUFFIX}"):
            key, _, ntok = p.stem.rpartition("-")
            if not key or not ntok.isdigit():
                continue
            st = p.stat()
            found.append((st.st_mtime, key, int(ntok), st.st_size))
        for _, key, ntok, size in sorted(found):
            self._index[key] = (ntok, size)
            self._bytes += size
        pins = self.root / "pins.json"
        if pins.exists():
            try:
                self._pins = set(json.loads(pins.read_text())) & set(self._index)
            except (ValueError, TypeError):
                self._pins = set()

    def _save_pins(self) -> None:
        atomic_write(self.root / "pins.json", json.dumps(sorted(self._pins)).encode())

    def get(self, key: str) -> bytes | None:
        with self._lock:
            meta = self._index.get(key)
            if meta is None:
                return None
            self._index.move_to_end(key)
            path = self._path(key, meta[0])
        try:
            return path.read_bytes()
        except FileNotFoundError:
            with self._lock:
                self._forget(key)
            return None

    def _forget(self, key: str) -> int:
        meta = self._index.pop(key, None)
        if meta is None:
            return 0
        self._bytes -= meta[1]
        if key in self._pins:
            self._pins.discard(key)
            self._save_pins()
        with contextlib.suppress(FileNotFoundError):
            self._path(key, meta[0]).unlink()
        return meta[0]

    def put(self, key: str, blob: bytes, num_tokens: int) -> None:
        size = len(blob)
        with self._lock:
            if size > self.capacity:
                raise StorageFullError(
                    f"{self.name}: a {size} B chunk exceeds max_local_disk_size")
            old = self._index.get(key)
            freed = old[1] if old else 0
            for k in list(self._index):
                if self._bytes - freed + size <= self.capacity:
                    break
                if k != key and k not in self._pins:
                    self._forget(k)
            if self._bytes - freed + size > self.capacity:
                raise StorageFullError(
                    f"{self.name}: full of pinned chunks; raise max_local_disk_size")
            try:
                atomic_write(self._path(key, num_tokens), blob)
            except OSError as exc:
                raise StorageError(
                    f"{self.name}: cannot write {self.root}: {exc.strerror}") from None
            if old is not None:
                self._bytes -= old[1]
                if old[0] != num_tokens:
                    with contextlib.suppress(FileNotFoundError):
                        self._path(key, old[0]).unlink()
            self._index[key] = (num_tokens, size)
            self._index.move_to_end(key)
            self._bytes += size

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._index

    def delete(self, key: str) -> int:
        with self._lock:
            return self._forget(key)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._index)

    def num_tokens(self, key: str) -> int:
        with self._lock:
            meta = self._index.get(key)
            return meta[0] if meta else 0

    def set_pinned(self, key: str, pinned: bool) -> bool:
        with self._lock:
            if key not in self._index:
                return False
            if pinned:
                self._pins.add(key)
            else:
                self._pins.discard(key)
            self._save_pins()
            return True

    def stats(self) -> BackendStats:
        with self._lock:
            return BackendStats(len(self._index), self._bytes, self.capacity, len(self._pins))


class RemoteBackend(StorageBackend):
    """Chunks in a Redis server (``remote_url: redis://host:port[/db]``)."""

    name = "RemoteBackend"

    def __init__(self, url: str, namespace: str) -> None:
        import redis

        if url.startswith("lm://"):
            raise StorageError(
                f"remote_url {url!r}: lm:// needs LMCache's own server; use redis://host:port")
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise StorageError(f"remote_url {url!r}: expected redis://host:port[/db]")
        self.url = url
        self._redis: Any = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self._ns = f"kvctl:{namespace}:"
        self._meta = self._ns + "tokens"
        self._pins = self._ns + "pins"

    def _k(self, key: str) -> str:
        return self._ns + "chunk:" + key

    def _call(self, fn: Any, *args: Any) -> Any:
        import redis

        try:
            return fn(*args)
        except redis.RedisError as exc:
            raise StorageError(f"{self.name} at {self.url}: {exc}") from None

    def ping(self) -> None:
        self._call(self._redis.ping)

    def get(self, key: str) -> bytes | None:
        return self._call(self._redis.get, self._k(key))

    def put(self, key: str, blob: bytes, num_tokens: int) -> None:
        pipe = self._redis.pipeline()
        pipe.set(self._k(key), blob)
        pipe.hset(self._meta, key, num_tokens)
        self._call(pipe.execute)

    def contains(self, key: str) -> bool:
        return bool(self._call(self._redis.exists, self._k(key)))

    def delete(self, key: str) -> int:
        ntok = self.num_tokens(key)
        pipe = self._redis.pipeline()
        pipe.delete(self._k(key))
        pipe.hdel(self._meta, key)
        pipe.srem(self._pins, key)
        removed = self._call(pipe.execute)[0]
        return ntok if removed else 0

    def keys(self) -> list[str]:
        return [k.decode() for k in self._call(self._redis.hkeys, self._meta)]

    def num_tokens(self, key: str) -> int:
        v = self._call(self._redis.hget, self._meta, key)
        return int(v) if v is not None else 0

    def set_pinned(self, key: str, pinned: bool) -> bool:
        if not self.contains(key):
            return False
        fn = self._redis.sadd if pinned else self._redis.srem
        self._call(fn, self._pins, key)
        return True

    def stats(self) -> BackendStats:
        keys = self.keys()
        size = 0
        if keys:
            pipe = self._redis.pipeline()
            for k in keys:
                pipe.strlen(self._k(k))
            size = sum(self._call(pipe.execute))
        return BackendStats(len(keys), size, None, int(self._call(self._redis.scard, self._pins)))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._redis.close()
