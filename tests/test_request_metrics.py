"""The request histogram's labels stay bounded whatever clients send: route templates, never
ids, keys or unknown paths (in-process controller app through the ASGI transport)."""

from __future__ import annotations

import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvctl.server.config import ServerSettings
from tests.conftest import in_process_api

pytestmark = pytest.mark.anyio
NAME = "kvctl_http_request_duration_seconds_count"


def counts(text: str) -> dict[tuple[str, str, str, str], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == NAME:
                out[(s.labels["app"], s.labels["route"], s.labels["method"],
                     s.labels["code"])] = s.value
    return out


async def test_routes_are_templates_and_the_unknown_is_one_label(tmp_path):
    settings = ServerSettings(model="none", local_disk=str(tmp_path / "disk"),
                              max_local_disk_size=1)
    secrets = [uuid.uuid4().hex for _ in range(3)]
    async with in_process_api(settings) as api:
        for s in secrets:
            assert (await api.get(f"/events/{s}")).status_code == 404
            assert (await api.get(f"/no/such/{s}")).status_code == 404
            assert (await api.post(f"/worker/ops/{s}", json={})).status_code == 400
        assert (await api.post("/worker/ops/info", json={})).status_code == 200
        assert (await api.request("BREW", "/codecs")).status_code == 405
        text = (await api.get("/metrics")).text
    got = counts(text)
    assert got[("controller", "/events/{event_id}", "GET", "4xx")] == 3
    assert got[("controller", "other", "GET", "4xx")] == 3
    assert got[("controller", "/worker/ops/{op}", "POST", "4xx")] == 3
    assert got[("controller", "/worker/ops/info", "POST", "2xx")] == 1
    assert got[("controller", "/codecs", "other", "4xx")] == 1
    assert not [k for k in got if any(s in "".join(k) for s in secrets)]
    # buckets and sum come with the count
    assert f'{NAME.removesuffix("_count")}_bucket{{app="controller"' in text
