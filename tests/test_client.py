"""ControllerClient: one method per endpoint against the real app; HTTP faults as KvctlError."""

from __future__ import annotations

import httpx
import pytest
from starlette.testclient import TestClient

from kvctl.client import ControllerClient, ControllerError, UntrackedEvents
from kvctl.errors import KvctlError
from kvctl.server.app import create_app
from kvctl.server.config import ServerSettings
from tests.conftest import free_port

INSTANCE = "lmcache_default_instance"


@pytest.fixture
def controller():
    app = create_app(ServerSettings(model="none"))
    with TestClient(app) as http:
        yield ControllerClient("http://testserver", 5, http=http), app.state.runtime


def stub(handler) -> ControllerClient:
    return ControllerClient("http://ctl:9000", 5,
                            http=httpx.Client(transport=httpx.MockTransport(handler),
                                              base_url="http://ctl:9000"))


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
    assert [e["event_id"] for e in client.events(status="finished")] == [reply["event_id"]]
    assert client.codecs()["default"] == "cachegen"
    assert list(client.health(INSTANCE)["error_codes"].values()) == [0]
    assert client.query_worker_info(INSTANCE)["worker_infos"][0]["instance_id"] == INSTANCE


def test_4xx_carries_the_detail(controller):
    client, _ = controller
    with pytest.raises(ControllerError) as info:
        client.compress("nope", "cachegen", "LocalCPUBackend", [1])
    assert info.value.status == 404 and "unknown instance_id 'nope'" in info.value.message
    assert info.value.exit_code == 1


def test_connection_refused():
    url = f"http://127.0.0.1:{free_port()}"
    with ControllerClient(url, 5) as client, pytest.raises(KvctlError) as info:
        client.codecs()
    assert info.value.message.startswith(f"cannot reach the controller at {url}")


def test_timeout_and_non_json():
    def slow(req: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=req)

    with pytest.raises(KvctlError, match="did not answer /codecs within 5 s"):
        stub(slow).codecs()
    with pytest.raises(KvctlError, match="not JSON"):
        stub(lambda req: httpx.Response(200, text="<html>")).codecs()


def test_upstream_lmcache_check_finish_500_is_explained():
    def upstream(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/check_finish":
            return httpx.Response(500, text="Internal Server Error")
        return httpx.Response(404, json={"detail": "Not Found"})

    with pytest.raises(UntrackedEvents, match="finishes each operation before it answers"):
        stub(upstream).event("abc")
    with pytest.raises(KvctlError, match="upstream LMCache's has no /codecs"):
        stub(upstream).codecs()


def test_event_falls_back_to_check_finish():
    def partial(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/check_finish":
            return httpx.Response(200, json={"event_id": "abc", "status": "running"})
        return httpx.Response(404, json={"detail": "Not Found"})

    assert stub(partial).event("abc") == {"event_id": "abc", "status": "running"}


def test_injected_client_is_left_open():
    http = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200, json={})))
    with ControllerClient("http://x", 1, http=http):
        pass
    assert not http.is_closed
