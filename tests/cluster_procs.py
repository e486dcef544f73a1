"""Real controller and worker processes on loopback ports, for the cluster tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.conftest import free_port

# Short intervals so that the tests run fast; the defaults (2 s / 10 s) meet the 15 s bound.
FAST = {"heartbeat_interval_s": 0.3, "dead_after_s": 3.0, "worker_timeout_s": 3.0}


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen
    log: Path
    urls: dict[str, str] = field(default_factory=dict)

    def tail(self) -> str:
        try:
            return self.log.read_text()[-3000:]
        except OSError:
            return ""

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def interrupt_group(self) -> None:
        """Ctrl-C as a terminal sends it: SIGINT to every process of the process's group
        (its codec pool too); the process must have been started with own_group=True."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _spawn(name: str, args: list[str], tmp: Path, own_group: bool = False) -> Proc:
    log = tmp / f"{name}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", KVCTL_DEVICE="cpu")
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "kvctl", *args], stdout=f,
                                stderr=subprocess.STDOUT, env=env, start_new_session=own_group)
    return Proc(name, proc, log)


def start_controller(tmp: Path, name: str = "controller", state: str | None = None,
                     ports: tuple[int, int] | None = None,
                     extra: dict[str, Any] | None = None, worker: bool = False,
                     own_group: bool = False) -> Proc:
    """``extra``: more config keys; ``worker``: run `kvctl serve`'s own worker."""
    port, monitor = ports or (free_port(), free_port())
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({**FAST, **({"state": state} if state else {}),
                                   **(extra or {})}))
    p = _spawn(name, ["serve", "--config", str(cfg), "--model", "none",
                      "--worker" if worker else "--no-worker",
                      "--port", str(port), "--monitor-port", str(monitor)], tmp, own_group)
    p.urls = {"api": f"http://127.0.0.1:{port}", "monitor": f"http://127.0.0.1:{monitor}"}
    wait_for(lambda: _ok(p.urls["api"] + "/workers"), 60, f"{name} did not start", p)
    return p


def start_worker(tmp: Path, instance_id: str, controllers: list[str], model: str = "smollm2",
                 extra: dict[str, Any] | None = None, own_group: bool = False) -> Proc:
    wport, eport = free_port(), free_port()
    cfg = tmp / f"{instance_id}.yaml"
    cfg.write_text(yaml.safe_dump({
        "chunk_size": 256, "local_cpu": True, "max_local_cpu_size": 1,
        "enable_controller": True, "lmcache_instance_id": instance_id,
        "controller_url": ",".join(u.removeprefix("http://") for u in controllers),
        "lmcache_worker_port": wport, "torch_threads": 1, **(extra or {})}))
    p = _spawn(instance_id, ["worker", "--config", str(cfg), "--engine-port", str(eport),
                             "--model", model], tmp, own_group)
    p.urls = {"worker": f"http://127.0.0.1:{wport}", "engine": f"http://127.0.0.1:{eport}"}
    return p


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def wait_for(cond: Callable[[], Any], timeout: float, what: str, *procs: Proc) -> Any:
    """Poll ``cond`` until it returns something truthy; fail with the processes' logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.proc.poll() is not None:
                raise AssertionError(f"{p.name} exited with {p.proc.returncode}:\n{p.tail()}")
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    logs = "\n".join(f"--- {p.name}\n{p.tail()}" for p in procs)
    raise AssertionError(f"{what} (after {timeout:g} s)\n{logs}")


def workers(controller: str) -> dict[str, dict[str, Any]]:
    r = httpx.get(controller + "/workers", timeout=10)
    r.raise_for_status()
    return {w["instance_id"]: w for w in r.json()["workers"]}


def wait_event(controller: str, event_id: str, timeout: float = 180) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        ev = httpx.get(f"{controller}/events/{event_id}", timeout=10).json()
        return ev if ev["status"] in ("finished", "failed") else None

    return wait_for(ended, timeout, f"event {event_id} did not end")
