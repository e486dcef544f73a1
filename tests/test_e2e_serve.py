"""End to end: a real `kvctl serve` process on loopback ports, driven over real HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.cluster_procs import _ok, start_serve, wait_for
from tests.conftest import DATA, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.model]

SEED_PROMPT = "Explain the significance of KV cache in language models."
INSTANCE = "lmcache_default_instance"


@dataclass
class Stack:
    proc: subprocess.Popen
    controller: str
    monitor: str
    engine: str


def wait_until_ready(proc: subprocess.Popen, url: str, timeout: float = 180) -> None:
    """``url`` answers 200 (the process must not exit first); for a Popen of one's own."""
    wait_for(lambda: proc.poll() is not None or _ok(url), timeout, f"{url} not ready")
    if proc.poll() is not None:
        raise AssertionError(f"kvctl serve exited with {proc.returncode}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    p = start_serve(tmp_path_factory.mktemp("serve"), "--config",
                    str(DATA / "seed_example.yaml"))
    try:
        yield Stack(p.proc, p.urls["api"], p.urls["monitor"], p.urls["engine"])
    finally:
        p.stop()


def poll_status(controller: str, event_id: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = httpx.post(f"{controller}/check_finish", json={"event_id": event_id}
                            ).json()["status"]
        if status in ("finished", "failed"):
            return status
        time.sleep(0.1)
    raise AssertionError(f"{event_id} did not end")


def test_seed_sequence_over_http(stack: Stack):
    comp = {"model": "SmolLM2-135M-Instruct", "prompt": SEED_PROMPT, "max_tokens": 10,
            "temperature": 0}
    r = httpx.post(f"{stack.engine}/v1/completions", json=comp, timeout=120)
    assert r.status_code == 200 and r.json()["choices"][0]["text"]

    tok = httpx.post(f"{stack.engine}/tokenize",
                     json={"model": "SmolLM2-135M-Instruct", "prompt": SEED_PROMPT}).json()
    assert tok["count"] == len(tok["tokens"]) > 0

    req = {"instance_id": INSTANCE, "method": "cachegen", "location": "LocalCPUBackend",
           "tokens": tok["tokens"]}
    r = httpx.post(f"{stack.controller}/compress", json=req)
    assert r.status_code == 200 and r.json()["num_tokens"] == tok["count"]
    assert poll_status(stack.controller, r.json()["event_id"]) == "finished"
    ev = httpx.get(f"{stack.controller}/events/{r.json()['event_id']}").json()
    assert 0 < ev["bytes_after"] < ev["bytes_before"]

    r = httpx.post(f"{stack.controller}/decompress", json=req)
    assert r.json()["num_tokens"] == tok["count"]
    assert poll_status(stack.controller, r.json()["event_id"]) == "finished"

    again = httpx.post(f"{stack.engine}/v1/completions", json=comp, timeout=120).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0

    metrics = httpx.get(f"{stack.monitor}/metrics").text
    assert 'kvctl_events_total{op="decompress",status="finished"} 1.0' in metrics


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a LISTEN socket on ``port``, read from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:
                found.add(addr)
    return found


def test_binds_loopback_only(stack: Stack):
    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("needs Linux /proc/net/tcp")
    for url in (stack.controller, stack.monitor, stack.engine):
        port = int(url.rsplit(":", 1)[1])
        # 0100007F is 127.0.0.1 in /proc's little-endian hex
        assert listening_addresses(port) == {"0100007F"}


def test_busy_port_is_one_line_error(stack: Stack):
    port = int(stack.controller.rsplit(":", 1)[1])
    r = subprocess.run([sys.executable, "-m", "kvctl", "serve", "--model", "none",
                        "--port", str(port), "--monitor-port", str(free_port())],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr


def test_sigint_stops_cleanly(tmp_path):
    p = start_serve(tmp_path, engine=False, timeout=60)
    p.proc.send_signal(signal.SIGINT)
    assert p.proc.wait(30) == 0
    assert "Traceback" not in p.tail()


def kvctl(stack: Stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvctl", *args, "--controller", stack.controller],
                          capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items()
                               if not k.startswith("KVCTL_")})


def test_cli_flow_against_real_serve(stack: Stack):
    import json

    prompt = "Write a haiku about a lighthouse keeper who collects old maps."
    r = httpx.post(f"{stack.engine}/v1/completions",
                   json={"prompt": prompt, "max_tokens": 4, "temperature": 0}, timeout=120)
    assert r.status_code == 200
    count = r.json()["usage"]["prompt_tokens"]

    r = kvctl(stack, "compress", "--json", prompt)
    assert r.returncode == 0, r.stderr
    scheduled = json.loads(r.stdout)
    assert scheduled["num_tokens"] == count

    r = kvctl(stack, "events", "watch", scheduled["event_id"])
    assert r.returncode == 0, r.stderr
    assert "finished" in r.stdout + r.stderr

    r = kvctl(stack, "decompress", "--wait", "--json", prompt)
    assert r.returncode == 0, r.stderr
    event = json.loads(r.stdout)
    assert event["status"] == "finished" and event["num_tokens"] == count
    assert event["bytes_after"] > event["bytes_before"] > 0


def test_cli_errors_against_real_serve(stack: Stack):
    r = kvctl(stack, "compress", "--method", "zstd", "--tokens", "1,2,3")
    assert r.returncode == 2  # rejected: the controller answered 4xx
    assert "unknown method 'zstd'" in r.stderr and "cachegen" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "kvctl", "events", "list", "--controller",
                        f"http://127.0.0.1:{free_port()}"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "kvctl serve" in r.stderr and "Traceback" not in r.stderr
