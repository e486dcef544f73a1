"""The worker's command API (``POST /worker/ops/{op}``), served as plain ASGI: the answers,
errors and guards the controller's `HttpTransport` relies on, on a real uvicorn server."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from tests.cliutil import INSTANCE, serve_app

TOKEN = "worker-ops-test-token"


@pytest.fixture
def worker(prose_ids, prose_kv):
    """A worker app on loopback whose one codec job thread is held by a gate, with one
    queued job allowed, and the prose prompt stored."""
    from kvctl.server.config import ServerSettings
    from kvctl.server.worker.app import create_worker_app
    from kvctl.server.worker.runtime import WorkerRuntime

    rt = WorkerRuntime(ServerSettings(model="none", codec_threads=1, max_queued_jobs=1))
    rt.store_kv(prose_ids, prose_kv)
    gate = threading.Event()
    held = rt._pool.submit(gate.wait)
    try:
        with serve_app(create_worker_app(rt)) as url:
            yield url, rt
    finally:
        gate.set()
        held.result(30)
        rt.close()


def _op(url: str, op: str, body: object, **kw) -> httpx.Response:
    return httpx.post(f"{url}/worker/ops/{op}", json=body, timeout=30, **kw)


def _compress_body(ids: list[int]) -> dict:
    return {"instance_id": INSTANCE, "method": "cachegen", "location": "LocalCPUBackend",
            "tokens": ids}


def test_commands_answer_json(worker, prose_ids):
    url, rt = worker
    r = _op(url, "lookup", {"tokens": prose_ids})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    # every chunk is stored, the last partial one too (save_unfull_chunk)
    assert r.json()["layout_info"] == {INSTANCE: ["LocalCPUBackend", len(prose_ids)]}
    plan = _op(url, "chunk_plan", {"location": "LocalCPUBackend", "tokens": prose_ids}).json()
    assert len(plan) == -(-len(prose_ids) // rt.settings.chunk_size)
    assert sum(c["num_tokens"] for c in plan) == len(prose_ids)


def test_errors_carry_detail_and_kind(worker, prose_ids):
    url, _ = worker
    r = _op(url, "nope", {})
    assert r.status_code == 400 and r.json()["kind"] == "unknown_method"
    assert "nope" in r.json()["detail"] and "lookup" in r.json()["detail"]

    # bodies are checked with the controller's own schemas: 422 as the controller answers
    r = httpx.post(f"{url}/worker/ops/lookup", content=b"{not json", timeout=30)
    assert r.status_code == 422 and "Invalid JSON" in r.json()["detail"]
    r = _op(url, "lookup", [1, 2, 3])
    assert r.status_code == 422 and "should be an object" in r.json()["detail"]
    r = _op(url, "chunk_plan", {"tokens": prose_ids})  # no location
    assert r.status_code == 422 and "location: Field required" in r.json()["detail"]
    r = _op(url, "chunk_plan", {"location": "Nowhere", "tokens": prose_ids})
    assert r.status_code == 404 and r.json()["kind"] == "unknown_location"
    r = _op(url, "compress", {**_compress_body(prose_ids), "instance_id": "other"})
    assert r.status_code == 404 and r.json()["kind"] == "unknown_instance"

    r = httpx.get(f"{url}/worker/ops/lookup", timeout=30)
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_full_queue_is_429_with_retry_after_and_the_transport_raises_busy(worker, prose_ids):
    from kvctl.server.controller.transport import HttpTransport
    from kvctl.server.errors import Busy

    url, rt = worker
    first = _op(url, "compress", _compress_body(prose_ids))
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "queued"
    r = _op(url, "compress", _compress_body(prose_ids))
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["kind"] == "busy"

    async def through_transport() -> None:
        t = HttpTransport(url, INSTANCE, timeout_s=30)
        try:
            await t.call("compress", _compress_body(prose_ids))
        finally:
            await t.close()

    with pytest.raises(Busy):
        asyncio.run(through_transport())
    # the refused commands queued nothing
    assert rt.queue_depth() == 1


def test_guards_hold_on_commands(prose_ids):
    from kvctl.server.config import ServerSettings
    from kvctl.server.worker.app import create_worker_app
    from kvctl.server.worker.runtime import WorkerRuntime

    rt = WorkerRuntime(ServerSettings(model="none", auth_token=TOKEN, max_body_bytes=4096))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with serve_app(create_worker_app(rt)) as url:
            assert _op(url, "info", {}).status_code == 401
            assert _op(url, "info", {}, headers={"Authorization": "Bearer wrong"}
                       ).status_code == 401
            r = _op(url, "info", {}, headers=auth)
            assert r.status_code == 200 and r.json()["instance_id"] == INSTANCE
            # DNS rebinding: a loopback connection naming another host
            r = _op(url, "info", {}, headers={**auth, "Host": "evil.example"})
            assert r.status_code == 421
            # the body cap, by Content-Length and on a chunked stream alike
            big = {"tokens": list(range(2000))}
            r = _op(url, "lookup", big, headers=auth)
            assert r.status_code == 413
            r = httpx.post(f"{url}/worker/ops/lookup", headers=auth, timeout=30,
                           content=(b"x" * 1000 for _ in range(10)))
            assert r.status_code == 413
    finally:
        rt.close()
