"""Engine isolation in a real `kvctl serve`: an abandoned completion stops generating, a big
/tokenize does not hold the controller, SIGTERM during a long generation ends the process.

Everything is observed through the engine's own counters (GET /metrics on the engine port),
never through how long something took."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.cluster_procs import start_serve

pytestmark = [pytest.mark.e2e, pytest.mark.model]

# Greedy decoding keeps counting: a prompt that runs to max_tokens rather than to EOS.
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,"
LONG = 4000


@dataclass
class Serve:
    proc: subprocess.Popen
    controller: str
    engine: str
    log: Path


@pytest.fixture(scope="module")
def serve(tmp_path_factory) -> Iterator[Serve]:
    p = start_serve(tmp_path_factory.mktemp("serve"))
    try:
        yield Serve(p.proc, p.urls["api"], p.urls["engine"], p.log)
    finally:
        p.kill9()  # what it is doing at the end is not under test: no need to wait for it


def counters(engine: str) -> dict[str, float]:
    r = httpx.get(engine + "/metrics", timeout=30)
    assert r.status_code == 200, r.text
    out = {}
    for line in r.text.splitlines():
        if line.startswith("kvctl_engine_"):
            name, value = line.split()
            out[name.removeprefix("kvctl_engine_")] = float(value)
    return out


def poll(engine: str, until, what: str, timeout: float = 60) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c = counters(engine)
        if until(c):
            return c
        time.sleep(0.1)
    raise AssertionError(f"{what} not seen within {timeout} s; counters: {counters(engine)}")


def start_long_completion(engine: str) -> http.client.HTTPConnection:
    """POST a long completion on a connection of its own and return without reading."""
    host, port = engine.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    conn.request("POST", "/v1/completions",
                 body=json.dumps({"prompt": COUNTING, "max_tokens": LONG, "temperature": 0}),
                 headers={"Content-Type": "application/json"})
    return conn


def test_abandoned_completion_stops_generating(serve: Serve):
    before = counters(serve.engine)
    conn = start_long_completion(serve.engine)
    poll(serve.engine, lambda c: c["running"] == 1
         and c["generated_tokens_total"] > before["generated_tokens_total"], "generation start")
    conn.close()  # the client goes away
    after = poll(serve.engine, lambda c: c["running"] == 0, "generation end")
    assert after["cancelled_total"] == before["cancelled_total"] + 1
    assert after["completions_total"] == before["completions_total"]
    generated = after["generated_tokens_total"] - before["generated_tokens_total"]
    assert 0 < generated < LONG
    # once stopped it stays stopped: no more tokens are counted, and the next request runs
    r = httpx.post(serve.engine + "/v1/completions",
                   json={"prompt": "Hello", "max_tokens": 3, "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    last = counters(serve.engine)
    assert last["completions_total"] == after["completions_total"] + 1
    assert last["generated_tokens_total"] - after["generated_tokens_total"] <= 3


def test_big_tokenize_leaves_controller_responsive(serve: Serve):
    # ~4 s of tokenizer work on this class of machine; the controller shares the loop
    text = "The quick brown fox jumps over the lazy dog. " * (2_000_000 // 45)
    result: dict[str, int] = {}

    def tokenize() -> None:
        r = httpx.post(serve.engine + "/tokenize", json={"prompt": text}, timeout=300)
        result["status"] = r.status_code
        result["count"] = r.json()["count"]

    t = threading.Thread(target=tokenize)
    t.start()
    try:
        poll(serve.engine, lambda c: c["tokenizing"] == 1, "tokenize start")
        r = httpx.post(serve.controller + "/health",
                       json={"instance_id": "lmcache_default_instance"}, timeout=120)
        assert r.status_code == 200, r.text
        # the controller answered while the tokenizer was still working
        assert counters(serve.engine)["tokenizing"] == 1
    finally:
        t.join(300)
    assert result["status"] == 200 and result["count"] > 100_000


def test_sigterm_during_generation_exits_promptly(serve: Serve):
    before = counters(serve.engine)
    conn = start_long_completion(serve.engine)
    poll(serve.engine, lambda c: c["running"] == 1
         and c["generated_tokens_total"] > before["generated_tokens_total"], "generation start")
    serve.proc.send_signal(signal.SIGTERM)
    try:
        # uvicorn's graceful window is 5 s, then the request is cancelled and so is the
        # generation; a generation left to run would take minutes (LONG tokens)
        assert serve.proc.wait(20) == 0
    finally:
        conn.close()
    err = serve.log.read_text()
    assert "Traceback" not in err, err
