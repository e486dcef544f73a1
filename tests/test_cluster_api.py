"""The controller's registry and routing, in-process (httpx over ASGI, lifespan running)."""

from __future__ import annotations

import time

import anyio
import pytest

from kvctl.server.config import ServerSettings
from tests.conftest import free_port, in_process_api

pytestmark = pytest.mark.anyio

INSTANCE = "lmcache_default_instance"


@pytest.fixture
async def api():
    settings = ServerSettings(model="none", heartbeat_interval_s=0.2, dead_after_s=1.0,
                              worker_timeout_s=2.0, codec_pool="thread")
    async with in_process_api(settings, base_url="http://127.0.0.1") as client:
        yield client


def beat(instance_id: str, url: str) -> dict:
    return {"instance_id": instance_id, "url": url, "chunk_size": 256,
            "locations": [{"location": "LocalCPUBackend", "chunks": 3, "bytes": 300,
                           "capacity_bytes": 1000, "pinned_chunks": 0}]}


async def test_embedded_worker_is_listed_alive(api):
    [w] = (await api.get("/workers")).json()["workers"]
    assert w["instance_id"] == INSTANCE and w["state"] == "alive"
    assert {loc["location"] for loc in w["locations"]} == {"LocalCPUBackend"}


async def test_refused_request_leaves_no_event(api):
    r = await api.post("/compress", json={"instance_id": INSTANCE, "method": "cachegen",
                                          "location": "GPU", "tokens": [1, 2]})
    assert r.status_code == 404 and "LocalCPUBackend" in r.json()["detail"]
    assert (await api.get("/events")).json()["events"] == []


async def test_silent_worker_turns_dead_and_its_work_is_refused_at_once(api):
    url = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    r = await api.post("/workers/register", json=beat("ghost", url))
    assert r.status_code == 200 and r.json()["heartbeat_interval_s"] == 0.2
    body = {"instance_id": "ghost", "method": "cachegen", "location": "LocalCPUBackend",
            "tokens": [1, 2, 3]}

    # registered and fresh, but unreachable: 503 naming the address, the event says why
    r = await api.post("/compress", json=body)
    assert r.status_code == 503 and url in r.json()["detail"]
    [ev] = (await api.get("/events", params={"status": "failed"})).json()["events"]
    assert ev["instance_id"] == "ghost" and "did not confirm" in ev["error"]

    deadline = time.monotonic() + 10
    while True:
        h = (await api.post("/health", json={"instance_id": "ghost"})).json()
        if h["workers"][0]["state"] == "dead":
            break
        assert time.monotonic() < deadline, "never marked dead"
        await anyio.sleep(0.1)
    assert h["error_codes"] == {"0": 2}
    r = await api.post("/compress", json=body)
    assert r.status_code == 503 and "no heartbeat" in r.json()["detail"]

    # a heartbeat brings it back
    await api.post("/workers/heartbeat", json=beat("ghost", url))
    workers = {w["instance_id"]: w for w in (await api.get("/workers")).json()["workers"]}
    assert workers["ghost"]["state"] == "alive" and workers[INSTANCE]["state"] == "alive"


async def test_lookup_skips_unreachable_workers(api):
    await api.post("/workers/register", json=beat("ghost", f"http://127.0.0.1:{free_port()}"))
    r = await api.post("/lookup", json={"tokens": [7, 8, 9]})
    assert r.status_code == 200 and r.json()["layout_info"] == {}


async def test_heartbeat_body_is_validated(api):
    r = await api.post("/workers/heartbeat", json={"instance_id": "x"})
    assert r.status_code == 422 and "url" in r.json()["detail"]
