"""Real LMCache 0.5.6 instances and kvctl controllers in front of them, as processes on
loopback ports, for the fleet tests and benchmarks/lmcache_fleet.py."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.cluster_procs import Proc, spawn, wait_for
from tests.conftest import free_port

# the defaults (2 s / 10 s) meet the 15 s bound too; short ones keep the tests short
FAST = {"heartbeat_interval_s": 0.3, "dead_after_s": 3.0, "worker_timeout_s": 5.0}


class LMCacheInstance:
    """`python -m tests.lmcache_instance CONFIG` and its stdin/stdout command channel."""

    def __init__(self, tmp: Path, instance_id: str, pull: int, reply: int,
                 cpu_gb: float = 1.0, heartbeat_s: int = 1, rank: tuple[int, int] = (0, 1),
                 worker_ports: list[int] | None = None) -> None:
        self.instance_id = instance_id
        ports = worker_ports or [free_port() for _ in range(rank[1])]
        self.worker_port = ports[rank[0]]
        name = f"{instance_id}-{rank[0]}" if rank[1] > 1 else instance_id
        self.config = tmp / f"{name}.lmcache.yaml"
        # what LMCache 0.5.6 accepts (it rejects controller_url / lmcache_worker_port)
        self.config.write_text(yaml.safe_dump({
            "chunk_size": 256, "local_cpu": True, "max_local_cpu_size": cpu_gb,
            "enable_controller": True, "lmcache_instance_id": instance_id,
            "controller_pull_url": f"127.0.0.1:{pull}",
            "controller_reply_url": f"127.0.0.1:{reply}",
            "lmcache_worker_ports": ports,
            "lmcache_worker_heartbeat_time": heartbeat_s,
            "lmcache_worker_heartbeat_delay_time": 1}))
        self.log = tmp / f"{name}.lmcache.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.lmcache_instance", str(self.config),
                 *map(str, rank)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                env=env, cwd=Path(__file__).resolve().parents[1])
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def _answer(self, timeout: float) -> dict[str, Any]:
        try:
            return json.loads(self._lines.get(timeout=timeout))
        except queue.Empty:
            raise AssertionError(f"LMCache instance {self.instance_id} did not answer in "
                                 f"{timeout:g} s:\n{self.tail()}") from None

    def wait_ready(self, timeout: float = 240) -> None:
        assert self._answer(timeout).get("ready"), self.tail()

    def send(self, op: str, tokens: list[int], timeout: float = 120) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, "tokens": tokens}) + "\n")
        self.proc.stdin.flush()
        out = self._answer(timeout)
        assert out.get("ok"), out
        return out

    def tail(self) -> str:
        try:
            return self.log.read_text()[-3000:]
        except OSError:
            return ""

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def start_lmcache_controller(tmp: Path, name: str, port: int, monitor: int,
                             zmq_ports: dict[str, int] | None, state: str | None = None,
                             extra: dict[str, Any] | None = None) -> Proc:
    """`kvctl serve --no-worker --model none ... --monitor-ports JSON`: the drop-in command."""
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({**FAST, **({"state": state} if state else {}),
                                   **(extra or {})}))
    args = ["serve", "--config", str(cfg), "--no-worker", "--model", "none",
            "--host", "127.0.0.1", "--port", str(port), "--monitor-port", str(monitor)]
    if zmq_ports is not None:
        args += ["--monitor-ports", json.dumps(zmq_ports)]
    p = spawn(name, args, tmp)
    p.urls = {"api": f"http://127.0.0.1:{port}"}
    wait_for(lambda: _ok(p.urls["api"] + "/workers"), 60, f"{name} did not start", p)
    return p


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def lm_workers(api: str) -> dict[str, dict[str, Any]]:
    r = httpx.get(api + "/workers", timeout=10)
    r.raise_for_status()
    return {w["instance_id"]: w for w in r.json()["workers"] if w.get("kind") == "lmcache"}


def lookup(api: str, tokens: list[int]) -> dict[str, Any]:
    r = httpx.post(api + "/lookup", json={"tokens": tokens}, timeout=30)
    r.raise_for_status()
    return r.json()["layout_info"]
