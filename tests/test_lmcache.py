"""kvctl's serdes and FS adapter inside a real LMCache 0.5.6 storage manager.

The storage manager is built from ``--l2-adapter`` JSON through LMCache's own argument
parser, exactly what ``lmcache server`` does, and fed real SmolLM2 KV in LMCache's layout.
Expected values come from kvctl's codec API and plain torch permutes written here, never
from the integration under test.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip(
    "lmcache", reason="LMCache is not installed: `make setup` installs it "
    "(pip install --no-deps lmcache==0.5.6 plus its pure-Python dependencies)")

import torch

from kvctl.codecs import decode_blob, get_codec, peek_blob

pytestmark = pytest.mark.model

CHUNK = 256
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEADLINE_S = 120


def lmc_layout(kv: torch.Tensor) -> torch.Tensor:
    """[L, 2, T, H, D] -> LMCache's [2, L, T, H*D], written out independently of the plugin."""
    L, _, T, H, D = kv.shape
    return kv.permute(1, 0, 2, 3, 4).reshape(2, L, T, H * D).contiguous()


def adapter_json(base: Path, serde: dict) -> str:
    return json.dumps({
        "type": "plugin", "module_path": "kvctl.integrations.lmcache.plugin",
        "class_name": "KvctlFSL2Adapter", "adapter_params": {"base_path": str(base)},
        "serde": serde})


def wait_files(base: Path, keys: list) -> list[Path]:
    """The chunk files of these keys, once all exist (polled with a deadline)."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        found = [list(base.glob(f"*@{k.chunk_hash.hex()}.kvc")) for k in keys]
        if all(len(f) == 1 for f in found):
            return [f[0] for f in found]
        if time.monotonic() > deadline:
            missing = sum(1 for f in found if not f)
            raise AssertionError(f"{missing} of {len(keys)} chunks never reached L2")
        time.sleep(0.05)


def l1_args(size_gb: float) -> list[str]:
    """A DRAM L1 without a named shared-memory segment: its default name is per process, so
    two managers in one test process would share (and unlink) one segment."""
    return ["--eviction-policy", "LRU", "--l1-manager", json.dumps({
        "type": "DRAM", "tag": "_default", "size_gb": size_gb, "use_lazy": False,
        "init_size_gb": size_gb})]


class Manager:
    """A real StorageManager with one kvctl-serde FS adapter, and helpers to drive it."""

    def __init__(self, base: Path, serde: dict) -> None:
        from lmcache.v1.distributed.config import parse_args
        from lmcache.v1.distributed.storage_manager import StorageManager

        self.base = base
        cfg = parse_args([*l1_args(0.25), "--l2-adapter", adapter_json(base, serde)])
        self.sm = StorageManager(cfg)

    def store(self, keys: list, layout, chunks: list[torch.Tensor]) -> None:
        objs = self.sm.reserve_write(keys, layout)
        assert set(objs) == set(keys)
        for key, chunk in zip(keys, chunks, strict=True):
            objs[key].tensor.copy_(chunk)
        self.sm.finish_write(keys)

    def clear_l1(self) -> None:
        """Empty L1. Objects stay read-locked until their L2 store completes, so clearing
        is repeated until nothing is left (polled with a deadline)."""
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            self.sm.clear()
            if self.sm.get_l1_usage()[0] == 0:
                return
            time.sleep(0.05)
        raise AssertionError(f"L1 still holds {self.sm.get_l1_usage()[0]} bytes")

    def prefetch(self, keys: list, layout):
        from lmcache.v1.distributed.api import GroupedObjectKeys, PrefetchTaskSpec

        spec = PrefetchTaskSpec(key_groups=[GroupedObjectKeys(
            keys=keys, object_group_id=0, layout_desc=layout)])
        handle = self.sm.submit_prefetch_task(spec)
        assert self.sm.wait_prefetch_status(handle, DEADLINE_S)
        return self.sm.query_prefetch_status(handle)

    def read(self, keys: list, result) -> list[torch.Tensor]:
        with self.sm.read_prefetched_results(keys, result.l1_owners) as objs:
            assert objs is not None
            out = [o.tensor.clone() for o in objs]
        self.sm.finish_read_prefetched(keys, 1, result.l1_owners)
        return out


def smollm2_codec(method: str):
    """What the serde encodes SmolLM2's chunks with: the method, with SmolLM2's profile."""
    from kvctl.common import calibration

    profile = calibration.load_profile("SmolLM2-135M-Instruct")
    assert profile is not None
    return calibration.codec_for(method, profile)


def keys_for(prefix: bytes, n: int, model: str = SMOLLM2, rank: int = 0) -> list:
    from lmcache.v1.distributed.api import ObjectKey

    return [ObjectKey(chunk_hash=prefix + bytes([i]) * 15, model_name=model, kv_rank=rank)
            for i in range(n)]


def layout_of(*tensors: torch.Tensor):
    from lmcache.v1.distributed.api import MemoryLayoutDesc

    return MemoryLayoutDesc(shapes=[t.shape for t in tensors], dtypes=[t.dtype for t in tensors])


@pytest.fixture(scope="module")
def kv_chunks(prose_kv) -> list[torch.Tensor]:
    """Full 256-token chunks of real SmolLM2 KV, kvctl layout [30, 2, 256, 3, 64], fp16."""
    n = prose_kv.shape[2] // CHUNK
    assert n >= 2
    return [prose_kv[:, :, i * CHUNK:(i + 1) * CHUNK].contiguous() for i in range(n)]


@pytest.fixture(scope="module")
def manager(tmp_path_factory) -> Manager:
    m = Manager(tmp_path_factory.mktemp("l2"), {"type": "kvctl-cachegen", "head_dim": 64})
    yield m
    m.sm.close()


def test_storage_manager_round_trip_through_l2(manager, kv_chunks):
    """Store real KV, clear L1, prefetch: every chunk an L2 hit, equal to the codec's own
    decode(encode(x)) (SmolLM2's keys: with SmolLM2's step profile), and the files on disk
    are the codec's blobs, not a padded budget."""
    codec = smollm2_codec("cachegen")
    chunks = [lmc_layout(c) for c in kv_chunks]
    keys = keys_for(b"A", len(chunks))
    layout = layout_of(chunks[0])
    manager.store(keys, layout, chunks)
    files = wait_files(manager.base, keys)
    manager.clear_l1()

    result = manager.prefetch(keys, layout)
    assert result.l1_hit_count == 0
    assert result.l2_hit_count == len(keys)
    got = manager.read(keys, result)

    fp16_bytes = 0
    disk_bytes = 0
    for kv, chunk, out in zip(kv_chunks, chunks, got, strict=True):
        blob = codec.encode(kv)
        assert torch.equal(out, lmc_layout(codec.decode(blob)))
        assert not torch.equal(out, chunk)  # lossy: it really went through the codec
        fp16_bytes += chunk.numel() * 2
    for path, kv in zip(files, kv_chunks, strict=True):
        data = path.read_bytes()
        assert len(data) == len(codec.encode(kv))  # exactly the blob, no padding
        info = peek_blob(data, verify=True)
        assert (info.codec, info.params, info.shape) == ("cachegen", {"level": "default"},
                                                           tuple(kv.shape))
        disk_bytes += len(data)
    ratio = fp16_bytes / disk_bytes
    assert ratio >= 5.0, f"ratio on disk {ratio:.2f}x"


def test_second_store_of_a_key_is_a_no_op_and_l1_hits_skip_l2(manager, kv_chunks):
    chunks = [lmc_layout(kv_chunks[0])]
    keys = keys_for(b"B", 1)
    layout = layout_of(chunks[0])
    manager.store(keys, layout, chunks)
    wait_files(manager.base, keys)
    result = manager.prefetch(keys, layout)
    assert (result.l1_hit_count, result.l2_hit_count) == (1, 0)
    assert torch.equal(manager.read(keys, result)[0], chunks[0])


def test_a_corrupted_file_is_a_miss_not_garbage(manager, kv_chunks):
    """A flipped bit on disk fails the blob's checksum: the prefetch reports a miss (the
    engine recomputes) and the manager keeps serving."""
    chunk = lmc_layout(kv_chunks[1])
    keys = keys_for(b"X", 1)
    layout = layout_of(chunk)
    manager.store(keys, layout, [chunk])
    (path,) = wait_files(manager.base, keys)
    manager.clear_l1()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    result = manager.prefetch(keys, layout)
    assert (result.l1_hit_count, result.l2_hit_count) == (0, 0)
    path.unlink()  # the manager still works: store and read the chunk again
    manager.store(keys, layout, [chunk])
    wait_files(manager.base, keys)
    manager.clear_l1()
    assert manager.prefetch(keys, layout).l2_hit_count == 1
    manager.sm.finish_read_prefetched(keys, 1)


def test_bf16_chunks_and_compact_level(tmp_path, kv_chunks):
    m = Manager(tmp_path, {"type": "kvctl-cachegen-compact", "head_dim": 64})
    try:
        kv = kv_chunks[0].to(torch.bfloat16)
        chunk = lmc_layout(kv)
        keys = keys_for(b"C", 1)
        layout = layout_of(chunk)
        m.store(keys, layout, [chunk])
        (path,) = wait_files(tmp_path, keys)
        m.clear_l1()
        result = m.prefetch(keys, layout)
        assert result.l2_hit_count == 1
        codec = smollm2_codec("cachegen-compact")
        blob = codec.encode(kv)
        out = m.read(keys, result)[0]
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, lmc_layout(codec.decode(blob)))
        assert path.stat().st_size == len(blob)
        assert chunk.numel() * 2 / len(blob) >= 7.0
    finally:
        m.sm.close()


@pytest.mark.parametrize("case", ["mla", "fp8", "odd_width"])
def test_layouts_the_codec_does_not_take_are_stored_bit_exactly(manager, kv_chunks, case):
    """MLA (kv size 1), fp8 (uint8) caches and a width that head_dim does not divide go
    through the raw frame: the store succeeds and the data comes back bit-exact."""
    kv = kv_chunks[0]
    if case == "mla":
        chunk = lmc_layout(kv)[:1].clone()  # [1, L, T, 192]
    elif case == "fp8":
        chunk = lmc_layout(kv).to(torch.float8_e4m3fn).view(torch.uint8)
    else:
        chunk = lmc_layout(kv)[..., :100].contiguous()
    keys = keys_for(case.encode()[:1].upper(), 1)
    layout = layout_of(chunk)
    manager.store(keys, layout, [chunk])
    (path,) = wait_files(manager.base, keys)
    manager.clear_l1()
    result = manager.prefetch(keys, layout)
    assert result.l2_hit_count == 1
    assert torch.equal(manager.read(keys, result)[0], chunk)
    data = path.read_bytes()
    assert data[:4] == b"KVLR"
    assert len(data) < chunk.numel() * chunk.element_size() + 256


def test_an_object_of_several_kernel_groups_is_stored_bit_exactly(manager, kv_chunks):
    """One object holding two kernel groups (classic K/V layers and MLA-style layers)."""
    full = lmc_layout(kv_chunks[0])
    groups = [full[:, :20].contiguous(), full[:1, 20:].to(torch.bfloat16).contiguous()]
    layout = layout_of(*groups)
    keys = keys_for(b"G", 1)
    objs = manager.sm.reserve_write(keys, layout)
    for i, g in enumerate(groups):
        objs[keys[0]].get_tensor(i).copy_(g)
    manager.sm.finish_write(keys)
    wait_files(manager.base, keys)
    manager.clear_l1()
    result = manager.prefetch(keys, layout)
    assert result.l2_hit_count == 1
    with manager.sm.read_prefetched_results(keys, result.l1_owners) as got:
        assert got is not None
        back = [got[0].get_tensor(i).clone() for i in range(2)]
    manager.sm.finish_read_prefetched(keys, 1, result.l1_owners)
    assert all(torch.equal(a, b) for a, b in zip(back, groups, strict=True))


def test_tensor_parallel_shard_is_quantized_as_in_the_full_chunk(kv_chunks):
    """A rank holding one of SmolLM2's three heads decodes to exactly that head of the full
    chunk decoded by the codec the model gets: SmolLM2's step profile (found by the hub
    id's last part) for SmolLM2's key, equal steps for a model kvctl has no profile for.
    The profile scales whole layers and cachegen's steps follow each (layer, head)'s own
    statistics, so a head quantizes the same alone as beside the others."""
    from kvctl.common import calibration
    from kvctl.integrations.lmcache.serde import KvctlDeserializer, KvctlSerializer

    kv = kv_chunks[0]
    profile = calibration.load_profile("SmolLM2-135M-Instruct")
    assert profile is not None
    shard = lmc_layout(kv[:, :, :, :1].contiguous())  # [2, 30, 256, 64]
    ser, de = KvctlSerializer("cachegen", 64), KvctlDeserializer(64)
    (smol_key,) = keys_for(b"T", 1)
    (other_key,) = keys_for(b"T", 1, model="acme/unknown-model")
    for key, prof in ((smol_key, profile), (other_key, None)):
        full = calibration.codec_for("cachegen", prof)
        want = full.decode(full.encode(kv))[:, :, :, :1]
        out = torch.empty_like(shard)
        de.decode_into(ser.encode_chunk(shard, key), out)
        assert torch.equal(out, lmc_layout(want))
    # the two differ: the profile was used (and the blobs decode without it)
    assert ser.encode_chunk(shard, smol_key) != ser.encode_chunk(shard, other_key)


def test_pipeline_stage_gets_equal_steps(kv_chunks):
    """A pipeline stage holds some of the model's layers, and the key does not say which:
    the profile (one pair per layer of the whole model) is not applied to it."""
    from kvctl.integrations.lmcache.serde import KvctlSerializer

    stage = kv_chunks[0][:10].contiguous()
    (smol_key,) = keys_for(b"P", 1)
    blob = KvctlSerializer("cachegen", 64).encode_chunk(lmc_layout(stage), smol_key)
    assert blob == get_codec("cachegen").encode(stage)


@pytest.mark.parametrize("method", ["cachegen", "cachegen-compact", "int8", "fp8", "kivi-2",
                                    "kivi-4", "raw"])
def test_estimate_is_an_upper_bound_and_tight(kv_chunks, method):
    from kvctl.integrations.lmcache.serde import KvctlSerializer

    ser = KvctlSerializer(method, 64)
    fp16 = kv_chunks[0].numel() * 2
    for kv in kv_chunks:
        chunk = lmc_layout(kv)
        estimate = ser.estimate_serialized_size(layout_of(chunk))
        blob = ser.encode_chunk(chunk, capacity=estimate)
        assert len(blob) <= estimate
        assert decode_blob(blob).shape == kv.shape
    if method != "raw":
        assert estimate <= 0.55 * fp16, f"{method} reserves {estimate / fp16:.2f} of fp16"


def test_cachegen_over_its_reservation_falls_back_to_int8(kv_chunks):
    from kvctl.integrations.lmcache.serde import KvctlSerializer

    ser = KvctlSerializer("cachegen", 64)
    chunk = lmc_layout(kv_chunks[0])
    blob = ser.encode_chunk(chunk, capacity=1000)  # smaller than any cachegen blob
    assert peek_blob(blob).codec == "int8"
    assert blob == get_codec("int8").encode(kv_chunks[0])


def test_serde_options_are_checked_with_a_message_that_says_what_to_fix():
    from kvctl.integrations.lmcache.serde import make_serde

    with pytest.raises(ValueError, match=r'set "head_dim" to the model'):
        make_serde("cachegen", {})
    with pytest.raises(ValueError, match=r"unknown option.*headdim"):
        make_serde("cachegen", {"headdim": 64})
    with pytest.raises(ValueError, match="max_workers"):
        make_serde("cachegen", {"head_dim": 64, "max_workers": 0})


def test_adapter_sweeps_only_stale_temporaries_at_startup(tmp_path):
    import os

    from kvctl.integrations.lmcache.plugin import KvctlFSL2Adapter

    stale = tmp_path / ".m@0x00000000@0@ab.kvc.x1y2.tmp"
    fresh = tmp_path / ".m@0x00000000@0@cd.kvc.z3w4.tmp"
    chunk = tmp_path / "m@0x00000000@0@ef.kvc"
    for p in (stale, fresh, chunk):
        p.write_bytes(b"x")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    os.utime(chunk, (old, old))
    KvctlFSL2Adapter({"base_path": str(tmp_path)}).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh.name, chunk.name])


def test_unknown_serde_type_fails_the_build_naming_kvctl_types(tmp_path):
    with pytest.raises(ValueError, match="kvctl-cachegen"):
        Manager(tmp_path, {"type": "kvctl-nope", "head_dim": 64})


def test_adapter_params_are_checked(tmp_path):
    from lmcache.v1.distributed.config import parse_args
    from lmcache.v1.distributed.storage_manager import StorageManager

    spec = json.loads(adapter_json(tmp_path, {"type": "kvctl-cachegen", "head_dim": 64}))
    spec["adapter_params"] = {"base_path": str(tmp_path), "fsnyc": False}
    cfg = parse_args([*l1_args(0.05), "--l2-adapter", json.dumps(spec)])
    with pytest.raises(ValueError, match="unknown adapter_params fsnyc"):
        StorageManager(cfg)
