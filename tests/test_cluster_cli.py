"""`kvctl events watch --all` follows events created after it started (real controller app)."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx

from kvctl.commands.events import NEW_EVENTS_WINDOW
from tests.cliutil import INSTANCE, run_cli
from tests.test_cli import ids_arg, store


def test_watch_all_follows_events_created_after_it_starts(cli_server, monkeypatch):
    first, later = list(range(5000, 5300)), list(range(6000, 6300))
    store(cli_server, first)
    store(cli_server, later)
    rt = cli_server.state.runtime
    ctl = cli_server.state.controller
    # Hold the worker's only job thread so the first event is still queued when the
    # watch starts; released once the later event exists.
    gate = threading.Event()
    rt._pool.submit(gate.wait, 60)
    e1 = json.loads(run_cli("compress", "--tokens", ids_arg(first), "--json").stdout
                    )["event_id"]

    created: list[str] = []
    real_list = ctl.list_events

    async def list_events(status: str | None, limit: int | None, *args: Any, **kw: Any) -> Any:
        # The watch's first look for new events: create one just before it looks, so the
        # event is born after the watch began, with no sleep or timing involved.
        if limit == NEW_EVENTS_WINDOW and not created:
            async with httpx.AsyncClient() as c:
                r = await c.post(cli_server.state.url + "/compress", json={
                    "instance_id": INSTANCE, "method": "cachegen",
                    "location": "LocalCPUBackend", "tokens": later})
            created.append(r.json()["event_id"])
            gate.set()
        return await real_list(status, limit, *args, **kw)

    monkeypatch.setattr(ctl, "list_events", list_events)
    try:
        r = run_cli("events", "watch", "--all", "--json")
    finally:
        gate.set()
    watched = {ev["event_id"]: ev["status"] for ev in json.loads(r.stdout)}
    assert created and watched == {e1: "finished", created[0]: "finished"}


def test_without_instance_id_the_only_registered_instance_is_used(cli_env, monkeypatch):
    """`compress` without --instance-id: one instance registered is the one; with several
    the CLI names them and does nothing (`health` without it reports every instance)."""
    from kvctl.server.config import ServerSettings
    from kvctl.server.http.app import create_app
    from tests.cliutil import serve_app

    app = create_app(ServerSettings(model="none", lmcache_instance_id="node-a"))
    with serve_app(app) as url:
        monkeypatch.setenv("KVCTL_CONTROLLER", url)
        ids = list(range(7000, 7100))
        store(app, ids)
        ev = json.loads(run_cli("compress", "--tokens", ids_arg(ids), "--wait", "--json"
                                ).stdout)
        assert ev["status"] == "finished" and ev["instance_id"] == "node-a"

        # a second instance registers (its worker is not running: it only has to be listed)
        r = httpx.post(url + "/workers/register", json={
            "instance_id": "node-b", "url": "http://127.0.0.1:9", "chunk_size": 256})
        assert r.status_code == 200, r.text
        r = run_cli("compress", "--tokens", ids_arg(ids), expected_exit_code=2)
        assert r.stderr.startswith("error: 2 instances are registered with ")
        assert "(node-a, node-b); name one with --instance-id" in r.stderr
        r = run_cli("health", "--instance-id", "node-a", "--json")
        assert json.loads(r.stdout)["error_codes"] == {"0": 0}
        ev = json.loads(run_cli("decompress", "--tokens", ids_arg(ids), "--instance-id",
                                "node-a", "--wait", "--json").stdout)
        assert ev["status"] == "finished" and ev["instance_id"] == "node-a"
