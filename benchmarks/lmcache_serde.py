"""What an LMCache user gains from kvctl's serdes: bytes on disk and codec time per chunk.

Real SmolLM2-135M KV of the bundled held-out text (bf16, as vLLM hands it to LMCache), cut
into LMCache's 256-token chunks ``[2, layers, tokens, heads*dim]``, goes through a real
LMCache 0.5.6 StorageManager built from ``--l2-adapter`` JSON by LMCache's own argument
parser: store, wait for L2, clear L1, prefetch (every chunk must be an L2 hit). Bytes on
disk are the files each adapter wrote. Configurations: LMCache's stock filesystem adapter
without a serde and with its ``fp8`` serde, and kvctl's plugin adapter with each
``kvctl-*`` serde.

Codec time is the serde's own ``serialize`` / ``deserialize`` on each chunk (the code the
server's serde thread runs, minus L1 bookkeeping), one thread, median of ``--repeats``.

Usage: python benchmarks/lmcache_serde.py [--tokens 1024] [--markdown benchmarks/lmcache_serde.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

CHUNK = 256
HEAD_DIM = 64
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEADLINE_S = 300


class Obj:
    """The slice of LMCache's MemoryObj a serde touches, over a plain CPU tensor."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t
        self.used: int | None = None

    @property
    def tensor(self) -> torch.Tensor:
        return self.t if self.used is None else self.t.view(torch.uint8).reshape(-1)[:self.used]

    @property
    def byte_array(self) -> memoryview:
        return memoryview(self.t.view(torch.uint8).reshape(-1).numpy())

    def get_shapes(self) -> list[torch.Size]:
        return [self.t.shape]

    def get_dtypes(self) -> list[torch.dtype]:
        return [self.t.dtype]

    def set_used_size(self, n: int) -> None:
        self.used = n


def kv_chunks(tokens: int) -> list[torch.Tensor]:
    """LMCache-layout bf16 chunks of real SmolLM2 KV."""
    from kvctl.common.bench import DEFAULT_TEXT
    from kvctl.common.model import load_model, load_tokenizer_for, prefill

    lm = load_model("smollm2")
    ids = list(load_tokenizer_for("smollm2")(DEFAULT_TEXT.read_text())["input_ids"])[:tokens]
    _, kv = prefill(lm, ids)  # [L, 2, T, H, D]
    L, _, T, H, D = kv.shape
    lmc = kv.to(torch.bfloat16).permute(1, 0, 2, 3, 4).reshape(2, L, T, H * D)
    return [lmc[:, :, i:i + CHUNK].contiguous() for i in range(0, T - CHUNK + 1, CHUNK)]


def l1_args() -> list[str]:
    return ["--eviction-policy", "LRU", "--l1-manager", json.dumps({
        "type": "DRAM", "tag": "_default", "size_gb": 0.5, "use_lazy": False,
        "init_size_gb": 0.5})]


def stored_files(base: Path) -> list[Path]:
    return [p for p in base.rglob("*") if p.is_file() and not p.name.endswith(".tmp")]


def through_storage_manager(spec: dict[str, Any], chunks: list[torch.Tensor], base: Path
                            ) -> tuple[list[int], list[torch.Tensor]]:
    """Store, clear L1, prefetch from L2; returns (bytes of each file, chunks read back)."""
    from lmcache.v1.distributed.api import (
        GroupedObjectKeys,
        MemoryLayoutDesc,
        ObjectKey,
        PrefetchTaskSpec,
    )
    from lmcache.v1.distributed.config import parse_args
    from lmcache.v1.distributed.storage_manager import StorageManager

    sm = StorageManager(parse_args([*l1_args(), "--l2-adapter", json.dumps(spec)]))
    try:
        keys = [ObjectKey(chunk_hash=bytes([i]) * 32, model_name=MODEL, kv_rank=0)
                for i in range(len(chunks))]
        layout = MemoryLayoutDesc(shapes=[chunks[0].shape], dtypes=[chunks[0].dtype])
        objs = sm.reserve_write(keys, layout)
        for k, c in zip(keys, chunks, strict=True):
            objs[k].tensor.copy_(c)
        sm.finish_write(keys)
        deadline = time.monotonic() + DEADLINE_S
        # Clearing L1 before the store controller has picked the objects up would drop
        # them unstored: wait for every file, then clear (objects stay read-locked until
        # their L2 store is acknowledged).
        while len(stored_files(base)) < len(chunks):
            if time.monotonic() > deadline:
                sys.exit(f"{spec}: L2 stores did not finish")
            time.sleep(0.05)
        while True:
            sm.clear()
            if sm.get_l1_usage()[0] == 0:
                break
            if time.monotonic() > deadline:
                sys.exit(f"{spec}: L2 stores did not finish")
            time.sleep(0.05)
        handle = sm.submit_prefetch_task(PrefetchTaskSpec(key_groups=[
            GroupedObjectKeys(keys=keys, object_group_id=0, layout_desc=layout)]))
        if not sm.wait_prefetch_status(handle, DEADLINE_S):
            sys.exit(f"{spec}: prefetch did not finish")
        result = sm.query_prefetch_status(handle)
        if result.l2_hit_count != len(keys):
            sys.exit(f"{spec}: {result.l2_hit_count} of {len(keys)} chunks hit L2")
        with sm.read_prefetched_results(keys, result.l1_owners) as got:
            back = [o.tensor.clone() for o in got]
        sm.finish_read_prefetched(keys, 1, result.l1_owners)
    finally:
        sm.close()
    files = stored_files(base)
    if len(files) != len(chunks):
        sys.exit(f"{spec}: {len(files)} files for {len(chunks)} chunks")
    return sorted(p.stat().st_size for p in files), back


def time_serde(ser: Any, de: Any, chunks: list[torch.Tensor], repeats: int
               ) -> tuple[float, float, int]:
    """Median ms per chunk of serialize and deserialize; the size each chunk reserves."""
    from lmcache.v1.distributed.api import MemoryLayoutDesc

    layout = MemoryLayoutDesc(shapes=[chunks[0].shape], dtypes=[chunks[0].dtype])
    reserve = ser.estimate_serialized_size(layout)
    enc, dec = [], []
    for chunk in chunks:
        src = Obj(chunk)
        for _ in range(repeats):
            dst = Obj(torch.empty(reserve, dtype=torch.uint8))
            t0 = time.perf_counter()
            n = ser.serialize(src, dst, None)
            enc.append(time.perf_counter() - t0)
            dst.set_used_size(n)
            out = Obj(torch.empty_like(chunk))
            t0 = time.perf_counter()
            de.deserialize(dst, out, None)
            dec.append(time.perf_counter() - t0)
    return 1000 * statistics.median(enc), 1000 * statistics.median(dec), reserve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024, help="prefix length (a multiple of 256)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--markdown", type=Path, help="write the results table here")
    args = ap.parse_args()
    torch.set_num_threads(1)

    import lmcache
    from lmcache.v1.distributed.serde.fp8 import (
        Fp8QuantizationDeserializer,
        Fp8QuantizationSerializer,
    )

    from kvctl.codecs import available_methods
    from kvctl.common.bench import machine_info
    from kvctl.integrations.lmcache.serde import KvctlDeserializer, KvctlSerializer, warm_up

    chunks = kv_chunks(args.tokens)
    fp16 = chunks[0].numel() * 2
    print(f"{len(chunks)} chunks of {list(chunks[0].shape)} bf16, {fp16} bytes each",
          file=sys.stderr)

    configs: list[tuple[str, dict[str, Any], Any]] = [
        ("LMCache fs, no serde", {"type": "fs"}, None),
        ("LMCache fs + fp8 serde", {"type": "fs", "serde": {"type": "fp8"}},
         (Fp8QuantizationSerializer(), Fp8QuantizationDeserializer())),
    ]
    for method in available_methods():
        ser, de = KvctlSerializer(method, HEAD_DIM), KvctlDeserializer(HEAD_DIM)
        warm_up(ser, de)
        configs.append((f"kvctl plugin + kvctl-{method}",
                        {"type": "plugin", "module_path": "kvctl.integrations.lmcache.plugin",
                         "class_name": "KvctlFSL2Adapter",
                         "serde": {"type": f"kvctl-{method}", "head_dim": HEAD_DIM}},
                        (ser, de)))

    rows = []
    for name, spec, serde in configs:
        with tempfile.TemporaryDirectory() as tmp:
            spec = dict(spec)
            if spec["type"] == "fs":
                spec["base_path"] = tmp
            else:
                spec["adapter_params"] = {"base_path": tmp}
            sizes, back = through_storage_manager(spec, chunks, Path(tmp))
        err = max(float((b.float() - c.float()).norm() / c.float().norm())
                  for b, c in zip(back, chunks, strict=True))
        enc = dec = None
        reserve = fp16
        if serde is not None:
            enc, dec, reserve = time_serde(*serde, chunks, args.repeats)
        mean = statistics.mean(sizes)
        rows.append((name, mean, fp16 / mean, reserve, err, enc, dec))
        print(f"{name}: {mean:.0f} B/chunk, {fp16 / mean:.2f}x", file=sys.stderr)

    info = machine_info()
    lines = [
        "# kvctl serdes inside LMCache",
        "",
        "Command: `python benchmarks/lmcache_serde.py "
        f"--tokens {args.tokens} --markdown benchmarks/lmcache_serde.md`",
        "",
        f"- KV: SmolLM2-135M-Instruct on the bundled held-out text, {args.tokens} tokens, "
        f"{len(chunks)} LMCache chunks of {list(chunks[0].shape)} bf16 "
        f"({fp16} bytes each).",
        "- Path: a real LMCache StorageManager from `--l2-adapter` JSON; store, clear L1, "
        "prefetch; every chunk an L2 hit. Bytes on disk: the files the adapter wrote, mean "
        "per chunk. Reserved: the serde's size estimate, the L1 memory each in-flight store "
        "holds for its temporary buffer.",
        "- Time: the serde's serialize / deserialize per chunk, one thread, median of "
        f"{args.repeats} runs on each chunk; the machine is shared, so timings are noisy.",
        "- Error: max over chunks of ||read back - stored|| / ||stored||.",
        f"- Machine: {info['cpu']} ({info['arch']}, {info['cores']} cores, GPU: "
        f"{info['gpu']}); Python {info['python']}, torch {info['torch']}, LMCache "
        f"{lmcache.__version__}, "
        f"numba {info['numba']}.",
        "",
        "| L2 configuration | bytes on disk / chunk | ratio vs bf16 | reserved / chunk "
        "| rel. error | serialize ms | deserialize ms |",
        "|---|---|---|---|---|---|---|",
    ]
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    for name, mean, ratio, reserve, err, enc, dec in rows:
        lines.append(f"| {name} | {mean:,.0f} | {ratio:.2f}x | {reserve:,} | {err:.4f} | "
                     f"{ms(enc)} | {ms(dec)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
