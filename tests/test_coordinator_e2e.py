"""A real `lmcache server` (CPU, L1 + fs L2) joined to `kvctl serve --no-worker --model none
--coordinator-port P` with a Redis state, storing real SmolLM2 KV through LMCache's own MP
client; then everything an operator does to it, and what happens when processes die.

One fleet per module (the server starts once); the tests run in file order and each leaves
the fleet as the next expects it.
"""

from __future__ import annotations

import json
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("lmcache", reason="LMCache is not installed: `make setup` installs it")

import torch

from tests.cliutil import run_cli
from tests.cluster_procs import Proc, wait_for
from tests.conftest import PROSE, free_port
from tests.mp_fleet import (
    MODEL_NAME,
    MPClient,
    MPServer,
    start_kvctl_coordinator,
    start_mp_server,
    stop,
)

pytestmark = [pytest.mark.e2e, pytest.mark.model]
N = 512
CHUNK_BYTES = 30 * 2 * 256 * 3 * 64 * 2  # one fp16 chunk of SmolLM2's KV


@dataclass
class Fleet:
    tmp: Path
    port: int
    state: str
    extra: dict[str, Any]
    coordinator: Proc
    server: MPServer
    client: MPClient
    ids: list[int]
    kv: torch.Tensor

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, **kw: Any) -> Any:
        r = httpx.get(self.url + path, timeout=30, **kw)
        assert r.status_code == 200, r.text
        return r.json()

    def post(self, path: str, body: dict[str, Any], method: str = "POST") -> Any:
        r = httpx.request(method, self.url + path, json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    def query(self) -> dict[str, Any]:
        return {"model_name": MODEL_NAME, "world_size": 1, "token_ids": self.ids}

    def tiers(self) -> list[list[tuple[str, str]]]:
        res = self.post("/directory/lookup", self.query())["results"]
        return [sorted((p["instance_id"], p["tier"]) for p in r["placements"]) for r in res]

    def wait_tiers(self, want: list[str], what: str) -> None:
        iid = self.server.instance_id
        expect = [[(iid, t) for t in want]] * 2
        wait_for(lambda: self.tiers() == expect, 30, what, self.coordinator,
                 self.server.proc)

    def instances(self) -> dict[str, dict[str, Any]]:
        return {i["instance_id"]: i for i in self.get("/instances")["instances"]}

    def ingest(self) -> dict[str, dict[str, Any]]:
        return {r["instance_id"]: r for r in self.get("/instances/ingest")["instances"]}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, redis_url, prose_ids, prose_kv) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("mp-fleet")
    port = free_port()
    extra = {"remote_key_prefix": f"e2e{uuid.uuid4().hex[:8]}"}
    coordinator = start_kvctl_coordinator(tmp, port, state=redis_url, extra=extra)
    server = client = f = None
    try:
        server = start_mp_server(tmp, f"http://127.0.0.1:{port}")
        client = MPClient(server)
        ids = list(prose_ids[:N])
        kv = prose_kv[:, :, :N].contiguous()
        client.store(ids, kv)
        f = Fleet(tmp, port, redis_url, extra, coordinator, server, client, ids, kv)
        yield f
    finally:
        if client is not None and not client.closed:
            client.close()
        if server is not None:
            stop(server.proc)
        stop(f.coordinator if f is not None else coordinator)


def test_the_server_registers_and_heartbeats(fleet):
    inst = fleet.instances()[fleet.server.instance_id]
    assert (inst["ip"], inst["http_port"]) == ("127.0.0.1",
                                              int(fleet.server.http.rsplit(":", 1)[1]))
    first = fleet.ingest()[fleet.server.instance_id]
    assert first["alive"] and first["registered"]

    def beat_seen() -> bool:
        row = fleet.ingest()[fleet.server.instance_id]
        return row["heartbeat_age_s"] < 1.5 and row["cursor"]["last_seq"] >= 2
    wait_for(beat_seen, 20, "no fresh heartbeat", fleet.coordinator)
    # registered once: heartbeats renew it, they do not register it again
    assert fleet.instances()[fleet.server.instance_id]["registration_time"] == \
        inst["registration_time"]


def test_lookup_shows_l1_and_l2_placements_of_the_real_kv(fleet):
    fleet.wait_tiers(["l1", "l2"], "the store did not reach the directory")
    res = fleet.post("/directory/lookup", fleet.query())
    assert res["chunks"] == 2
    for i, r in enumerate(res["results"]):
        assert r["token_ids"] == fleet.ids[256 * i:256 * (i + 1)]
        # fp16 KV of 30 layers x 2 x 256 tokens x 3 heads x 64
        assert {p["size_bytes"] for p in r["placements"]} == {30 * 2 * 256 * 3 * 64 * 2}
        assert {p["backend"] for p in r["placements"]} == {"dram", "fs"}
    stats = fleet.get("/directory/stats")
    assert (stats["num_keys"], stats["l1_count"], stats["l2_count"]) == (2, 2, 2)
    assert torch.equal(fleet.client.retrieve(fleet.ids), fleet.kv)


def test_pin_and_unpin(fleet):
    assert fleet.post("/cache/pins", fleet.query()) == {"requested": 2, "affected": 2,
                                                         "status": "pinned"}
    assert fleet.get("/cache/pins")["total"] == 2
    # a pinned L2 chunk survives a delete that is not forced
    out = fleet.post("/cache/delete", {**fleet.query(), "instance_id":
                                       fleet.server.instance_id, "tier": "l2"})
    assert (out["affected"], out["skipped"]) == (0, 2)
    assert fleet.post("/cache/pins", fleet.query(), method="DELETE")["status"] == "unpinned"
    assert fleet.get("/cache/pins") == {"total": 0, "pins": []}


def test_delete_l1_then_prefetch_it_back_from_l2(fleet):
    iid = fleet.server.instance_id
    assert fleet.server.l1_objects() == 2
    out = fleet.post("/cache/delete", {**fleet.query(), "instance_id": iid, "tier": "l1"})
    assert out == {"instance_id": iid, "requested": 2, "affected": 2, "skipped": 0,
                   "status": "deleted"}
    assert fleet.server.l1_objects() == 0  # the server's own view: its L1 objects are gone
    fleet.wait_tiers(["l2"], "the server's delete events did not reach the directory")
    sub = fleet.post("/cache/prefetches", {**fleet.query(), "instance_id": iid})
    assert (sub["chunks"], sub["status"]) == (2, "submitted")

    def done() -> dict[str, Any] | None:
        st = fleet.get(f"/cache/prefetches/{iid}/{sub['request_id']}")
        return st if st["status"] == "completed" else None
    st = wait_for(done, 60, "prefetch did not complete", fleet.coordinator, fleet.server.proc)
    assert (st["found_keys"], st["total_keys"]) == (2, 2)
    fleet.wait_tiers(["l1", "l2"], "the prefetched chunks did not show in L1")
    assert fleet.server.l1_objects() == 2
    assert torch.equal(fleet.client.retrieve(fleet.ids), fleet.kv)


def test_the_cli_against_kvctls_coordinator(fleet, cli_env):
    url, iid = fleet.url, fleet.server.instance_id
    mp = ("--coordinator", url, "--model-name", MODEL_NAME)
    data = json.loads(run_cli("instances", "--coordinator", url, "--json").stdout)
    assert data["coordinator"] == "kvctl"
    (row,) = [r for r in data["instances"] if r["instance_id"] == iid]
    assert row["alive"] and row["cursor"]["last_seq"] >= 3 and row["cursor"]["gaps"] == 0
    l1 = next(m for m in row["modules"] if m["tier"] == "l1")
    assert l1["used_bytes"] == 2 * CHUNK_BYTES and l1["capacity_bytes"] > 0
    assert "keys of at most" in run_cli("instances", "--coordinator", url).stderr

    found = json.loads(run_cli("lookup", PROSE, *mp, "--json").stdout)
    assert found["coordinator"] == "kvctl" and found["prefix_chunks"] == 2
    assert [sorted(p["tier"] for p in r["placements"]) for r in found["results"][:2]] == \
        [["l1", "l2"], ["l1", "l2"]]
    assert "2 of " in run_cli("lookup", PROSE, *mp).stderr

    assert json.loads(run_cli("pin", PROSE, *mp, "--json").stdout)["status"] == "pinned"
    assert fleet.get("/cache/pins")["total"] >= 2
    assert json.loads(run_cli("unpin", PROSE, *mp, "--json").stdout)["status"] == "unpinned"
    assert fleet.get("/cache/pins")["total"] == 0

    out = json.loads(run_cli("delete", PROSE, *mp, "--instance", iid, "--tier", "l1",
                             "--json").stdout)
    assert (out["status"], out["affected"]) == ("deleted", 2)
    assert fleet.server.l1_objects() == 0
    fleet.wait_tiers(["l2"], "the CLI's delete did not reach the directory")
    out = json.loads(run_cli("prefetch", PROSE, *mp, "--instance", iid, "--wait",
                             "--json").stdout)
    assert (out["status"], out["found_keys"], out["total_keys"]) == ("completed", 2, 2)
    fleet.wait_tiers(["l1", "l2"], "the CLI's prefetch did not show in L1")
    assert fleet.server.l1_objects() == 2

    # what the operator got wrong: one line, exit 2
    r = run_cli("delete", PROSE, *mp, "--instance", "nope", expected_exit_code=2)
    assert "no MP server registered with instance_id='nope'" in r.stderr
    r = run_cli("lookup", PROSE, "--coordinator", url, expected_exit_code=2)
    assert "--model-name" in r.stderr
    r = run_cli("lookup", "too short", *mp, expected_exit_code=2)
    assert "less than one 256-token chunk" in r.stderr
    r = run_cli("lookup", PROSE, "--coordinator", url, "--model-name", "nobody",
                expected_exit_code=2)
    assert "nothing matched" in r.stderr
    assert "--coordinator" in run_cli("instances", expected_exit_code=2).stderr


def test_coordinator_kill9_and_restart_with_state_loses_nothing(fleet):
    before = fleet.post("/directory/lookup", fleet.query())
    reg = fleet.instances()[fleet.server.instance_id]["registration_time"]
    fleet.coordinator.kill9()
    fleet.coordinator = start_kvctl_coordinator(fleet.tmp, fleet.port, state=fleet.state,
                                                extra=fleet.extra, name="kvctl-again")
    assert fleet.post("/directory/lookup", fleet.query()) == before

    def beating() -> bool:
        return fleet.ingest()[fleet.server.instance_id]["heartbeat_age_s"] < 1.5
    wait_for(beating, 20, "heartbeats did not continue", fleet.coordinator)
    # the same registration: no 404, so no re-register
    assert fleet.instances()[fleet.server.instance_id]["registration_time"] == reg
    assert fleet.ingest()[fleet.server.instance_id]["cursor"]["gaps"] == 0


def test_restart_without_state_makes_the_server_register_again(fleet):
    fleet.coordinator.kill9()
    fleet.coordinator = start_kvctl_coordinator(fleet.tmp, fleet.port, name="kvctl-memory")
    wait_for(lambda: fleet.server.instance_id in fleet.instances(), 30,
             "the server did not register again after the 404", fleet.coordinator,
             fleet.server.proc)
    assert fleet.tiers() == [[], []]  # an empty directory: nothing to replay from


def test_server_kill9_is_dead_after_the_timeout(fleet):
    other = start_mp_server(fleet.tmp, fleet.url, name="doomed", l2=False)
    wait_for(lambda: other.instance_id in fleet.instances(), 30, "doomed did not register",
             fleet.coordinator)
    other.proc.proc.send_signal(signal.SIGKILL)
    other.proc.proc.wait(30)
    # alive at first, then past coordinator_instance_timeout_s (6 s here) deregistered
    wait_for(lambda: other.instance_id not in fleet.instances(), 30,
             "a killed server stayed registered", fleet.coordinator)
    metrics = httpx.get(fleet.url + "/metrics", timeout=10).text
    assert "kvctl_coordinator_evicted_instances_total 1.0" in metrics
    assert fleet.server.instance_id in fleet.instances()


def test_server_sigterm_deregisters(fleet):
    iid = fleet.server.instance_id
    fleet.client.close()
    stop(fleet.server.proc, signal.SIGTERM)
    assert iid not in fleet.instances()
