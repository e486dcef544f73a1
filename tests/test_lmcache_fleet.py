"""A real LMCache 0.5.6 fleet under kvctl's controller: LMCacheEngine + LMCacheWorker in a
subprocess on CPU (real SmolLM2 KV, our CPU connector), driven through `kvctl serve
--no-worker --model none --monitor-ports ...` over LMCache's own wire protocol.

The tests run in file order on one instance and one controller (LMCache's start-up, ~30 s
here, is paid once); the last ones restart the controller and kill the worker.
"""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace
from typing import Any

import httpx
import msgspec
import pytest
import zmq

from tests.cliutil import run_cli
from tests.cluster_procs import wait_for
from tests.conftest import PROSE, free_port
from tests.lmcache_procs import LMCacheInstance, lm_workers, lookup, start_lmcache_controller

pytest.importorskip("lmcache.v1.cache_engine")
INST = "fleet-a"
LOC = "LocalCPUBackend"
MAX_KEYS = 64


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, redis_url):
    tmp = tmp_path_factory.mktemp("lmcache-fleet")
    state = redis_url.rsplit("/", 1)[0] + "/3"
    import redis

    redis.Redis.from_url(state).flushdb()
    port, monitor = free_port(), free_port()
    zmq_ports = {"pull": free_port(), "reply": free_port(), "heartbeat": free_port()}
    ns = SimpleNamespace(tmp=tmp, state=state, port=port, monitor=monitor, zmq=zmq_ports,
                         procs=[])

    def controller(name: str = "controller", with_state: bool = True) -> Any:
        p = start_lmcache_controller(tmp, name, port, monitor, zmq_ports,
                                     state if with_state else None,
                                     {"lmcache_max_keys": MAX_KEYS})
        ns.procs.append(p)
        return p

    ns.start_controller = controller
    ns.ctl = controller()
    ns.api = ns.ctl.urls["api"]
    # 0.02 GB of LocalCPUBackend: room for 3 SmolLM2 chunks (5,898,240 bytes each)
    ns.inst = LMCacheInstance(tmp, INST, zmq_ports["pull"], zmq_ports["reply"], cpu_gb=0.02)
    try:
        ns.inst.wait_ready()
        ids = json.loads(run_cli("tokenize", PROSE, "--json").stdout)["tokens"]
        ns.a = ids
        ns.full = len(ids) // 256 * 256   # LMCache stores full chunks only
        ns.c = [ids[0] + 1, *ids[1:600]]
        ns.d = [ids[0] + 2, *ids[1:600]]
        wait_for(lambda: lm_workers(ns.api).get(INST, {}).get("state") == "alive", 60,
                 "the LMCache worker did not register", ns.ctl)
        yield ns
    finally:
        ns.inst.stop()
        for p in ns.procs:
            p.stop()


def post(api: str, path: str, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    r = httpx.post(api + path, json=body, timeout=60)
    assert r.status_code == status, (path, r.status_code, r.text)
    return r.json()


def wait_event(api: str, event_id: str, timeout: float = 120) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        ev = httpx.get(f"{api}/events/{event_id}", timeout=10).json()
        return ev if ev["status"] in ("finished", "failed") else None

    return wait_for(ended, timeout, f"event {event_id} did not end")


def op(api: str, path: str, tokens: list[int] | None = None, **extra: Any) -> dict[str, Any]:
    body = {"instance_id": INST, "location": LOC, **extra}
    if tokens is not None:
        body["tokens"] = tokens
    return post(api, path, body)


def store(fleet: Any, tokens: list[int]) -> None:
    fleet.inst.send("store", tokens)


def held(fleet: Any, tokens: list[int], n: int) -> None:
    """Wait until the controller's directory says ``n`` tokens of ``tokens`` are stored."""
    def ok() -> bool:
        got = lookup(fleet.api, tokens).get(INST)
        return (got == [LOC, n]) if n else got is None
    wait_for(ok, 30, f"lookup never showed {n} tokens")


# ---------------------------------------------------------------------------------------
def test_registration_visible_to_api_and_cli(fleet):
    w = lm_workers(fleet.api)[INST]
    assert (w["kind"], w["state"], w["worker_id"], w["held_here"]) == ("lmcache", "alive", 0,
                                                                         True)
    assert w["port"] == fleet.inst.worker_port
    infos = post(fleet.api, "/query_worker_info", {"instance_id": "all"})["worker_infos"]
    assert [(i["instance_id"], i["kind"]) for i in infos] == [(INST, "lmcache")]
    up = httpx.get(fleet.api + "/controller/workers").json()
    assert up["total_count"] == 1 and up["workers"][0]["instance_id"] == INST
    assert post(fleet.api, "/health", {"instance_id": INST})["error_codes"] == {"0": 0}
    r = run_cli("--controller", fleet.api, "workers")
    assert INST in r.stdout and "LMCache" in r.stdout and "alive" in r.stdout


def test_lru_eviction_and_clear_reflected_in_lookup(fleet):
    store(fleet, fleet.c)
    held(fleet, fleet.c, 512)
    store(fleet, fleet.d)            # a fourth chunk: LRU evicts c's first
    held(fleet, fleet.d, 512)
    held(fleet, fleet.c, 0)
    stats = httpx.get(fleet.api + "/controller/key-stats").json()
    assert stats["total_key_count"] == 3
    r = run_cli("--controller", fleet.api, "--instance-id", INST, "--json", "clear", "--yes",
                "--wait")
    assert json.loads(r.stdout)["status"] == "finished"
    held(fleet, fleet.d, 0)
    assert httpx.get(fleet.api + "/controller/key-stats").json()["total_key_count"] == 0


def test_lookup_after_store_from_the_directory(fleet):
    assert lookup(fleet.api, fleet.a) == {}
    store(fleet, fleet.a)
    held(fleet, fleet.a, fleet.full)
    assert lookup(fleet.api, fleet.a[:300]) == {INST: [LOC, 256]}
    assert lookup(fleet.api, fleet.a[:200]) == {}   # shorter than a chunk


def test_cli_compress_wait_and_decompress_wait_against_lmcache(fleet):
    api = ["--controller", fleet.api, "--instance-id", INST]
    r = run_cli(*api, "--json", "lookup", PROSE)
    assert json.loads(r.stdout)["layout_info"][INST] == [LOC, fleet.full]
    r = run_cli(*api, "--json", "compress", PROSE, "--wait")
    ev = json.loads(r.stdout)
    assert (ev["status"], ev["num_tokens"], ev["op"]) == ("finished", fleet.full, "compress")
    # the instance's own chunks are CacheGen bitstreams now, a fraction of fp16's bytes
    held_now = fleet.inst.send("formats", [])
    assert held_now["formats"] == ["BINARY_BUFFER"] * (fleet.full // 256)
    assert held_now["bytes"] < fleet.full // 256 * 5_898_240 / 2
    r = run_cli(*api, "--json", "decompress", PROSE, "--wait")
    ev = json.loads(r.stdout)
    assert (ev["status"], ev["num_tokens"]) == ("finished", fleet.full)
    assert fleet.inst.send("formats", [])["formats"] == ["KV_2LTD"] * (fleet.full // 256)
    assert fleet.inst.send("retrieve", fleet.a)["retrieved"] == fleet.full
    r = run_cli(*api, "--json", "health")
    assert json.loads(r.stdout)["error_codes"] == {"0": 0}
    r = run_cli(*api, "--json", "pin", PROSE, "--wait")
    assert (json.loads(r.stdout)["status"], json.loads(r.stdout)["num_tokens"]) == \
        ("finished", fleet.full)
    r = run_cli(*api, "compress", PROSE, "--method", "zstd", expected_exit_code=2)
    assert "cachegen" in r.stderr


def test_pin_compress_decompress_each_event_tracked(fleet):
    a = fleet.a
    pin = op(fleet.api, "/pin", a)
    assert pin["num_tokens"] == fleet.full
    assert wait_event(fleet.api, pin["event_id"])["status"] == "finished"
    ev = op(fleet.api, "/compress", a, method="cachegen")
    assert ev["num_tokens"] == fleet.full
    done = wait_event(fleet.api, ev["event_id"])
    assert (done["status"], done["num_tokens"], done["op"]) == ("finished", fleet.full,
                                                                "compress")
    assert done["started_at"] <= done["finished_at"]
    assert post(fleet.api, "/check_finish", {"event_id": ev["event_id"]})["status"] == \
        "finished"
    # a compress shows as evict + admit of the same keys: the directory still holds them
    held(fleet, a, fleet.full)
    # a second compress of compressed chunks fails in LMCache and leaves them pinned:
    # kvctl refuses it before it reaches the worker
    again = httpx.post(fleet.api + "/compress", json={"instance_id": INST, "method": "cachegen",
                                                      "location": LOC, "tokens": a})
    assert again.status_code == 409 and "decompress them first" in again.json()["detail"]
    ev = op(fleet.api, "/decompress", a, method="cachegen")
    assert wait_event(fleet.api, ev["event_id"])["status"] == "finished"
    assert fleet.inst.send("retrieve", a)["retrieved"] == fleet.full
    bad = httpx.post(fleet.api + "/compress", json={"instance_id": INST, "method": "kivi-2",
                                                    "location": LOC, "tokens": a})
    assert bad.status_code == 400 and "cachegen" in bad.json()["detail"]
    bad = httpx.post(fleet.api + "/unpin", json={"instance_id": INST, "location": LOC,
                                                 "tokens": a})
    assert bad.status_code == 400 and "unpin" in bad.json()["detail"]


def test_two_concurrent_requests_to_one_worker_both_succeed(fleet):
    """Upstream answers the second of two overlapping calls with a 500 (LMCache #1702)."""
    results: dict[str, httpx.Response] = {}
    started = threading.Barrier(3)

    def call(name: str, path: str, body: dict[str, Any]) -> None:
        started.wait()
        results[name] = httpx.post(fleet.api + path, json=body, timeout=120)

    base = {"instance_id": INST, "location": LOC, "tokens": fleet.a}
    threads = [threading.Thread(target=call, args=a) for a in (
        ("compress", "/compress", {**base, "method": "cachegen"}),
        ("pin", "/pin", base),
        ("health", "/health", {"instance_id": INST}))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert {k: r.status_code for k, r in results.items()} == \
        {"compress": 200, "pin": 200, "health": 200}
    assert results["health"].json()["error_codes"] == {"0": 0}
    for k in ("compress", "pin"):
        ev = wait_event(fleet.api, results[k].json()["event_id"])
        assert (ev["status"], ev["num_tokens"]) == ("finished", fleet.full), ev
    ev = op(fleet.api, "/decompress", fleet.a, method="cachegen")
    assert wait_event(fleet.api, ev["event_id"])["status"] == "finished"


def _dealer(port: int) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 10_000)
    s.connect(f"tcp://127.0.0.1:{port}")
    return s


def _ask(s: zmq.Socket, payload: bytes) -> dict[str, Any]:
    s.send_multipart([b"", payload])
    frames = s.recv_multipart()
    assert frames[0] == b""
    return msgspec.msgpack.decode(frames[1])


def test_bad_frames_answered_dropped_and_counted(fleet):
    from kvctl.server.lmcache import wire

    reply = _dealer(fleet.zmq["reply"])
    try:
        assert _ask(reply, b"\xc1not msgpack")["type"] == "ErrorMsg"
        assert _ask(reply, msgspec.msgpack.encode({"type": "NopeMsg"}))["type"] == "ErrorMsg"
        real = lm_workers(fleet.api)[INST]
        claim = wire.RegisterMsg(instance_id=INST, worker_id=0, ip="10.9.9.9", port=1,
                                 peer_init_url=None)
        got = _ask(reply, wire.encode(claim))
        assert got["type"] == "ErrorMsg" and "registered from" in got["error"]
        after = lm_workers(fleet.api)[INST]
        assert (after["ip"], after["port"]) == (real["ip"], real["port"])
        # a worker of our own making floods the directory with admits
        fake = wire.RegisterMsg(instance_id="flood", worker_id=0, ip="127.0.0.1",
                                port=free_port(), peer_init_url=None)
        assert _ask(reply, wire.encode(fake))["type"] == "RegisterRetMsg"
    finally:
        reply.close()
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(f"tcp://127.0.0.1:{fleet.zmq['pull']}")
    try:
        push.send(b"\x92garbage")
        push.send(wire.encode(wire.BatchedKVOperationMsg(
            instance_id="flood", worker_id=0, location=LOC,
            operations=[wire.KVOpEvent(wire.OpType.ADMIT, k, k) for k in range(500)])))
        wait_for(lambda: lm_workers(fleet.api).get("flood", {}).get("key_count") == MAX_KEYS,
                 20, "the flood was not bounded")
        stats = httpx.get(fleet.api + "/lmcache/stats").json()
        assert stats["dropped_admits"] == 500 - MAX_KEYS
        assert stats["bad_frames"]["undecodable push frame"] == 1
        assert stats["bad_frames"]["identity claimed from another address"] == 1
        assert stats["bad_frames"]["undecodable reply frame"] == 2
        metrics = httpx.get(fleet.api + "/metrics").text
        assert ('kvctl_lmcache_bad_frames_total{reason="identity claimed from another '
                'address"} 1.0') in metrics
        push.send(wire.encode(wire.DeRegisterMsg(instance_id="flood", worker_id=0,
                                                 ip="127.0.0.1", port=fake.port)))
        wait_for(lambda: "flood" not in lm_workers(fleet.api), 20, "flood not deregistered")
    finally:
        push.close()
    # and the real worker is served as before
    assert lookup(fleet.api, fleet.a) == {INST: [LOC, fleet.full]}


def test_second_controller_on_the_same_state_answers_for_the_worker(fleet):
    other = start_lmcache_controller(fleet.tmp, "second", free_port(), free_port(), None,
                                     fleet.state)
    fleet.procs.append(other)
    try:
        api = other.urls["api"]
        w = lm_workers(api)[INST]
        assert (w["state"], w["held_here"]) == ("alive", False)
        assert lookup(api, fleet.a) == {INST: [LOC, fleet.full]}
        # its own REQ socket to the worker's REP port: a command works from here too
        assert post(api, "/health", {"instance_id": INST})["error_codes"] == {"0": 0}
        ev = post(api, "/pin", {"instance_id": INST, "location": LOC, "tokens": fleet.a})
        assert wait_event(api, ev["event_id"])["status"] == "finished"
        # and the first controller sees that event in the shared state
        assert wait_event(fleet.api, ev["event_id"])["status"] == "finished"
    finally:
        other.stop()


def _stats(api: str) -> dict[str, Any]:
    return httpx.get(api + "/lmcache/stats", timeout=10).json()


def test_controller_kill9_and_restart_with_state_keeps_the_directory(fleet):
    fleet.ctl.kill9()
    t0 = time.time()
    fleet.ctl = fleet.start_controller("restarted-with-state")
    # known at once, from the state: no full sync needed
    assert lookup(fleet.api, fleet.a) == {INST: [LOC, fleet.full]}
    wait_for(lambda: lm_workers(fleet.api)[INST]["last_heartbeat_time"] > t0 and
             lm_workers(fleet.api)[INST]["held_here"], 30, "no heartbeat after restart",
             fleet.ctl)
    assert _stats(fleet.api)["full_syncs_requested"] == 0
    # the admit stream goes on where it was
    store(fleet, fleet.c)
    held(fleet, fleet.c, 512)


def test_controller_kill9_and_restart_without_state_rebuilds_by_full_sync(fleet):
    fleet.ctl.kill9()
    fleet.ctl = fleet.start_controller("restarted-without-state", with_state=False)
    assert lookup(fleet.api, fleet.a) == {}      # nothing known yet
    wait_for(lambda: lookup(fleet.api, fleet.a) == {INST: [LOC, fleet.full]}, 60,
             "the full sync did not rebuild the directory", fleet.ctl)
    assert lookup(fleet.api, fleet.c) == {INST: [LOC, 512]}
    assert _stats(fleet.api)["full_syncs_requested"] == 1
    assert lm_workers(fleet.api)[INST]["directory"] == "ok"


def test_worker_kill9_fails_its_command_and_then_fails_fast(fleet):
    ev = op(fleet.api, "/compress", fleet.a, method="cachegen")
    wait_for(lambda: httpx.get(f"{fleet.api}/events/{ev['event_id']}").json()["status"] !=
             "queued", 30, "the compress did not start")
    fleet.inst.kill9()
    # noticed from the socket's disconnect, not after the compress deadline (600 s)
    failed = wait_event(fleet.api, ev["event_id"], timeout=30)
    assert failed["status"] == "failed" and "dropped the connection" in failed["error"]
    wait_for(lambda: lm_workers(fleet.api)[INST]["state"] == "dead", 30,
             "the killed worker was not declared dead")
    r = httpx.post(fleet.api + "/pin", json={"instance_id": INST, "location": LOC,
                                             "tokens": fleet.a}, timeout=30)
    assert r.status_code == 503 and "dead" in r.json()["detail"]
    assert lookup(fleet.api, fleet.a) == {}      # a dead worker's chunks are not offered
