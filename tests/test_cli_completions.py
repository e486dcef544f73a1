"""The CLI as a program: import weight of --help, completion scripts, console entry."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "tokenizers", "uvicorn", "fastapi", "numpy", "numba")


def run_kvctl(*args: str, env: dict[str, str] | None = None, **kw):
    return subprocess.run([sys.executable, "-m", "kvctl", *args], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, **(env or {})}, **kw)


@pytest.mark.parametrize("argv", [["--help"], ["compress", "--help"], ["serve", "--help"],
                                  ["bench", "--help"], ["events", "watch", "--help"]])
def test_help_imports_nothing_heavy(argv):
    code = ("import json, sys\n"
            "from kvctl.cli import app\n"
            f"try:\n    app({argv!r}, prog_name='kvctl')\n"
            "except SystemExit:\n    pass\n"
            f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})),"
            " file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, check=True)
    assert json.loads(proc.stderr.strip().splitlines()[-1]) == []
    assert "Usage" in proc.stdout


@pytest.mark.parametrize("argv", [
    ["compress", "Explain the significance of KV cache.", "--controller", "CLOSED"],
    ["tokenize", "--tokenizer", "llama3", "Explain the significance of KV cache."],
])
def test_prompt_commands_import_no_model_code(argv):
    """A prompt is tokenized with `tokenizers` on the cached tokenizer.json; neither
    transformers nor torch loads, so a failing command fails at once."""
    from kvctl.common.tokenizers import load_tokenizer
    from tests.conftest import free_port

    load_tokenizer("llama3"), load_tokenizer("smollm2")  # the converted files exist now
    argv = [a.replace("CLOSED", f"http://127.0.0.1:{free_port()}") for a in argv]
    code = ("import json, sys\n"
            "from kvctl.cli import app\n"
            f"try:\n    app({argv!r}, prog_name='kvctl')\n"
            "except SystemExit as e:\n    code = e.code\n"
            "print(json.dumps([code, sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'transformers', 'uvicorn', 'fastapi'})]), file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, check=True)
    exit_code, heavy = json.loads(proc.stderr.strip().splitlines()[-1])
    assert heavy == []
    assert exit_code == (1 if argv[0] == "compress" else 0)
    if argv[0] == "compress":
        assert "cannot reach the controller" in proc.stderr


def test_python_m_kvctl_and_version():
    proc = run_kvctl("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("kvctl ")


def test_usage_error_exit_2_without_traceback():
    proc = run_kvctl("compress", "--no-such-flag")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_committed_completions_are_current(tmp_path):
    gen = [sys.executable, str(ROOT / "scripts" / "gen_completions.py")]
    subprocess.run([*gen, "--out", str(tmp_path)], check=True, capture_output=True)
    for name in ("kvctl.bash", "_kvctl", "kvctl.fish"):
        assert (ROOT / "completions" / name).read_text() == (tmp_path / name).read_text(), (
            f"completions/{name} is stale: run `make completions`")
    proc = subprocess.run([*gen, "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_bash_completion_answers(tmp_path):
    env = {"_KVCTL_COMPLETE": "complete_bash", "COMP_WORDS": "kvctl ev", "COMP_CWORD": "1"}
    proc = run_kvctl(env=env)
    assert proc.returncode == 0 and "events" in proc.stdout.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_install_completion_bash(tmp_path):
    # bash as the parent process is how the shell is detected, as for a user at a prompt
    env = {**os.environ, "HOME": str(tmp_path)}
    line = f'"{sys.executable}" -m kvctl --install-completion; exit $?'  # no exec: bash stays
    proc = subprocess.run(["bash", "-c", line], capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    script = tmp_path / ".bash_completions" / "kvctl.sh"
    assert "_KVCTL_COMPLETE=complete_bash" in script.read_text()
    assert str(script) in (tmp_path / ".bashrc").read_text()


def words(text: str) -> str:
    """Help text without Rich's box and line folding."""
    return " ".join(re.sub("[│╭╮╰╯─]", " ", text).split())


def test_help_shows_defaults_and_no_type_noise():
    serve = run_kvctl("serve", "--help")
    assert serve.returncode == 0
    for default in ("Controller port. [default: 9000]", "[default: 9001]",
                    "[default: 8000]", "[default: smollm2]", "[default: 127.0.0.1]"):
        assert default in words(serve.stdout), default
    helps = [words(serve.stdout)] + [words(run_kvctl(*cmd, "--help").stdout) for cmd in (
        [], ["compress"], ["move"], ["events", "watch"], ["events", "show"], ["config"])]
    for text in helps:
        assert "<bool>" not in text and "<str>" not in text and "[[" not in text
    compress, move, watch = helps[2], helps[3], helps[4]
    assert "[default: cachegen]" in compress and "[default: LocalCPUBackend]" in compress
    assert "Usage: kvctl compress [OPTIONS] [PROMPT]" in compress
    assert "Global options, before or after the command" in compress
    assert "Exit codes: 0 done" in compress
    assert "[default: the source instance]" in move
    assert "Usage: kvctl events watch [OPTIONS] [ID...]" in watch
