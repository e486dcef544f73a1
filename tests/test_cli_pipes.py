"""`kvctl ... | head`: a reader that goes away early is no error worth a message."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("args", [
    ["--help"],
    ["bench", "--help"],
    ["tokenize", "--tokenizer", "llama3", "--json", "word " * 5000],
])
def test_closed_stdout_is_quiet(args):
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to stdout now fails with EPIPE
    try:
        r = subprocess.run([sys.executable, "-m", "kvctl", *args], stdout=write_end,
                           stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "bug" not in r.stderr
