"""Shared fixtures. Expensive real parts (the model, redis-server) start once per session."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.cluster_procs import free_port  # the one definition; tests import it from here

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


@pytest.fixture
def anyio_backend():
    return "asyncio"


@contextlib.asynccontextmanager
async def in_process_api(settings, base_url: str = "http://test") -> AsyncIterator:
    """An httpx client on ``create_app(settings)`` through the ASGI transport, inside the
    app's lifespan (as uvicorn runs it); ``client.runtime`` is the app's worker runtime."""
    import httpx

    from kvctl.server.http.app import create_app

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url=base_url) as client:
            client.runtime = getattr(app.state, "runtime", None)  # type: ignore[attr-defined]
            yield client




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
                "KVCTL_DEBUG", "KVCTL_AUTH_TOKEN", "KVCTL_COORDINATOR", "KVCTL_MODEL_NAME"):
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
    from kvctl.server.config import ServerSettings
    from kvctl.server.http.app import create_app
    from tests.cliutil import serve_app

    app = create_app(ServerSettings(model="none", local_disk=str(tmp_path / "disk"),
                                    max_local_disk_size=1))
    with serve_app(app) as url:
        app.state.url = url
        monkeypatch.setenv("KVCTL_CONTROLLER", url)
        yield app


# ------------------------------------------------------- redis processes we control ----
class RedisProc:
    """One real redis-server on a loopback port that a test may stop and start again."""

    def __init__(self, workdir: Path, extra: tuple[str, ...] = ()) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.exe = exe
        self.workdir = workdir
        self.extra = extra
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (again, on the same port once it has one); returns once it answers PING."""
        import redis

        for _ in range(5):
            port = self.port or free_port()
            self.proc = subprocess.Popen(
                [self.exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.workdir), *self.extra],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
            deadline = time.monotonic() + 20
            while self.proc.poll() is None and time.monotonic() < deadline:
                try:
                    client.ping()
                    self.port = port
                    return
                except redis.AuthenticationError:
                    self.port = port  # up, and asking for the password it was given
                    return
                except redis.ConnectionError:
                    time.sleep(0.05)
            self.stop()
        pytest.fail("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


@pytest.fixture
def redis_proc(tmp_path) -> Iterator[RedisProc]:
    """A fresh redis-server for one test (``--save '' --appendonly no``), stoppable."""
    workdir = tmp_path / "redis"
    workdir.mkdir()
    r = RedisProc(workdir)
    r.start()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory) -> Iterator[str]:
    """A real three-node Redis Cluster on loopback ports; yields a remote_url naming every
    node as a startup node."""
    import redis

    if shutil.which("redis-cli") is None or shutil.which("redis-server") is None:
        pytest.skip("redis-server / redis-cli are not installed")
    nodes = []
    try:
        for i in range(3):
            workdir = tmp_path_factory.mktemp(f"redis-cluster-{i}")
            node = RedisProc(workdir, ("--cluster-enabled", "yes", "--cluster-config-file",
                                       str(workdir / "nodes.conf"),
                                       "--cluster-node-timeout", "2000"))
            node.start()
            nodes.append(node)
        addrs = [f"127.0.0.1:{n.port}" for n in nodes]
        r = subprocess.run(["redis-cli", "--cluster", "create", *addrs, "--cluster-replicas",
                            "0", "--cluster-yes"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        deadline = time.monotonic() + 60
        pending = list(nodes)
        while pending and time.monotonic() < deadline:
            pending = [n for n in pending if redis.Redis(port=n.port).cluster("info").get(
                "cluster_state") != "ok"]
            if pending:
                time.sleep(0.1)
        assert not pending, "cluster_state never became ok"
        yield "redis://" + ",".join(addrs)
    finally:
        for n in nodes:
            n.stop()
