"""`kvctl inspect FILE` on codec blobs, the LMCache plugin's chunk files and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kvctl.cli import app
from kvctl.codecs import get_codec

SHAPE = (4, 2, 32, 2, 16)


def kvctl(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def kv() -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(SHAPE, generator=gen).to(torch.bfloat16)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(("name", "params", "method"), [
    ("cachegen", {"level": "compact"}, "cachegen-compact"),
    ("cachegen", {"level": "default"}, "cachegen"),
    ("int8", {}, "int8"),
])
def test_json_reports_codec_shape_ratio_and_checksum(tmp_path, kv, name, params, method):
    blob = get_codec(name, **params).encode(kv)
    path = write(tmp_path / "chunk.bin", blob)
    res = kvctl("inspect", str(path), "--json")
    assert res.exit_code == 0, res.output
    facts = json.loads(res.stdout)
    assert facts["codec"] == name
    assert facts["method"] == method
    assert facts["params"] == params
    assert facts["shape"] == list(SHAPE)
    assert facts["lmcache_shape"] == [2, 4, 32, 32]
    assert facts["dtype"] == "bfloat16"
    assert facts["tokens"] == 32
    assert facts["bytes"] == len(blob)
    assert facts["ratio_vs_fp16"] == pytest.approx(kv.numel() * 2 / len(blob))
    assert facts["checksum_ok"] is True
    assert "lmcache_key" not in facts


def test_table_names_the_level_and_ratio(tmp_path, kv):
    blob = get_codec("cachegen", level="compact").encode(kv)
    res = kvctl("inspect", str(write(tmp_path / "c.bin", blob)))
    assert res.exit_code == 0, res.output
    assert "cachegen (level=compact)" in res.stdout
    assert f"{kv.numel() * 2 / len(blob):.2f}x" in res.stdout
    assert "ok" in res.stdout


def test_a_plugin_chunk_file_shows_its_lmcache_key(tmp_path, kv):
    name = ("HuggingFaceTB-SEP-SmolLM2-135M-Instruct@0x02010201@0@"
            + "ab" * 32 + "@tenant1.kvc")
    path = write(tmp_path / name, get_codec("cachegen").encode(kv))
    facts = json.loads(kvctl("inspect", str(path), "--json").stdout)
    assert facts["lmcache_key"] == {
        "model_name": "HuggingFaceTB/SmolLM2-135M-Instruct", "kv_rank": 0x02010201,
        "world_size": 2, "rank": 1, "object_group_id": 0, "chunk_hash": "ab" * 32,
        "cache_salt": "tenant1"}


def test_raw_frame_of_an_mla_chunk(tmp_path):
    from kvctl.integrations.lmcache.frame import pack_frame

    mla = torch.arange(3 * 8 * 20, dtype=torch.float16).reshape(1, 3, 8, 20)
    data = pack_frame([[1, 3, 8, 20]], ["float16"], mla.view(torch.uint8).numpy())
    res = kvctl("inspect", str(write(tmp_path / "m.kvc", data)), "--json")
    assert res.exit_code == 0, res.output
    facts = json.loads(res.stdout)
    assert facts["codec"] == "raw-frame"
    assert facts["shapes"] == [[1, 3, 8, 20]]
    assert facts["dtypes"] == ["float16"]
    assert facts["bytes"] == len(data)
    assert facts["checksum_ok"] is True


@pytest.mark.parametrize("kind", ["blob", "frame"])
def test_a_flipped_bit_is_reported_and_exits_1(tmp_path, kv, kind):
    from kvctl.integrations.lmcache.frame import pack_frame

    if kind == "blob":
        data = bytearray(get_codec("cachegen").encode(kv))
    else:
        data = bytearray(pack_frame([[2, 3]], ["uint8"], bytes(range(6))))
    data[-6] ^= 0x10  # inside the payload, before the checksum
    res = kvctl("inspect", str(write(tmp_path / "bad.bin", bytes(data))))
    assert res.exit_code == 1
    assert "MISMATCH" in res.stdout
    assert "checksum mismatch" in res.stderr
    assert "Traceback" not in res.output


@pytest.mark.parametrize(("content", "message"), [
    (b"# a README, not a chunk\n", "not a kvctl codec blob"),
    (b"KVZ1", "shorter than the smallest blob"),
])
def test_foreign_and_truncated_files_get_one_line_errors(tmp_path, content, message):
    res = kvctl("inspect", str(write(tmp_path / "x.bin", content)))
    assert res.exit_code == 1
    assert message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.output


def test_truncated_blob(tmp_path, kv):
    blob = get_codec("cachegen").encode(kv)
    res = kvctl("inspect", str(write(tmp_path / "t.bin", blob[:-100])))
    assert res.exit_code == 1
    assert "its header says" in res.stderr


def test_missing_file_and_empty_directory(tmp_path):
    res = kvctl("inspect", str(tmp_path / "nope.kvc"))
    assert res.exit_code == 1
    assert res.stderr.strip() == f"error: {tmp_path / 'nope.kvc'}: no such file"
    res = kvctl("inspect", str(tmp_path))
    assert res.exit_code == 0 and res.stdout == f"{tmp_path}: no chunk files (0 other file(s))\n"


def test_a_directory_is_summarized_per_method(tmp_path, kv):
    d = tmp_path / "l2"
    (d / "sub").mkdir(parents=True)
    write(d / "a.kvc", get_codec("cachegen").encode(kv))
    write(d / "sub" / "b.kvc", get_codec("cachegen").encode(kv[:, :, :16]))
    write(d / "c.kvc", get_codec("int8").encode(kv))
    bad = bytearray(get_codec("int8").encode(kv))
    bad[-6] ^= 0x10
    write(d / "d.kvc", bytes(bad))
    write(d / "README", b"not a chunk\n")
    write(d / ".c.kvc.1234.tmp", b"a write in progress")
    res = kvctl("inspect", str(d), "--json")
    assert res.exit_code == 1 and "1 chunk file(s) fail their checksum: d.kvc" in res.stderr
    data = json.loads(res.stdout)
    assert data["files"] == 5 and data["not_chunks"] == 1
    assert data["not_chunks_named"] == ["README"]
    assert data["checksum_mismatches_named"] == ["d.kvc"]
    cg, i8 = data["by_method"]["cachegen"], data["by_method"]["int8"]
    assert (cg["chunks"], cg["tokens"], i8["chunks"], i8["tokens"]) == (2, 48, 2, 64)
    assert cg["bytes"] == (d / "a.kvc").stat().st_size + (d / "sub" / "b.kvc").stat().st_size
    assert cg["ratio_vs_fp16"] == pytest.approx(cg["fp16_bytes"] / cg["bytes"])
    res = kvctl("inspect", str(d))
    cells = [[c.strip() for c in ln.split("│") if c.strip()] for ln in res.stdout.splitlines()]
    rows = [c[:3] for c in cells if c[:1] in (["cachegen"], ["int8"])]
    assert rows == [["cachegen", "2", "48"], ["int8", "2", "64"]], res.stdout


def test_full_hash_and_path_at_80_columns(tmp_path, kv, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    name = ("HuggingFaceTB-SEP-SmolLM2-135M-Instruct@0x02010201@0@" + "cd" * 32 + ".kvc")
    path = write(tmp_path / name, get_codec("cachegen").encode(kv))
    res = kvctl("inspect", str(path))
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert any(ln.split() == ["chunk", "hash", "cd" * 32] for ln in lines), res.stdout
    assert any(ln.split() == ["file", str(path)] for ln in lines), res.stdout


def test_a_chunk_in_redis_by_key_and_a_summary(redis_proc, kv, cli_env):
    from kvctl.server.storage.remote import RemoteBackend

    remote = RemoteBackend(redis_proc.url, "node-a")
    try:
        remote.put("k1", get_codec("cachegen").encode(kv), 32)
        remote.put("k2", get_codec("kivi", bits=2).encode(kv), 32)
    finally:
        remote.close()
    res = kvctl("inspect", redis_proc.url, "k1", "--instance-id", "node-a", "--json")
    assert res.exit_code == 0, res.output
    facts = json.loads(res.stdout)
    assert facts["redis_key"] == "kvctl:node-a:c:k1" and facts["method"] == "cachegen"
    assert facts["shape"] == list(SHAPE) and facts["checksum_ok"] is True
    res = kvctl("inspect", redis_proc.url, "--instance-id", "node-a", "--json")
    data = json.loads(res.stdout)
    assert data["chunks"] == 2 and {m: r["chunks"] for m, r in data["by_method"].items()} == {
        "cachegen": 1, "kivi-2": 1}
    res = kvctl("inspect", redis_proc.url, "nope", "--instance-id", "node-a")
    assert res.exit_code == 1 and "no chunk 'kvctl:node-a:c:nope'" in res.stderr
