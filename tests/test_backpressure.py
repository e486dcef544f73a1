"""Bounded job queue (429 + Retry-After, nothing accepted is lost) and event retention."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.cliutil import INSTANCE, run_cli, serve_app

QUEUE = 3


def _compress(url: str, ids: list[int]) -> httpx.Response:
    return httpx.post(url + "/compress", json={"instance_id": INSTANCE, "method": "cachegen",
                                               "location": "LocalCPUBackend", "tokens": ids},
                      timeout=60)


def _wait_ended(url: str, event_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = httpx.get(f"{url}/events/{event_id}", timeout=30).json()
        if ev["status"] in ("finished", "failed"):
            return ev
        time.sleep(0.05)
    raise AssertionError(f"{event_id} still {ev['status']} after {timeout} s")


@pytest.fixture
def busy_server(cli_env, monkeypatch, prose_ids, prose_kv):
    """A controller whose queue holds QUEUE jobs and whose one codec thread is held by a
    gate until the test opens it (a codec that is slow for as long as the test needs; a
    real slow job could finish at any moment and make the flood's outcome a race)."""
    from kvctl.server.config import ServerSettings
    from kvctl.server.http.app import create_app

    app = create_app(ServerSettings(model="none", codec_threads=1, max_queued_jobs=QUEUE))
    gate = threading.Event()
    with serve_app(app) as url:
        rt = app.state.runtime
        rt.store_kv(prose_ids, prose_kv)
        held = rt._pool.submit(gate.wait)
        monkeypatch.setenv("KVCTL_CONTROLLER", url)
        try:
            yield url, gate
        finally:
            gate.set()
            held.result(30)


def test_full_queue_answers_429_and_loses_nothing(busy_server, prose_ids):
    url, gate = busy_server
    answers = [_compress(url, prose_ids) for _ in range(QUEUE + 4)]
    accepted = [r.json()["event_id"] for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code != 200]
    assert len(accepted) == QUEUE
    assert len(refused) == 4
    for r in refused:
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
        assert "busy" in r.json()["detail"] and "max_queued_jobs" in r.json()["detail"]
    # a refused request left no event behind
    listed = httpx.get(url + "/events", timeout=30).json()
    ids = {e["event_id"] for e in listed["events"]}
    assert ids == set(accepted)

    # the CLI says so in one line, with a non-zero exit and no traceback
    r = run_cli("compress", "--tokens", ",".join(map(str, prose_ids)), expected_exit_code=2)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "429" in lines[0] and "busy" in lines[0]
    assert "Traceback" not in r.stderr

    gate.set()
    for eid in accepted:
        ev = _wait_ended(url, eid)
        assert ev["status"] == "finished", ev
        assert ev["chunks_done"] == ev["chunks_total"] > 0
    # drained: accepted again
    again = _compress(url, prose_ids)
    assert again.status_code == 200, again.text
    assert _wait_ended(url, again.json()["event_id"])["status"] == "finished"


def test_event_history_is_bounded_by_count_and_age():
    from kvctl.server.events import EventTable

    table = EventTable(max_events=10, retention_s=600)
    running = [table.create("pin", "i", None, "LocalCPUBackend", 1, 1) for _ in range(3)]
    for ev in running:
        table.start(ev)
    ended = []
    for _ in range(20):
        ev = table.create("compress", "i", "cachegen", "LocalCPUBackend", 1, 1)
        table.finish(ev)
        ended.append(ev)
    listed = [e["event_id"] for e in table.list()]
    # count: never more than max_events, the newest ended ones kept, no running one dropped
    assert len(listed) == 10
    assert {ev.event_id for ev in running} <= set(listed)
    assert [e for e in listed if e.startswith("compress")] == [e.event_id for e in ended[-7:]]

    # age: an event that ended longer ago than retention_s is gone; a running one stays
    # however old it is (the clock is moved by back-dating, not by waiting)
    # (the clock is moved by back-dating: every event was created two hours ago, the
    # oldest kept one ended just past the retention, the others ended just now)
    oldest = ended[-7]
    assert table.get(oldest.event_id) is not None
    for ev in running + ended[-7:]:
        table.record(ev, created_at=time.time() - 7200)
    table.record(oldest, finished_at=time.time() - 601)
    assert table.get(oldest.event_id) is None
    assert all(table.get(ev.event_id) is not None for ev in running + ended[-6:])
    assert len(table.list()) == 9


def test_retention_settings_reach_the_runtime():
    from kvctl.server.config import ServerSettings
    from kvctl.server.worker.runtime import WorkerRuntime

    rt = WorkerRuntime(ServerSettings(model="none", max_events=50, event_retention_s=30))
    try:
        assert (rt.events.max_events, rt.events.retention_s) == (50, 30)
    finally:
        rt.close()
