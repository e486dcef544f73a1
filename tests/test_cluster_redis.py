"""Controller state in a real redis-server: shared by two controllers, kept across kill -9."""

from __future__ import annotations

import shutil
import subprocess
import time

import anyio
import httpx
import pytest
import redis

from kvctl.common.events import FINISHED, Event
from kvctl.server.controller.state import EventRow, RedisState
from tests.cluster_procs import start_controller, start_worker, wait_event, wait_for, workers
from tests.conftest import free_port

pytestmark = pytest.mark.e2e

INSTANCE = "inst-r"


@pytest.fixture
def state_url(redis_url) -> str:
    """A database of the session's redis-server of its own, emptied first."""
    url = redis_url.rsplit("/", 1)[0] + "/3"
    redis.Redis.from_url(url).flushdb()
    return url


def compress(controller: str, tokens: list[int]) -> dict:
    r = httpx.post(controller + "/compress", json={
        "instance_id": INSTANCE, "method": "cachegen", "location": "LocalCPUBackend",
        "tokens": tokens}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def test_two_controllers_share_events_and_survive_kill9(tmp_path, state_url):
    a_ports = (free_port(), free_port())
    a = start_controller(tmp_path, "ctl-a", state=state_url, ports=a_ports)
    b = start_controller(tmp_path, "ctl-b", state=state_url)
    w = start_worker(tmp_path, INSTANCE, [a.urls["monitor"], b.urls["monitor"]], model="none")
    procs = [a, b, w]
    try:
        seen = wait_for(lambda: workers(b.urls["api"]).get(INSTANCE), 60,
                        "worker not visible through controller B", *procs)
        assert seen["state"] == "alive" and seen["url"] == w.urls["worker"]

        ev_id = compress(a.urls["api"], list(range(100, 140)))["event_id"]
        ev = wait_event(b.urls["api"], ev_id)
        assert ev["status"] == "finished" and ev["instance_id"] == INSTANCE
        listed = httpx.get(b.urls["api"] + "/events").json()["events"]
        assert ev_id in [e["event_id"] for e in listed]

        a.kill9()
        # B keeps serving the same events and workers while A is gone
        assert httpx.get(f"{b.urls['api']}/events/{ev_id}").json()["status"] == "finished"
        ev2 = compress(b.urls["api"], list(range(200, 240)))["event_id"]

        a = start_controller(tmp_path, "ctl-a2", state=state_url, ports=a_ports)
        procs[0] = a
        r = httpx.get(f"{a.urls['api']}/events/{ev_id}")
        assert r.status_code == 200 and r.json()["status"] == "finished"
        assert wait_event(a.urls["api"], ev2)["status"] == "finished"
        again = workers(a.urls["api"])[INSTANCE]
        # the same worker process, registered once: it was never restarted
        assert again["state"] == "alive" and again["registration_time"] == seen[
            "registration_time"]
        assert w.proc.poll() is None
    finally:
        for p in procs:
            p.stop()


def test_state_redis_gone_is_503_at_once(tmp_path):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    rs = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                           "--appendonly", "no", "--dir", str(tmp_path)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    wait_for(lambda: _pings(client), 20, "redis-server did not start")
    ctl = start_controller(tmp_path, "ctl-lonely", state=url)
    try:
        assert httpx.get(ctl.urls["api"] + "/events", timeout=5).status_code == 200
        rs.kill()
        rs.wait(10)
        # a timeout of 3 s turns a hang into a failure
        for path in ("/events", "/events/compress-x", "/workers"):
            r = httpx.get(ctl.urls["api"] + path, timeout=3)
            assert r.status_code == 503, (path, r.text)
            assert f"127.0.0.1:{port}" in r.json()["detail"]
        r = httpx.post(ctl.urls["api"] + "/compress", timeout=3, json={
            "instance_id": "x", "method": "cachegen", "location": "LocalCPUBackend",
            "tokens": [1]})
        assert r.status_code == 503
    finally:
        ctl.stop()
        if rs.poll() is None:
            rs.kill()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_ended_events_expire_after_the_retention(state_url):
    async def scenario() -> None:
        st = RedisState(state_url, max_events=100, retention_s=0.5)
        try:
            done = Event("compress-old", "compress", "i", "cachegen", "LocalCPUBackend", 1, 1,
                         status=FINISHED)
            open_ = Event("compress-open", "compress", "i", "cachegen", "LocalCPUBackend", 1, 1)
            await st.put_event(EventRow(done))
            await st.put_event(EventRow(open_))
            assert [r.event.event_id for r in await st.list_events(10)] == [
                "compress-old", "compress-open"]
            deadline = time.monotonic() + 10
            while (await st.get_events(["compress-old"]))[0] is not None:
                assert time.monotonic() < deadline, "ended event did not expire"
                await anyio.sleep(0.1)
            # the unended one stays; the index forgets the expired one
            assert [r.event.event_id for r in await st.list_events(10)] == ["compress-open"]
        finally:
            await st.close()

    anyio.run(scenario)
