"""The cluster boundary under attack (issue 19): what a worker, or anything that registers as
one, says is input. Real controllers and workers on loopback ports, real redis-servers, fake
workers that are tiny real uvicorn apps answering whatever a test makes them answer."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest
import redis

from kvctl.server.chunks import chunk_refs
from kvctl.server.worker.jobs import checksum
from tests.cluster_procs import (
    Proc,
    start_controller,
    start_worker,
    wait_event,
    wait_for,
    workers,
)
from tests.conftest import RedisProc
from tests.hostile_procs import fake_worker, raw_blob

pytestmark = pytest.mark.e2e

CPU, DISK, REMOTE = "LocalCPUBackend", "LocalDiskBackend", "RemoteBackend"


def alive(ctl: Proc, iid: str, *procs: Proc) -> dict:
    return wait_for(lambda: (w := workers(ctl.urls["api"]).get(iid)) and w["state"] == "alive"
                    and w, 60, f"{iid} never alive", ctl, *procs)


def put_chunk(worker_url: str, location: str, key: str, blob: bytes, ntok: int
              ) -> httpx.Response:
    return httpx.put(f"{worker_url}/worker/chunks/{location}/{key}", content=blob, timeout=30,
                     headers={"x-kvctl-num-tokens": str(ntok),
                              "x-kvctl-checksum": checksum(blob)})


def stop_all(*procs: Proc) -> None:
    for p in procs:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGCONT)
        p.stop()


# 1 ------------------------------------------------------------------ path traversal ----
def test_move_refuses_chunk_keys_a_worker_made_up(tmp_path: Path):
    disk = tmp_path / "root" / "disk"
    ctl = start_controller(tmp_path, "ctl", worker=True, extra={
        "lmcache_instance_id": "dst", "local_disk": str(disk), "max_local_disk_size": 1})
    toks = list(range(1000, 1004))
    blob = raw_blob(bytes(4 * 2 * 64 * 2))  # 4 tokens of a 1-layer, 1-head model
    try:
        alive(ctl, "dst")
        with fake_worker() as fake:
            evil = "../../pwned"
            fake.ops["chunk_plan"] = lambda b: [{"key": evil, "num_tokens": 4}]
            fake.chunks[evil] = (blob, 4, checksum(blob))
            assert fake.register(ctl.urls["monitor"], "src").status_code == 200
            r = httpx.post(ctl.urls["api"] + "/move", timeout=30, json={
                "old_position": ["src", CPU], "new_position": ["dst", DISK],
                "tokens": toks, "should_copy": True})
            if r.status_code == 200:
                ev = wait_event(ctl.urls["api"], r.json()["event_id"])
                assert ev["status"] == "failed", ev
                detail = ev["error"]
            else:
                assert r.status_code in (502, 503), r.text
                detail = r.json()["detail"]
        assert "chunk key" in detail and "src" in detail
        assert not list(tmp_path.rglob("pwned*")), "a file was written outside local_disk"
    finally:
        ctl.stop()


def test_disk_tier_never_builds_a_path_from_a_bad_key(tmp_path: Path):
    """Defence in depth under the boundary checks: whatever key reaches the disk tier, no
    path leaves its directory (only letters, digits and _ name a file)."""
    from kvctl.server.storage import LocalDiskBackend, StorageError

    disk = LocalDiskBackend(tmp_path / "d", 1 << 20)
    blob = raw_blob(bytes(256))
    for bad in ("../../x", "/etc/passwd", "..", "", "a/b", "x.kvc", "0" * 31 + "\\0"):
        with pytest.raises(StorageError):
            disk.put(bad, blob, 1)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


# 2 ------------------------------------------------------------ bytes are not text ----
def test_chunk_bytes_that_look_like_credentials_pass_unchanged(tmp_path: Path):
    ctl = start_controller(tmp_path, "ctl")
    w = start_worker(tmp_path, "bytes", [ctl.urls["monitor"]], model="none",
                     extra={"auth_token": "cluster-token-0123456789"})
    ctl.stop()  # the worker's own port is what is tested; it keeps serving without one
    payload = (b"pwd=hunter22&token: abcdefgh redis://u:pw@host/ Bearer xyz123 "
               b"cluster-token-0123456789 ") * 8
    blob = raw_blob(payload)
    key = chunk_refs(list(range(7)), 256)[0].key
    auth = {"Authorization": "Bearer cluster-token-0123456789"}
    try:
        wait_for(lambda: _answers(w.urls["worker"] + "/healthz", auth), 60, "no worker", w)
        r = httpx.put(f"{w.urls['worker']}/worker/chunks/{CPU}/{key}", content=blob,
                      timeout=30, headers={**auth, "x-kvctl-num-tokens": str(_tokens(blob)),
                                           "x-kvctl-checksum": checksum(blob)})
        assert r.status_code == 200, r.text
        got = httpx.get(f"{w.urls['worker']}/worker/chunks/{CPU}/{key}", headers=auth,
                        timeout=30)
        assert got.status_code == 200
        assert got.content == blob
        assert got.headers["x-kvctl-checksum"] == checksum(blob)
        # text still is: a JSON error never shows the token
        r = httpx.post(w.urls["worker"] + "/worker/ops/compress", headers=auth, timeout=10,
                       json={"instance_id": "cluster-token-0123456789", "method": "raw",
                             "location": CPU, "tokens": [1]})
        assert r.status_code == 404 and "cluster-token-0123456789" not in r.text
    finally:
        stop_all(w)


def _tokens(blob: bytes) -> int:
    from kvctl.codecs import peek_blob

    return peek_blob(blob).num_tokens


def _answers(url: str, headers: dict | None = None) -> bool:
    try:
        return httpx.get(url, headers=headers, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


# 3 ------------------------------------------------------------------ instance hijack ----
def test_a_live_instance_belongs_to_its_first_worker(tmp_path: Path):
    ctl = start_controller(tmp_path, "ctl")
    w = start_worker(tmp_path, "held", [ctl.urls["monitor"]], model="none")
    try:
        seen = alive(ctl, "held", w)
        with fake_worker() as fake:
            for path in ("/workers/register", "/workers/heartbeat"):
                r = fake.register(ctl.urls["monitor"], "held", path=path)
                assert r.status_code == 409, (path, r.text)
                assert w.urls["worker"] in r.json()["detail"]
            # a made-up credential does no better
            r = fake.register(ctl.urls["monitor"], "held", path="/workers/heartbeat",
                              lease="0" * 64)
            assert r.status_code == 409
            assert workers(ctl.urls["api"])["held"]["url"] == seen["url"] == w.urls["worker"]
            r = httpx.post(ctl.urls["api"] + "/compress", timeout=10, json={
                "instance_id": "held", "method": "cachegen", "location": CPU,
                "tokens": list(range(300))})
            assert r.status_code == 200, r.text
            assert wait_event(ctl.urls["api"], r.json()["event_id"])["status"] == "finished"
            assert [op for op, _ in fake.asked if op != "info"] == []
            # a new instance id is anyone's with the token (here: none is configured)
            assert fake.register(ctl.urls["monitor"], "other").status_code == 200
        # the real worker is still the holder, heartbeat after heartbeat
        again = alive(ctl, "held", w)
        assert again["registration_time"] == seen["registration_time"]
    finally:
        stop_all(ctl, w)


def test_only_the_lease_holder_renews_or_deregisters_and_a_gone_holder_is_replaced(
        tmp_path: Path):
    ctl = start_controller(tmp_path, "ctl")
    mon = ctl.urls["monitor"]
    try:
        with fake_worker() as first, fake_worker() as second:
            r = first.register(mon, "x")
            assert r.status_code == 200
            lease = r.json()["lease"]
            assert len(lease) >= 40
            # its lease renews it, keeping its registration time
            again = first.register(mon, "x", path="/workers/heartbeat", lease=lease)
            assert again.status_code == 200
            assert again.json()["registered_at"] == r.json()["registered_at"]
            assert second.register(mon, "x").status_code == 409
            # its address alone does not deregister it (anyone can read that in /workers)
            for body in ({"url": first.url}, {"url": first.url, "lease": "not-the-lease"}):
                bye = httpx.post(mon + "/workers/deregister", timeout=10,
                                 json={"instance_id": "x", **body})
                assert bye.status_code == 200 and bye.json() == {"stopped": False}, body
            assert workers(ctl.urls["api"])["x"]["state"] == "alive"
            bye = httpx.post(mon + "/workers/deregister", timeout=10,
                             json={"instance_id": "x", "url": first.url, "lease": lease})
            assert bye.status_code == 200 and bye.json() == {"stopped": True}
            assert workers(ctl.urls["api"])["x"]["state"] == "dead"
            assert second.register(mon, "x").status_code == 200
            assert workers(ctl.urls["api"])["x"]["url"] == second.url
            gone_url = second.url
        # both fake workers are gone now: their ports refuse, so a successor need not wait
        # for dead_after_s
        with fake_worker() as third:
            r = third.register(mon, "x")
            assert r.status_code == 200, r.text
            assert workers(ctl.urls["api"])["x"]["url"] == third.url != gone_url
    finally:
        ctl.stop()


def test_a_worker_restarted_on_its_own_port_takes_its_instance_back_at_once(tmp_path: Path):
    from tests.cluster_procs import spawn

    # dead_after_s far beyond the test's patience: the successor must not wait for it
    ctl = start_controller(tmp_path, "ctl", extra={"dead_after_s": 600.0})
    w = start_worker(tmp_path, "rs", [ctl.urls["monitor"]], model="none")
    again = None
    try:
        first = alive(ctl, "rs", w)
        w.kill9()
        again = spawn("rs-again", list(w.proc.args[3:]), tmp_path)
        again.urls = w.urls
        back = wait_for(lambda: (v := workers(ctl.urls["api"])["rs"])["registration_time"]
                        != first["registration_time"] and v, 60,
                        "the restarted worker did not get its instance back", ctl, again)
        assert back["url"] == first["url"] and back["state"] == "alive"
        r = httpx.post(ctl.urls["api"] + "/compress", timeout=10, json={
            "instance_id": "rs", "method": "cachegen", "location": CPU, "tokens": [1, 2]})
        assert r.status_code == 200, r.text
    finally:
        stop_all(ctl, *([again] if again else []))


def test_a_worker_cannot_answer_a_command_with_another_event(tmp_path: Path):
    ctl = start_controller(tmp_path, "ctl")
    try:
        with fake_worker() as fake:
            fake.ops["compress"] = lambda b: {
                "event_id": "compress-victim", "op": "compress", "instance_id": "other",
                "method": "cachegen", "location": CPU, "num_tokens": 0, "chunks_total": 0,
                "status": "finished", "created_at": 0.0}
            assert fake.register(ctl.urls["monitor"], "liar").status_code == 200
            r = httpx.post(ctl.urls["api"] + "/compress", timeout=10, json={
                "instance_id": "liar", "method": "cachegen", "location": CPU,
                "tokens": [1, 2]})
            assert r.status_code == 503 and "compress-victim" in r.json()["detail"]
            assert httpx.get(ctl.urls["api"] + "/events/compress-victim",
                             timeout=10).status_code == 404
    finally:
        ctl.stop()


# 4 ------------------------------------------------------- one bad registration -------
def test_bad_registration_is_refused_and_cannot_break_shared_endpoints(tmp_path: Path,
                                                                       redis_url: str):
    state = redis_url.rsplit("/", 1)[0] + "/5"
    redis.Redis.from_url(state).flushdb()
    ctl = start_controller(tmp_path, "ctl", state=state)
    w = start_worker(tmp_path, "good", [ctl.urls["monitor"]], model="none")
    try:
        alive(ctl, "good", w)
        with fake_worker() as fake:
            for url in ("http://127.0.0.1:99999", "ftp://127.0.0.1:1", "http://:80",
                        "http://u:p@127.0.0.1:1/", "not a url", "http://127.0.0.1:1/x?y"):
                fake.url = url
                r = fake.register(ctl.urls["monitor"], "bad")
                assert r.status_code == 422, (url, r.text)
                assert "url" in r.json()["detail"]
        # a record an older version let in (or that anything else wrote) is still input
        r = redis.Redis.from_url(state)
        now = time.time()
        r.set("kvctl:ctl:worker:stale", json.dumps({
            "instance_id": "stale", "worker_id": 0, "url": "http://127.0.0.1:99999",
            "engine_url": None, "chunk_size": 256, "registered_at": now,
            "last_heartbeat": now + 3600, "locations": [], "error_code": 0, "pid": None}))
        r.sadd("kvctl:ctl:workers", "stale")
        for _ in range(2):
            got = httpx.post(ctl.urls["api"] + "/lookup", json={"tokens": [1, 2]}, timeout=10)
            assert got.status_code == 200, got.text
            listed = httpx.get(ctl.urls["api"] + "/workers", timeout=10)
            assert listed.status_code == 200, listed.text
            views = {v["instance_id"]: v for v in listed.json()["workers"]}
            assert views["stale"]["error_code"] == 2 and views["good"]["error_code"] == 0
            assert httpx.get(ctl.urls["api"] + "/metrics", timeout=10).status_code == 200
    finally:
        stop_all(ctl, w)


# 5 ---------------------------------------------------- frozen storage Redis ---------
def test_frozen_storage_redis_leaves_the_worker_alive(tmp_path: Path, redis_proc: RedisProc):
    ctl = start_controller(tmp_path, "ctl")
    w = start_worker(tmp_path, "rw", [ctl.urls["monitor"]], model="none",
                     extra={"remote_url": redis_proc.url})
    try:
        alive(ctl, "rw", w)
        redis_proc.proc.send_signal(signal.SIGSTOP)
        try:
            until = time.monotonic() + 3.0 + 2.0  # dead_after_s (FAST) and a margin
            while time.monotonic() < until:
                state = workers(ctl.urls["api"])["rw"]["state"]
                assert state == "alive", "a frozen storage Redis made the worker look dead"
                time.sleep(0.1)
            r = httpx.post(ctl.urls["api"] + "/compress", timeout=10, json={
                "instance_id": "rw", "method": "cachegen", "location": CPU,
                "tokens": list(range(300))})
            assert r.status_code == 200, r.text
            assert wait_event(ctl.urls["api"], r.json()["event_id"], 30)["status"] == \
                "finished"
        finally:
            redis_proc.proc.send_signal(signal.SIGCONT)
    finally:
        stop_all(ctl, w)


# 6 ---------------------------------------------------------------- decode bounds ----
def _cachegen_blob(shape: tuple[int, ...]) -> bytes:
    import torch

    from kvctl.codecs import get_codec

    return get_codec("cachegen").encode(torch.zeros(shape, dtype=torch.float16))


def test_a_blob_decodes_only_if_its_shape_fits_the_deployment(tmp_path: Path):
    disk = tmp_path / "disk"
    disk.mkdir()
    ctl = start_controller(tmp_path, "ctl")
    # 1,024 tokens in a deployment of 256-token chunks; every byte of it valid
    toks = list(range(1024))
    key = chunk_refs(toks, 256)[0].key
    long_blob = _cachegen_blob((2, 2, 1024, 2, 64))
    (disk / f"{key}-256.kvc").write_bytes(long_blob)  # a file from outside
    # 256 tokens, but more elements than the deployment allows
    wide_blob = _cachegen_blob((8, 2, 256, 4, 64))
    w = start_worker(tmp_path, "bl", [ctl.urls["monitor"]], model="none", extra={
        "local_disk": str(disk), "max_local_disk_size": 1, "max_chunk_elements": 200_000})
    try:
        alive(ctl, "bl", w)
        for blob in (long_blob, wide_blob):
            r = put_chunk(w.urls["worker"], CPU, key, blob, 256)
            assert r.status_code in (400, 413), r.text
            assert "256" in r.json()["detail"] or "200000" in r.json()["detail"]
        r = httpx.post(ctl.urls["api"] + "/decompress", timeout=10, json={
            "instance_id": "bl", "method": "cachegen", "location": DISK, "tokens": toks[:256]})
        assert r.status_code == 200, r.text
        ev = wait_event(ctl.urls["api"], r.json()["event_id"], 60)
        assert ev["status"] == "failed" and "1024 tokens" in ev["error"], ev
    finally:
        stop_all(ctl, w)


# 7 ---------------------------------------------------- the worker command port --------
def test_worker_command_port_validates_as_the_controller_does(tmp_path: Path):
    ctl = start_controller(tmp_path, "ctl")
    w = start_worker(tmp_path, "v", [ctl.urls["monitor"]], model="none")
    base = {"instance_id": "v", "method": "raw", "location": CPU}
    try:
        alive(ctl, "v", w)
        ops = w.urls["worker"] + "/worker/ops/"
        r = httpx.post(ops + "compress", content=b"[" * 200_000, timeout=10,
                       headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        for tokens in ("123", [-1], [1.5], [2**70], [True, None], {"a": 1}):
            r = httpx.post(ops + "compress", json={**base, "tokens": tokens}, timeout=10)
            assert r.status_code == 422, (tokens, r.text)
            assert "tokens" in r.json()["detail"]
        for op, body in (("lookup", {"tokens": "12"}), ("events", {"ids": "abc"}),
                         ("delete_chunk", {"location": CPU, "key": "../x"}),
                         ("chunk_plan", {"location": CPU, "tokens": [-5]})):
            r = httpx.post(ops + op, json=body, timeout=10)
            assert r.status_code == 422, (op, r.text)
        key = chunk_refs([1, 2, 3], 256)[0].key
        r = httpx.get(f"{w.urls['worker']}/worker/chunks/{CPU}/{key}", timeout=10)
        assert r.status_code == 404 and key in r.json()["detail"]
        r = httpx.get(f"{w.urls['worker']}/worker/chunks/{CPU}/not-a-key", timeout=10)
        assert r.status_code in (400, 422) and "chunk key" in r.json()["detail"]
        # and a good command still works
        r = httpx.post(ops + "compress", json={**base, "tokens": [1, 2, 3]}, timeout=10)
        assert r.status_code == 200, r.text
    finally:
        stop_all(ctl, w)


# 8 ------------------------------------------------------------ frozen state Redis ----
def test_frozen_state_redis_is_a_fast_503_and_no_worker_dies_of_it(tmp_path: Path,
                                                                   redis_proc: RedisProc):
    ctl = start_controller(tmp_path, "ctl", state=redis_proc.url,
                           extra={"heartbeat_interval_s": 1.5, "dead_after_s": 3.0})
    w = start_worker(tmp_path, "sw", [ctl.urls["monitor"]], model="none")
    try:
        alive(ctl, "sw", w)
        redis_proc.proc.send_signal(signal.SIGSTOP)
        try:
            first = httpx.get(ctl.urls["api"] + "/events", timeout=5)
            assert first.status_code == 503
            frozen_until = time.monotonic() + 4.0  # longer than dead_after_s
            n = 0
            while time.monotonic() < frozen_until:
                # a frozen Redis answers like a dead one: at once (the old wait was 2 s)
                r = httpx.get(ctl.urls["api"] + "/workers", timeout=1.0)
                assert r.status_code == 503 and "unreachable" in r.json()["detail"]
                n += 1
            assert n >= 4
        finally:
            redis_proc.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: httpx.get(ctl.urls["api"] + "/events", timeout=5).status_code
                 == 200, 20, "state never came back", ctl)
        # the worker beat all along; the controller could not write it down: not its fault
        assert workers(ctl.urls["api"])["sw"]["state"] == "alive"
        r = httpx.post(ctl.urls["api"] + "/compress", timeout=10, json={
            "instance_id": "sw", "method": "cachegen", "location": CPU, "tokens": [1, 2]})
        assert r.status_code == 200, r.text
    finally:
        stop_all(ctl, w)


# 9 --------------------------------------------------------------- a hung worker ------
def test_a_hung_worker_slows_no_one_and_keeps_its_events(tmp_path: Path):
    ctl = start_controller(tmp_path, "ctl")
    hung = start_worker(tmp_path, "hung", [ctl.urls["monitor"]], model="none")
    ok = start_worker(tmp_path, "ok", [ctl.urls["monitor"]], model="none")
    toks = list(range(600))
    try:
        alive(ctl, "hung", hung)
        alive(ctl, "ok", ok)
        r = httpx.post(ctl.urls["api"] + "/compress", timeout=10, json={
            "instance_id": "hung", "method": "cachegen", "location": CPU, "tokens": toks})
        assert r.status_code == 200
        ev_id = r.json()["event_id"]
        hung.proc.send_signal(signal.SIGSTOP)
        try:
            # while it hangs (not yet dead): lookup answers from the others, names the late
            got = httpx.post(ctl.urls["api"] + "/lookup", json={"tokens": toks}, timeout=2.0)
            assert got.status_code == 200
            assert got.json()["late"] == ["hung"]
            listed = httpx.get(ctl.urls["api"] + "/workers", timeout=2.0).json()["workers"]
            assert {v["instance_id"]: v["late"] for v in listed} == {"hung": True,
                                                                     "ok": False}
            wait_for(lambda: workers(ctl.urls["api"])["hung"]["state"] == "dead", 30,
                     "a stopped worker never looked dead", ctl)
            ev = httpx.get(f"{ctl.urls['api']}/events/{ev_id}", timeout=5).json()
            assert ev["status"] != "failed", ev
        finally:
            hung.proc.send_signal(signal.SIGCONT)
        assert wait_event(ctl.urls["api"], ev_id, 30)["status"] == "finished"
    finally:
        stop_all(ctl, hung, ok)


# 10 ---------------------------------------------------------------- pins in Redis ----
def test_pin_refuses_a_redis_that_may_evict_any_key(tmp_path: Path):
    workdir = tmp_path / "redis"
    workdir.mkdir()
    rp = RedisProc(workdir, ("--maxmemory", "8mb", "--maxmemory-policy", "allkeys-lru"))
    rp.start()
    ctl = start_controller(tmp_path, "ctl")
    w = start_worker(tmp_path, "pr", [ctl.urls["monitor"]], model="none",
                     extra={"remote_url": rp.url})
    toks = list(range(256))
    key = chunk_refs(toks, 256)[0].key
    try:
        alive(ctl, "pr", w)
        blob = raw_blob(bytes(256 * 2 * 64 * 2), layers=1, heads=1, head_dim=64)
        assert put_chunk(w.urls["worker"], REMOTE, key, blob, 256).status_code == 200
        r = httpx.post(ctl.urls["api"] + "/pin", timeout=10, json={
            "instance_id": "pr", "location": REMOTE, "tokens": toks})
        if r.status_code == 200:  # accepted: then it must hold
            assert wait_event(ctl.urls["api"], r.json()["event_id"])["status"] == "finished"
            c = redis.Redis.from_url(rp.url)
            for i in range(400):
                c.set(f"filler:{i}", b"x" * 65536)
            assert c.exists(f"kvctl:pr:c:{key}"), "a pinned chunk was evicted"
        else:
            assert r.status_code == 409, r.text
            assert "allkeys-lru" in r.json()["detail"]
        # the memory tier still pins
        r = httpx.post(ctl.urls["api"] + "/pin", timeout=10, json={
            "instance_id": "pr", "location": CPU, "tokens": toks})
        assert r.status_code == 200, r.text
    finally:
        stop_all(ctl, w)
        rp.stop()


def test_pins_hold_in_a_redis_that_evicts_only_expiring_keys(tmp_path: Path):
    workdir = tmp_path / "redis"
    workdir.mkdir()
    rp = RedisProc(workdir, ("--maxmemory", "8mb", "--maxmemory-policy", "volatile-lru"))
    rp.start()
    ctl = start_controller(tmp_path, "ctl")
    w = start_worker(tmp_path, "pv", [ctl.urls["monitor"]], model="none",
                     extra={"remote_url": rp.url})
    toks = list(range(256))
    key = chunk_refs(toks, 256)[0].key
    try:
        alive(ctl, "pv", w)
        blob = raw_blob(bytes(256 * 2 * 64 * 2))
        assert put_chunk(w.urls["worker"], REMOTE, key, blob, 256).status_code == 200
        c = redis.Redis.from_url(rp.url)
        c.expire(f"kvctl:pv:c:{key}", 3600)  # whoever set a TTL, a pin lifts it
        r = httpx.post(ctl.urls["api"] + "/pin", timeout=10, json={
            "instance_id": "pv", "location": REMOTE, "tokens": toks})
        assert r.status_code == 200, r.text
        assert wait_event(ctl.urls["api"], r.json()["event_id"])["status"] == "finished"
        for i in range(400):
            try:
                c.set(f"filler:{i}", b"x" * 65536, ex=3600)
            except redis.ResponseError:
                break  # full of what may not be evicted: fine, nothing pinned was dropped
        assert int(c.info("stats")["evicted_keys"]) > 0
        assert c.exists(f"kvctl:pv:c:{key}"), "a pinned chunk was evicted"
    finally:
        stop_all(ctl, w)
        rp.stop()


# 11 ------------------------------------------------------------- bounded registry ----
def test_registrations_are_bounded(tmp_path: Path):
    ctl = start_controller(tmp_path, "ctl", extra={"max_workers": 3})
    try:
        with fake_worker() as fake:
            for i in range(3):
                r = fake.register(ctl.urls["monitor"], f"w{i}")
                assert r.status_code == 200, r.text
            r = fake.register(ctl.urls["monitor"], "w3")
            assert r.status_code == 409, r.text
            assert "max_workers" in r.json()["detail"] and "3" in r.json()["detail"]
            assert sorted(workers(ctl.urls["api"])) == ["w0", "w1", "w2"]
            metrics = httpx.get(ctl.urls["api"] + "/metrics", timeout=10).text
            assert 'instance_id="w3"' not in metrics
    finally:
        ctl.stop()


# 12 -------------------------------------------------------------------- slowloris ----
def test_slow_headers_and_stalled_bodies_are_cut_off(tmp_path: Path):
    ctl = start_controller(tmp_path, "ctl", extra={"header_timeout_s": 1.0,
                                                   "body_timeout_s": 1.0})
    host, port = "127.0.0.1", int(ctl.urls["api"].rsplit(":", 1)[1])
    socks = []
    try:
        for _ in range(5):  # headers that never end, a byte at a time
            s = socket.create_connection((host, port))
            s.sendall(b"GET /workers HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            socks.append(s)
        idle = socket.create_connection((host, port))  # says nothing at all
        body = socket.create_connection((host, port))  # a body that stops
        body.sendall(b"POST /lookup HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 1000\r\n\r\n{\"tokens\": [1,")
        for s in [*socks, idle, body]:
            s.setblocking(False)
        closed: set[int] = set()
        reply = b""
        deadline = time.monotonic() + 15
        while len(closed) < len(socks) + 2 and time.monotonic() < deadline:
            for i, s in enumerate([*socks, idle, body]):
                if i in closed:
                    continue
                try:
                    if i < len(socks):
                        s.send(b"X")
                    data = s.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except (ConnectionResetError, BrokenPipeError):
                    data = b""
                if s is body:
                    reply += data
                if not data:
                    closed.add(i)
            time.sleep(0.2)
        assert len(closed) == len(socks) + 2, f"only {len(closed)} connections were closed"
        assert b" 408 " in reply.split(b"\r\n", 1)[0], reply[:200]
        # others were served all along
        assert httpx.get(ctl.urls["api"] + "/workers", timeout=5).status_code == 200
    finally:
        for s in socks:
            s.close()
        ctl.stop()
