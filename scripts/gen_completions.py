#!/usr/bin/env python3
"""Write kvctl's shell completion scripts (bash, zsh, fish) into completions/.

The scripts come from kvctl itself (Typer's completion sources, `_KVCTL_COMPLETE=source_<shell>`)
run in a subprocess, exactly as a shell would ask for them. `--check` exits 1 when the
committed files differ from what the CLI generates now (tests/test_cli_completions.py).

    python scripts/gen_completions.py [--out DIR] [--check]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = {"bash": "kvctl.bash", "zsh": "_kvctl", "fish": "kvctl.fish"}


def generate(shell: str) -> str:
    """The completion script kvctl prints for ``shell``."""
    env = {**os.environ, "_KVCTL_COMPLETE": f"source_{shell}"}
    proc = subprocess.run([sys.executable, "-m", "kvctl"], env=env, capture_output=True,
                          text=True, check=False, cwd=ROOT)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise SystemExit(f"kvctl did not produce a {shell} script: {proc.stderr.strip()}")
    return proc.stdout.rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "completions",
                        help="folder to write into (default: completions/)")
    parser.add_argument("--check", action="store_true",
                        help="compare with the files in --out instead of writing them")
    args = parser.parse_args(argv)
    stale = []
    for shell, name in FILES.items():
        text, path = generate(shell), args.out / name
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    if stale:
        print("stale completion scripts (run `make completions`): " + ", ".join(stale),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
