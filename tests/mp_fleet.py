"""Real LMCache multiprocess servers and coordinators on loopback ports, and LMCache's own MP
client storing real KV into them (the path `lmcache bench server --mode cpu
--transfer-mode lmcache_driven` takes: REGISTER_KV_CACHE with CPU tensors shared over POSIX
SHM, then STORE / RETRIEVE of token ranges)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from tests.cluster_procs import Proc, wait_for
from tests.conftest import free_port

LAYERS, HEADS, DIM, BLOCK, BLOCKS = 30, 3, 64, 16, 64  # SmolLM2-135M, paged as vLLM does
SHAPE_SPEC = f"(2,{BLOCKS},{BLOCK},{HEADS},{DIM}):float16:{LAYERS}"
MODEL_NAME = "test-model"  # what LMCache's bench client registers its KV under
START_S = 180


def lmcache_exe() -> str:
    return str(Path(sys.executable).with_name("lmcache"))


def lmcache_env() -> dict[str, str]:
    return {**os.environ, "LMCACHE_DISABLE_BANNER": "1", "LMCACHE_TRACK_USAGE": "false",
            "DO_NOT_TRACK": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _spawn(name: str, cmd: list[str], tmp: Path, env: dict[str, str] | None = None) -> Proc:
    log = tmp / f"{name}-{uuid.uuid4().hex[:6]}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env=env or lmcache_env(), start_new_session=True)
    return Proc(name, proc, log)


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@dataclass
class MPServer:
    proc: Proc
    instance_id: str
    rpc: str
    http: str
    l2: Path

    def status(self) -> dict[str, Any]:
        return httpx.get(self.http + "/status", timeout=10).json()

    def l1_objects(self) -> int:
        return sum(m["total_object_count"] for m in
                   self.status()["storage_manager"]["l1_managers"].values())


def start_mp_server(tmp: Path, coordinator: str, name: str = "mp-server",
                    l2: bool = True, heartbeat_s: float = 1.0) -> MPServer:
    iid = f"{name}-{uuid.uuid4().hex[:8]}"
    rpc_port, http_port = free_port(), free_port()
    l2_dir = tmp / f"{iid}-l2"
    cmd = [lmcache_exe(), "server", "--instance-id", iid, "--host", "127.0.0.1",
           "--port", str(rpc_port), "--http-host", "127.0.0.1", "--http-port", str(http_port),
           "--chunk-size", "256", "--l1-size-gb", "0.05", "--eviction-policy", "LRU",
           "--supported-transfer-mode", "lmcache_driven", "--max-workers", "1",
           "--disable-metrics",
           "--coordinator-url", coordinator, "--coordinator-advertise-ip", "127.0.0.1",
           "--coordinator-event-reporting",
           "--coordinator-heartbeat-interval", str(heartbeat_s),
           "--coordinator-event-flush-interval", "0.2"]
    if l2:
        cmd += ["--l2-adapter", json.dumps({"type": "fs", "base_path": str(l2_dir)})]
    p = _spawn(name, cmd, tmp)
    http = f"http://127.0.0.1:{http_port}"
    wait_for(lambda: _ok(http + "/healthcheck"), START_S, f"{name} did not start", p)
    return MPServer(p, iid, f"tcp://127.0.0.1:{rpc_port}", http, l2_dir)


def start_kvctl_coordinator(tmp: Path, port: int, state: str | None = None,
                            extra: dict[str, Any] | None = None, name: str = "kvctl") -> Proc:
    """`kvctl serve --no-worker --model none --coordinator-port PORT` (what the issue's
    Done-when names), controller and monitor on ports of their own."""
    import yaml

    cfg = tmp / f"{name}-{uuid.uuid4().hex[:6]}.yaml"
    cfg.write_text(yaml.safe_dump({"coordinator_instance_timeout_s": 6.0,
                                   **({"state": state} if state else {}), **(extra or {})}))
    cmd = [sys.executable, "-m", "kvctl", "serve", "--config", str(cfg), "--no-worker",
           "--model", "none", "--port", str(free_port()), "--monitor-port", str(free_port()),
           "--coordinator-port", str(port)]
    p = _spawn(name, cmd, tmp, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    wait_for(lambda: _ok(f"http://127.0.0.1:{port}/healthz"), 60, f"{name} did not start", p)
    return p


def start_upstream_coordinator(tmp: Path, port: int) -> Proc:
    p = _spawn("lmcache-coordinator", [lmcache_exe(), "coordinator", "--host", "127.0.0.1",
                                       "--port", str(port), "--disable-metrics"], tmp)
    wait_for(lambda: _ok(f"http://127.0.0.1:{port}/healthz"), START_S,
             "lmcache coordinator did not start", p)
    return p


def stop(p: Proc, sig: int = signal.SIGTERM) -> None:
    if p.proc.poll() is None:
        p.proc.send_signal(sig)
        try:
            p.proc.wait(30)
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait(10)


class MPClient:
    """LMCache's own MP client (its server bench's), with real KV in its paged tensors."""

    def __init__(self, server: MPServer) -> None:
        from lmcache.cli.commands.bench.server_bench.client import ServerBenchClient
        from lmcache.cli.commands.bench.server_bench.config import BenchConfig

        self.log: list[str] = []
        cfg = BenchConfig(rpc_url=server.rpc, http_url=server.http, mode="cpu",
                          transfer_mode="lmcache_driven", tp_size=1, use_mla=False,
                          num_tokens=511, kvcache_shape_spec=SHAPE_SPEC, num_blocks=BLOCKS,
                          block_size=BLOCK)
        self.client = ServerBenchClient(cfg, self.log.append)
        self.client.start()
        self.closed = False

    @property
    def caches(self) -> dict[str, torch.Tensor]:
        return self.client._workers[0].kv_caches

    def _request(self, token_ids: list[int]) -> Any:
        from lmcache.cli.commands.bench.server_bench.client import RequestContext

        n = len(token_ids) - len(token_ids) % 256
        return RequestContext(sequence_id=0, request_id=f"req-{uuid.uuid4().hex[:8]}",
                              request_kind="test", token_ids=tuple(token_ids),
                              num_full_tokens=n, total_chunks=n // 256, chunk_size=256,
                              block_offset=0, num_blocks=n // BLOCK)

    def put_kv(self, kv: torch.Tensor) -> None:
        """Real KV [layers, 2, T, heads, dim] into blocks 0.. of the paged tensors."""
        t = kv.shape[2]
        for layer in range(LAYERS):
            paged = self.caches[f"layer.{layer}"]
            paged.zero_()
            paged[:, : t // BLOCK] = kv[layer].reshape(2, t // BLOCK, BLOCK, HEADS, DIM)

    def get_kv(self, t: int) -> torch.Tensor:
        return torch.stack([self.caches[f"layer.{layer}"][:, : t // BLOCK].reshape(
            2, t, HEADS, DIM) for layer in range(LAYERS)])

    def store(self, token_ids: list[int], kv: torch.Tensor) -> None:
        self.put_kv(kv)
        req = self._request(token_ids)
        for _ in range(3):  # LMCache's client gives an RPC 10 s; a loaded machine can miss it
            res = self.client.store(req, 0, req.num_full_tokens)
            if res is not None and res.succeeded:
                break
        else:
            raise AssertionError(f"store failed: {self.log[-5:]}")
        self.client.end_session(req)

    def retrieve(self, token_ids: list[int]) -> torch.Tensor:
        req = self._request(token_ids)
        for c in self.caches.values():
            c.zero_()
        for _ in range(3):
            # a retrieve follows a lookup, which locks the chunks (and loads them from L2)
            hit = self.client.lookup(req)
            if hit.hit_chunks != req.total_chunks:
                continue
            res = self.client.retrieve(req, 0, req.num_full_tokens)
            if res is not None and res.succeeded:
                break
        else:
            raise AssertionError(f"retrieve failed: {self.log[-5:]}")
        self.client.end_session(req)
        return self.get_kv(req.num_full_tokens)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.client.close()


def wait_until(cond: Any, timeout: float, what: str, *procs: Proc) -> Any:
    return wait_for(cond, timeout, what, *procs)


def now() -> float:
    return time.time()
