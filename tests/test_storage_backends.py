"""The storage tiers one by one: the shared LRU index, memory, disk, Redis and Redis Cluster."""

from __future__ import annotations

import json
import time

import pytest
import torch

from kvctl.codecs import codec_for_method, decode_blob
from kvctl.server.storage import (
    LocalCPUBackend,
    LocalDiskBackend,
    LruIndex,
    RemoteBackend,
    StorageError,
    StorageFullError,
    parse_remote_url,
    redact_url,
)


def blob(method: str = "raw", tokens: int = 8, seed: int = 0) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, 2, tokens, 2, 16, generator=gen).to(torch.float16)
    return codec_for_method(method).encode(kv)


# ---------------------------------------------------------------- the shared index ----
def test_index_has_one_byte_counter_and_one_capacity_check():
    ix = LruIndex(300, "T", "max_t")
    assert ix.admit("a", 100, 1, "raw") == []
    assert ix.admit("b", 100, 1, "raw") == []
    ix.touch("a")
    assert ix.admit("c", 150, 1, "raw") == ["b"]  # b is least recently used
    assert (ix.bytes, ix.evictions, list(ix.entries)) == (250, 1, ["a", "c"])
    # replacing a key frees its old size first
    assert ix.admit("c", 200, 1, "kivi-2") == []
    assert ix.bytes == 300 and ix.stats().bytes_by_codec == {"raw": 100, "kivi-2": 200}


def test_index_never_evicts_pinned_or_protected_and_changes_nothing_when_full():
    ix = LruIndex(200, "T", "max_t")
    ix.admit("a", 100, 1, "raw")
    ix.admit("b", 100, 1, "raw")
    ix.set_pinned("a", True)
    with pytest.raises(StorageFullError, match="max_t"):
        ix.admit("c", 100, 1, "raw", protect={"b"})
    assert list(ix.entries) == ["a", "b"] and ix.bytes == 200 and ix.evictions == 0
    with pytest.raises(StorageFullError, match="exceeds the whole capacity"):
        ix.admit("d", 201, 1, "raw")
    assert ix.admit("c", 100, 1, "raw") == ["b"]


def test_memory_and_disk_evict_the_same_way(tmp_path):
    size = len(blob())
    for b in (LocalCPUBackend(3 * size), LocalDiskBackend(tmp_path, 3 * size)):
        for k in "abc":
            b.put(k, blob(), 8)
        b.get("a")
        b.put("d", blob(), 8)
        assert sorted(b.keys()) == ["a", "c", "d"], b.name
        s = b.stats()
        assert (s.chunks, s.bytes, s.evictions) == (3, 3 * size, 1)
        assert s.bytes_by_codec == {"raw": 3 * size}


# ---------------------------------------------------------------------- disk tier ----
def test_disk_restart_rebuilds_index_codecs_and_pins_and_sweeps_temp_files(tmp_path):
    b = LocalDiskBackend(tmp_path, 10**7)
    b.put("k1", blob("raw"), 8)
    b.put("k2", blob("kivi-2"), 8)
    b.set_pinned_many(["k1", "k2"], True)
    # what a kill -9 inside atomic_write leaves: a temporary beside the chunk
    (tmp_path / ".k3-8.kvc.x1y2.tmp").write_bytes(b"half a chunk")
    (tmp_path / ".pins.json.abc.tmp").write_bytes(b"[")
    again = LocalDiskBackend(tmp_path, 10**7)
    assert again.swept == 2 and not list(tmp_path.glob(".*.tmp"))
    assert sorted(again.keys()) == ["k1", "k2"]
    assert again.codec_of("k1") == "raw" and again.codec_of("k2") == "kivi-2"
    assert again.stats().pinned_chunks == 2 and again.num_tokens("k2") == 8
    decode_blob(again.get("k2"))


def test_disk_drops_a_file_that_is_not_a_whole_chunk(tmp_path):
    whole = blob()
    b = LocalDiskBackend(tmp_path, 10**7)
    b.put("good", whole, 8)
    (tmp_path / "bad-8.kvc").write_bytes(whole[: len(whole) // 2])
    again = LocalDiskBackend(tmp_path, 10**7)
    assert again.keys() == ["good"] and not (tmp_path / "bad-8.kvc").exists()


def test_pinning_many_chunks_writes_the_pins_file_once(tmp_path, monkeypatch):
    from kvctl.server.storage import disk

    b = LocalDiskBackend(tmp_path, 10**8)
    keys = [f"k{i}" for i in range(40)]
    for k in keys:
        b.put(k, blob(), 8)
    writes = []
    real = disk.atomic_write

    def counting(path, data, **kw):
        writes.append(path.name)
        real(path, data, **kw)

    monkeypatch.setattr(disk, "atomic_write", counting)
    assert b.set_pinned_many([*keys, "absent"], True) == 40
    assert writes == ["pins.json"]
    assert json.loads((tmp_path / "pins.json").read_text()) == sorted(keys)
    assert b.set_pinned_many(keys, True) == 40 and writes == ["pins.json"]  # no change
    b.clear()
    assert writes == ["pins.json", "pins.json"]
    assert json.loads((tmp_path / "pins.json").read_text()) == []


# ------------------------------------------------------------------- remote URLs ----
@pytest.mark.parametrize("url,cluster,tls,nodes,db,user", [
    ("redis://127.0.0.1:6400/2", False, False, [("127.0.0.1", 6400)], 2, None),
    ("rediss://alice:s3cret@cache.example:6380", False, True, [("cache.example", 6380)], 0,
     "alice"),
    ("redis://h1:7000,h2:7001,h3:7002", True, False,
     [("h1", 7000), ("h2", 7001), ("h3", 7002)], 0, None),
    ("redis+cluster://:pw@h1:7000", True, False, [("h1", 7000)], 0, None),
    ("valkeys://h", False, True, [("h", 6379)], 0, None),
])
def test_remote_url_forms(url, cluster, tls, nodes, db, user):
    t = parse_remote_url(url)
    assert (t.cluster, t.tls, t.nodes, t.db, t.username) == (cluster, tls, nodes, db, user)


def test_remote_url_errors_never_show_the_password():
    assert redact_url("redis://bob:hunter2@h:1/0") == "redis://bob:***@h:1/0"
    assert redact_url("redis://:hunter2@h:1") == "redis://:***@h:1"
    for bad in ("redis://:hunter2@h:notaport", "ftp://:hunter2@h:1", "redis://:hunter2@h:1/x",
                "lm://:hunter2@h:1"):
        with pytest.raises(StorageError) as exc:
            parse_remote_url(bad)
        assert "hunter2" not in str(exc.value) and "***" in str(exc.value)


def test_rediss_uses_tls_connections():
    from redis.connection import SSLConnection

    b = RemoteBackend("rediss://127.0.0.1:1", namespace="x")
    assert b._redis.connection_pool.connection_class is SSLConnection


# -------------------------------------------------------------------- real Redis ----
def test_remote_batches_prefix_and_codecs(redis_proc):
    import redis

    b = RemoteBackend(redis_proc.url, namespace="inst", key_prefix="team-a")
    items = [(f"k{i}", blob("raw" if i % 2 else "cachegen", seed=i), 8) for i in range(130)]
    assert b.put_many(items) == 130
    assert b.contains_many(["k0", "nope", "k129"]) == [True, False, True]
    got = b.get_many([k for k, _, _ in items])
    assert got == [x for _, x, _ in items]
    assert b.codecs_many(["k0", "k1", "nope"]) == ["cachegen", "raw", None]
    raw_keys = redis.Redis(port=redis_proc.port).keys("*")
    assert len(raw_keys) == 130 and all(k.startswith(b"team-a:inst:c:") for k in raw_keys)
    assert b.set_pinned_many(["k0", "k1", "nope"], True) == 2
    s = b.stats()
    assert (s.chunks, s.pinned_chunks) == (130, 2)
    assert set(s.bytes_by_codec) == {"raw", "cachegen"}
    assert s.bytes == sum(len(x) for _, x, _ in items)
    assert b.clear() == 130 * 8 and b.keys() == []


def test_remote_password_in_url_and_failures_without_it(tmp_path):
    from tests.conftest import RedisProc

    workdir = tmp_path / "r"
    workdir.mkdir()
    r = RedisProc(workdir, ("--requirepass", "hunter2"))
    r.start()
    try:
        good = RemoteBackend(f"redis://:hunter2@127.0.0.1:{r.port}", namespace="x")
        good.put("k", blob(), 8)
        assert good.get("k") == blob()
        bad = RemoteBackend(f"redis://:wrong-hunter3@127.0.0.1:{r.port}", namespace="x")
        with pytest.raises(StorageError) as exc:
            bad.ping()
        assert "wrong-hunter3" not in str(exc.value) and "***" in str(exc.value)
        r.stop()
        with pytest.raises(StorageError) as exc:
            good.get("k")
        assert "hunter2" not in str(exc.value) and "RemoteBackend" in str(exc.value)
    finally:
        r.stop()


def test_remote_outage_fails_fast_and_recovers(redis_proc):
    b = RemoteBackend(redis_proc.url, namespace="x")
    b.put("k", blob(), 8)
    redis_proc.stop()
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="RemoteBackend"):
        b.get_many(["k"])
    # a bound on failing, not a speed claim: the socket timeouts are 2 s / 5 s
    assert time.monotonic() - t0 < 5
    redis_proc.start()  # same port, empty (no persistence)
    assert b.get("k") is None
    b.put("k", blob(), 8)
    assert b.get("k") == blob()


# ------------------------------------------------------------------ Redis Cluster ----
def test_cluster_spreads_chunks_over_nodes(redis_cluster):
    import redis

    b = RemoteBackend(redis_cluster, namespace="spread")
    b.clear()
    items = [(f"k{i}", blob(seed=i), 8) for i in range(60)]
    assert b.put_many(items) == 60
    assert b.get_many([k for k, _, _ in items]) == [x for _, x, _ in items]
    assert sorted(b.keys()) == sorted(k for k, _, _ in items)
    ports = [int(a.rsplit(":", 1)[1]) for a in redis_cluster.removeprefix("redis://").split(",")]
    per_node = [redis.Redis(port=p).dbsize() for p in ports]
    assert sum(per_node) == 60 and all(n > 0 for n in per_node), per_node
    assert b.set_pinned_many(["k1", "k2"], True) == 2 and b.stats().pinned_chunks == 2
    assert b.clear() == 60 * 8 and b.stats().chunks == 0


def test_disk_accounting_holds_under_concurrent_writers(tmp_path):
    import random
    import threading

    sizes = [len(blob(tokens=t)) for t in (4, 8, 16)]
    b = LocalDiskBackend(tmp_path, 10 * max(sizes))
    errors = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(60):
                key = f"k{rng.randrange(20)}"
                op = rng.random()
                if op < 0.6:
                    b.put(key, blob(tokens=rng.choice((4, 8, 16)), seed=seed), 8)
                elif op < 0.8:
                    b.get(key)
                elif op < 0.9:
                    b.delete(key)
                else:
                    b.set_pinned_many([key], rng.random() < 0.3)
        except StorageFullError:
            pass
        except Exception as exc:  # collected: an assertion in a thread would be lost
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    files = {p.name.rsplit("-", 1)[0]: p.stat().st_size for p in tmp_path.glob("*.kvc")}
    assert files.keys() == set(b.keys())
    assert b.stats().bytes == sum(files.values()) <= 10 * max(sizes)
    assert not list(tmp_path.glob(".*.tmp"))
    for key in files:
        decode_blob(b.get(key))
