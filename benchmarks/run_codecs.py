"""Reproduce benchmarks/results.md and results.png: every codec on the text suite.

Same code path as `kvctl bench --suite` (the Typer command function is invoked directly, so
this works before or without the CLI), with the committed defaults: both embedded models
(SmolLM2-135M, Gemma 3 270M) read each of the eleven texts in kvctl/common/texts/, 512-token
prefix in 256-token chunks, 256-token continuation.

Usage: .venv/bin/python benchmarks/run_codecs.py [`kvctl bench` options instead of the default]
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from kvctl.commands.bench import bench

HERE = Path(__file__).resolve().parent


def main() -> None:
    app = typer.Typer()
    app.command()(bench)
    out = HERE.relative_to(Path.cwd()) if HERE.is_relative_to(Path.cwd()) else HERE
    args = sys.argv[1:] or ["--suite", "--plot", str(out / "results.png"),
                            "--markdown", str(out / "results.md")]
    sys.argv = ["kvctl", "bench", *args]  # what results.md records as the command
    app(args=args, prog_name="kvctl bench")


if __name__ == "__main__":
    main()
