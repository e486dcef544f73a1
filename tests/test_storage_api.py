"""Tiers through the controller API and the CLI, in-process: lookup detail, metrics per tier,
the lossy-stacking guard, save_unfull_chunk, remote_serde and a store that is full."""

from __future__ import annotations

import json
import logging

import anyio
import httpx
import pytest
import torch

from kvctl.server.config import ConfigError, ServerSettings, build_settings
from kvctl.server.http.app import create_app
from tests.conftest import in_process_api

pytestmark = pytest.mark.anyio

INSTANCE = "lmcache_default_instance"
CHUNK = 64


def kv_for(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, n, 2, 32, generator=gen).to(torch.float16)


async def _client(settings: ServerSettings):
    async with in_process_api(settings, base_url="http://t") as c:
        yield c


@pytest.fixture
async def api(tmp_path):
    settings = ServerSettings(model="none", chunk_size=CHUNK, local_disk=str(tmp_path / "d"),
                              max_local_disk_size=1)
    async for c in _client(settings):
        yield c


async def ended(api, event_id: str) -> dict:
    ev = await anyio.to_thread.run_sync(api.runtime.events.wait, event_id, 120)
    assert ev is not None and ev["status"] in ("finished", "failed")
    return ev


async def compress(api, method: str, tokens, location="LocalCPUBackend", **kw):
    return await api.post("/compress", json={"instance_id": INSTANCE, "method": method,
                                             "location": location, "tokens": tokens, **kw})


def samples(text: str, name: str) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


async def test_lookup_keeps_layout_info_and_adds_every_tier(api):
    ids = list(range(150))
    api.runtime.store_kv(ids, kv_for(150))
    r = (await api.post("/lookup", json={"tokens": ids})).json()
    assert r["layout_info"] == {INSTANCE: ["LocalCPUBackend", 150]}
    assert r["tiers"] == {INSTANCE: {"LocalCPUBackend": 150, "LocalDiskBackend": 150}}
    # one chunk leaves memory: the disk still holds the whole prefix and becomes the answer
    api.runtime.backends["LocalCPUBackend"].delete(api.runtime.refs(ids)[1].key)
    r = (await api.post("/lookup", json={"tokens": ids})).json()
    assert r["layout_info"] == {INSTANCE: ["LocalDiskBackend", 150]}
    assert r["tiers"] == {INSTANCE: {"LocalCPUBackend": 64, "LocalDiskBackend": 150}}
    r = (await api.post("/lookup", json={"tokens": [7, 7]})).json()
    assert r["layout_info"] == {} and r["tiers"] == {}


async def test_compress_refuses_to_stack_lossy_codecs_unless_forced(api):
    ids = list(range(200))
    api.runtime.store_kv(ids, kv_for(200))
    first = await compress(api, "kivi-2", ids)
    ev = await ended(api, first.json()["event_id"])
    assert ev["status"] == "finished" and ev["warning"] is None
    assert ev["chunk_codecs"] == [["raw", "kivi-2"]] * 4

    r = await compress(api, "cachegen", ids)
    assert r.status_code == 409
    assert "4 with kivi-2" in r.json()["detail"] and "force" in r.json()["detail"]
    # the same method again is not a new loss
    again = await compress(api, "kivi-2", ids)
    assert again.status_code == 200
    assert (await ended(api, again.json()["event_id"]))["chunk_codecs"] == [["kivi-2"] * 2] * 4

    forced = await compress(api, "cachegen", ids, force=True)
    assert forced.status_code == 200 and forced.json()["num_tokens"] == 200
    ev = await ended(api, forced.json()["event_id"])
    assert ev["status"] == "finished"
    assert ev["chunk_codecs"] == [["kivi-2", "cachegen"]] * 4
    assert "kivi-2" in ev["warning"] and "both losses" in ev["warning"]
    assert api.runtime.backends["LocalCPUBackend"].stats().bytes_by_codec.keys() == {
        "cachegen"}


async def test_metrics_per_tier_and_decompress_under_the_decoded_codec(tmp_path):
    from kvctl.codecs import get_codec

    a, b = list(range(2 * CHUNK)), list(range(1000, 1000 + 2 * CHUNK))
    chunk_bytes = len(get_codec("raw").encode(kv_for(CHUNK)))
    # memory holds two chunks, the disk all of them
    settings = ServerSettings(model="none", chunk_size=CHUNK, local_disk=str(tmp_path / "d"),
                              max_local_disk_size=1,
                              max_local_cpu_size=(2.5 * chunk_bytes) / 1024**3)
    async for api in _client(settings):
        rt = api.runtime
        rt.store_kv(a, kv_for(len(a)))
        rt.store_kv(b, kv_for(len(b), seed=1))  # evicts a's two chunks from memory
        n, _ = rt.load_prefix(a)  # from disk; promoted back, evicting b's
        assert n == len(a)
        r = await compress(api, "kivi-4", a, location="LocalDiskBackend")
        await ended(api, r.json()["event_id"])
        # the request names cachegen; the chunks hold kivi-4, and that is what is decoded
        r = await api.post("/decompress", json={"instance_id": INSTANCE, "method": "cachegen",
                                                "location": "LocalDiskBackend", "tokens": a})
        assert (await ended(api, r.json()["event_id"]))["chunk_codecs"] == [
            ["kivi-4", "raw"]] * 2
        text = (await api.get("/metrics")).text
        evict = samples(text, "kvctl_tier_evictions_total")
        hits = samples(text, "kvctl_tier_hits_total")
        misses = samples(text, "kvctl_tier_misses_total")
        chunks = samples(text, "kvctl_codec_chunks_total")
        by_codec = samples(text, "kvctl_store_codec_bytes")
    mem, disk = (("location", "LocalCPUBackend"),), (("location", "LocalDiskBackend"),)
    assert evict[mem] == 4 and evict[disk] == 0
    assert hits[mem] == 0 and hits[disk] == 2 and misses[mem] == 2 and misses[disk] == 0
    assert chunks[(("method", "kivi-4"), ("op", "decompress"))] == 2
    assert (("method", "cachegen"), ("op", "decompress")) not in chunks
    # a's two chunks went through kivi-4 and back: their raw blobs carry that history
    decoded_bytes = len(get_codec("raw").encode(kv_for(CHUNK), history=["kivi-4"]))
    assert by_codec[(("codec", "raw"), ("location", "LocalDiskBackend"))] == (
        2 * chunk_bytes + 2 * decoded_bytes)
    assert by_codec[(("codec", "raw"), ("location", "LocalCPUBackend"))] == 2 * chunk_bytes


async def test_save_unfull_chunk_false_keeps_only_whole_chunks(tmp_path):
    settings = ServerSettings(model="none", chunk_size=CHUNK, save_unfull_chunk=False)
    async for api in _client(settings):
        ids = list(range(150))
        assert api.runtime.store_kv(ids, kv_for(150)) == 2
        r = (await api.post("/lookup", json={"tokens": ids})).json()
        assert r["tiers"] == {INSTANCE: {"LocalCPUBackend": 128}}


async def test_a_full_store_is_not_an_error(tmp_path):
    settings = ServerSettings(model="none", chunk_size=CHUNK,
                              max_local_cpu_size=1000 / 1024**3)  # smaller than one chunk
    async for api in _client(settings):
        assert api.runtime.store_kv(list(range(100)), kv_for(100)) == 0
        text = (await api.get("/metrics")).text
        fails = samples(text, "kvctl_tier_store_failures_total")
        assert fails[(("location", "LocalCPUBackend"),)] == 1


@pytest.mark.model
async def test_completion_with_a_full_store_is_served_uncached(lm, smollm2_tokenizer):
    from kvctl.server.engine.core import Engine, create_engine_app

    settings = ServerSettings(model="none", max_local_cpu_size=1000 / 1024**3)
    controller = create_app(settings)
    async with controller.router.lifespan_context(controller):
        rt = controller.state.runtime
        engine = create_engine_app(rt, engine=Engine(lm, smollm2_tokenizer, rt, [lm.name]))
        async with engine.router.lifespan_context(engine):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=engine),
                                         base_url="http://e") as e:
                for _ in range(2):
                    r = await e.post("/v1/completions", json={
                        "prompt": "Name three colours.", "max_tokens": 2, "temperature": 0})
                    assert r.status_code == 200, r.text
                    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


# ----------------------------------------------------------------------- config ----
def test_remote_serde_and_ignored_lmcache_keys(tmp_path, caplog):
    p = tmp_path / "c.yaml"
    p.write_text("remote_serde: cachegen\nsave_unfull_chunk: false\ncache_policy: LRU\n"
                 "enable_blending: true\nuse_layerwise: false\n")
    with caplog.at_level(logging.WARNING):
        s = build_settings(p)
    assert s.remote_method == "cachegen" and s.save_unfull_chunk is False
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1
    assert "enable_blending, use_layerwise" in warned[0] and "no effect" in warned[0]
    assert build_settings(None, {"remote_serde": "naive"}).remote_method == "raw"
    assert build_settings(None, {"remote_serde": "kivi-2"}).remote_method == "kivi-2"
    with pytest.raises(ConfigError, match=r"remote_serde.*unknown serde 'zstd'"):
        build_settings(None, {"remote_serde": "zstd"})


def test_other_cache_policy_warns(tmp_path, caplog):
    p = tmp_path / "c.yaml"
    p.write_text("cache_policy: LFU\n")
    with caplog.at_level(logging.WARNING):
        build_settings(p)
    assert "cache_policy" in caplog.records[0].getMessage()


# -------------------------------------------------------------------------- CLI ----
def test_cli_force_and_lookup_per_tier(cli_server):
    from tests.cliutil import run_cli
    from tests.test_cli import ids_arg, store

    ids = list(range(4000, 4300))
    store(cli_server, ids)
    r = run_cli("lookup", "--tokens", ids_arg(ids))
    rows = [ln for ln in r.stdout.splitlines() if "Backend" in ln]
    assert len(rows) == 2 and "best" in rows[0] and "LocalCPUBackend" in rows[0]
    assert "LocalDiskBackend" in rows[1] and "300/300" in rows[1]

    run_cli("compress", "--tokens", ids_arg(ids), "-m", "int8", "--wait", "--json")
    # refused by the controller (HTTP 4xx): kvctl's "rejected" exit code
    r = run_cli("compress", "--tokens", ids_arg(ids), "-m", "cachegen", expected_exit_code=2)
    assert "int8" in r.stderr and "--force" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli("compress", "--tokens", ids_arg(ids), "-m", "cachegen", "--force", "--wait",
                "--json")
    ev = json.loads(r.stdout)
    assert ev["status"] == "finished" and ev["chunk_codecs"] == [["int8", "cachegen"]] * 2
    assert "both losses" in r.stderr


async def test_redis_down_leaves_memory_serving_and_tiers_recover(redis_proc, monkeypatch):
    from kvctl.server.storage import tiers

    settings = ServerSettings(model="none", chunk_size=CHUNK, remote_url=redis_proc.url,
                              lmcache_instance_id=INSTANCE)
    async for api in _client(settings):
        rt = api.runtime
        ids = list(range(128))
        redis_proc.stop()
        assert rt.store_kv(ids, kv_for(128)) == 2  # memory took both; Redis failed
        r = await api.post("/lookup", json={"tokens": ids})
        assert r.status_code == 200
        assert r.json()["tiers"] == {INSTANCE: {"LocalCPUBackend": 128}}
        assert rt.load_prefix(ids)[0] == 128
        text = (await api.get("/metrics")).text
        assert samples(text, "kvctl_tier_store_failures_total")[
            (("location", "RemoteBackend"),)] == 1
        # inside the retry interval nobody waited on Redis again
        assert samples(text, "kvctl_tier_read_failures_total")[
            (("location", "RemoteBackend"),)] == 0

        monkeypatch.setattr(tiers, "RETRY_AFTER_S", 0.0)
        rt.store._down_until.clear()
        redis_proc.start()
        assert rt.store_kv(ids, kv_for(128)) == 2  # only Redis lacked them
        r = await api.post("/lookup", json={"tokens": ids})
        assert r.json()["tiers"] == {INSTANCE: {"LocalCPUBackend": 128, "RemoteBackend": 128}}


def _hold_jobs(api):
    """Keep the worker's job thread busy until the returned event is set, so that jobs
    scheduled meanwhile wait in its queue (max codec_threads=1 job runs at a time)."""
    import threading

    gate = threading.Event()
    api.runtime._pool.submit(gate.wait, 120)
    return gate


async def test_lossy_guard_decides_when_the_job_runs(api):
    ids = list(range(200))
    api.runtime.store_kv(ids, kv_for(200))
    gate = _hold_jobs(api)
    first = await compress(api, "kivi-2", ids)
    # the chunks are raw when these are scheduled, kivi-2 when they run
    unforced = await compress(api, "cachegen", ids)
    forced = await compress(api, "cachegen", ids, force=True)
    assert [r.status_code for r in (first, unforced, forced)] == [200, 200, 200]
    gate.set()
    assert (await ended(api, first.json()["event_id"]))["status"] == "finished"
    ev = await ended(api, unforced.json()["event_id"])
    assert ev["status"] == "failed" and ev["chunks_done"] == 0
    assert "chunk 0 (tokens 0-64) in LocalCPUBackend already went through the lossy kivi-2" \
        in ev["error"] and "force" in ev["error"]
    ev = await ended(api, forced.json()["event_id"])
    assert ev["status"] == "finished" and ev["chunk_codecs"] == [["kivi-2", "cachegen"]] * 4
    assert ev["warning"] == ("forced: 4 of 4 chunks were already lossy (4 with kivi-2); their "
                             "cachegen encoding carries both losses")


async def test_decompress_keeps_the_loss_history_with_the_chunk(api):
    from kvctl.codecs import peek_blob

    ids = list(range(200))
    api.runtime.store_kv(ids, kv_for(200))
    mem = api.runtime.backends["LocalCPUBackend"]
    key = api.runtime.refs(ids)[0].key

    async def run(path: str, method: str, **kw) -> dict:
        r = await api.post(path, json={"instance_id": INSTANCE, "method": method,
                                       "location": "LocalCPUBackend", "tokens": ids, **kw})
        assert r.status_code == 200, r.text
        return await ended(api, r.json()["event_id"])

    assert (await run("/compress", "kivi-2"))["status"] == "finished"
    assert (await run("/decompress", "kivi-2"))["status"] == "finished"
    info = peek_blob(mem.get(key))
    assert info.codec == "raw" and info.history == ("kivi-2",)
    # raw now, but the chunk remembers kivi-2: another lossy method is refused
    ev = await run("/compress", "cachegen")
    assert ev["status"] == "failed" and "kivi-2" in ev["error"]
    # the same method again is no new loss
    assert (await run("/compress", "kivi-2"))["warning"] is None
    assert peek_blob(mem.get(key)).history == ("kivi-2",)
    await run("/decompress", "kivi-2")
    ev = await run("/compress", "cachegen", force=True)
    assert ev["status"] == "finished" and "4 with kivi-2" in ev["warning"]
    await run("/decompress", "cachegen")
    assert peek_blob(mem.get(key)).history == ("kivi-2", "cachegen")


def test_blob_history_round_trips_and_is_bounded():
    import zlib

    from kvctl.codecs import CodecError, decode_blob, get_codec, peek_blob

    kv = kv_for(8)
    plain = get_codec("int8").encode(kv)
    assert peek_blob(plain).history == () and b"history" not in plain
    blob = get_codec("int8").encode(kv, history=["kivi-2", "cachegen"])
    assert peek_blob(blob, verify=True).history == ("kivi-2", "cachegen")
    assert torch.equal(decode_blob(blob), decode_blob(plain))
    with pytest.raises(CodecError, match="history"):
        get_codec("raw").encode(kv, history=["m"] * 17)
    # a forged header (checksum recomputed) whose history is not a list of names
    from kvctl.codecs import blob as fmt

    info, payload = fmt.unpack(plain)
    header = json.dumps({"codec": info.codec, "params": info.params, "shape": info.shape,
                         "dtype": info.dtype, "history": [1]}).encode()
    body = (fmt._PREFIX.pack(fmt.MAGIC, fmt.FORMAT_VERSION, 0, len(header)) + header
            + fmt._PAYLEN.pack(len(payload)) + bytes(payload))
    forged = body + fmt._CRC.pack(zlib.crc32(body))
    with pytest.raises(CodecError, match="history"):
        peek_blob(forged, verify=True)
