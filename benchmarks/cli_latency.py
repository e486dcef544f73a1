#!/usr/bin/env python3
"""Wall time of short `kvctl` invocations, as a user at a prompt sees them.

Each command runs as a fresh process (`.venv/bin/kvctl ...`), once to warm the page cache and
kvctl's tokenizer cache, then ``--runs`` times; the median wall time, the slowest, and the
median CPU time (user + system of the process) are printed as a markdown table. On a shared
machine the CPU time is the steadier figure: it is what the wall time comes to on an idle
one. `compress PROMPT` targets a loopback port nobody listens on, so it measures the path to
the "cannot reach the controller" error.

    python benchmarks/cli_latency.py [--runs 5] [--kvctl .venv/bin/kvctl]
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from harness import free_port

PROMPT = "Explain the significance of KV cache in language models."


def timed(argv: list[str]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, exit code) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--kvctl", default=str(Path(sys.executable).parent / "kvctl"))
    args = parser.parse_args()
    dead = f"http://127.0.0.1:{free_port()}"
    cases = {
        "kvctl --help": ["--help"],
        "kvctl tokenize -t llama3 PROMPT": ["tokenize", "--tokenizer", "llama3", PROMPT],
        "kvctl tokenize PROMPT (smollm2)": ["tokenize", PROMPT],
        "kvctl compress PROMPT (controller down)": ["compress", PROMPT, "--controller", dead],
    }
    from kvctl.common.bench import cpu_name

    cpu = cpu_name()
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in
                         ("typer", "click", "rich", "httpx", "tokenizers", "transformers"))
    print(f"Machine: {cpu}, Python {platform.python_version()}; {versions}\n")
    print(f"| command | exit | median wall s | max wall s (of {args.runs}) | median CPU s |")
    print("|---|---|---|---|---|")
    for name, extra in cases.items():
        timed([args.kvctl, *extra])  # warm-up: page cache, one-time tokenizer conversion
        runs = [timed([args.kvctl, *extra]) for _ in range(args.runs)]
        walls, cpus = [r[0] for r in runs], [r[1] for r in runs]
        print(f"| `{name}` | {runs[-1][2]} | {statistics.median(walls):.2f} | "
              f"{max(walls):.2f} | {statistics.median(cpus):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
