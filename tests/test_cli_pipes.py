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
    ["--json", "config", "show"],
])
def test_closed_stdout_is_quiet(args):
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to stdout now fails with EPIPE
    try:
        r = subprocess.run([sys.executable, "-m", "kvctl", *args], stdout=write_end,
                           stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert r.returncode == 141, r.stderr  # 128 + SIGPIPE, as a shell reports a killed writer
    assert r.stderr == ""
