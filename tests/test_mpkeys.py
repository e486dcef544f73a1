"""kvctl.common.mpkeys names chunks as LMCache's MP servers do: against LMCache's own
TokenHasher and key expansion, and against the keys of the recorded real run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from kvctl.common.mpkeys import chunk_hashes, kv_rank, lookup_ranks, resolve_keys

REC = Path("/work/shared/lmcache-0.5.6/mp_driver_http.jsonl")


def test_hashes_and_keys_match_lmcaches_own():
    pytest.importorskip("lmcache")
    from lmcache.v1.distributed.api import ObjectKey, ipc_key_to_object_keys
    from lmcache.v1.multiprocess.custom_types import IPCCacheServerKey
    from lmcache.v1.multiprocess.token_hasher import TokenHasher

    hasher = TokenHasher(chunk_size=256, hash_algorithm="blake3")
    rng = random.Random(7)
    for n in (0, 255, 256, 700, 1024):
        ids = [rng.randrange(1 << 32) for _ in range(n)]
        assert chunk_hashes(ids) == hasher.compute_chunk_hashes(ids)
    ids = [rng.randrange(50_000) for _ in range(600)]
    for ws in (1, 2, 4):
        ipc = IPCCacheServerKey(model_name="m", world_size=ws, worker_id=None,
                                token_ids=tuple(ids), start=0, end=len(ids), request_id="",
                                cache_salt="tenant")
        theirs = ipc_key_to_object_keys(ipc, hasher.compute_chunk_hashes(ids), [0])[0]
        ours, chunks = resolve_keys(ids, "m", ws, "tenant")
        assert chunks == 2
        assert [k.to_wire() for k in ours] == [
            {"chunk_hash_hex": k.chunk_hash.hex(), "model_name": k.model_name,
             "kv_rank": k.kv_rank, "object_group_id": k.object_group_id,
             "cache_salt": k.cache_salt} for k in theirs]
    assert kv_rank(8, 5, 4, 1) == ObjectKey.ComputeKVRank(8, 5, 4, 1)


def test_the_recorded_runs_keys():
    if not REC.exists():
        pytest.skip("no recording here")
    for line in REC.read_text().splitlines():
        r = json.loads(line)
        if r.get("path") == "/directory/lookup" and r["resp"].get("results") and \
                r["resp"]["results"][0]["token_ids"]:
            break
    ids = [t for res in r["resp"]["results"] for t in res["token_ids"]]
    keys, chunks = resolve_keys(ids, "test-model")
    assert chunks == 2 and [k.to_wire() for k in keys] == [res["key"] for res in
                                                           r["resp"]["results"]]
    assert lookup_ranks(1) == [16777472]


def test_bad_input_is_a_value_error():
    with pytest.raises(ValueError, match="uint32"):
        chunk_hashes([1 << 32] * 256)
    with pytest.raises(ValueError, match="model_name"):
        resolve_keys([1] * 256, "a@b")
    with pytest.raises(ValueError, match="cache_salt"):
        resolve_keys([1] * 256, "m", cache_salt="a/b")
    with pytest.raises(ValueError, match="world_size"):
        resolve_keys([1] * 256, "m", world_size=0)
