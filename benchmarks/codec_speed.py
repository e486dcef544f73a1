"""Single-thread encode/decode speed of the codecs' levels on real KV of both embedded models.

The issue's floor is 200 MB/s encode and 150 MB/s decode of fp16 KV per core. `kvctl bench`
times one run per chunk as a side figure; this script is the speed measurement itself: the
256-token chunks of a 512-token prefix (the bundled held-out text), with each model's step
profile (as the worker and `kvctl bench` use it), one warm-up round, then ``--rounds``
rounds, each timing every chunk once; the median and the range of the per-round MB/s.
The machine is a shared VM: a round that lands on a busy host core reads 20-30% slower,
which is why the range is printed beside the median.

Usage: OMP_NUM_THREADS=1 python benchmarks/codec_speed.py [--rounds 15] [--method M ...]
[--markdown FILE] (methods: cachegen's levels by default; int8 beside them gives a reference
ratio that does not depend on the machine's speed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from kvctl.codecs import decode_blob
from kvctl.common.bench import machine_info, text_workload
from kvctl.common.calibration import codec_for, load_profile
from kvctl.common.model import BUILTINS

METHODS = ("cachegen", "cachegen-compact")


def measure(model: str, rounds: int, methods: tuple[str, ...] = METHODS) -> list[dict]:
    work = text_workload(None, model=model)
    served = BUILTINS[model].served_name
    profile = load_profile(served)
    rows = []
    for method in methods:
        codec = codec_for(method, profile)
        blobs = [codec.encode(c) for c in work.chunks]  # warm-up: compilation, allocation
        [decode_blob(b) for b in blobs]
        nbytes = sum(2 * c.numel() for c in work.chunks)
        enc, dec = [], []
        for _ in range(rounds):
            te = td = 0.0
            for chunk in work.chunks:
                t0 = time.perf_counter()
                blob = codec.encode(chunk)
                t1 = time.perf_counter()
                decode_blob(blob)
                td += time.perf_counter() - t1
                te += t1 - t0
            enc.append(nbytes / te / 1e6)
            dec.append(nbytes / td / 1e6)
        rows.append({"model": served, "method": method, "profile": profile is not None,
                     "shape": list(work.chunks[0].shape), "enc": enc, "dec": dec})
    return rows


def markdown(rows: list[dict], rounds: int, methods: tuple[str, ...] = METHODS) -> str:
    info = machine_info()
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path(
        "/proc/loadavg").exists() else "n/a"
    lines = [
        "# codec speed, one thread", "",
        "Command: `OMP_NUM_THREADS=1 python benchmarks/codec_speed.py --rounds "
        f"{rounds}{''.join(f' --method {m}' for m in methods)}`", "",
        f"- Machine: {info['cpu']} ({info['arch']}, {info['cores']} cores, GPU: {info['gpu']}),"
        f" a shared VM; load average after the run: {load}.",
        f"- Python {info['python']}, torch {info['torch']}, numpy {info['numpy']}, numba "
        f"{info['numba']}; torch and numba on one thread.",
        "- KV: the 512-token prefix of the bundled held-out text in two 256-token fp16 chunks;"
        " each model's step profile. MB/s of fp16 KV; median and range over the rounds.", "",
        "| model | method | chunk shape | encode MB/s median (min-max) "
        "| decode MB/s median (min-max) |",
        "|---|---|---|---|---|"]
    for r in rows:
        e, d = r["enc"], r["dec"]
        lines.append(f"| {r['model']} | {r['method']} | {r['shape']} | "
                     f"{statistics.median(e):.0f} ({min(e):.0f}-{max(e):.0f}) | "
                     f"{statistics.median(d):.0f} ({min(d):.0f}-{max(d):.0f}) |")
    lines += ["", "Floor (issue 8): 200 MB/s encode, 150 MB/s decode per core.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--markdown", type=Path, help="also write the table to this file")
    ap.add_argument("--method", action="append", help="method to time (repeatable)")
    args = ap.parse_args()
    methods = tuple(args.method or METHODS)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    rows = [r for model in BUILTINS for r in measure(model, args.rounds, methods)]
    text = markdown(rows, args.rounds, methods)
    print(text)
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
