"""Storage locations for KV chunks: bounded CPU memory, a local disk directory, Redis.

``LocalCPUBackend`` and ``LocalDiskBackend`` share one LRU-with-pins index (``lru.py``);
``RemoteBackend`` speaks to Redis or a Redis Cluster. ``tiers.TieredStore`` is how the engine
uses them together: write-through to every tier, read-through from the fastest.
"""

from kvctl.server.storage.base import (
    BackendStats,
    StorageBackend,
    StorageError,
    StorageFullError,
    codec_label,
)
from kvctl.server.storage.disk import LocalDiskBackend
from kvctl.server.storage.lru import IndexEntry, LruIndex
from kvctl.server.storage.memory import LocalCPUBackend
from kvctl.server.storage.remote import RemoteBackend, parse_remote_url, redact_url

__all__ = [
    "BackendStats",
    "IndexEntry",
    "LocalCPUBackend",
    "LocalDiskBackend",
    "LruIndex",
    "RemoteBackend",
    "StorageBackend",
    "StorageError",
    "StorageFullError",
    "codec_label",
    "parse_remote_url",
    "redact_url",
]
