"""Codec jobs: the process pool that runs a chunk's decode + encode off the serving process.

Only bytes and strings cross into the pool; a blob is parsed by the codecs' format, never
unpickled. The pool's processes run niced and leave when their owner dies.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field

from prometheus_client import Histogram

from kvctl.codecs import codec_for_method, decode_blob, get_codec
from kvctl.server.config import ServerSettings

RAW_METHOD = "raw"


# one chunk through a codec: ~1 ms (raw, a small chunk) to seconds (a long chunk, slow level)
CODEC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _codec_histogram() -> Histogram:
    return Histogram("kvctl_codec_duration_seconds",
                     "Time one chunk spent in a codec job (decode + encode), by op and method",
                     labelnames=["op", "method"], buckets=CODEC_BUCKETS, registry=None)


@dataclass
class CodecTimes:
    """Cumulative codec seconds and chunk counts per (op, method), and the time per chunk
    as a histogram, for /metrics."""

    seconds: dict[tuple[str, str], float]
    chunks: dict[tuple[str, str], int]
    durations: Histogram = field(default_factory=_codec_histogram)

    def add(self, key: tuple[str, str], elapsed: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + elapsed
        self.chunks[key] = self.chunks.get(key, 0) + 1
        self.durations.labels(*key).observe(elapsed)


def checksum(blob: bytes) -> str:
    """The digest a chunk travels with between workers."""
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


# Codec work is batch work: the processes that run it yield the CPU to those answering
# requests (the controller's and the worker's event loops) when both want it.
CODEC_NICENESS = 10


def _init_codec_process(torch_threads: int, owner_pid: int) -> None:
    # Ctrl-C reaches the whole process group: the owner stops the pool in order; a child
    # must not die mid-wait on its own (and print a traceback).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(CODEC_NICENESS)
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    # A pool process outlives a worker killed with SIGKILL (nothing tells it); it watches
    # its owner instead and leaves with it.
    threading.Thread(target=_exit_with, args=(owner_pid,), daemon=True,
                     name="kvctl-owner-watch").start()


def _exit_with(owner_pid: int) -> None:
    while True:
        time.sleep(1.0)
        try:
            os.kill(owner_pid, 0)
        except ProcessLookupError:
            os._exit(0)
        except PermissionError:  # pid reused by another user's process: the owner is gone
            os._exit(0)


def transcode_blob(blob: bytes, codec: str, params_json: str, device: str,
                   history: tuple[str, ...] = ()) -> tuple[bytes, float]:
    """Decode a chunk blob and encode it with codec ``codec`` built from ``params_json``
    (its params, a model's step profile included), recording ``history`` (the lossy methods
    the KV has been through) in the new blob; runs in a codec process.

    Only bytes and strings cross the process boundary (the pool's own pipe between processes
    this worker started); blobs are parsed by the codecs' format, never unpickled.
    """
    t0 = time.perf_counter()
    new = get_codec(codec, **json.loads(params_json)).encode(decode_blob(blob, device=device),
                                                             history=history)
    return new, time.perf_counter() - t0


def warm_up_codecs() -> None:
    """Compile (or load the cache of) the JIT coders, so the first real job does not pay."""
    import torch

    kv = torch.randn(1, 2, 4, 1, 8, dtype=torch.float16)
    for method in ("cachegen", RAW_METHOD):
        decode_blob(codec_for_method(method).encode(kv))


def codec_executor(settings: ServerSettings) -> Executor:
    if settings.codec_pool == "thread":
        return ThreadPoolExecutor(settings.codec_threads, thread_name_prefix="kvctl-codec")
    # forkserver: children fork from a clean server that has already imported the codecs
    # (no fork of a threaded parent, and no torch import per child).
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["kvctl.codecs", "torch"])
    return ProcessPoolExecutor(settings.codec_threads, mp_context=ctx,
                               initializer=_init_codec_process,
                               initargs=(settings.torch_threads or 1, os.getpid()))
