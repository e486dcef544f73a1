"""An LMCache instance of two tensor-parallel ranks (two LMCacheEngine + LMCacheWorker
processes, worker_id 0 and 1): every command goes to both, and they must agree."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.cluster_procs import wait_for
from tests.conftest import free_port
from tests.lmcache_procs import LMCacheInstance, lookup, start_lmcache_controller

pytest.importorskip("lmcache.v1.cache_engine")
INST, LOC = "tp-inst", "LocalCPUBackend"


@pytest.fixture(scope="module")
def tp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lmcache-tp")
    zmq_ports = {"pull": free_port(), "reply": free_port()}   # heartbeat: a free port
    ctl = start_lmcache_controller(tmp, "controller", free_port(), free_port(), zmq_ports)
    ports = [free_port(), free_port()]
    ranks = [LMCacheInstance(tmp, INST, zmq_ports["pull"], zmq_ports["reply"], rank=(r, 2),
                             worker_ports=ports) for r in (0, 1)]
    try:
        for r in ranks:
            r.wait_ready()
        api = ctl.urls["api"]

        def both() -> bool:
            ws = httpx.get(api + "/workers").json()["workers"]
            return sorted((w["worker_id"], w["state"]) for w in ws) == [(0, "alive"),
                                                                        (1, "alive")]
        wait_for(both, 60, "both ranks did not register", ctl)
        yield api, ranks
    finally:
        for r in ranks:
            r.stop()
        ctl.stop()


def run(api: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(api + path, json={"instance_id": INST, "location": LOC, **body}, timeout=60)
    assert r.status_code == 200, r.text
    eid = r.json()["event_id"]
    return wait_for(lambda: (lambda e: e if e["status"] in ("finished", "failed") else None)(
        httpx.get(f"{api}/events/{eid}").json()), 120, f"{eid} did not end")


def test_commands_fan_out_to_every_rank_and_must_agree(tp):
    api, ranks = tp
    a = list(range(1000, 1600))
    ranks[0].send("store", a)
    # one rank holds it: the instance does not (lookup wants every rank's chunks)
    wait_for(lambda: httpx.get(api + "/controller/key-stats").json()["total_key_count"] == 2,
             30, "rank 0's admits not seen")
    assert lookup(api, a) == {}
    ev = run(api, "/pin", {"tokens": a})
    assert ev["status"] == "failed" and "disagree" in ev["error"], ev
    assert "worker 0: 512" in ev["error"] and "worker 1: 0" in ev["error"]
    ranks[1].send("store", a)
    wait_for(lambda: lookup(api, a) == {INST: [LOC, 512]}, 30, "rank 1's admits not seen")
    ev = run(api, "/compress", {"tokens": a, "method": "cachegen"})
    assert (ev["status"], ev["num_tokens"]) == ("finished", 512), ev
    ev = run(api, "/decompress", {"tokens": a, "method": "cachegen"})
    assert (ev["status"], ev["num_tokens"]) == ("finished", 512), ev
    h = httpx.post(api + "/health", json={"instance_id": INST}).json()
    assert h["error_codes"] == {"0": 0, "1": 0}
    metrics = httpx.get(api + "/metrics").text
    # one series per rank: an LMCache instance has a worker per tensor-parallel rank
    for rank in (0, 1):
        assert f'kvctl_worker_up{{instance_id="{INST}",worker_id="{rank}"}} 1.0' in metrics

    per_rank = [line.rsplit(" ", 1)[1] for line in metrics.splitlines()
                if line.startswith("kvctl_worker_chunks{") and f'instance_id="{INST}"' in line
                and f'location="{LOC}"' in line]
    assert per_rank and sum(map(float, per_rank)) == 4.0, per_rank
    assert "kvctl_lmcache_full_syncs_total 0.0" in metrics
