"""`kvctl workers` (bytes per codec, hit rates), `kvctl health` (the whole cluster) and
`kvctl events list` (instance and error columns, filters) against the real controller app
on a loopback port (the `cli_server` fixture). Chunks enter as another worker's would
(`import_chunk`), and are read the way the engine reads them (the tiered store's `load`).
"""

from __future__ import annotations

import json

import httpx
import torch
from fastapi import FastAPI

from kvctl.codecs import get_codec
from kvctl.server.worker.jobs import checksum
from tests.cliutil import INSTANCE, run_cli, serve_app
from tests.conftest import free_port

DISK = "LocalDiskBackend"
MEMORY = "LocalCPUBackend"
CHUNK = 256


def put_chunks(server, ids: list[int], location: str, corrupt: bool = False) -> None:
    rt = server.state.runtime
    gen = torch.Generator().manual_seed(len(ids))
    for ref in rt.refs(ids):
        kv = torch.randn(2, 2, ref.num_tokens, 2, 16, generator=gen).to(torch.float16)
        blob = bytearray(get_codec("raw").encode(kv))
        if corrupt:  # the header still reads; the payload's checksum does not match
            blob[-5] ^= 0xFF
        rt.import_chunk(location, ref.key, bytes(blob), ref.num_tokens, checksum(bytes(blob)))


def ids_arg(ids: list[int]) -> str:
    return ",".join(map(str, ids))


def test_workers_shows_bytes_per_codec_and_hit_rates(cli_server):
    ids = list(range(5000, 5000 + 2 * CHUNK))
    put_chunks(cli_server, ids, DISK)
    r = run_cli("compress", "--tokens", ids_arg(ids), "--location", DISK, "--wait", "--json")
    assert json.loads(r.stdout)["status"] == "finished"
    # the engine's read of the two chunks and one more that no tier holds: disk serves 2 of
    # its 3 lookups; memory misses all 3 (the two then get promoted into it)
    rt = cli_server.state.runtime
    got = rt.store.load(rt.refs([*ids, *range(9000, 9000 + CHUNK)]))
    assert got.served_by == {DISK: 2}

    [w] = json.loads(run_cli("workers", "--json").stdout)["workers"]
    locs = {loc["location"]: loc for loc in w["locations"]}
    assert (locs[DISK]["hits"], locs[DISK]["misses"]) == (2, 1)
    assert (locs[MEMORY]["hits"], locs[MEMORY]["misses"]) == (0, 3)
    assert set(locs[DISK]["bytes_by_codec"]) == {"cachegen"}
    assert 0 < locs[DISK]["bytes_by_codec"]["cachegen"] == locs[DISK]["bytes"]
    assert locs[DISK]["read_failures"] == locs[DISK]["evictions"] == 0

    table = run_cli("workers").stdout
    assert "hit rate" in table and "bytes per codec" in table
    # the second table: location, hit rate, read failures, evictions, bytes per codec
    rows = {line.split("│")[1].strip(): line for line in table.splitlines() if "% of" in line}
    assert "67% of 3" in rows[DISK] and "cachegen" in rows[DISK]
    assert "0% of 3" in rows[MEMORY]


def test_health_without_an_instance_reports_the_whole_cluster(cli_server):
    r = run_cli("health", "--json")
    reply = json.loads(r.stdout)
    assert reply["healthy"] is True
    assert reply["instances"] == {INSTANCE: {"error_codes": {"0": 0}}}
    assert "instance" in run_cli("health").stdout

    # a second instance whose worker cannot be reached: the controller marks it 2
    dead = f"http://127.0.0.1:{free_port()}"
    httpx.post(cli_server.state.url + "/workers/register", json={
        "instance_id": "ghost", "url": dead, "chunk_size": CHUNK}, timeout=10
    ).raise_for_status()
    r = run_cli("health", "--json", expected_exit_code=1)
    reply = json.loads(r.stdout)
    assert reply["healthy"] is False and set(reply["instances"]) == {INSTANCE, "ghost"}
    assert reply["instances"]["ghost"]["error_codes"] == {"0": 2}
    assert r.stderr == "error: 1 of 2 workers unhealthy: ghost worker 0 (alive, code 2)\n"

    # one instance, as before, with --instance-id
    r = run_cli("--instance-id", INSTANCE, "health", "--json")
    assert json.loads(r.stdout)["error_codes"] == {"0": 0}


def test_events_list_filters_and_shows_instance_and_error(cli_server):
    good, bad = list(range(6000, 6000 + CHUNK)), list(range(7000, 7000 + CHUNK))
    put_chunks(cli_server, good, MEMORY)
    put_chunks(cli_server, bad, MEMORY, corrupt=True)
    ok = json.loads(run_cli("compress", "--tokens", ids_arg(good), "-m", "kivi-2", "--wait",
                            "--json").stdout)
    r = run_cli("compress", "--tokens", ids_arg(bad), "--wait", "--json", expected_exit_code=1)
    failed = json.loads(r.stdout)
    assert ok["status"] == "finished" and failed["status"] == "failed" and failed["error"]

    def listed(*args: str) -> list[str]:
        return [e["event_id"] for e in json.loads(run_cli("events", "list", "--json",
                                                          *args).stdout)]

    both = [ok["event_id"], failed["event_id"]]
    assert listed() == both
    assert listed("--instance", INSTANCE) == both
    assert listed("--instance", "nope") == []
    assert listed("--status", "failed") == [failed["event_id"]]
    assert listed("--method", "kivi-2") == [ok["event_id"]]
    assert listed("--method", "kivi") == [ok["event_id"]]  # every level of the codec
    assert listed("--method", "cachegen", "--status", "finished") == []

    table = run_cli("events", "list").stdout
    assert "instance" in table and "error" in table
    # cut to fit 80 columns, never dropped
    assert INSTANCE[:7] in table and failed["error"][:7] in table
    assert run_cli("events", "list", "--instance", "nope").stdout == (
        "no events with instance nope\n")
    r = run_cli("events", "list", "--method", " ", expected_exit_code=2)
    assert "--method needs a value" in r.stderr


def upstream_with_health() -> FastAPI:
    """Upstream LMCache's controller: per-instance /health, no /workers to list a cluster."""
    app = FastAPI()

    @app.post("/compress")
    async def compress() -> dict:
        return {"event_id": "ev-1", "num_tokens": 12}

    @app.post("/health")
    async def health(body: dict) -> dict:
        return {"event_id": "h-1", "error_codes": {"0": 0} if body.get("instance_id") ==
                INSTANCE else {}}

    return app


def test_health_on_upstream_lmcache_asks_for_the_default_instance(cli_env):
    with serve_app(upstream_with_health()) as url:
        r = run_cli("health", "--json", "--controller", url)
        assert json.loads(r.stdout)["error_codes"] == {"0": 0}
        r = run_cli("--instance-id", "other", "health", "--controller", url,
                    expected_exit_code=1)
        assert r.stderr == "error: other: no workers registered\n"
