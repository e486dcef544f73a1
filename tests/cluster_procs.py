"""Real kvctl processes on loopback ports: the one start / wait / stop helper that the
end-to-end tests and the benchmarks (benchmarks/harness.py) share.

`spawn` starts `kvctl ARGS` with its output in a log file (never a pipe nobody reads),
`start_serve` / `start_controller` / `start_worker` start the usual shapes, `wait_http` and
`wait_for` poll a condition with a deadline (failing with the processes' logs), and
`Proc.stop` / `stop_all` stop them as Ctrl-C does. Nothing here needs pytest.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGINT (as Ctrl-C), then wait; SIGKILL what has not left after ``grace_s``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def spawn(name: str, args: list[str], tmp: Path, own_group: bool = False,
          env: dict[str, str] | None = None) -> Proc:
    """`kvctl ARGS` as a child process, its output in ``tmp/NAME.log``; ``env`` replaces the
    inherited environment (KVCTL_DEVICE=cpu and unbuffered output are added)."""
    log = tmp / f"{name}.log"
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1", KVCTL_DEVICE="cpu")
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
    p = spawn(name, ["serve", "--config", str(cfg), "--model", "none",
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
    p = spawn(instance_id, ["worker", "--config", str(cfg), "--engine-port", str(eport),
                             "--model", model], tmp, own_group)
    p.urls = {"worker": f"http://127.0.0.1:{wport}", "engine": f"http://127.0.0.1:{eport}"}
    return p


def start_serve(tmp: Path, *args: str, name: str = "serve", engine: bool = True,
                env: dict[str, str] | None = None, headers: dict[str, str] | None = None,
                timeout: float = 180) -> Proc:
    """`kvctl serve ARGS` on free ports (urls: api, monitor, and engine unless
    ``engine=False``, which adds --model none), ready when the engine (else the monitor)
    answers."""
    ports = {"api": free_port(), "monitor": free_port()}
    cmd = ["serve", *args, "--port", str(ports["api"]), "--monitor-port", str(ports["monitor"])]
    if engine:
        ports["engine"] = free_port()
        cmd += ["--engine-port", str(ports["engine"])]
    else:
        cmd += ["--model", "none"]
    p = spawn(name, cmd, tmp, env=env)
    p.urls = {k: f"http://127.0.0.1:{v}" for k, v in ports.items()}
    ready = p.urls["engine"] + "/health" if engine else p.urls["monitor"] + "/healthz"
    try:
        wait_http(ready, timeout, p, headers=headers)
    except BaseException:
        p.stop()
        raise
    return p


def stop_all(*procs: Proc | subprocess.Popen) -> None:
    """Stop each as Ctrl-C would (SIGINT), the last started first."""
    for p in reversed(procs):
        stop_process(p.proc if isinstance(p, Proc) else p)


def _ok(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        return httpx.get(url, timeout=2, headers=headers).status_code == 200
    except httpx.TransportError:
        return False


def wait_http(url: str, timeout: float, *procs: Proc | subprocess.Popen,
              headers: dict[str, str] | None = None) -> None:
    """Poll ``url`` until it answers 200 (failing early if one of ``procs`` exits)."""
    wait_for(lambda: _ok(url, headers), timeout, f"{url} not ready", *procs)


def wait_for(cond: Callable[[], Any], timeout: float, what: str,
             *procs: Proc | subprocess.Popen) -> Any:
    """Poll ``cond`` until it returns something truthy; fail (AssertionError) with the
    processes' logs, at once if one of them exits."""
    named = [p if isinstance(p, Proc) else Proc(str(p.args), p, Path(os.devnull))
             for p in procs]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in named:
            if p.proc.poll() is not None:
                raise AssertionError(f"{p.name} exited with {p.proc.returncode}:\n{p.tail()}")
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    logs = "\n".join(f"--- {p.name}\n{p.tail()}" for p in named)
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
