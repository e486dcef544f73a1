"""A corrupt chunk on disk: counted, quarantined, named, and read from the next tier.

A real WorkerRuntime over a real disk directory and a real redis-server, written through the
engine's path (write-through to every tier) and read back through it (read-through), with
one chunk file damaged on disk the way a bad sector or a stray write damages it.
"""

from __future__ import annotations

import torch

from kvctl.server.config import ServerSettings
from kvctl.server.storage.disk import QUARANTINE
from kvctl.server.worker.metrics import RuntimeCollector
from kvctl.server.worker.runtime import WorkerRuntime

DISK = "LocalDiskBackend"
INSTANCE = "lmcache_default_instance"


def damage(path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(64)  # zeros in the payload: the blob's checksum fails
    path.write_bytes(bytes(data))


def read_failures(rt: WorkerRuntime) -> dict[str, float]:
    [fam] = [f for f in RuntimeCollector(rt).collect() if f.name == "kvctl_tier_read_failures"]
    return {s.labels["location"]: s.value for s in fam.samples if s.name.endswith("_total")}


def test_a_corrupt_disk_chunk_is_read_from_redis_and_quarantined(tmp_path, redis_proc):
    disk = tmp_path / "disk"
    rt = WorkerRuntime(ServerSettings(model="none", chunk_size=16, local_cpu=True,
                                      local_disk=f"file://{disk}/", max_local_disk_size=1,
                                      remote_url=redis_proc.url, codec_pool="thread"))
    try:
        ids = list(range(100, 150))  # 3 whole chunks and a partial one
        kv = torch.randn(2, 2, len(ids), 2, 8, generator=torch.Generator().manual_seed(1)
                         ).to(torch.float16)
        assert rt.store_kv(ids, kv) == 12  # 4 chunks in each of the three tiers
        rt.backends["LocalCPUBackend"].clear()  # as after a restart: memory is empty
        bad = rt.refs(ids)[1]
        [path] = disk.glob(f"{bad.key}-*.kvc")
        damage(path)

        n, got = rt.load_prefix(ids)
        # the whole prefix, from disk and (for the bad chunk) Redis, bit-exact (naive serde)
        assert n == len(ids) and torch.equal(got, kv)
        assert read_failures(rt) == {"LocalCPUBackend": 0, DISK: 1, "RemoteBackend": 0}
        assert not path.exists() and (disk / QUARANTINE / path.name).is_file()
        assert not rt.backends[DISK].contains(bad.key)
        # lookup no longer counts the bad chunk in the disk tier: its prefix ends before it
        assert rt.lookup_tiers(ids) == {"LocalCPUBackend": len(ids), DISK: bad.start,
                                        "RemoteBackend": len(ids)}
        # the bad chunk was promoted into memory from Redis, so the next read is whole too
        assert rt.load_prefix(ids)[0] == len(ids)
    finally:
        rt.close()


def test_decompress_names_the_corrupt_chunk_and_quarantines_it(tmp_path):
    disk = tmp_path / "disk"
    rt = WorkerRuntime(ServerSettings(model="none", chunk_size=16, local_cpu=False,
                                      local_disk=f"file://{disk}/", max_local_disk_size=1))
    try:
        ids = list(range(200, 248))
        kv = torch.randn(2, 2, len(ids), 2, 8).to(torch.float16)
        rt.store_kv(ids, kv)
        ev = rt.compress(INSTANCE, "int8", DISK, ids)
        assert rt.events.wait(ev.event_id, 120)["status"] == "finished"
        bad = rt.refs(ids)[2]
        [path] = disk.glob(f"{bad.key}-*.kvc")
        damage(path)

        ev = rt.decompress(INSTANCE, "int8", DISK, ids)  # in a codec process (the default)
        done = rt.events.wait(ev.event_id, 120)
        assert done["status"] == "failed"
        assert f"chunk 2 (key {bad.key}, tokens 32-48) in {DISK} is corrupt" in done["error"]
        assert "quarantined" in done["error"] and done["chunks_done"] == 2
        assert (disk / QUARANTINE / path.name).is_file()
        assert read_failures(rt)[DISK] == 1
        # what is left decompresses: the stored prefix now ends before the bad chunk
        ev = rt.decompress(INSTANCE, "int8", DISK, ids)
        done = rt.events.wait(ev.event_id, 120)
        assert done["status"] == "finished" and done["num_tokens"] == bad.start
    finally:
        rt.close()
