"""Controller API in-process: httpx over ASGITransport with the app's lifespan running."""

from __future__ import annotations

import anyio
import httpx
import pytest

from kvctl.server.config import ServerSettings
from kvctl.server.http.app import create_app
from tests.conftest import in_process_api

pytestmark = pytest.mark.anyio

INSTANCE = "lmcache_default_instance"


@pytest.fixture
async def api(tmp_path):
    settings = ServerSettings(model="none", local_disk=str(tmp_path / "disk"),
                              max_local_disk_size=1, max_request_tokens=5000)
    async with in_process_api(settings) as client:
        yield client


async def wait_event(api, event_id: str) -> dict:
    """Block (off the loop) until the worker ends the event, then read it over HTTP."""
    ended = await anyio.to_thread.run_sync(api.runtime.events.wait, event_id, 120)
    assert ended is not None and ended["status"] in ("finished", "failed")
    r = await api.get(f"/events/{event_id}")
    assert r.status_code == 200
    return r.json()


def body(tokens, **kw):
    return {"instance_id": INSTANCE, "method": "cachegen", "location": "LocalCPUBackend",
            "tokens": tokens, **kw}


async def test_seed_flow_compress_then_decompress(api, prose_ids, prose_kv):
    import torch

    api.runtime.store_kv(prose_ids, prose_kv)
    r = await api.post("/compress", json=body(prose_ids))
    assert r.status_code == 200, r.text
    reply = r.json()
    assert set(reply) == {"event_id", "num_tokens"}
    assert reply["num_tokens"] == len(prose_ids)

    ev = await wait_event(api, reply["event_id"])
    assert ev["status"] == "finished", ev["error"]
    assert ev["chunks_done"] == ev["chunks_total"] == -(-len(prose_ids) // 256)
    assert 0 < ev["bytes_after"] < ev["bytes_before"]
    assert ev["created_at"] <= ev["started_at"] <= ev["finished_at"]
    r = await api.post("/check_finish", json={"event_id": reply["event_id"]})
    assert r.json() == {"event_id": reply["event_id"], "status": "finished"}

    r = await api.post("/decompress", json=body(prose_ids))
    assert r.json()["num_tokens"] == len(prose_ids)
    ev = await wait_event(api, r.json()["event_id"])
    assert ev["status"] == "finished" and ev["bytes_after"] > ev["bytes_before"]

    n, kv = api.runtime.load_prefix(prose_ids)
    assert n == len(prose_ids) and kv.shape == prose_kv.shape and kv.dtype == torch.float16
    err = (kv.float() - prose_kv.float()).norm() / prose_kv.float().norm()
    assert 0 < err < 0.2


async def test_num_tokens_counts_the_consecutive_stored_prefix(api, prose_ids, prose_kv):
    api.runtime.store_kv(prose_ids[:300], prose_kv[:, :, :300])
    # chunk 0 (256 tokens) matches; chunk 1 of the longer prompt covers other tokens
    r = await api.post("/compress", json=body(prose_ids))
    assert r.json()["num_tokens"] == 256
    r = await api.post("/compress", json=body([5, 6, 7]))
    reply = r.json()
    assert reply["num_tokens"] == 0
    ev = await wait_event(api, reply["event_id"])
    assert ev["status"] == "finished" and ev["chunks_total"] == 0


async def test_compress_twice_is_idempotent(api, prose_ids, prose_kv):
    api.runtime.store_kv(prose_ids[:256], prose_kv[:, :, :256])
    first = await wait_event(api, (await api.post("/compress", json=body(prose_ids))).json()[
        "event_id"])
    second = await wait_event(api, (await api.post("/compress", json=body(prose_ids))).json()[
        "event_id"])
    assert second["status"] == "finished"
    assert second["bytes_before"] == second["bytes_after"] == first["bytes_after"]


@pytest.mark.parametrize("patch,status,needle", [
    ({"instance_id": "nope"}, 404, "unknown instance_id 'nope'"),
    ({"method": "zstd"}, 400, "cachegen"),
    ({"location": "GPU"}, 404, "LocalCPUBackend"),
    ({"tokens": "abc"}, 422, "tokens"),
    ({"tokens": [1, "x"]}, 422, "tokens.1"),
    ({"tokens": list(range(5001))}, 413, "5000"),
])
async def test_bad_requests_say_what_to_fix(api, patch, status, needle):
    r = await api.post("/compress", json=body([1, 2, 3]) | patch)
    assert r.status_code == status
    assert isinstance(r.json()["detail"], str) and needle in r.json()["detail"]


async def test_missing_field_and_unknown_event(api):
    r = await api.post("/compress", json={"method": "cachegen"})
    assert r.status_code == 422 and "instance_id" in r.json()["detail"]
    r = await api.post("/check_finish", json={"event_id": "nope"})
    assert r.status_code == 404 and "nope" in r.json()["detail"]
    assert (await api.get("/events/nope")).status_code == 404


async def test_lookup_move_pin_clear(api, prose_ids, prose_kv):
    api.runtime.store_kv(prose_ids, prose_kv)
    r = await api.post("/lookup", json={"tokens": prose_ids})
    assert r.json()["layout_info"] == {INSTANCE: ["LocalCPUBackend", len(prose_ids)]}
    assert (await api.post("/lookup", json={"tokens": [9, 9]})).json()["layout_info"] == {}

    r = await api.post("/move", json={"old_position": [INSTANCE, "LocalCPUBackend"],
                                      "new_position": [INSTANCE, "LocalDiskBackend"],
                                      "tokens": prose_ids, "should_copy": False})
    ev = await wait_event(api, r.json()["event_id"])
    assert ev["status"] == "finished" and r.json()["num_tokens"] == len(prose_ids)
    r = await api.post("/lookup", json={"tokens": prose_ids})
    assert r.json()["layout_info"] == {INSTANCE: ["LocalDiskBackend", len(prose_ids)]}

    r = await api.post("/pin", json={"instance_id": INSTANCE, "location": "LocalDiskBackend",
                                     "tokens": prose_ids})
    ev = await wait_event(api, r.json()["event_id"])
    n_chunks = -(-len(prose_ids) // 256)
    assert ev["chunks_done"] == n_chunks
    assert api.runtime.backends["LocalDiskBackend"].stats().pinned_chunks == n_chunks

    r = await api.post("/clear", json={"instance_id": INSTANCE, "location": "LocalDiskBackend"})
    assert r.json()["num_tokens"] == len(prose_ids)
    assert api.runtime.backends["LocalDiskBackend"].stats().chunks == 0


async def test_events_list_filters(api):
    await wait_event(api, (await api.post("/compress", json=body([1]))).json()["event_id"])
    r = await api.get("/events", params={"status": "finished"})
    assert [e["op"] for e in r.json()["events"]] == ["compress"]
    assert (await api.get("/events", params={"status": "done"})).status_code == 422


async def test_health_workers_codecs_metrics(api, prose_ids, prose_kv):
    r = await api.post("/health", json={"instance_id": INSTANCE})
    assert r.json()["error_codes"] == {"0": 0}
    r = await api.post("/query_worker_info", json={"instance_id": INSTANCE})
    info = r.json()["worker_infos"][0]
    assert {loc["location"] for loc in info["locations"]} == {"LocalCPUBackend",
                                                             "LocalDiskBackend"}
    r = await api.get("/codecs")
    assert "cachegen" in r.json()["methods"] and "raw" in r.json()["methods"]

    api.runtime.store_kv(prose_ids, prose_kv)
    await wait_event(api, (await api.post("/compress", json=body(prose_ids))).json()["event_id"])
    text = (await api.get("/metrics")).text
    assert 'kvctl_events_total{op="compress",status="finished"} 1.0' in text
    n_chunks = -(-len(prose_ids) // 256)
    assert f'kvctl_store_chunks{{location="LocalCPUBackend"}} {float(n_chunks)}' in text
    assert "kvctl_queue_depth 0.0" in text
    saved = [ln for ln in text.splitlines() if ln.startswith("kvctl_bytes_saved_total")]
    assert saved and float(saved[0].split()[-1]) > 0


async def test_openapi_page(api):
    r = await api.get("/openapi.json")
    assert "/compress" in r.json()["paths"] and "/check_finish" in r.json()["paths"]


async def test_remote_backend_compress(redis_url, prose_ids, prose_kv):
    # Redis alone: write-through and read-through go to it only
    settings = ServerSettings(model="none", remote_url=redis_url, local_cpu=False,
                              lmcache_instance_id="redis-test")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        rt = app.state.runtime
        rt.backends["RemoteBackend"].clear()
        rt.store_kv(prose_ids, prose_kv)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as c:
            c.runtime = rt  # type: ignore[attr-defined]
            r = await c.post("/compress", json=body(prose_ids, instance_id="redis-test",
                                                    location="RemoteBackend"))
            assert r.json()["num_tokens"] == len(prose_ids)
            ev = await wait_event(c, r.json()["event_id"])
            assert ev["status"] == "finished" and 0 < ev["bytes_after"] < ev["bytes_before"]
        n, kv = rt.load_prefix(prose_ids)
        assert n == len(prose_ids) and kv.shape == prose_kv.shape
