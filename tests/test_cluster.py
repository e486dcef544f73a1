"""A controller and two `kvctl worker` processes with their own engines, on loopback ports.

One module-scoped cluster; the tests run in file order and the last one kills a worker.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.cluster_procs import (
    Proc,
    start_controller,
    start_worker,
    wait_event,
    wait_for,
    workers,
)

pytestmark = [pytest.mark.e2e, pytest.mark.model]

A, B = "inst-a", "inst-b"
PROMPTS = {
    A: "The lighthouse keeper counted ships through the long winter night. " * 12,
    B: "A small bakery on the corner sold bread to the whole valley every morning. " * 12,
}


@dataclass
class Cluster:
    controller: Proc
    workers: dict[str, Proc]
    tmp: Path

    @property
    def api(self) -> str:
        return self.controller.urls["api"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    ctl = start_controller(tmp)
    procs: dict[str, Proc] = {}
    try:
        for iid in (A, B):
            procs[iid] = start_worker(tmp, iid, [ctl.urls["monitor"]])
        for p in procs.values():
            wait_for(lambda p=p: _ok(p.urls["engine"] + "/health"), 300,
                     f"{p.name}'s engine did not load", p, ctl)
        c = Cluster(ctl, procs, tmp)
        yield c
    finally:
        for p in [*procs.values(), c.controller if "c" in locals() else ctl]:
            p.stop()


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def complete(p: Proc, prompt: str) -> dict:
    r = httpx.post(p.urls["engine"] + "/v1/completions",
                   json={"prompt": prompt, "max_tokens": 1, "temperature": 0}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["usage"]


def tokens(p: Proc, prompt: str) -> list[int]:
    return httpx.post(p.urls["engine"] + "/tokenize", json={"prompt": prompt},
                      timeout=60).json()["tokens"]


def req(iid: str, toks: list[int], **kw) -> dict:
    return {"instance_id": iid, "method": "cachegen", "location": "LocalCPUBackend",
            "tokens": toks, **kw}


def test_both_workers_register(cluster: Cluster):
    found = wait_for(lambda: (w := workers(cluster.api)) and set(w) == {A, B} and all(
        v["state"] == "alive" for v in w.values()) and w, 30, "workers did not register",
        cluster.controller, *cluster.workers.values())
    for iid, p in cluster.workers.items():
        assert found[iid]["url"] == p.urls["worker"]
        assert found[iid]["engine_url"] == p.urls["engine"]


def test_lookup_compress_and_reuse_on_each_instance(cluster: Cluster):
    for iid, p in cluster.workers.items():
        first = complete(p, PROMPTS[iid])
        assert first["prompt_tokens_details"]["cached_tokens"] == 0
        toks = tokens(p, PROMPTS[iid])
        r = httpx.post(cluster.api + "/lookup", json={"tokens": toks}, timeout=30)
        # found on its own instance only: the other worker never saw this prompt
        assert r.json()["layout_info"] == {iid: ["LocalCPUBackend", len(toks)]}

        r = httpx.post(cluster.api + "/compress", json=req(iid, toks), timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["num_tokens"] == len(toks)
        ev = wait_event(cluster.api, r.json()["event_id"])
        assert ev["status"] == "finished", ev["error"]
        assert ev["instance_id"] == iid and 0 < ev["bytes_after"] < ev["bytes_before"]

        again = complete(p, PROMPTS[iid])
        assert again["prompt_tokens_details"]["cached_tokens"] > 0


def test_unknown_instance_is_404_with_the_registered_ones(cluster: Cluster):
    r = httpx.post(cluster.api + "/compress", json=req("nope", [1, 2]), timeout=30)
    assert r.status_code == 404
    assert "nope" in r.json()["detail"] and A in r.json()["detail"]


def test_move_across_instances_copies_identical_bytes(cluster: Cluster):
    src, dst = cluster.workers[A], cluster.workers[B]
    toks = tokens(src, PROMPTS[A])
    r = httpx.post(cluster.api + "/move", json={
        "old_position": [A, "LocalCPUBackend"], "new_position": [B, "LocalCPUBackend"],
        "tokens": toks, "should_copy": True}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["num_tokens"] == len(toks)
    ev = wait_event(cluster.api, r.json()["event_id"])
    assert ev["status"] == "finished", ev["error"]
    assert ev["chunks_done"] == ev["chunks_total"] == -(-len(toks) // 256)

    # the same bytes on both sides, read back from each worker's own store
    def plan(p: Proc) -> list[dict]:
        return httpx.post(p.urls["worker"] + "/worker/ops/chunk_plan",
                          json={"location": "LocalCPUBackend", "tokens": toks}).json()

    keys = [c["key"] for c in plan(src)]
    assert [c["key"] for c in plan(dst)] == keys
    for key in keys:
        a = httpx.get(f"{src.urls['worker']}/worker/chunks/LocalCPUBackend/{key}").content
        b = httpx.get(f"{dst.urls['worker']}/worker/chunks/LocalCPUBackend/{key}").content
        assert a == b and len(a) > 0

    r = httpx.post(cluster.api + "/lookup", json={"tokens": toks}, timeout=30)
    assert r.json()["layout_info"] == {A: ["LocalCPUBackend", len(toks)],
                                       B: ["LocalCPUBackend", len(toks)]}
    assert complete(dst, PROMPTS[A])["prompt_tokens_details"]["cached_tokens"] > 0


def test_killed_worker_is_dead_and_its_work_fails_fast(cluster: Cluster):
    victim, other = cluster.workers[B], cluster.workers[A]
    victim.kill9()
    killed_at = time.monotonic()

    # routed work answers at once: the dead worker's port refuses the connection
    toks = tokens(other, PROMPTS[A])
    r = httpx.post(cluster.api + "/compress", json=req(B, toks), timeout=5)
    assert r.status_code == 503
    assert B in r.json()["detail"] and victim.urls["worker"] in r.json()["detail"]
    failed = httpx.get(cluster.api + "/events", params={"status": "failed"}).json()["events"]
    assert [e["instance_id"] for e in failed] == [B]
    assert victim.urls["worker"] in failed[0]["error"]

    def dead() -> dict | None:
        h = httpx.post(cluster.api + "/health", json={"instance_id": B}, timeout=5).json()
        return h if h["workers"] and h["workers"][0]["state"] == "dead" else None

    h = wait_for(dead, 15 - (time.monotonic() - killed_at), "not marked dead within 15 s")
    assert h["error_codes"] == {"0": 2}

    cli = subprocess.run([sys.executable, "-m", "kvctl", "workers", "--json",
                          "--controller", cluster.api], capture_output=True, text=True,
                         timeout=60)
    assert cli.returncode == 0, cli.stderr
    states = {w["instance_id"]: w["state"] for w in json.loads(cli.stdout)["workers"]}
    assert states == {A: "alive", B: "dead"}
    cli = subprocess.run([sys.executable, "-m", "kvctl", "workers", "--controller",
                          cluster.api], capture_output=True, text=True, timeout=60)
    assert "dead" in cli.stdout and "alive" in cli.stdout

    # once dead, refused without trying the worker; the detail says why
    r = httpx.post(cluster.api + "/compress", json=req(B, toks), timeout=5)
    assert r.status_code == 503 and "dead" in r.json()["detail"]

    # the other instance is unaffected
    r = httpx.post(cluster.api + "/decompress", json=req(A, toks), timeout=5)
    assert r.status_code == 200
    assert wait_event(cluster.api, r.json()["event_id"])["status"] == "finished"
    assert httpx.post(cluster.api + "/lookup", json={"tokens": toks}, timeout=5
                      ).json()["layout_info"] == {A: ["LocalCPUBackend", len(toks)]}


def test_worker_outlives_its_controller_and_registers_again(cluster: Cluster):
    worker = cluster.workers[A]
    api, monitor = (int(cluster.controller.urls[k].rsplit(":", 1)[1])
                    for k in ("api", "monitor"))
    cluster.controller.kill9()
    # the engine keeps serving, from its own store, with no controller at all
    assert complete(worker, PROMPTS[A])["prompt_tokens_details"]["cached_tokens"] > 0

    # a new controller (memory state: it starts knowing nobody) on the same address
    cluster.controller = start_controller(cluster.tmp, "controller-2", ports=(api, monitor))
    back = wait_for(lambda: workers(cluster.api).get(A), 30, "worker did not register again",
                    cluster.controller, worker)
    assert back["state"] == "alive" and back["url"] == worker.urls["worker"]
    toks = tokens(worker, PROMPTS[A])
    r = httpx.post(cluster.api + "/compress", json=req(A, toks), timeout=10)
    assert r.status_code == 200 and r.json()["num_tokens"] == len(toks)


def test_ctrl_c_stops_cleanly_and_deregisters_at_once(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, codec pool included) on `kvctl worker`
    and on `kvctl serve --model none`: no traceback, exit 0, and the worker is shown dead
    at once. dead_after_s is an hour here, so only the deregistration can make it so."""
    slow = {"dead_after_s": 3600.0}
    ctl = start_controller(tmp_path, extra=slow, worker=True, own_group=True)
    w = start_worker(tmp_path, "node-a", [ctl.urls["monitor"]], model="none",
                     own_group=True)
    try:
        wait_for(lambda: workers(ctl.urls["api"]).get("node-a", {}).get("state") == "alive",
                 120, "node-a did not register", ctl, w)
        w.interrupt_group()
        assert w.proc.wait(60) == 0
        view = workers(ctl.urls["api"])["node-a"]
        assert view["state"] == "dead" and view["error_code"] == 2
        r = httpx.post(ctl.urls["api"] + "/compress", json={
            "instance_id": "node-a", "method": "cachegen", "location": "LocalCPUBackend",
            "tokens": [1, 2, 3]}, timeout=30)
        assert r.status_code == 503 and "was stopped" in r.json()["detail"], r.text
        log = w.tail()
        assert "Traceback" not in log and "deregistered from the controller" in log, log
    finally:
        w.stop()
        ctl.interrupt_group()
        assert ctl.proc.wait(60) == 0
        assert "Traceback" not in ctl.tail(), ctl.tail()
        ctl.stop()
