"""LocalDiskBackend: chunks as files in a directory, whole after any crash.

Each chunk is one file ``KEY-TOKENS.kvc`` written by ``atomic_write`` (a temporary file beside
it, fsynced, then renamed over it): a ``kill -9`` at any moment leaves the old or the new
content, never half. Temporary files a crash left behind are swept when the backend starts,
and the index is rebuilt from the file names (tokens) and blob headers (codec), least recently
modified first. Pins live in ``pins.json``, rewritten once per pin request, not once per chunk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path

from kvctl.codecs import ForeignBlobError
from kvctl.codecs import peek_blob as _peek
from kvctl.common.paths import atomic_write
from kvctl.server.storage.base import (
    UNKNOWN_CODEC,
    BackendStats,
    StorageBackend,
    StorageError,
    codec_label,
    label_for,
)
from kvctl.server.storage.lru import IndexedTier, IndexEntry, LruIndex

log = logging.getLogger("kvctl.server")

SUFFIX = ".kvc"
PINS = "pins.json"
# What may name a chunk file: the project's keys are 32 hex digits (kvctl.server.chunks);
# whatever else arrives here is at least a plain file name that cannot leave the directory.
_SAFE_KEY = re.compile(r"[0-9A-Za-z_]{1,128}")
# corrupt chunk files are moved here for a post-mortem; the oldest go past this many
QUARANTINE = "quarantine"
QUARANTINE_KEEP = 16


def _file_label(path: Path) -> str | None:
    """The codec label of a chunk file from its header; None if the file is not whole."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return None
            # mmap: peeking reads the header pages only, not the whole chunk
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                try:
                    info = _peek(memoryview(mm))
                except ForeignBlobError:
                    return UNKNOWN_CODEC  # not a codec blob: kept, but not ours to judge
                except Exception:
                    return None
                return label_for(info.codec, info.params)
    except OSError:
        return None


class LocalDiskBackend(IndexedTier, StorageBackend):
    name = "LocalDiskBackend"

    def __init__(self, root: Path, capacity_bytes: int) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"local_disk {self.root}: cannot create it ({exc.strerror})") from None
        self._index = LruIndex(capacity_bytes, self.name, "max_local_disk_size")
        self._lock = threading.Lock()
        # keys whose file is being written right now (a missing file is then not a loss)
        self._writing: dict[str, int] = {}
        # writes of one key are serialised (striped locks), so the index records the size of
        # the file that lands last; writes of different keys run side by side
        self._key_locks = [threading.Lock() for _ in range(64)]
        # pins.json: one writer at a time, never under self._lock; generations coalesce
        # concurrent pin requests into as few writes as possible
        self._pins_io = threading.Lock()
        self._pins_gen = 0
        self._pins_written = 0
        self.swept = 0
        self._load()

    def _path(self, key: str, num_tokens: int) -> Path:
        """The file of a chunk, built only from a safe key and checked to stay in root."""
        if not isinstance(key, str) or not _SAFE_KEY.fullmatch(key):
            raise StorageError(f"{self.name}: {str(key)[:80]!r} cannot name a chunk file "
                               "(keys are letters, digits and _); nothing written")
        path = self.root / f"{key}-{int(num_tokens)}{SUFFIX}"
        if os.path.dirname(os.path.normpath(path)) != os.path.normpath(self.root):
            raise StorageError(f"{self.name}: chunk {key!r} would leave {self.root}")
        return path

    # ---- start-up -------------------------------------------------------------------
    def _load(self) -> None:
        for tmp in self.root.glob(".*.tmp"):
            # atomic_write's temporaries: a crash mid-write; the target is intact
            with contextlib.suppress(OSError):
                tmp.unlink()
                self.swept += 1
        found = []
        for p in self.root.glob(f"*{SUFFIX}"):
            key, _, ntok = p.stem.rpartition("-")
            if not key or not ntok.isdigit() or not _SAFE_KEY.fullmatch(key):
                continue
            label = _file_label(p)
            if label is None:
                log.warning("%s: %s is not a whole chunk; removed", self.name, p)
                with contextlib.suppress(OSError):
                    p.unlink()
                continue
            try:
                st = p.stat()
            except OSError:
                continue
            found.append((st.st_mtime_ns, key, int(ntok), st.st_size, label))
        overflow = []
        for _, key, ntok, size, label in sorted(found):
            self._index.entries[key] = IndexEntry(size, ntok, label)
            self._index.bytes += size
        # a smaller max_local_disk_size than last run: drop the oldest until it fits
        while self._index.bytes > self._index.capacity and self._index.entries:
            key = next(iter(self._index.entries))
            overflow.append((key, self._index.remove(key)))
        for key, e in overflow:
            with contextlib.suppress(OSError):
                self._path(key, e.num_tokens).unlink()
        pins = self.root / PINS
        if pins.exists():
            try:
                keys = json.loads(pins.read_text())
                for k in keys if isinstance(keys, list) else []:
                    if isinstance(k, str):
                        self._index.set_pinned(k, True)
            except (ValueError, OSError) as exc:
                log.warning("%s: %s unreadable (%s); no chunk pinned", self.name, pins, exc)
        if self.swept:
            log.info("%s: removed %d temporary file(s) left by an interrupted write",
                     self.name, self.swept)

    # ---- pins -------------------------------------------------------------------------
    def _persist_pins(self) -> None:
        with self._pins_io:
            with self._lock:
                gen = self._pins_gen
                if gen == self._pins_written:
                    return
                keys = sorted(self._index.pinned_keys())
            try:
                atomic_write(self.root / PINS, json.dumps(keys).encode())
            except OSError as exc:
                raise StorageError(f"{self.name}: cannot write {self.root / PINS}: "
                                   f"{exc.strerror}") from None
            self._pins_written = gen

    def set_pinned_many(self, keys: Sequence[str], pinned: bool) -> int:
        with self._lock:
            present = 0
            changed = False
            for k in keys:
                e = self._index.get(k)
                if e is None:
                    continue
                present += 1
                if e.pinned != pinned:
                    e.pinned = pinned
                    changed = True
            if changed:
                self._pins_gen += 1
        if changed:
            self._persist_pins()
        return present

    # ---- chunks -----------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        with self._lock:
            e = self._index.touch(key)
            if e is None:
                return None
            path = self._path(key, e.num_tokens)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            with self._lock:
                if key in self._index and not self._writing.get(key):
                    self._forget(key)  # removed behind our back
            return None
        except OSError as exc:
            raise StorageError(f"{self.name}: cannot read {path}: {exc.strerror}") from None

    def _forget(self, key: str) -> int:
        """Drop a chunk from the index and the disk (caller holds the lock)."""
        e = self._index.remove(key)
        if e is None:
            return 0
        if e.pinned:
            self._pins_gen += 1
        with contextlib.suppress(FileNotFoundError):
            self._path(key, e.num_tokens).unlink()
        return e.num_tokens

    def put(self, key: str, blob: bytes, num_tokens: int) -> None:
        self.put_protected(key, blob, num_tokens, ())

    def put_protected(self, key: str, blob: bytes, num_tokens: int,
                      protect: Sequence[str]) -> None:
        label = codec_label(blob)
        path = self._path(key, num_tokens)
        with self._key_locks[hash(key) % len(self._key_locks)]:
            self._put_locked(key, blob, num_tokens, label, path, protect)

    def _put_locked(self, key: str, blob: bytes, num_tokens: int, label: str, path: Path,
                    protect: Sequence[str]) -> None:
        with self._lock:
            for victim in self._index.admit(key, len(blob), num_tokens, label, protect):
                # admit() already dropped the victim from the index; its file goes too
                self._unlink_victim(victim)
            self._writing[key] = self._writing.get(key, 0) + 1
        try:
            # the slow part (write + fsync) runs outside the lock: reads of other chunks go on
            atomic_write(path, blob)
        except OSError as exc:
            with self._lock:
                self._forget(key)
            raise StorageError(f"{self.name}: cannot write {self.root}: {exc.strerror}"
                               ) from None
        finally:
            with self._lock:
                left = self._writing.pop(key) - 1
                if left:
                    self._writing[key] = left
                elif key not in self._index:
                    # evicted or deleted while its file was being written: no orphan file
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()

    def _unlink_victim(self, key: str) -> None:
        for p in self.root.glob(f"{key}-*{SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def quarantine(self, key: str) -> str:
        """Move a corrupt chunk's file into ``quarantine/`` (out of the index, so lookups
        stop counting it); only the newest QUARANTINE_KEEP files are kept there."""
        qdir = self.root / QUARANTINE
        with self._lock:
            gen = self._pins_gen
            e = self._index.remove(key)
            if e is None:
                return "already gone"
            if e.pinned:
                self._pins_gen += 1
            path = self._path(key, e.num_tokens)
            try:
                qdir.mkdir(exist_ok=True)
                os.replace(path, qdir / path.name)
                kept = sorted(qdir.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime_ns)
                for old in kept[:-QUARANTINE_KEEP]:
                    with contextlib.suppress(OSError):
                        old.unlink()
                where = f"moved to {qdir / path.name}"
            except OSError as exc:
                with contextlib.suppress(OSError):
                    path.unlink()
                where = f"deleted (cannot move it to {qdir}: {exc.strerror})"
            changed = gen != self._pins_gen
        if changed:
            self._persist_pins()
        return where

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._index

    def delete(self, key: str) -> int:
        with self._lock:
            gen = self._pins_gen
            tokens = self._forget(key)
            changed = gen != self._pins_gen
        if changed:
            self._persist_pins()
        return tokens

    def clear(self) -> int:
        with self._lock:
            gen = self._pins_gen
            tokens = sum(self._forget(k) for k in list(self._index.entries))
            changed = gen != self._pins_gen
        if changed:
            self._persist_pins()
        return tokens

    def stats(self) -> BackendStats:
        with self._lock:
            return self._index.stats()

