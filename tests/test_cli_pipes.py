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


def test_a_reader_that_takes_everything_leaves_exit_0():
    # `kvctl tokenize ... | head`: one line, all of it read: nothing was cut short
    r = subprocess.run(f"{sys.executable} -m kvctl tokenize hello | head -5; "
                       "echo \"exit=${PIPESTATUS[0]}\"", shell=True, executable="/bin/bash",
                       capture_output=True, text=True, timeout=60)
    lines = r.stdout.splitlines()
    assert lines[-1] == "exit=0" and lines[0].replace(",", "").isdigit(), r


def test_stdin_prompt_is_read_exactly(cli_env):
    """`-` reads stdin as it is: a file's final newline is part of the prompt, as it was of
    the prompt the engine was sent (the last partial chunk's tokens depend on it)."""
    import json

    from tests.cliutil import run_cli

    text = "The harbour town woke slowly.\nMara unlocked the bakery.\n"
    from_stdin = json.loads(run_cli("tokenize", "-", "--json", input=text).stdout)
    as_argument = json.loads(run_cli("tokenize", text, "--json").stdout)
    stripped = json.loads(run_cli("tokenize", text[:-1], "--json").stdout)
    assert from_stdin["tokens"] == as_argument["tokens"]
    assert from_stdin["count"] == stripped["count"] + 1
