"""Shared fixtures. Expensive real parts (the model, redis-server) start once per session."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).parent / "data"

# A prompt long enough for two 256-token chunks and a partial one.
PROSE = (
    "The harbour town woke slowly. Fishing boats rocked against the wooden piers while gulls "
    "argued over scraps near the market stalls. Mara unlocked the bakery at five, as she had "
    "done for eleven years, and lit the old oven that her grandfather had built from river "
    "stones. The first loaves were always for the night watchmen, who came in stamping their "
    "boots and complaining about the fog. "
) * 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- server fixtures ----
@pytest.fixture(scope="session")
def lm():
    """The embedded SmolLM2-135M model, loaded once."""
    from kvctl.common.model import load_model

    return load_model("smollm2")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from kvctl.common.model import load_tokenizer_for

    return load_tokenizer_for("smollm2")


@pytest.fixture(scope="session")
def prose_ids(smollm2_tokenizer) -> list[int]:
    return list(smollm2_tokenizer(PROSE)["input_ids"])


@pytest.fixture(scope="session")
def prose_kv(lm, prose_ids):
    """Real fp16 KV of PROSE: [30, 2, T, 3, 64]."""
    import torch

    from kvctl.common.model import prefill

    _, kv = prefill(lm, prose_ids)
    return kv.to(torch.float16)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """A real redis-server on a loopback port, for the RemoteBackend tests."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does)")
    import redis

    workdir = tmp_path_factory.mktemp("redis")
    for _ in range(5):
        port = free_port()
        proc = subprocess.Popen(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        if proc.poll() is None:
            break
    else:
        pytest.fail("redis-server did not start")
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


# ------------------------------------------------------------------- CLI fixtures ----
# The CLI's tests drive `kvctl` through Typer's CliRunner, in-process, against real servers
# on loopback ports (tests/cliutil.py): the CLI builds its HTTP client as in production.
@pytest.fixture
def cli_env(tmp_path, monkeypatch) -> Path:
    """No user settings leak in: empty env, a config file path under tmp_path, and an
    80-column terminal for everything Rich renders."""
    for var in ("KVCTL_CONTROLLER", "KVCTL_TIMEOUT", "KVCTL_TOKENIZER", "KVCTL_INSTANCE_ID",
                "KVCTL_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("COLUMNS", "80")
    cfg = tmp_path / "kvctl-config.yaml"
    monkeypatch.setenv("KVCTL_CONFIG", str(cfg))
    return cfg


@pytest.fixture
def cli_server(tmp_path, cli_env, monkeypatch):
    """The controller app without the engine, served by uvicorn on a loopback port that
    KVCTL_CONTROLLER names; yields the FastAPI app (``app.state.runtime``, ``app.state.url``).
    """
    from kvctl.server.app import create_app
    from kvctl.server.config import ServerSettings
    from tests.cliutil import serve_app

    app = create_app(ServerSettings(model="none", local_disk=str(tmp_path / "disk"),
                                    max_local_disk_size=1))
    with serve_app(app) as url:
        app.state.url = url
        monkeypatch.setenv("KVCTL_CONTROLLER", url)
        yield app
