"""The codec worker: owns the storage locations of one LMCache instance and runs jobs on them.

Request handlers only validate and schedule; each job runs on a bounded thread pool, and the
codec work of a chunk (decode, then encode) runs in a separate process so that it never holds
the interpreter lock of the process whose event loop answers requests.

The worker raises domain errors (`kvctl.server.errors`); whoever serves it over HTTP maps them
to statuses. It is the same object whether the controller reaches it in-process (`kvctl serve`)
or over HTTP (`kvctl worker`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

from kvctl.codecs import CodecError, codec_for_method, get_codec, peek_blob
from kvctl.common.calibration import ModelProfile, codec_for, load_profile
from kvctl.common.defaults import DEVICE_ENV, env
from kvctl.common.model import served_name
from kvctl.server.chunks import (
    ChunkRef,
    ChunkShapeError,
    check_chunk_key,
    check_chunk_shape,
    chunk_refs,
)
from kvctl.server.config import ServerSettings
from kvctl.server.errors import (
    BadRequest,
    Busy,
    ChecksumMismatch,
    Conflict,
    DomainError,
    TooLarge,
    UnknownChunk,
    UnknownInstance,
    UnknownLocation,
    UnknownMethod,
)
from kvctl.server.events import Event, EventTable
from kvctl.server.storage import (
    LocalCPUBackend,
    LocalDiskBackend,
    RemoteBackend,
    StorageBackend,
    StorageError,
)
from kvctl.server.storage.base import UNKNOWN_CODEC, codec_name, label_for
from kvctl.server.storage.tiers import TIER_ORDER, TieredStore
from kvctl.server.worker.jobs import (
    RAW_METHOD,
    CodecTimes,
    checksum,
    codec_executor,
    transcode_blob,
    warm_up_codecs,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger("kvctl.server")

# A location's numbers (for heartbeats, /workers) are waited for this long at most: a frozen
# Redis then reports its last known numbers and error code 1, and the heartbeat goes out.
STATS_WAIT_S = 0.5


def build_backends(settings: ServerSettings) -> dict[str, StorageBackend]:
    backends: dict[str, StorageBackend] = {}
    if settings.local_cpu:
        backends[LocalCPUBackend.name] = LocalCPUBackend(settings.cpu_bytes)
    if settings.local_disk_path is not None:
        backends[LocalDiskBackend.name] = LocalDiskBackend(settings.local_disk_path,
                                                           settings.disk_bytes)
    if settings.remote_url:
        remote = RemoteBackend(settings.remote_url, settings.lmcache_instance_id,
                               key_prefix=settings.remote_key_prefix)
        remote.ping()
        backends[RemoteBackend.name] = remote
    return backends


class WorkerRuntime:
    """One instance's KV store plus the pool that compresses and decompresses it."""

    def __init__(self, settings: ServerSettings, backends: dict[str, StorageBackend] | None = None
                 ) -> None:
        self.settings = settings
        self.instance_id = settings.lmcache_instance_id
        self.worker_id = 0
        self.backends = backends if backends is not None else build_backends(settings)
        self.events = EventTable(settings.max_events, settings.event_retention_s)
        # jobs accepted but not yet started, across both pools (bounded: max_queued_jobs)
        self._queued = 0
        self._queued_lock = threading.Lock()
        self.codec_times = CodecTimes({}, {})
        self.bytes_saved = 0
        self.started_at = time.time()
        self._stats_lock = threading.Lock()
        # Jobs: one thread per running codec job; the codec work itself goes to _codec.
        self._pool = ThreadPoolExecutor(settings.codec_threads, thread_name_prefix="kvctl-job")
        self._codec = codec_executor(settings)
        # clear/pin/move must not queue behind long codec jobs
        self._io_pool = ThreadPoolExecutor(2, thread_name_prefix="kvctl-io")
        self._raw = get_codec(RAW_METHOD)
        # Locations that answer from this process's memory (no network round trip).
        self.all_local = all(isinstance(b, LocalCPUBackend | LocalDiskBackend)
                             for b in self.backends.values())
        self.device = _pick_device(env(DEVICE_ENV, "auto") or "auto")
        # The step profile of the model this worker's engine runs: a bundled model's is
        # committed (read now); another model's is measured once its engine has loaded it
        # (set_profile). Until then, and without a model, codecs use equal steps.
        self.profile: ModelProfile | None = None
        if settings.model and settings.model != "none":
            self.profile = load_profile(served_name(settings.model))
        # the engine's view: write-through to every tier, read-through from the fastest
        self.store = TieredStore(self.backends, self._raw,
                                 codec_for(settings.remote_method, self.profile),
                                 settings.save_unfull_chunk, settings.chunk_size, self.device,
                                 max_elements=settings.max_chunk_elements)
        # stats of locations that may block (Redis): one thread each, answers cached
        self._stats_pool = ThreadPoolExecutor(max(1, len(self.backends)),
                                              thread_name_prefix="kvctl-stats")
        self._stats_futs: dict[str, Future[Any]] = {}
        self._stats_last: dict[str, Any] = {}
        for _ in range(settings.codec_threads):
            self._codec.submit(warm_up_codecs).add_done_callback(_log_warm_up)

    # ---- validation -------------------------------------------------------------------
    def check_instance(self, instance_id: str) -> None:
        if instance_id != self.instance_id:
            raise UnknownInstance(f"unknown instance_id {instance_id!r}; this worker serves "
                                  f"{self.instance_id!r}")

    def backend(self, location: str) -> StorageBackend:
        try:
            return self.backends[location]
        except KeyError:
            known = ", ".join(self.backends) or "none configured"
            raise UnknownLocation(f"unknown location {location!r}; configured locations: "
                                  f"{known}") from None

    def codec(self, method: str) -> Any:
        """The codec for a `method` string, with this worker's model profile when it takes
        one; an unknown method lists the known ones."""
        try:
            return codec_for(method, self.profile)
        except CodecError as exc:
            raise UnknownMethod(str(exc)) from None

    def set_profile(self, profile: ModelProfile | None) -> None:
        """Use ``profile`` (the engine's model's) for codec jobs from now on."""
        self.profile = profile
        self.store.remote_codec = codec_for(self.settings.remote_method, profile)

    def check_tokens(self, tokens: Sequence[int]) -> None:
        if len(tokens) > self.settings.max_request_tokens:
            raise TooLarge(f"{len(tokens)} tokens is more than the "
                           f"{self.settings.max_request_tokens} a request may carry")

    def check_blob(self, blob: bytes, num_tokens: int | None = None) -> Any:
        """The header of a blob from outside, if its shape is one this deployment stores
        (`check_chunk_shape`); ChunkShapeError before anything is decoded if not."""
        info = peek_blob(blob)
        check_chunk_shape(info, self.settings.chunk_size, self.settings.max_chunk_elements,
                          num_tokens)
        return info

    def refs(self, tokens: Sequence[int]) -> list[ChunkRef]:
        return chunk_refs(tokens, self.settings.chunk_size)

    def matched(self, backend: StorageBackend, tokens: Sequence[int]) -> list[ChunkRef]:
        """The consecutive prefix of ``tokens``' chunks that ``backend`` holds."""
        refs = self.refs(tokens)
        held = backend.contains_many([r.key for r in refs]) if refs else []
        out = []
        for ref, ok in zip(refs, held, strict=True):
            if not ok:
                break
            out.append(ref)
        return out

    # ---- scheduling -------------------------------------------------------------------
    def _schedule(self, pool: ThreadPoolExecutor, op: str, instance_id: str, method: str | None,
                  location: str | None, refs: list[ChunkRef],
                  job: Callable[[Event, list[ChunkRef]], None], event_id: str | None) -> Event:
        # Bounded: a client faster than the codecs gets 429 now, not an ever longer queue
        # (and acknowledgements that wait behind it).
        with self._queued_lock:
            if self._queued >= self.settings.max_queued_jobs:
                raise Busy(f"the worker is busy: {self._queued} jobs are waiting already; "
                           f"retry in {Busy.retry_after_s} s (its limit is max_queued_jobs)")
            self._queued += 1
        ev = self.events.create(op, instance_id, method, location,
                                num_tokens=refs[-1].end if refs else 0, chunks_total=len(refs),
                                event_id=event_id)

        def run() -> None:
            with self._queued_lock:
                self._queued -= 1
            self.events.start(ev)
            try:
                job(ev, refs)
            except (CodecError, StorageError, DomainError) as exc:
                self.events.finish(ev, error=str(exc))
            except Exception as exc:  # a bug: keep the worker alive, say what happened
                log.exception("%s %s failed", op, ev.event_id)
                self.events.finish(ev, error=f"internal error: {type(exc).__name__}: {exc}")
            else:
                self.events.finish(ev)

        pool.submit(run)
        return ev

    def compress(self, instance_id: str, method: str, location: str, tokens: Sequence[int],
                 force: bool = False, event_id: str | None = None) -> Event:
        self.check_instance(instance_id)
        self.check_tokens(tokens)
        codec = self.codec(method)
        backend = self.backend(location)
        refs = self.matched(backend, tokens)
        if not force and self.events.active() == 0:
            # Nothing queued or running could change these chunks before this job runs, so
            # a refusal now is the one the job would reach: say it at once, as a 409.
            # Otherwise the job decides when it runs (see _transcode).
            self._refuse_stacking(backend.name, len(refs), _stacked(
                [(label, ()) for label in backend.codecs_many([r.key for r in refs])],
                label_for(codec.name, codec.header_params)), codec)
        return self._schedule(self._pool, "compress", instance_id, method, location, refs,
                              lambda ev, rs: self._transcode(ev, rs, backend, codec,
                                                             "compress", force), event_id)

    @staticmethod
    def _refuse_stacking(location: str, total: int, lossy: dict[str, int], codec: Any) -> None:
        """Refuse to re-encode chunks that another lossy codec already went through: the
        losses would add up and nothing downstream could tell."""
        if not lossy:
            return
        target = label_for(codec.name, codec.header_params)
        raise Conflict(f"{sum(lossy.values())} of {total} chunks in {location} are already "
                       f"compressed lossily ({_held(lossy)}); compressing them with {target} "
                       "would add its loss to theirs. Compress with the same method, or pass "
                       "force=true (kvctl compress --force) to accept both losses")

    def decompress(self, instance_id: str, method: str, location: str, tokens: Sequence[int],
                   event_id: str | None = None) -> Event:
        self.check_instance(instance_id)
        self.check_tokens(tokens)
        self.codec(method)  # an unknown method is refused before anything is scheduled
        backend = self.backend(location)
        refs = self.matched(backend, tokens)
        return self._schedule(self._pool, "decompress", instance_id, method, location, refs,
                              lambda ev, rs: self._transcode(ev, rs, backend, self._raw,
                                                             "decompress"), event_id)

    def _transcode(self, ev: Event, refs: list[ChunkRef], backend: StorageBackend, target: Any,
                   op: str, force: bool = False) -> None:
        """Re-encode each chunk with ``target`` (the raw codec when decompressing).

        A compress checks each chunk as it finds it when the job runs (not when it was
        scheduled: a job queued before it may have changed the chunk), against its codec
        and the lossy methods it went through before, which every blob carries in its
        history (decompressing keeps them). Unforced, a chunk another lossy method went
        through fails the job there; forced, the event's warning counts those chunks.
        """
        method = ev.method or target.name
        target_label = label_for(target.name, target.header_params)
        params_json = json.dumps(target.params)
        codecs: list[list[str]] = []
        stacked: dict[str, int] = {}
        for i, ref in enumerate(refs):
            blob = backend.get(ref.key)
            if blob is None:
                raise StorageError(
                    f"chunk {i} (tokens {ref.start}-{ref.end}) left {backend.name} before it "
                    f"was processed (evicted or cleared); {ev.chunks_done} of "
                    f"{len(refs)} chunks done")
            try:
                info = self.check_blob(blob)
                before = label_for(info.codec, info.params)
                if op == "compress":
                    lossy = _stacked([(before, info.history)], target_label)
                    if lossy and not force:
                        raise Conflict(
                            f"chunk {i} (tokens {ref.start}-{ref.end}) in {backend.name} "
                            f"already went through the lossy {next(iter(lossy))}; "
                            f"compressing it with {target_label} would add its loss to that "
                            "one, so it was left as it is. Compress with the same method, or "
                            "pass force=true (kvctl compress --force) to accept both losses; "
                            f"{ev.chunks_done} of {len(refs)} chunks done")
                    for label in lossy:
                        stacked[label] = stacked.get(label, 0) + 1
                    if lossy:
                        self.events.record(ev, warning=(
                            f"forced: {sum(stacked.values())} of {len(refs)} chunks were "
                            f"already lossy ({_held(stacked)}); their {target_label} "
                            "encoding carries both losses"))
                codecs.append([before, target_label])
                if info.codec == target.name and info.params == target.header_params:
                    self.events.progress(ev, len(blob), len(blob))
                    self.events.record(ev, chunk_codecs=[list(c) for c in codecs])
                    continue
                history = tuple(dict.fromkeys(
                    [*info.history, *([] if _lossless(before) else [before])]))
                new, elapsed = self._codec.submit(transcode_blob, blob, target.name,
                                                  params_json, self.device, history).result()
            except ChunkShapeError as exc:
                raise StorageError(f"chunk {i} (tokens {ref.start}-{ref.end}) in "
                                   f"{backend.name} is not decoded: {exc}") from None
            except CodecError as exc:
                self.store.corrupt(backend.name, ref.key, exc)
                raise StorageError(
                    f"chunk {i} (key {ref.key}, tokens {ref.start}-{ref.end}) in "
                    f"{backend.name} is corrupt ({exc}); it was quarantined, so the engine "
                    f"reads it from another location or recomputes it; {ev.chunks_done} of "
                    f"{len(refs)} chunks done") from None
            backend.put(ref.key, new, ref.num_tokens)
            self.events.record(ev, chunk_codecs=[list(c) for c in codecs])
            with self._stats_lock:
                # a decompress is counted under the codec it actually decoded
                k = (op, method if op == "compress" else _metric_label(before))
                self.codec_times.add(k, elapsed)
                if op == "compress":
                    self.bytes_saved += len(blob) - len(new)
            self.events.progress(ev, len(blob), len(new))

    def clear(self, instance_id: str, location: str, event_id: str | None = None) -> Event:
        self.check_instance(instance_id)
        backend = self.backend(location)
        ev = self.events.create("clear", instance_id, None, location, 0, 0, event_id=event_id)

        def run() -> None:
            self.events.start(ev)
            try:
                stats = backend.stats()
                tokens = backend.clear()
                self.events.record(ev, num_tokens=tokens, chunks_total=stats.chunks,
                                   chunks_done=stats.chunks, bytes_before=stats.bytes)
            except StorageError as exc:
                self.events.finish(ev, error=str(exc))
            else:
                self.events.finish(ev)

        # The reply carries num_tokens, so clear runs before it (fast: no codec work).
        self._io_pool.submit(run).result()
        return ev

    def pin(self, instance_id: str, location: str, tokens: Sequence[int], pinned: bool = True,
            event_id: str | None = None) -> Event:
        self.check_instance(instance_id)
        self.check_tokens(tokens)
        backend = self.backend(location)
        if pinned:
            why = backend.pin_refusal()
            if why:
                raise Conflict(why)
        refs = self.matched(backend, tokens)

        def job(ev: Event, rs: list[ChunkRef]) -> None:
            # one call for all chunks: the disk tier writes its pins file once
            present = backend.set_pinned_many([r.key for r in rs], pinned)
            self.events.record(ev, chunks_done=present)

        return self._schedule(self._io_pool, "pin" if pinned else "unpin", instance_id, None,
                              location, refs, job, event_id)

    def move(self, old: tuple[str, str], new: tuple[str, str], tokens: Sequence[int],
             should_copy: bool, event_id: str | None = None) -> Event:
        """Move between two locations of this instance (the controller handles cross-instance)."""
        self.check_instance(old[0])
        self.check_instance(new[0])
        self.check_tokens(tokens)
        src, dst = self.backend(old[1]), self.backend(new[1])
        if src is dst:
            raise BadRequest(f"old_position and new_position are both {old[1]!r}; "
                             "nothing to move")
        refs = self.matched(src, tokens)

        def job(ev: Event, rs: list[ChunkRef]) -> None:
            for ref in rs:
                blob = src.get(ref.key)
                if blob is None:
                    raise StorageError(f"chunk tokens {ref.start}-{ref.end} left {src.name} "
                                       "before it was moved")
                dst.put(ref.key, blob, ref.num_tokens)
                if not should_copy:
                    src.delete(ref.key)
                self.events.progress(ev, len(blob), len(blob))

        return self._schedule(self._io_pool, "move", old[0], None, f"{old[1]}->{new[1]}", refs,
                              job, event_id)

    def lookup_tiers(self, tokens: Sequence[int]) -> dict[str, int]:
        """Tokens of the stored prefix each location holds (locations holding none left out,
        fastest first). A location that cannot answer (Redis down) is left out too: the
        others still answer."""
        self.check_tokens(tokens)
        out: dict[str, int] = {}
        order = [n for n in TIER_ORDER if n in self.backends]
        order += [n for n in self.backends if n not in order]
        for name in order:
            if not self.store.available(name):
                continue  # failed moments ago: answer from the others without waiting
            try:
                refs = self.matched(self.backends[name], tokens)
            except StorageError as exc:
                self.store.failed(name, "read_failures", exc)
                continue
            if refs:
                out[name] = refs[-1].end
        return out

    def layout_info(self, tiers: dict[str, int]) -> dict[str, list[Any]]:
        best: tuple[str, int] | None = None
        for name, n in tiers.items():
            if best is None or n > best[1]:
                best = (name, n)
        return {self.instance_id: [best[0], best[1]]} if best else {}

    # ---- chunks crossing instances (cross-instance /move) ----------------------------
    def chunk_plan(self, location: str, tokens: Sequence[int]) -> list[dict[str, Any]]:
        """Keys and token counts of the stored prefix of ``tokens`` in ``location``."""
        self.check_tokens(tokens)
        backend = self.backend(location)
        return [{"key": r.key, "num_tokens": r.num_tokens}
                for r in self.matched(backend, tokens)]

    def export_chunk(self, location: str, key: str) -> tuple[bytes, int]:
        """A chunk's blob and the tokens it covers; StorageError if it is gone."""
        check_chunk_key(key)
        backend = self.backend(location)
        blob = backend.get(key)
        if blob is None:
            raise UnknownChunk(f"chunk {key} is not in {location} (evicted or cleared)")
        return blob, backend.num_tokens(key)

    def import_chunk(self, location: str, key: str, blob: bytes, num_tokens: int,
                     digest: str) -> str:
        """Store a chunk sent by another worker after checking it arrived intact."""
        got = checksum(blob)
        if got != digest:
            raise ChecksumMismatch(f"chunk {key}: received bytes hash to {got}, the sender "
                                   f"sent {digest}; nothing stored")
        try:
            check_chunk_key(key)
            self.check_blob(blob, num_tokens)
        except ChunkShapeError as exc:
            raise TooLarge(f"chunk {key}: {exc}; nothing stored") from None
        except CodecError as exc:
            raise BadRequest(f"chunk {key} is not a kvctl blob: {exc}") from None
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        self.backend(location).put(key, blob, num_tokens)
        return got

    def delete_chunk(self, location: str, key: str) -> int:
        return self.backend(location).delete(check_chunk_key(key))

    # ---- status ------------------------------------------------------------------------
    def locations(self) -> tuple[list[dict[str, Any]], int]:
        """Stats per location and an error code: 0 healthy, 1 a location is unreachable.

        With each location, its bytes per codec and the engine's reads from it since start
        (hits, misses, failed reads) and its evictions: what `kvctl workers` shows."""
        out, code = [], 0
        c = self.store.counters
        for name, backend in self.backends.items():
            if isinstance(backend, LocalCPUBackend | LocalDiskBackend):
                s: Any = backend.stats()
            else:
                s = self._bounded_stats(name, backend)
                if s is None or s is False:
                    code = 1
                    s = self._stats_last.get(name) if s is False else None
                    if s is None:
                        continue
            with c.lock:
                reads = {t: getattr(c, t).get(name, 0)
                         for t in ("hits", "misses", "read_failures")}
            out.append({"location": name, "chunks": s.chunks, "bytes": s.bytes,
                        "capacity_bytes": s.capacity_bytes, "pinned_chunks": s.pinned_chunks,
                        "bytes_by_codec": dict(sorted(s.bytes_by_codec.items())),
                        "evictions": s.evictions, **reads})
        return out, code

    def _bounded_stats(self, name: str, backend: StorageBackend) -> Any:
        """A location's stats within STATS_WAIT_S: the stats, False if they did not come in
        time (a frozen Redis: the call goes on in its thread), None if the location failed.
        Heartbeats never wait longer on storage."""
        fut = self._stats_futs.get(name)
        if fut is None or fut.done():
            fut = self._stats_pool.submit(backend.stats)
            self._stats_futs[name] = fut
        try:
            s = fut.result(timeout=STATS_WAIT_S)
        except FutureTimeout:
            return False
        except Exception:  # an unreachable Redis is reported, not raised
            return None
        self._stats_last[name] = s
        return s

    def info(self) -> dict[str, Any]:
        locs, code = self.locations()
        return {"instance_id": self.instance_id, "worker_id": self.worker_id,
                "chunk_size": self.settings.chunk_size, "started_at": self.started_at,
                "pid": os.getpid(),
                "error_code": code, "locations": locs, "queue_depth": self.queue_depth()}

    # ---- the engine's side ----------------------------------------------------------
    def store_kv(self, tokens: Sequence[int], kv: torch.Tensor) -> int:
        """Save the fp16 KV of ``tokens`` (``[L, 2, T, H, D]``) chunk by chunk, into every
        configured tier (write-through, see TieredStore). Chunks already present (possibly
        compressed) are left alone. Returns chunks written (summed over tiers)."""
        return sum(self.store.store(self.refs(tokens), kv).values())

    def load_prefix(self, tokens: Sequence[int], max_tokens: int | None = None
                    ) -> tuple[int, torch.Tensor | None]:
        """The stored KV of the longest stored prefix of ``tokens``, each chunk read from
        the fastest tier holding it (read-through), decoding as needed."""
        got = self.store.load(self.refs(tokens), max_tokens)
        return got.num_tokens, got.kv

    # ---- lifecycle ------------------------------------------------------------------
    def queue_depth(self) -> int:
        return self.events.active()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._io_pool.shutdown(wait=True, cancel_futures=True)
        self._stats_pool.shutdown(wait=False, cancel_futures=True)
        self._codec.shutdown(wait=True, cancel_futures=True)
        for b in self.backends.values():
            b.close()


def _log_warm_up(fut: Any) -> None:
    # never fatal: the first real job will report the real error
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("codec warm-up failed: %s", fut.exception())


def _stacked(chunks: Sequence[tuple[str | None, Sequence[str]]], target: str
             ) -> dict[str, int]:
    """Lossy methods other than ``target`` that the chunks went through, counted per method
    (one chunk counts once, under its latest such method): (current label, history) each."""
    out: dict[str, int] = {}
    for label, history in chunks:
        seen = [m for m in (*history, label) if m is not None and m not in (target,
                UNKNOWN_CODEC) and not _lossless(m)]
        if seen:
            out[seen[-1]] = out.get(seen[-1], 0) + 1
    return out


def _held(lossy: dict[str, int]) -> str:
    return ", ".join(f"{n} with {label}" for label, n in sorted(lossy.items()))


def _lossless(label: str) -> bool:
    try:
        return bool(codec_for_method(label).lossless)
    except CodecError:
        return False


def _metric_label(label: str) -> str:
    """A method label as-is when it is a known method, else its codec's name: metric label
    values stay a bounded set whatever blobs a store holds."""
    try:
        codec_for_method(label)
        return label
    except CodecError:
        return codec_name(label)


def _pick_device(pref: str) -> str:
    if pref != "auto":
        return pref
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        return "cpu"
