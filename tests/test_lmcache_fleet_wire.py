"""kvctl's LMCache 0.5.6 wire schema against the recordings and against LMCache's own classes;
the chunk-hash chain and the directory's seq_num rules. No processes: fast."""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec
import pytest

from kvctl.server.lmcache import wire
from kvctl.server.lmcache.directory import Directory, chunk_hashes

# the recordings sit beside the repository (../shared/lmcache-0.5.6) on the project's machines
REC = Path(os.environ.get("KVCTL_LMCACHE_RECORDINGS")
           or Path(__file__).resolve().parents[2] / "shared" / "lmcache-0.5.6")
needs_rec = pytest.mark.skipif(not REC.exists(), reason="LMCache 0.5.6 recordings not found")
upstream = pytest.importorskip("lmcache.v1.cache_controller.message")


def _recorded_messages() -> list[dict]:
    out = []
    for line in (REC / "legacy_wire.jsonl").read_text().splitlines():
        for m in json.loads(line)["msgs"]:
            if isinstance(m, dict):
                if m.get("tokens") and isinstance(m["tokens"][-1], str):
                    m["tokens"] = m["tokens"][:-1]  # the recorder's "...(+588)" elision
                out.append(m)
    return out


def _http_tokens() -> dict[str, list[int]]:
    """The token sequences the recorded run stored (a, c, d), by their first token."""
    seqs: dict[int, list[int]] = {}
    for line in (REC / "legacy_http.jsonl").read_text().splitlines():
        d = json.loads(line)
        toks = (d.get("req") or {}).get("tokens")
        if toks and len(toks) == 600:
            seqs.setdefault(toks[0], toks)
    return {"a": seqs[100], "c": seqs[102], "d": seqs[103]}


@needs_rec
def test_every_recorded_frame_decodes_and_reencodes_unchanged():
    msgs = _recorded_messages()
    types = {m["type"] for m in msgs}
    assert {"RegisterMsg", "HeartbeatRetMsg", "BatchedKVOperationMsg", "FullSyncStartMsg",
            "CompressWorkerMsg", "ErrorMsg", "HealthWorkerRetMsg"} <= types
    for m in msgs:
        ours = wire.decode_any(msgspec.msgpack.encode(m))
        assert type(ours).__name__ == m["type"]
        assert msgspec.to_builtins(ours) == m


def _sample(cls: type) -> msgspec.Struct:
    """A value of ``cls`` with every field set (no defaults), built from its annotations."""
    values = {
        "str": "x", "int": 7, "float": 0.5, "bool": True,
    }
    kwargs = {}
    for f in msgspec.structs.fields(cls):
        t = str(f.type)
        if f.name == "operations":
            kwargs[f.name] = [wire.KVOpEvent(wire.OpType.EVICT, -3, 4)]
        elif f.name == "commands":
            kwargs[f.name] = [wire.FullSyncCommand(reason="r")]
        elif f.name == "new_position":
            kwargs[f.name] = ("127.0.0.1:1", "LocalCPUBackend")
        elif "list[int]" in t or "list" in t:
            kwargs[f.name] = [1, -2, 2**62]
        elif "dict" in t:
            kwargs[f.name] = {"heartbeat_url": "127.0.0.1:1"}
        else:
            base = next((v for k, v in values.items() if k in t), "x")
            kwargs[f.name] = base
    return cls(**kwargs)


@pytest.mark.parametrize("name", sorted(wire.ALL_MESSAGES))
def test_schema_matches_lmcache_056_class(name):
    ours = wire.ALL_MESSAGES[name]
    theirs = getattr(upstream, name)
    assert [f.name for f in msgspec.structs.fields(ours)] == \
        [f.name for f in msgspec.structs.fields(theirs)]
    # defaults equal where upstream has one
    for a, b in zip(msgspec.structs.fields(ours), msgspec.structs.fields(theirs), strict=True):
        assert (a.default, a.required) == (b.default, b.required), (name, a.name)
    # a frame of ours is the frame LMCache decodes, field for field, and back
    frame = wire.encode(_sample(ours))
    decoded = msgspec.msgpack.decode(frame, type=upstream.Msg)
    assert type(decoded).__name__ == name
    assert msgspec.to_builtins(decoded) == msgspec.to_builtins(wire.decode_any(frame))
    assert wire.encode(wire.decode_any(msgspec.msgpack.encode(decoded))) == frame


def test_heartbeat_command_tag_is_upstreams():
    frame = wire.encode(wire.HeartbeatRetMsg(commands=[wire.FullSyncCommand(reason="why")]))
    got = msgspec.msgpack.decode(frame, type=upstream.Msg)
    assert type(got.commands[0]).__name__ == "FullSyncCommand"
    assert msgspec.msgpack.decode(frame)["commands"][0]["command_type"] == "full_sync"


def test_bad_frames_are_typed_errors():
    for frame, why in ((b"\xc1", "not msgpack"), (msgspec.msgpack.encode({"type": "NopeMsg"}),
                                                   "NopeMsg"),
                       (msgspec.msgpack.encode({"type": "RegisterMsg", "instance_id": 1}),
                        "instance_id"),
                       (b"\x00" * (wire.MAX_FRAME_BYTES + 1), "bytes")):
        with pytest.raises(wire.BadFrame, match=why):
            wire.decode_request(frame)
    # a control message is not something a worker may send on its DEALER
    with pytest.raises(wire.BadFrame):
        wire.decode_request(wire.encode(wire.HealthWorkerMsg(worker_event_id="x")))


@needs_rec
def test_chunk_hashes_are_lmcaches_prefix_chain():
    recorded = json.loads((REC / "legacy_chunk_hashes.json").read_text())
    for name, toks in _http_tokens().items():
        full = [(end, h) for end, h in chunk_hashes(toks, 256) if end % 256 == 0]
        assert [[end - 256, end, h] for end, h in full] == recorded[name]


def test_chunk_hashes_match_real_token_database():
    import torch
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.metadata import LMCacheMetadata
    from lmcache.v1.token_database import ChunkedTokenDatabase

    cfg = LMCacheEngineConfig.from_dict({"chunk_size": 16, "save_unfull_chunk": True})
    meta = LMCacheMetadata(model_name="m", world_size=1, local_world_size=1, worker_id=0,
                           local_worker_id=0, kv_dtype=torch.float16,
                           kv_shape=(2, 2, 16, 1, 4))
    db = ChunkedTokenDatabase(cfg, meta)
    tokens = list(range(1000, 1050))
    theirs = [(end, key.chunk_hash) for _, end, key in db.process_tokens(tokens)]
    assert theirs == chunk_hashes(tokens, 16)


def _ops(*spec: tuple[str, int, int]) -> list[wire.KVOpEvent]:
    return [wire.KVOpEvent(wire.OpType(op), key, seq) for op, key, seq in spec]


def test_directory_applies_in_seq_order_and_drops_repeats():
    d = Directory(max_keys=100)
    hashes = chunk_hashes(list(range(600)), 256)
    # a batch whose evict arrives listed before the admit it follows
    d.apply("i", 0, "cpu", _ops(("evict", hashes[0][1], 1), ("admit", hashes[0][1], 0),
                                ("admit", hashes[1][1], 2)))
    assert d.matched("i", 0, "cpu", hashes) == 0   # evicted after admitted
    d.apply("i", 0, "cpu", _ops(("admit", hashes[0][1], 3)))
    assert d.matched("i", 0, "cpu", hashes) == 512
    # the same ops again (a repeated batch) change nothing
    res = d.apply("i", 0, "cpu", _ops(("evict", hashes[0][1], 1)))
    assert res.stale == 1 and d.matched("i", 0, "cpu", hashes) == 512
    assert not d.get("i", 0).needs_sync
    d.apply("i", 0, "cpu", _ops(("admit", 5, 9)))   # 4..8 lost on the way
    assert d.get("i", 0).needs_sync


def test_directory_is_bounded_per_worker_location():
    d = Directory(max_keys=10)
    res = d.apply("i", 0, "cpu", _ops(*(("admit", k, k) for k in range(50))))
    assert res.dropped == 40 and d.get("i", 0).count() == 10
    d.replace("i", 0, "cpu", range(1000))
    assert d.get("i", 0).count() == 10


def test_readme_worker_yaml_is_accepted_by_lmcache_056(tmp_path):
    import re

    from lmcache.v1.config import LMCacheEngineConfig

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Running kvctl in front of an LMCache 0.5.6 fleet", 1)[1]
    [text] = re.findall(r"```yml\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)
    path = tmp_path / "lmcache.yaml"
    path.write_text(text)
    cfg = LMCacheEngineConfig.from_file(str(path))
    cfg.validate()
    assert (cfg.enable_controller, cfg.controller_pull_url, cfg.controller_reply_url,
            cfg.lmcache_worker_ports, cfg.lmcache_worker_heartbeat_time) == \
        (True, "ctl-host:8300", "ctl-host:8400", [8600], 3)


@pytest.mark.anyio
async def test_query_worker_info_all_lists_kvctl_workers_too():
    """LMCache's orchestrators ask for instance_id "all"; kvctl answered 404 before."""
    from kvctl.server.config import ServerSettings
    from tests.conftest import in_process_api

    async with in_process_api(ServerSettings(model="none")) as api:
        r = await api.post("/query_worker_info", json={"instance_id": "all"})
        assert r.status_code == 200
        [info] = r.json()["worker_infos"]
        assert (info["instance_id"], info["kind"]) == ("lmcache_default_instance", "kvctl")
        r = await api.post("/query_worker_info", json={"instance_id": "nope"})
        assert r.status_code == 404 and "lmcache_default_instance" in r.json()["detail"]
        stats = (await api.get("/controller/key-stats")).json()
        assert (stats["total_instance_count"], stats["total_worker_count"]) == (1, 1)
        r = await api.post("/query_instance", json={"ip": "127.0.0.1"})
        assert r.json()["res"] == "lmcache_default_instance"


def test_serve_refuses_bad_lmcache_flags_in_one_line(cli_env):
    from tests.cliutil import run_cli

    base = ("serve", "--no-worker", "--model", "none", "--port", "0", "--monitor-port", "0")
    r = run_cli(*base, "--monitor-ports", "{pull: 1}", expected_exit_code=2)
    assert "lmcache_monitor_ports" in r.stderr and '"pull": 8300' in r.stderr
    r = run_cli(*base, "--monitor-ports", '{"push": 1}', expected_exit_code=2)
    assert "'push'" in r.stderr and "pull, reply and heartbeat" in r.stderr
    r = run_cli(*base, "--monitor-ports", '{"pull": 70000}', expected_exit_code=2)
    assert "[0, 65535]" in r.stderr
    r = run_cli(*base, "--monitor-ports", '{"pull": 0}', "--monitor-host", "0.0.0.0",
                expected_exit_code=2)
    assert "cannot authenticate" in r.stderr and "--insecure" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_monitor_ports_take_upstreams_defaults():
    from kvctl.server.config import ServerSettings

    s = ServerSettings(lmcache_monitor_ports='{"heartbeat": 8500}')
    assert s.lmcache_monitor_ports == {"pull": 8300, "reply": 8400, "heartbeat": 8500}
