"""The blob decoder under coverage-guided fuzzing (tests/fuzz_blob.py) for a bounded time.

Done when (issue 12): no untyped exception, no input costing more than 10x its size in
memory (or 10x the tensor its header may legitimately describe) nor more than 1 s of CPU.
The harness raises on any of these; libFuzzer then exits non-zero and saves the input.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tests import fuzz_blob

HARNESS = Path(fuzz_blob.__file__)
FUZZ_SECONDS = int(os.environ.get("KVCTL_FUZZ_SECONDS", "20"))


def _run(tmp_path: Path, extra: list[str], timeout: float) -> dict:
    stats = tmp_path / "stats.json"
    proc = subprocess.run(
        [sys.executable, str(HARNESS), "--stats", str(stats), *extra],
        capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(HARNESS.parent.parent)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(stats.read_text())


def _check(stats: dict) -> None:
    assert stats["execs"] > 500, stats  # it really ran
    assert stats["decoded"] > 0, stats  # and reached the success path
    assert stats["errors"].get("CorruptBlobError", 0) > 0, stats  # and past the checksum
    assert stats["max_cost_over_budget"] <= 1.0, stats
    assert stats["max_cpu_seconds"] <= fuzz_blob.CPU_SECONDS, stats


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
def test_coverage_guided_fuzz_of_the_decoder(tmp_path):
    new = tmp_path / "new"
    new.mkdir()
    # libFuzzer's RSS limit reads the peak RSS, which Linux carries over fork and exec: the
    # child starts with this (model-loading) test process's peak, so the limit sits above it.
    inherited_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    stats = _run(tmp_path, ["--", f"-max_total_time={FUZZ_SECONDS}", "-timeout=30",
                            "-max_len=4096", f"-rss_limit_mb={inherited_mb + 3072}", "-seed=12",
                            f"-artifact_prefix={tmp_path}/", str(new),
                            str(fuzz_blob.CORPUS)], timeout=FUZZ_SECONDS + 120)
    _check(stats)


def test_mutational_fuzz_without_atheris(tmp_path):
    """The fallback loop (and the one that runs where atheris does not install)."""
    seconds = FUZZ_SECONDS if importlib.util.find_spec("atheris") is None else 3
    _check(_run(tmp_path, ["--mutate", str(seconds)], timeout=seconds + 120))


_SEES_TORCH = """
import sys, torch
from tests import fuzz_blob
from kvctl.codecs import get_codec
blob = b"\\x00" + get_codec("int8").encode(torch.randn(4, 2, 256, 4, 128).half())
target = fuzz_blob.Target(None)
target.warm_up([blob])
target(blob)  # within the real budget
fuzz_blob.MEMORY_FACTOR, fuzz_blob.FIXED_ALLOWANCE = 1, 0
try:
    target(blob)
except AssertionError as exc:
    print("caught:", exc)
    sys.exit(0)
sys.exit("the harness did not see the decode's allocations")
"""


def test_the_harness_sees_torch_allocations():
    """With no allowance, decoding a real 2 MiB tensor (int8 decode makes fp32 temporaries
    of 8 MiB in torch) must trip the memory check: the accounting sees torch's allocations,
    not only Python's. In a fresh process: peak RSS is process-wide."""
    proc = subprocess.run([sys.executable, "-c", _SEES_TORCH], capture_output=True, text=True,
                          timeout=120, env={**os.environ,
                                            "PYTHONPATH": str(HARNESS.parent.parent)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "caught: input of" in proc.stdout


def test_corpus_is_small_and_decodes_or_fails_typed():
    from kvctl.codecs import CodecError, decode_blob

    files = sorted(fuzz_blob.CORPUS.iterdir())
    assert 10 <= len(files) and sum(f.stat().st_size for f in files) < 64 * 1024
    for f in files:
        try:
            decode_blob(fuzz_blob.fix_up(f.read_bytes()))
        except CodecError:
            pass
