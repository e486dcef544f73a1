"""The MP-fleet CLI against upstream's own `lmcache coordinator` 0.5.6, with a real `lmcache
server` joined to it holding real SmolLM2 KV: the same commands work, and kvctl says what
upstream's coordinator does not report."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytest.importorskip("lmcache", reason="LMCache is not installed: `make setup` installs it")

from tests.cliutil import run_cli
from tests.cluster_procs import wait_for
from tests.conftest import PROSE, free_port
from tests.mp_fleet import (
    MODEL_NAME,
    MPClient,
    start_mp_server,
    start_upstream_coordinator,
    stop,
)

pytestmark = [pytest.mark.e2e, pytest.mark.model]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, prose_ids, prose_kv) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("mp-upstream")
    port = free_port()
    coord = start_upstream_coordinator(tmp, port)
    server = client = None
    try:
        server = start_mp_server(tmp, f"http://127.0.0.1:{port}", name="up-server")
        client = MPClient(server)
        client.store(list(prose_ids[:512]), prose_kv[:, :, :512].contiguous())
        yield {"url": f"http://127.0.0.1:{port}", "server": server, "coord": coord}
    finally:
        if client is not None:
            client.close()
        if server is not None:
            stop(server.proc)
        stop(coord)


def tiers(url: str) -> list[list[str]]:
    r = httpx.post(url + "/directory/lookup", json={
        "model_name": MODEL_NAME, "world_size": 1,
        "token_ids": json.loads(run_cli("tokenize", PROSE, "--json").stdout)["tokens"]},
        timeout=30).json()
    return [sorted(p["tier"] for p in res["placements"]) for res in r["results"][:2]]


def test_the_cli_against_upstreams_coordinator(upstream, cli_env):
    url, server = upstream["url"], upstream["server"]
    iid = server.instance_id
    mp = ("--coordinator", url, "--model-name", MODEL_NAME)
    wait_for(lambda: tiers(url) == [["l1", "l2"], ["l1", "l2"]], 30,
             "the store did not reach upstream's directory", upstream["coord"], server.proc)

    data = json.loads(run_cli("instances", "--coordinator", url, "--json").stdout)
    assert data["coordinator"] == "lmcache"
    (row,) = data["instances"]
    assert row["instance_id"] == iid and "cursor" not in row
    assert {m["tier"] for m in row["modules"]} == {"l1", "l2"}
    assert "keeps ingest state" in run_cli("instances", "--coordinator", url).stderr

    found = json.loads(run_cli("lookup", PROSE, *mp, "--json").stdout)
    assert found["coordinator"] == "lmcache" and found["prefix_chunks"] == 2

    assert json.loads(run_cli("pin", PROSE, *mp, "--json").stdout)["status"] == "pinned"
    assert httpx.get(url + "/cache/pins", timeout=10).json()["total"] >= 2
    assert json.loads(run_cli("unpin", PROSE, *mp, "--json").stdout)["status"] == "unpinned"

    out = json.loads(run_cli("delete", PROSE, *mp, "--instance", iid, "--tier", "l1",
                             "--json").stdout)
    assert (out["status"], out["affected"]) == ("deleted", 2)
    assert server.l1_objects() == 0
    wait_for(lambda: tiers(url) == [["l2"], ["l2"]], 30, "delete not in the directory")
    out = json.loads(run_cli("prefetch", PROSE, *mp, "--instance", iid, "--wait",
                             "--json").stdout)
    assert (out["status"], out["found_keys"], out["total_keys"]) == ("completed", 2, 2)
    wait_for(lambda: tiers(url) == [["l1", "l2"], ["l1", "l2"]], 30,
             "the prefetch did not show in L1")
    assert server.l1_objects() == 2

    r = run_cli("prefetch", PROSE, *mp, "--instance", "nope", expected_exit_code=2)
    assert "no MP server registered with instance_id='nope'" in r.stderr
