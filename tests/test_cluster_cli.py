"""`kvctl events watch --all` follows events created after it started (real controller app)."""

from __future__ import annotations

import json
import threading
from typing import Any

from kvctl import client as kvclient
from tests.test_cli import INSTANCE, ids_arg, kvctl, store


class Hooked:
    """The real app's TestClient; the first listing of new events first creates one more.

    That puts the new event's creation after the watch began, with no sleep or timing.
    """

    def __init__(self, http: Any, on_poll: Any) -> None:
        self.http = http
        self.on_poll = on_poll
        self.polled = False

    def request(self, method: str, path: str, **kw: Any) -> Any:
        if method == "GET" and path == "/events" and (kw.get("params") or {}).get("limit") \
                and not self.polled:
            self.polled = True
            self.on_poll()
        return self.http.request(method, path, **kw)


def test_watch_all_follows_events_created_after_it_starts(cli_server):
    first, later = list(range(5000, 5300)), list(range(6000, 6300))
    store(cli_server, first)
    store(cli_server, later)
    rt = cli_server.state.runtime
    # Hold the worker's only job thread so the first event is still queued when the
    # watch starts; released once the later event exists.
    gate = threading.Event()
    rt._pool.submit(gate.wait, 60)
    e1 = json.loads(kvctl("compress", "--tokens", ids_arg(first), "--json").stdout)["event_id"]

    http = kvclient._http_factory("http://testserver", 30)  # the fixture's TestClient
    created: list[str] = []

    def create_later() -> None:
        r = http.post("/compress", json={"instance_id": INSTANCE, "method": "cachegen",
                                         "location": "LocalCPUBackend", "tokens": later})
        created.append(r.json()["event_id"])
        gate.set()

    hooked = Hooked(http, create_later)
    kvclient.set_http_factory(lambda url, timeout: hooked)  # type: ignore[arg-type,return-value]
    r = kvctl("events", "watch", "--all", "--json")
    gate.set()
    assert r.exit_code == 0, r.stderr
    watched = {ev["event_id"]: ev["status"] for ev in json.loads(r.stdout)}
    assert created and watched == {e1: "finished", created[0]: "finished"}
