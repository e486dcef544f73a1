"""ControllerClient against real servers on loopback ports: one method per endpoint, HTTP
faults as KvctlError, and what it says about a server that is not a controller."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from kvctl.client import ControllerError, NotAController, UntrackedEvents, classify, connect
from kvctl.errors import KvctlError
from kvctl.server.config import ServerSettings
from kvctl.server.http.app import create_app
from kvctl.settings import Settings
from tests.cliutil import INSTANCE, serve_app
from tests.conftest import free_port


@pytest.fixture
def controller():
    app = create_app(ServerSettings(model="none"))
    with serve_app(app) as url, connect(Settings(controller=url, timeout=5)) as client:
        yield client, app.state.runtime


def test_endpoints_round_trip(controller):
    import torch

    client, runtime = controller
    ids = list(range(100, 140))
    runtime.store_kv(ids, torch.zeros(2, 2, len(ids), 2, 16, dtype=torch.float16))
    assert client.lookup(ids)["layout_info"] == {INSTANCE: ["LocalCPUBackend", 40]}
    reply = client.compress(INSTANCE, "cachegen", "LocalCPUBackend", ids)
    assert reply["num_tokens"] == 40
    runtime.events.wait(reply["event_id"], 60)
    assert client.check_finish(reply["event_id"]) == {"event_id": reply["event_id"],
                                                      "status": "finished"}
    assert client.event(reply["event_id"])["chunks_done"] == 1
    short = reply["event_id"].removeprefix("compress-")[:8]
    assert client.event(short)["event_id"] == reply["event_id"]
    assert client.check_finish(short)["event_id"] == reply["event_id"]
    assert [e["event_id"] for e in client.events(status="finished")] == [reply["event_id"]]
    assert client.codecs()["default"] == "cachegen"
    assert list(client.health(INSTANCE)["error_codes"].values()) == [0]
    assert client.query_worker_info(INSTANCE)["worker_infos"][0]["instance_id"] == INSTANCE
    assert client.peer().kind == "controller"


def test_4xx_carries_the_detail_and_means_rejected(controller):
    client, _ = controller
    with pytest.raises(ControllerError) as info:
        client.compress("nope", "cachegen", "LocalCPUBackend", [1])
    assert info.value.status == 404 and "unknown instance_id 'nope'" in info.value.message
    assert info.value.exit_code == 2


def test_connection_refused():
    url = f"http://127.0.0.1:{free_port()}"
    with connect(Settings(controller=url, timeout=5)) as client, \
            pytest.raises(KvctlError) as info:
        client.codecs()
    assert info.value.message.startswith(f"cannot reach the controller at {url}")


def test_timeout_and_non_json():
    import asyncio

    app = FastAPI(title="kvctl controller")

    @app.get("/codecs")
    async def slow() -> dict:
        await asyncio.sleep(3)
        return {}

    @app.post("/health")
    async def html() -> HTMLResponse:
        return HTMLResponse("<html>")

    with serve_app(app) as url, connect(Settings(controller=url, timeout=0.3)) as client:
        with pytest.raises(KvctlError, match=r"did not answer /codecs within 0\.3 s"):
            client.codecs()
        with pytest.raises(KvctlError, match="not JSON"):
            client.health(INSTANCE)


def test_upstream_lmcache_check_finish_500_is_explained():
    from tests.test_cli import upstream_lmcache_app

    with serve_app(upstream_lmcache_app()) as url, connect(Settings(controller=url)) as client:
        with pytest.raises(UntrackedEvents, match="finishes each operation before it answers"):
            client.event("abc")
        with pytest.raises(KvctlError, match="upstream LMCache's has no /codecs"):
            client.codecs()
        assert client.peer().kind == "lmcache"


def test_event_falls_back_to_check_finish():
    app = FastAPI()

    @app.post("/check_finish")
    async def check_finish() -> dict:
        return {"event_id": "abc", "status": "running"}

    with serve_app(app) as url, connect(Settings(controller=url)) as client:
        assert client.event("abc") == {"event_id": "abc", "status": "running"}


def test_not_a_controller_is_probed_once():
    app = FastAPI(title="something")
    probes = []

    @app.middleware("http")
    async def count(request, call_next):
        if request.url.path == "/openapi.json":
            probes.append(1)
        return await call_next(request)

    with serve_app(app) as url, connect(Settings(controller=url)) as client:
        for _ in range(3):
            with pytest.raises(NotAController, match="a server titled 'something'"):
                client.lookup([1])
    assert len(probes) == 1


@pytest.mark.parametrize("spec,kind", [
    ({"info": {"title": "kvctl controller"}, "paths": {}}, "controller"),
    ({"info": {"title": "kvctl monitor"}, "paths": {}}, "monitor"),
    ({"info": {"title": "vLLM"}, "paths": {"/v1/completions": {}, "/tokenize": {}}}, "engine"),
    ({"info": {"title": "FastAPI"}, "paths": {"/lookup": {}, "/check_finish": {}}}, "lmcache"),
    ({"info": {"title": "FastAPI"}, "paths": {"/items": {}}}, "unknown"),
    (None, "unknown"),
    ([1, 2], "unknown"),
])
def test_classify(spec, kind):
    assert classify(spec).kind == kind


def test_api_description_is_served_without_a_cdn_page():
    """/docs would load Swagger UI from a CDN (blank offline): there is none; the OpenAPI
    document is where the README points."""
    import httpx

    with serve_app(create_app(ServerSettings(model="none"))) as url:
        assert httpx.get(f"{url}/docs").status_code == 404
        assert httpx.get(f"{url}/redoc").status_code == 404
        spec = httpx.get(f"{url}/openapi.json").json()
    assert spec["info"]["title"] == "kvctl controller" and "/compress" in spec["paths"]


def test_no_app_serves_a_cdn_docs_page():
    """The monitor, worker and engine apps have no /docs either (their JSON schema stays)."""
    from kvctl.server.engine.core import create_engine_app
    from kvctl.server.runner import create_monitor_app
    from kvctl.server.worker.app import create_worker_app
    from kvctl.server.worker.runtime import WorkerRuntime

    runtime = WorkerRuntime(ServerSettings(model="none"))
    apps = [create_monitor_app(create_app(ServerSettings(model="none"))),
            create_worker_app(runtime), create_engine_app(runtime, model_spec="none")]
    for app in apps:
        paths = {getattr(r, "path", None) for r in app.routes}
        assert "/docs" not in paths and "/redoc" not in paths, app.title
        assert "/openapi.json" in paths, app.title
