"""Coverage-guided fuzzing of the blob decoder (atheris / libFuzzer), with a budget per input.

Run by ``tests/test_fuzz_blob.py`` for a bounded time; by hand for longer::

    .venv/bin/python tests/fuzz_blob.py --stats /tmp/stats.json -- -max_total_time=600 \\
        /tmp/new_corpus tests/fuzz_corpus

Each input is one mode byte then a blob. Mode 0 decodes the bytes as they are; mode 1
recomputes the checksum first and mode 2 also the payload length, because a checksum is no
defence (anyone can recompute one): the fuzzer must reach the header and payload logic
behind it. Every input must either decode or raise a ``CodecError``, cost at most
``MEMORY_FACTOR`` x its size in memory (or x the tensor its header may legitimately
describe, see ``budget``), plus a fixed allowance, and at most ``CPU_SECONDS`` of CPU time.
A violation raises, which libFuzzer reports as a crash (exit status != 0, input saved).

Without atheris (``--mutate``, or when it is not installed) a seeded mutational loop over
the corpus drives the same target.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import torch

from kvctl.codecs.blob import FORMAT_VERSION  # seeds and mutations write the current format

MEMORY_FACTOR = 10
# Not input dependent: RSS pages, allocator arenas, and cachegen building its rANS tables
# for every decode (about 0.5 MiB; the codec instance is rebuilt from each blob's header).
FIXED_ALLOWANCE = 1024 * 1024
CPU_SECONDS = 1.0
CORPUS = Path(__file__).parent / "fuzz_corpus"

_PREFIX = struct.Struct("<4sBBH")
# numba compiles these from their bytecode, which atheris's instrumentation would rewrite
NUMBA_MODULES = ["kvctl.codecs.rans", "kvctl.codecs.predict"]


def fix_up(data: bytes) -> bytes:
    """Mode byte + blob -> the blob, with checksum (and payload length) recomputed."""
    if not data:
        return b""
    mode, blob = data[0] % 3, data[1:]
    if mode == 0 or len(blob) < _PREFIX.size + 12 or blob[:4] != b"KVZ1":
        return blob
    hlen = _PREFIX.unpack_from(blob, 0)[3]
    off = _PREFIX.size + hlen
    if len(blob) < off + 12:
        return blob
    body = bytearray(blob[:-4])
    if mode == 2:
        struct.pack_into("<Q", body, off, len(body) - off - 8)
    return bytes(body) + struct.pack("<I", zlib.crc32(body))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _fresh_pages_for_big_allocations() -> None:
    """glibc otherwise raises its mmap threshold after the first big free and then serves
    big blocks from heap pages that stay resident, which a peak-RSS measure cannot see:
    from here on every block of 64 KiB or more is mapped when allocated, unmapped when
    freed. (torch and numba allocate through malloc, behind tracemalloc's back.)"""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.mallopt(m_trim_threshold, 128 * 1024)


def budget(blob: bytes) -> int:
    """Bytes an input may cost: 10x the larger of the blob and the tensor its header
    describes, when the codec's own bound admits that tensor (a valid cachegen blob of
    constant KV really does decode to ~380 elements per byte)."""
    from kvctl.codecs import CodecError, peek_blob
    from kvctl.codecs.base import codec_from_info

    out = 0
    try:
        info = peek_blob(blob)
        codec = codec_from_info(info)
        # a codec that declares no bound is held to one element per byte
        per_byte = getattr(codec, "max_elements_per_byte", 1.0)
        if info.num_elements <= per_byte * info.payload_bytes:
            out = info.num_elements * (4 if info.dtype == "float32" else 2)
    except CodecError:
        pass
    return MEMORY_FACTOR * max(len(blob), out) + FIXED_ALLOWANCE


class Target:
    """The fuzz target plus what it measured (written to ``stats_path`` now and then)."""

    def __init__(self, stats_path: str | None) -> None:
        self.stats_path = stats_path
        self.stats = {"execs": 0, "decoded": 0, "typed_errors": 0, "max_cost_bytes": 0,
                      "max_cost_per_input_byte": 0.0, "max_cost_over_budget": 0.0,
                      "max_cpu_seconds": 0.0, "errors": {}}
        self._last_write = 0.0
        self.track_rss = os.path.exists("/proc/self/clear_refs")
        if self.track_rss:
            _fresh_pages_for_big_allocations()

    def warm_up(self, corpus: list[bytes]) -> None:
        """Decode the seeds once, unmeasured: a codec's first use (torch kernels, numba
        caches, tables) costs megabytes once per process, not per input."""
        from kvctl.codecs import decode_blob

        for data in corpus:
            try:
                decode_blob(fix_up(data))
            except Exception:  # the measured run reports anything untyped
                pass

    def __call__(self, data: bytes) -> None:
        from kvctl.codecs import CodecError, decode_blob

        blob = fix_up(data)
        if self.track_rss:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            rss0 = _status_kib("VmRSS")
        tracemalloc.start()
        tracemalloc.reset_peak()
        cpu0 = time.thread_time()
        outcome = "decoded"
        try:
            decode_blob(blob)
        except CodecError as exc:
            outcome = type(exc).__name__
        finally:
            cpu = time.thread_time() - cpu0
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        if self.track_rss:
            peak = max(peak, 1024 * (_status_kib("VmHWM") - rss0))
        limit = budget(blob)
        s = self.stats
        s["execs"] += 1
        s["decoded" if outcome == "decoded" else "typed_errors"] += 1
        if outcome != "decoded":
            s["errors"][outcome] = s["errors"].get(outcome, 0) + 1
        s["max_cost_bytes"] = max(s["max_cost_bytes"], peak)
        s["max_cost_per_input_byte"] = max(s["max_cost_per_input_byte"],
                                           peak / max(len(blob), 1))
        s["max_cost_over_budget"] = max(s["max_cost_over_budget"], peak / limit)
        s["max_cpu_seconds"] = max(s["max_cpu_seconds"], cpu)
        self.write_stats()
        if peak > limit:
            raise AssertionError(f"input of {len(blob)} B cost {peak} B (budget {limit} B)")
        if cpu > CPU_SECONDS:
            raise AssertionError(f"input of {len(blob)} B took {cpu:.2f} s of CPU")

    def write_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.stats_path and (force or now - self._last_write > 0.5):
            self._last_write = now
            tmp = self.stats_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.stats, f)
            os.replace(tmp, self.stats_path)


# ------------------------------------------------------------ fallback: plain mutation ----
def _mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(pos, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 2 and b:
            del b[pos:pos + rng.randint(1, 16)]
        elif op == 3:  # digits drive the header's shape: grow or shrink a number
            digits = [i for i, c in enumerate(b[:300]) if 48 <= c <= 57]
            if digits:
                i = rng.choice(digits)
                b[i:i + 1] = str(rng.choice([0, 9, 99999, 2**31, 2**40])).encode()
        elif op == 4:
            other = rng.choice(pool)
            cut = rng.randrange(len(other) + 1)
            b[pos:] = other[cut:]
        else:
            b[0:1] = bytes([rng.randrange(3)])
    return bytes(b)


_CODECS = ["raw", "int8", "fp8", "kivi", "cachegen", "zstd", ""]
_PARAMS = [{}, {"level": "default"}, {"level": "compact"}, {"level": [1]}, {"bits": 1},
           {"bits": 2, "group": 4096}, {"bits": 8, "group": 1}, {"group": 0}, {"bits": True}]


def structured_mutation(rng: random.Random, data: bytes) -> bytes:
    """Edit a blob's header as a header (shape, codec, params, dtype) or cut its payload,
    then let mode 1 or 2 re-checksum it: byte flips alone rarely produce a header that
    parses, and a header that parses is where a decoder meets a lying shape."""
    if len(data) < 1 + _PREFIX.size or data[1:5] != b"KVZ1":
        return data
    blob = data[1:]
    hlen = _PREFIX.unpack_from(blob, 0)[3]
    off = _PREFIX.size + hlen
    try:
        hdr = json.loads(blob[_PREFIX.size:off])
        payload = blob[off + 8:-4]
        shape = list(hdr["shape"])
    except (ValueError, KeyError, TypeError, RecursionError):  # the seed is hostile itself
        return data
    what = rng.randrange(5)
    if what == 0 and shape:
        i = rng.randrange(len(shape))
        x = shape[i] if type(shape[i]) is int else 1
        shape[i] = rng.choice([0, 1, 2, x + 1, max(x - 1, 0), 2 * x, x // 2, 2**rng.randrange(40),
                               -1, 2**64])
        hdr["shape"] = shape
    elif what == 1:
        hdr["codec"] = rng.choice(_CODECS)
    elif what == 2:
        hdr["params"] = rng.choice(_PARAMS)
    elif what == 3:
        hdr["dtype"] = rng.choice(["float16", "bfloat16", "float32", "int8", None])
    else:
        cut = rng.randrange(len(payload) + 1)
        payload = payload[:cut] if rng.random() < 0.5 else payload + payload[cut:]
    head = json.dumps(hdr, separators=(",", ":")).encode()
    if len(head) > 0xFFFF:
        return data
    body = (_PREFIX.pack(b"KVZ1", FORMAT_VERSION, 0, len(head)) + head
            + struct.pack("<Q", len(payload)) + payload)
    return bytes([rng.choice([1, 2])]) + body + b"\0\0\0\0"


def mutate_loop(target: Target, seconds: float, corpus: list[bytes], seed: int = 0) -> None:
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    for data in corpus:
        target(data)
    while time.monotonic() < deadline:
        seed = rng.choice(corpus)
        if rng.random() < 0.5:
            target(structured_mutation(rng, seed))
        else:
            target(_mutate(rng, seed, corpus))


def write_corpus(directory: Path) -> None:
    """The committed seeds: a small valid blob of every method and dtype (mode 1, so the
    fuzzer's edits keep a valid checksum), plus the hostile shapes the issue reported."""
    from kvctl.codecs import available_methods, codec_for_method
    from kvctl.codecs.blob import pack, unpack

    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    seeds: dict[str, bytes] = {}
    for method in available_methods():
        for dtype, shape in ((torch.float16, (1, 2, 6, 1, 8)), (torch.bfloat16, (1, 2, 3, 2, 4)),
                             (torch.float32, (2, 2, 1, 1, 4))):
            kv = torch.randn(shape, generator=g).to(dtype)
            seeds[f"{method}-{str(dtype)[6:]}"] = codec_for_method(method).encode(kv)
    # the bomb: a valid 4-token blob whose header claims 2**30 tokens
    small = codec_for_method("cachegen").encode(torch.randn((1, 2, 4, 1, 1), generator=g).half())
    info, payload = unpack(small)
    seeds["bomb-tokens"] = pack("cachegen", info.params, (1, 2, 1 << 30, 1, 1), "float16",
                                bytes(payload))
    for depth in (40, 1500):  # json.loads recurses once per level
        head = (b'{"codec":"raw","params":' + b"[" * depth + b"]" * depth
                + b',"shape":[1,2,1,1,1]}')
        seeds[f"nested-{depth}"] = (_PREFIX.pack(b"KVZ1", FORMAT_VERSION, 0, len(head)) + head
                                    + struct.pack("<Q", 4) + bytes(4) + bytes(4))
    for name, blob in seeds.items():
        (directory / name).write_bytes(b"\x01" + blob)


def load_corpus(dirs: list[Path]) -> list[bytes]:
    out = []
    for d in dirs:
        out += [p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()]
    return out


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stats", help="write measured maxima (JSON) to this file")
    ap.add_argument("--mutate", type=float, metavar="SECONDS",
                    help="plain seeded mutation for SECONDS instead of atheris")
    ap.add_argument("--write-corpus", type=Path, metavar="DIR",
                    help="write the seed corpus to DIR and exit")
    ap.add_argument("rest", nargs="*", help="libFuzzer arguments and corpus directories")
    args = ap.parse_args(argv[1:])
    torch.set_num_threads(1)
    if args.write_corpus:
        write_corpus(args.write_corpus)
        return
    try:
        import atheris
    except ImportError:
        atheris = None
    use_atheris = args.mutate is None and atheris is not None
    if use_atheris:
        # Coverage comes from the codec library's Python code (numba loops are compiled);
        # it must be instrumented before anything imports it.
        with atheris.instrument_imports(include=["kvctl.codecs"], exclude=NUMBA_MODULES):
            import kvctl.codecs  # noqa: F401
    target = Target(args.stats)
    target.warm_up(load_corpus([CORPUS]))
    if not use_atheris:
        dirs = [Path(a) for a in args.rest if not a.startswith("-")] or [CORPUS]
        mutate_loop(target, args.mutate or 20.0, load_corpus(dirs))
        target.write_stats(force=True)
        return
    def mutator(data: bytes, max_size: int, seed: int) -> bytes:
        # half libFuzzer's byte-level mutations, half header-aware edits
        rng = random.Random(seed)
        if rng.random() < 0.5:
            return atheris.Mutate(data, max_size)
        return structured_mutation(rng, data)[:max_size]

    atheris.Setup([argv[0], *args.rest], target, custom_mutator=mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
