"""kvctl's MP coordinator in-process (ASGI transport with lifespan), in memory and on a real
Redis: upstream's replies to a recorded real server, ingest rules, bad input, access, and
two coordinators sharing one Redis.

The recordings (../shared/lmcache-0.5.6/) are what a real `lmcache server` 0.5.6 sent to a
real `lmcache coordinator` and what it answered; replaying the server's side must give
upstream's answers, and the directory must then read as upstream's did.
"""

from __future__ import annotations

import contextlib
import copy
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvctl.common.mpkeys import resolve_keys
from kvctl.server.config import ServerSettings
from kvctl.server.coordinator.app import create_coordinator_app

pytestmark = pytest.mark.anyio

REC = Path("/work/shared/lmcache-0.5.6")
if not REC.is_dir():
    REC = Path(__file__).parent / "data" / "lmcache-0.5.6"
IID = "29433496-2b5a-46a1-9e08-1d2cb9c976b8"
TOKEN = "coordinator-test-token-0123456789"


def _rows(name: str) -> list[dict[str, Any]]:
    path = REC / name
    if not path.exists():
        pytest.skip(f"recording {path} is not here")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _full_tokens() -> list[int]:
    """The 512 token ids of the recorded run (whole in the driver's lookup replies)."""
    for r in _rows("mp_driver_http.jsonl"):
        if r.get("path") == "/directory/lookup" and r["resp"].get("results") and \
                r["resp"]["results"][0]["token_ids"]:
            return [t for res in r["resp"]["results"] for t in res["token_ids"]]
    raise AssertionError("no lookup with token ids in the recording")


def _restore_tokens(body: Any, by_offset: dict[int, list[int]]) -> Any:
    """The recorder abbreviated store entries' token lists; put the real ones back."""
    body = copy.deepcopy(body)
    for b in (body or {}).get("batches", []):
        for e in b["entries"]:
            if e["token_ids"]:
                e["token_ids"] = by_offset[e["token_offset"]]
    return body


def _server_exchanges() -> list[dict[str, Any]]:
    toks = _full_tokens()
    by_offset = {0: toks[:256], 256: toks[256:512]}
    out = []
    for r in _rows("mp_server_coordinator_http.jsonl"):
        if r.get("link") == "server->coordinator":
            out.append({**r, "req": _restore_tokens(r["req"], by_offset)})
    return out


@pytest.fixture(params=["memory", "redis"])
def settings(request) -> ServerSettings:
    state = request.getfixturevalue("redis_url") if request.param == "redis" else None
    return ServerSettings(coordinator_port=0, state=state,
                          remote_key_prefix=f"t{uuid.uuid4().hex[:12]}")


@contextlib.asynccontextmanager
async def coordinator(settings: ServerSettings, client: tuple[str, int] = ("127.0.0.1", 5000),
                      headers: dict[str, str] | None = None) -> AsyncIterator[httpx.AsyncClient]:
    app = create_coordinator_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=client)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1",
                                     headers=headers or {}) as c:
            c.app = app  # type: ignore[attr-defined]
            yield c


def batch(seq: int, kind: str = "store", tier: str = "l1", entries: list | None = None,
          inc: int = 100, iid: str = "srv-a", backend: str = "dram", **kw: Any
          ) -> dict[str, Any]:
    return {"instance_id": iid, "incarnation": inc, "seq": seq, "event_type": kind,
            "tier": tier, "backend": backend, "entries": entries or [], **kw}


def entry(h: str, size: int = 100, tokens: list[int] | None = None,
          model: str = "m") -> dict[str, Any]:
    return {"key": {"chunk_hash_hex": h, "model_name": model, "kv_rank": 16777472,
                    "object_group_id": 0, "cache_salt": ""}, "size_bytes": size,
            "token_ids": tokens or [], "token_offset": 0 if tokens else -1}


def key(h: str, model: str = "m") -> dict[str, Any]:
    return entry(h, model=model)["key"]


async def register(c: httpx.AsyncClient, iid: str = "srv-a", port: int = 1) -> None:
    r = await c.post("/instances", json={"instance_id": iid, "ip": "127.0.0.1",
                                         "http_port": port})
    assert r.status_code == 200, r.text


async def events(c: httpx.AsyncClient, *batches: dict[str, Any]) -> dict[str, Any]:
    r = await c.post("/events", json={"batches": list(batches)})
    assert r.status_code == 200, r.text
    return r.json()


async def placements(c: httpx.AsyncClient, *hashes: str) -> list[list[tuple]]:
    r = await c.post("/directory/lookup", json={"keys": [key(h) for h in hashes]})
    assert r.status_code == 200, r.text
    return [[(p["instance_id"], p["tier"], p["backend"], p["size_bytes"])
             for p in res["placements"]] for res in r.json()["results"]]


# ------------------------------------------------------------------ the recordings ----
async def test_replaying_a_real_server_gets_upstreams_answers_and_directory(settings):
    driver = _rows("mp_driver_http.jsonl")
    stats_after_store = next(r for r in driver if r.get("path") == "/directory/stats")
    lookup_after_store = next(r for r in driver if r.get("path") == "/directory/lookup")
    usage_after_store = next(r for r in driver if r.get("path") == "/instances/usage")
    keys_after_store = next(r for r in driver if r.get("path", "").startswith(
        "/directory/keys"))
    toks = _full_tokens()
    async with coordinator(settings) as c:
        for n, ex in enumerate(_server_exchanges()):
            r = await c.request(ex["method"], ex["path"], json=ex["req"])
            assert r.status_code == ex["status"], (n, ex["path"], r.text)
            if ex["path"] == "/events":
                got = r.json()
                assert {k: got[k] for k in ("applied", "duplicates", "stale")} == ex["resp"]
            elif ex["resp"] is not None:
                assert r.json() == ex["resp"], (n, ex["path"])
            if ex["path"] == "/events" and ex["req"]["batches"][-1]["seq"] == 4:
                # both chunks stored in l1 and l2: what the driver read at this point
                r = await c.get("/directory/stats")
                want = stats_after_store["resp"]
                got = r.json()
                assert {k: v for k, v in got.items() if k != "blend"} == \
                    {k: v for k, v in want.items() if k != "blend"}
                r = await c.post("/directory/lookup", json={
                    "model_name": "test-model", "world_size": 1, "token_ids": toks})
                assert r.json() == lookup_after_store["resp"]
                r = await c.get("/instances/usage")
                assert r.json() == usage_after_store["resp"]
                r = await c.get("/directory/keys", params={"limit": 10})
                assert r.json() == keys_after_store["resp"]
                r = await c.get("/instances")
                (inst,) = r.json()["instances"]
                want_inst = next(r for r in driver if r.get("path") == "/instances"
                                 )["resp"]["instances"][0]
                assert {k: v for k, v in inst.items() if k != "registration_time"} == \
                    {k: v for k, v in want_inst.items() if k != "registration_time"}
        # the run ended with a forced delete of both tiers: nothing is left
        final = next(r for r in reversed(driver) if r.get("path") == "/directory/stats")
        got = (await c.get("/directory/stats")).json()
        assert {k: v for k, v in got.items() if k != "blend"} == \
            {k: v for k, v in final["resp"].items() if k != "blend"}
        ingest = (await c.get("/instances/ingest")).json()
        (row,) = ingest["instances"]
        assert row["cursor"]["last_seq"] == 12 and row["cursor"]["gaps"] == 0


async def test_recorded_errors_have_upstreams_status_and_detail(settings):
    toks = _full_tokens()
    checked = 0
    async with coordinator(settings) as c:
        errors = _rows("mp_driver_http.jsonl")[-4:]  # the recording's "errors" step
        for r in errors:
            req = r["req"]
            if isinstance(req, dict) and isinstance(req.get("token_ids"), str):
                n = int(req["token_ids"].strip("<>").split()[0])
                req = {**req, "token_ids": toks[:n]}
            got = await c.request(r["method"], r["path"], json=req)
            assert got.status_code == r["status"], (r["path"], got.text)
            assert got.json() == r["resp"], r["path"]
            checked += 1
    assert checked == 4


# ----------------------------------------------------------------------- ingest ----
async def test_seq_rules_duplicates_gaps_stale_and_fencing(settings):
    async with coordinator(settings) as c:
        await register(c)
        out = await events(c, batch(1, entries=[entry("aa")]),
                           batch(2, tier="l2", backend="fs", entries=[entry("aa")]))
        assert (out["applied"], out["duplicates"], out["gaps"]) == (2, 0, 0)
        # a replay and a seq that goes backwards: duplicates, nothing changes
        out = await events(c, batch(2, kind="delete", tier="l2", backend="fs",
                                    entries=[entry("aa")]), batch(1, kind="delete",
                                                                  entries=[entry("aa")]))
        assert (out["applied"], out["duplicates"]) == (0, 2)
        assert await placements(c, "aa") == [[("srv-a", "l1", "dram", 100),
                                              ("srv-a", "l2", "fs", 100)]]
        # a jump: admitted and counted
        out = await events(c, batch(5, entries=[entry("bb")]))
        assert (out["applied"], out["gaps"]) == (1, 1)
        # the server restarted (higher incarnation): its L1 is gone, its L2 stays
        out = await events(c, batch(1, inc=101, kind="access", backend="",
                                    entries=[entry("aa")]))
        assert out["applied"] == 1
        assert await placements(c, "aa", "bb") == [[("srv-a", "l2", "fs", 100)], []]
        # the old incarnation is stale now
        out = await events(c, batch(9, inc=100, entries=[entry("cc")]))
        assert out["stale"] == 1
        assert await placements(c, "cc") == [[]]
        cur = {r["instance_id"]: r["cursor"] for r in
               (await c.get("/instances/ingest")).json()["instances"]}["srv-a"]
        assert cur == {"incarnation": 101, "last_seq": 1, "gap_detected": False,
                       "applied": 4, "duplicates": 2, "stale": 1, "gaps": 1,
                       "dropped_entries": 0}
        metrics = (await c.get("/metrics")).text
        assert 'kvctl_coordinator_batches_duplicates_total{instance_id="srv-a"} 2.0' in metrics
        assert 'kvctl_coordinator_seq_gaps_total{instance_id="srv-a"} 1.0' in metrics
        assert 'kvctl_coordinator_batches_stale_total{instance_id="srv-a"} 1.0' in metrics
        assert 'kvctl_coordinator_last_seq{instance_id="srv-a"} 1.0' in metrics


async def test_unregistered_instance_and_deregistration(settings):
    async with coordinator(settings) as c:
        out = await events(c, batch(1, iid="ghost", entries=[entry("aa")]))
        assert (out["applied"], out["unregistered"]) == (0, 1)
        assert await placements(c, "aa") == [[]]
        await register(c)
        await events(c, batch(1, entries=[entry("aa")]),
                     batch(2, tier="l2", backend="fs", entries=[entry("aa")]))
        r = await c.delete("/instances/srv-a")
        assert r.status_code == 204
        assert (await c.delete("/instances/srv-a")).status_code == 204  # idempotent
        assert await placements(c, "aa") == [[("srv-a", "l2", "fs", 100)]]
        r = await c.put("/instances/srv-a/heartbeat")
        assert r.status_code == 404
        assert r.json() == {"error": "unknown instance srv-a; re-register"}
        text = (await c.get("/metrics")).text
        assert "kvctl_coordinator_unregistered_batches_total 1.0" in text


async def test_key_limit_drops_new_keys_counts_them_and_keeps_the_rest(settings):
    settings = settings.model_copy(update={"coordinator_max_keys": 3})
    async with coordinator(settings) as c:
        await register(c)
        out = await events(c, batch(1, entries=[entry(h) for h in ("01", "02", "03", "04")]))
        assert (out["applied"], out["dropped_entries"]) == (1, 1)
        # an existing key still updates; a delete makes room
        out = await events(c, batch(2, tier="l2", backend="fs", entries=[entry("01")]),
                           batch(3, kind="delete", entries=[entry("02")]),
                           batch(4, entries=[entry("05")]))
        assert out["dropped_entries"] == 0
        found = await placements(c, "01", "02", "03", "04", "05")
        assert [len(p) for p in found] == [2, 0, 1, 0, 1]
        text = (await c.get("/metrics")).text
        assert "kvctl_coordinator_key_limit_dropped_entries_total 1.0" in text
        assert "kvctl_coordinator_max_keys 3.0" in text
        assert "kvctl_coordinator_keys 3.0" in text


async def test_bad_batches_are_4xx_with_detail_and_disturb_nothing(settings):
    async with coordinator(settings) as c:
        await register(c)
        await events(c, batch(1, entries=[entry("aa", tokens=list(range(256)))]))
        before = (await c.get("/directory/stats")).json()
        bad = [
            b"not json",
            json.dumps({"batches": [batch(2, entries=[{"key": {"chunk_hash_hex": "zz",
                                                               "model_name": "m",
                                                               "kv_rank": 1}}])]}),
            json.dumps({"batches": [batch(2, tier="all")]}),
            json.dumps({"batches": [batch(2, kind="config", entries=[entry("bb")])]}),
            json.dumps({"batches": [batch(0)]}),
            json.dumps({"batches": [batch(2, kind="explode")]}),
            json.dumps({"batches": [batch(2, entries=[entry("aa", size=-1)])]}),
            json.dumps({"batches": [batch(2, entries=[entry(f"{i:08x}")
                                                      for i in range(10_000)])]}),
            json.dumps({"batches": [batch(2, entries=[entry("bb", model="a@b")])]}),
        ]
        details = []
        for body in bad:
            r = await c.post("/events", content=body,
                             headers={"content-type": "application/json"})
            assert r.status_code == 422, r.text
            details.append(r.json()["detail"])
            assert isinstance(details[-1], str) and details[-1]
        assert "length <= 8192 - at `$.batches[0].entries`" in details[7]
        assert "concrete tier" in details[2] and "carry no entries" in details[3]
        assert "`$.batches[0].seq`" in details[4]
        assert "`$.batches[0].entries[0].key.model_name`" in details[8]
        assert (await c.get("/directory/stats")).json() == before
        # the stream goes on at seq 2: nothing of the refused requests was counted
        out = await events(c, batch(2, entries=[entry("bb")]))
        assert (out["applied"], out["gaps"]) == (1, 0)


async def test_lookups_for_unknown_keys_and_unserved_models_are_empty_not_errors(settings):
    async with coordinator(settings) as c:
        await register(c)
        await events(c, batch(1, entries=[entry("aa")]))
        r = await c.post("/directory/lookup", json={"keys": [key("ffee")]})
        assert r.status_code == 200
        assert r.json()["results"][0]["placements"] == []
        r = await c.post("/directory/lookup", json={"model_name": "nobody-serves-this",
                                                    "world_size": 1,
                                                    "token_ids": list(range(512))})
        assert r.status_code == 200 and r.json()["chunks"] == 2
        assert all(res["placements"] == [] for res in r.json()["results"])
        for body, code in (({}, 422), ({"keys": [key("aa")], "token_ids": [1]}, 422),
                           ({"token_ids": [1, 2]}, 422),
                           ({"keys": [{"chunk_hash_hex": "xyz", "model_name": "m",
                                       "kv_rank": 1}]}, 422),
                           ({"model_name": "m", "world_size": 1, "token_ids": [-1]}, 422),
                           ({"model_name": "m", "world_size": 1, "token_ids": [1],
                             "cache_salt": "a/b"}, 400)):
            r = await c.post("/directory/lookup", json=body)
            assert r.status_code == code, (body, r.text)
            assert r.json()["detail"]


async def test_pins_count_and_list_in_first_pinned_order(settings):
    toks = list(range(600))
    q = {"model_name": "m", "world_size": 1, "token_ids": toks}
    async with coordinator(settings) as c:
        r = await c.post("/cache/pins", json=q)
        assert r.json() == {"requested": 2, "affected": 2, "status": "pinned"}
        await c.post("/cache/pins", json={**q, "token_ids": toks[:256]})
        r = await c.get("/cache/pins")
        keys, _ = resolve_keys(toks, "m")
        assert r.json() == {"total": 2, "pins": [
            {"key": keys[0].to_wire(), "pin_count": 2},
            {"key": keys[1].to_wire(), "pin_count": 1}]}
        r = await c.request("DELETE", "/cache/pins", json=q)
        assert r.json() == {"requested": 2, "affected": 2, "status": "unpinned"}
        r = await c.get("/cache/pins", params={"model_name": "m"})
        assert r.json() == {"total": 1, "pins": [{"key": keys[0].to_wire(),
                                                  "pin_count": 1}]}
        assert (await c.get("/cache/pins", params={"model_name": "x"})).json()["total"] == 0


async def test_delete_and_prefetch_of_an_unknown_or_unreachable_instance(settings):
    q = {"model_name": "m", "world_size": 1, "token_ids": list(range(256))}
    async with coordinator(settings) as c:
        for path in ("/cache/delete", "/cache/prefetches"):
            r = await c.post(path, json={**q, "instance_id": "nope"})
            assert r.status_code == 404
            assert r.json() == {"detail": "no MP server registered with instance_id='nope'"}
        # registered, but nothing listens at its address: 502 with what failed
        from tests.conftest import free_port

        await register(c, "gone", free_port())
        r = await c.post("/cache/delete", json={**q, "instance_id": "gone"})
        assert r.status_code == 502 and "delete to 'gone' failed" in r.json()["detail"]
        r = await c.post("/cache/prefetches", json={**q, "instance_id": "gone"})
        assert r.status_code == 502
        r = await c.post("/cache/delete", json={**q, "token_ids": [1], "instance_id": "gone"})
        assert r.json()["status"] == "noop"


async def test_silent_instances_are_deregistered_after_the_timeout(settings):
    settings = settings.model_copy(update={"coordinator_instance_timeout_s": 5.0})
    async with coordinator(settings) as c:
        await register(c)
        await events(c, batch(1, entries=[entry("aa")]),
                     batch(2, tier="l2", backend="fs", entries=[entry("aa")]))
        coord = c.app.state.coordinator  # type: ignore[attr-defined]
        import time

        assert await coord.sweep(time.time() + 1) == []
        assert await coord.sweep(time.time() + 6) == ["srv-a"]
        assert (await c.get("/instances")).json() == {"instances": []}
        assert await placements(c, "aa") == [[("srv-a", "l2", "fs", 100)]]


# ----------------------------------------------------------------------- access ----
async def test_ingest_routes_answer_loopback_and_the_allow_list_only(settings):
    async with coordinator(settings, client=("10.1.2.3", 4000)) as c:
        r = await c.post("/instances", json={"ip": "10.1.2.3", "http_port": 80})
        assert r.status_code == 403 and "coordinator_allow" in r.json()["detail"]
        assert (await c.post("/events", json={"batches": []})).status_code == 403
        assert (await c.put("/instances/x/heartbeat")).status_code == 403
    allowed = settings.model_copy(update={"coordinator_allow": ["10.1.2.0/24"]})
    async with coordinator(allowed, client=("10.1.2.3", 4000)) as c:
        r = await c.post("/instances", json={"ip": "10.1.2.3", "http_port": 80})
        assert r.status_code == 200
        assert r.json()["instance_id"].startswith("mp-")  # an empty id gets one


async def test_operator_routes_need_the_token_ingest_routes_do_not(settings):
    secured = settings.model_copy(update={"auth_token": TOKEN})
    async with coordinator(secured) as c:
        await register(c)  # a server on loopback sends no token
        assert (await events(c, batch(1)))["applied"] == 1
        for method, path in (("GET", "/directory/stats"), ("GET", "/instances/usage"),
                             ("GET", "/cache/pins"), ("GET", "/metrics"),
                             ("GET", "/instances/ingest"), ("POST", "/cache/delete")):
            r = await c.request(method, path)
            assert r.status_code == 401, path
            assert TOKEN not in r.text
        r = await c.get("/directory/stats", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200
    # a remote server not on the list may still report with the token
    async with coordinator(secured, client=("10.9.9.9", 1)) as c:
        r = await c.post("/instances", json={"ip": "10.9.9.9", "http_port": 80},
                         headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200


# ------------------------------------------------------------- shared Redis state ----
async def test_two_coordinators_on_one_redis_share_everything(redis_url):
    s = ServerSettings(coordinator_port=0, state=redis_url,
                       remote_key_prefix=f"t{uuid.uuid4().hex[:12]}")
    async with coordinator(s) as a, coordinator(s) as b:
        await register(a)
        assert (await b.put("/instances/srv-a/heartbeat")).status_code == 200
        # the server's batches go to either coordinator in turn: each applied once
        assert (await events(a, batch(1, entries=[entry("aa")])))["applied"] == 1
        assert (await events(b, batch(1, entries=[entry("aa")])))["duplicates"] == 1
        assert (await events(b, batch(2, tier="l2", backend="fs",
                                      entries=[entry("aa")])))["applied"] == 1
        assert await placements(a, "aa") == await placements(b, "aa") == [
            [("srv-a", "l1", "dram", 100), ("srv-a", "l2", "fs", 100)]]
        await a.post("/cache/pins", json={"model_name": "m", "world_size": 1,
                                          "token_ids": list(range(256))})
        assert (await b.get("/cache/pins")).json()["total"] == 1
        cur_a = (await a.get("/instances/ingest")).json()["instances"]
        cur_b = (await b.get("/instances/ingest")).json()["instances"]
        assert [r["cursor"] for r in cur_a] == [r["cursor"] for r in cur_b]
    # a fresh coordinator on the same Redis (a restart) finds it all again
    async with coordinator(s) as c:
        assert await placements(c, "aa") == [[("srv-a", "l1", "dram", 100),
                                              ("srv-a", "l2", "fs", 100)]]
        assert (await c.put("/instances/srv-a/heartbeat")).status_code == 200


async def test_redis_down_is_503_and_the_batch_is_not_acknowledged(redis_proc):
    s = ServerSettings(coordinator_port=0, state=redis_proc.url,
                       remote_key_prefix=f"t{uuid.uuid4().hex[:12]}")
    async with coordinator(s) as c:
        await register(c)
        await events(c, batch(1, entries=[entry("aa")]))
        redis_proc.stop()
        r = await c.post("/events", json={"batches": [batch(2, entries=[entry("bb")])]})
        assert r.status_code == 503 and "unreachable" in r.json()["detail"]
        r = await c.post("/directory/lookup", json={"keys": [key("aa")]})
        assert r.status_code == 503


async def test_key_listing_filters_and_pages(settings):
    async with coordinator(settings) as c:
        await register(c)
        await register(c, "srv-b")
        await events(c, batch(1, entries=[entry(h) for h in ("01", "02", "03")]),
                     batch(2, tier="l2", backend="fs", entries=[entry("02")]))
        await events(c, batch(1, iid="srv-b", entries=[entry("03")]))
        r = (await c.get("/directory/keys", params={"limit": 2})).json()
        assert r["total"] == 3 and [k["key"]["chunk_hash_hex"] for k in r["keys"]] == \
            ["01", "02"]
        r = (await c.get("/directory/keys", params={"offset": 2})).json()
        assert [k["key"]["chunk_hash_hex"] for k in r["keys"]] == ["03"]
        r = (await c.get("/directory/keys", params={"tier": "l2"})).json()
        assert r["total"] == 1 and r["keys"][0]["placements"][0]["backend"] == "fs"
        r = (await c.get("/directory/keys", params={"instance_id": "srv-b"})).json()
        assert r["total"] == 1 and [p["instance_id"] for p in r["keys"][0]["placements"]] \
            == ["srv-b"]
        assert (await c.get("/directory/keys", params={"limit": 0})).status_code == 422
        assert (await c.get("/directory/keys", params={"tier": "l3"})).status_code == 422
