"""The module an LMCache server loads from config: kvctl serdes plus an exact-size FS adapter.

One ``--l2-adapter`` JSON does it all::

    {"type": "plugin", "module_path": "kvctl.integrations.lmcache.plugin",
     "class_name": "KvctlFSL2Adapter", "adapter_params": {"base_path": "/var/cache/kv"},
     "serde": {"type": "kvctl-cachegen", "head_dim": 64}}

LMCache imports ``module_path`` while it builds the adapter, before it builds that adapter's
serde, so importing this module is what registers the ``kvctl-*`` serde types.

Why an adapter of its own: LMCache's stock filesystem adapter reads back exactly the size
estimate and rejects shorter files, so an entropy-coded blob would have to be padded to a
budget. This adapter writes each blob at its real size (atomically) and reads it back into
the front of the load buffer, narrowing the buffer to the bytes read.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lmcache.lmcache_native import Bitmap
from lmcache.logging import init_logger
from lmcache.v1.distributed.internal_api import L2StoreResult
from lmcache.v1.distributed.l2_adapters.base import L2AdapterInterface, L2TaskId
from lmcache.v1.distributed.l2_adapters.config import L2AdapterConfigBase
from lmcache.v1.platform import create_event_notifier

from kvctl.common.paths import atomic_write
from kvctl.integrations.lmcache.files import FILE_EXT, chunk_filename
from kvctl.integrations.lmcache.serde import register_serdes

if TYPE_CHECKING:
    from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey
    from lmcache.v1.distributed.internal_api import L1MemoryDesc
    from lmcache.v1.memory_management import MemoryObj

# LMCache configures only its own loggers: without its handler an INFO line would be lost
log = init_logger("kvctl.lmcache")

MAX_IO_WORKERS = 32
# A writer's temporary file older than this is a leftover of a crash, not a write in
# progress (another server may share the folder), and is removed at startup.
STALE_TMP_S = 3600


def key_filename(key: ObjectKey) -> str:
    """The chunk file name of a key (see ``files.py``)."""
    return chunk_filename(key.model_name, key.kv_rank, key.object_group_id, key.chunk_hash,
                          key.cache_salt)


class KvctlFSL2AdapterConfig(L2AdapterConfigBase):
    """``adapter_params`` of ``KvctlFSL2Adapter``.

    - ``base_path`` (str, required): folder of the chunk files (created if missing).
    - ``fsync`` (bool, default true): fsync each file before its atomic rename, so a crash
      never leaves an empty file under a final name.
    - ``io_workers`` (int, default 2): threads doing file I/O.
    """

    def __init__(self, base_path: str, fsync: bool = True, io_workers: int = 2) -> None:
        self.base_path = base_path
        self.fsync = fsync
        self.io_workers = io_workers

    @classmethod
    def from_dict(cls, d: dict) -> KvctlFSL2AdapterConfig:
        known = {"base_path", "fsync", "io_workers"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown adapter_params {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known))}")
        base = d.get("base_path")
        if not isinstance(base, str) or not base:
            raise ValueError("base_path must be a non-empty string (the chunk folder)")
        fsync = d.get("fsync", True)
        if not isinstance(fsync, bool):
            raise ValueError("fsync must be true or false")
        workers = d.get("io_workers", 2)
        if isinstance(workers, bool) or not isinstance(workers, int) or not (
                0 < workers <= MAX_IO_WORKERS):
            raise ValueError(f"io_workers must be an integer from 1 to {MAX_IO_WORKERS}")
        return cls(base, fsync, workers)

    @classmethod
    def help(cls) -> str:
        return (cls.__doc__ or "").strip()


class KvctlFSL2Adapter(L2AdapterInterface):
    """Filesystem L2 adapter that stores and loads each object at its real size."""

    def __init__(self, config: KvctlFSL2AdapterConfig | dict[str, Any],
                 l1_memory_desc: L1MemoryDesc | None = None) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = KvctlFSL2AdapterConfig.from_dict(config)
        self._config = config
        self._base = Path(config.base_path)
        self._base.mkdir(parents=True, exist_ok=True)
        self._sweep_temporaries()
        self._store_efd = create_event_notifier()
        self._lookup_efd = create_event_notifier()
        self._load_efd = create_event_notifier()
        self._lock = threading.Lock()
        self._next_id: L2TaskId = 0
        self._stored: dict[L2TaskId, L2StoreResult] = {}
        self._looked_up: dict[L2TaskId, Bitmap] = {}
        self._loaded: dict[L2TaskId, Bitmap] = {}
        self._pool = ThreadPoolExecutor(max_workers=config.io_workers,
                                        thread_name_prefix="kvctl-fs-l2")
        self._closed = False
        from kvctl import __version__

        log.info("kvctl %s: KvctlFSL2Adapter loaded, storing blobs at their real size in %s "
                 "(fsync %s, %d I/O threads)", __version__, self._base,
                 "on" if config.fsync else "off", config.io_workers)

    def _sweep_temporaries(self) -> None:
        """Remove temporary files (``kvctl.common.paths.atomic_write`` names them
        ``.NAME.*.tmp``) that a crashed writer left behind."""
        cutoff = time.time() - STALE_TMP_S
        for tmp in self._base.glob(f".*{FILE_EXT}.*.tmp"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
            except FileNotFoundError:
                continue

    # ---------------------------------------------------------------- plumbing ----
    def _task_id(self) -> L2TaskId:
        with self._lock:
            tid = self._next_id
            self._next_id += 1
        return tid

    def path_of(self, key: ObjectKey) -> Path:
        return self._base / key_filename(key)

    def get_store_event_fd(self) -> int:
        return self._store_efd.fileno()

    def get_lookup_and_lock_event_fd(self) -> int:
        return self._lookup_efd.fileno()

    def get_load_event_fd(self) -> int:
        return self._load_efd.fileno()

    # ------------------------------------------------------------------- store ----
    def submit_store_task(self, keys: list[ObjectKey], objects: list[MemoryObj]) -> L2TaskId:
        tid = self._task_id()
        self._pool.submit(self._store, tid, keys, objects)
        return tid

    def _store(self, tid: L2TaskId, keys: list[ObjectKey], objects: list[MemoryObj]) -> None:
        ok = True
        written = 0
        done_keys: list[ObjectKey] = []
        sizes: list[int] = []
        for key, obj in zip(keys, objects, strict=True):
            path = self.path_of(key)
            try:
                if path.exists():  # content-addressed: the same key holds the same chunk
                    continue
                data = obj.byte_array  # honours the serializer's narrowed size
                atomic_write(path, data, durable=self._config.fsync)
                written += len(data)
                done_keys.append(key)
                sizes.append(len(data))
            except Exception:
                log.exception("kvctl FS L2: storing %s failed", path.name)
                ok = False
        if done_keys:
            self._notify_keys_stored(done_keys, sizes)
        with self._lock:
            self._stored[tid] = L2StoreResult(ok, written)
        self._store_efd.notify()

    def pop_completed_store_tasks(self) -> dict[L2TaskId, L2StoreResult]:
        with self._lock:
            done, self._stored = self._stored, {}
        return done

    # ------------------------------------------------------------------ lookup ----
    def submit_lookup_and_lock_task(self, keys: list[ObjectKey],
                                    group_layout_descs: dict[int, MemoryLayoutDesc]
                                    ) -> L2TaskId:
        tid = self._task_id()
        self._pool.submit(self._lookup, tid, keys)
        return tid

    def _lookup(self, tid: L2TaskId, keys: list[ObjectKey]) -> None:
        bits = Bitmap(len(keys))
        for i, key in enumerate(keys):
            if self.path_of(key).is_file():
                bits.set(i)
        with self._lock:
            self._looked_up[tid] = bits
        self._lookup_efd.notify()

    def query_lookup_and_lock_result(self, task_id: L2TaskId) -> Bitmap | None:
        with self._lock:
            return self._looked_up.pop(task_id, None)

    def submit_unlock(self, keys: list[ObjectKey]) -> None:
        # No per-key locks: a delete racing a lookup turns the later load into a miss.
        return None

    # -------------------------------------------------------------------- load ----
    def submit_load_task(self, keys: list[ObjectKey], objects: list[MemoryObj]) -> L2TaskId:
        tid = self._task_id()
        self._pool.submit(self._load, tid, keys, objects)
        return tid

    def _load_one(self, key: ObjectKey, obj: MemoryObj) -> bool:
        path = self.path_of(key)
        try:
            f = open(path, "rb")  # closed by the `with` below; the size comes from this handle
        except FileNotFoundError:
            return False
        with f:
            size = os.fstat(f.fileno()).st_size
            buf = obj.byte_array
            # A serde's load buffer is a flat uint8 buffer sized by its estimate; anything
            # else is a KV object that the file must fill exactly.
            byte_buffer = list(obj.get_dtypes()) == [torch.uint8] and len(obj.get_shapes()) == 1
            if size > len(buf) or (size < len(buf) and not byte_buffer):
                log.warning("kvctl FS L2: %s is %d bytes, the load buffer %d; treated as a miss",
                            path.name, size, len(buf))
                return False
            view = memoryview(buf)[:size]
            got = 0
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
            if got != size:
                log.warning("kvctl FS L2: short read of %s (%d of %d bytes)", path.name, got,
                            size)
                return False
        if size < len(buf):
            obj.set_used_size(size)
        return True

    def _load(self, tid: L2TaskId, keys: list[ObjectKey], objects: list[MemoryObj]) -> None:
        bits = Bitmap(len(keys))
        hits: list[ObjectKey] = []
        for i, (key, obj) in enumerate(zip(keys, objects, strict=True)):
            try:
                if self._load_one(key, obj):
                    bits.set(i)
                    hits.append(key)
            except Exception:
                log.exception("kvctl FS L2: loading %s failed", key_filename(key))
        if hits:
            self._notify_keys_accessed(hits)
        with self._lock:
            self._loaded[tid] = bits
        self._load_efd.notify()

    def query_load_result(self, task_id: L2TaskId) -> Bitmap | None:
        with self._lock:
            return self._loaded.pop(task_id, None)

    # ------------------------------------------------------------ eviction etc. ----
    def delete(self, keys: list[ObjectKey]) -> None:
        gone: list[ObjectKey] = []
        sizes: list[int] = []
        for key in keys:
            path = self.path_of(key)
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            gone.append(key)
            sizes.append(size)
        if gone:
            self._notify_keys_deleted(gone, sizes)

    def report_status(self) -> dict:
        usage = self.get_usage()
        return {"is_healthy": not self._closed, "type": "KvctlFSL2Adapter",
                "base_path": str(self._base), "bytes_stored": usage.total_bytes_used}

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=True)
        for efd in (self._store_efd, self._lookup_efd, self._load_efd):
            efd.close()


SERDE_TYPES = register_serdes()
