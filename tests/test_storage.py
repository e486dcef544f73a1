import pytest

from kvctl.server.storage import (
    LocalCPUBackend,
    LocalDiskBackend,
    RemoteBackend,
    StorageError,
    StorageFullError,
)


def test_cpu_evicts_least_recently_used_unpinned():
    b = LocalCPUBackend(capacity_bytes=300)
    b.put("a", b"x" * 100, 1)
    b.put("b", b"x" * 100, 1)
    b.put("c", b"x" * 100, 1)
    assert b.get("a") is not None  # a is now most recent
    b.put("d", b"x" * 100, 1)
    assert not b.contains("b")
    assert b.keys() == ["c", "a", "d"]
    assert b.stats().bytes == 300


def test_cpu_never_evicts_pinned():
    b = LocalCPUBackend(capacity_bytes=200)
    b.put("a", b"x" * 100, 1)
    b.put("b", b"x" * 100, 1)
    assert b.set_pinned("a", True) and b.set_pinned("b", True)
    with pytest.raises(StorageFullError, match="pinned"):
        b.put("c", b"x" * 100, 1)
    assert b.contains("a") and b.contains("b")
    b.set_pinned("b", False)
    b.put("c", b"x" * 100, 1)
    assert b.contains("a") and not b.contains("b")


def test_cpu_replacing_a_chunk_keeps_accounting_and_pin():
    b = LocalCPUBackend(capacity_bytes=1000)
    b.put("a", b"x" * 400, 5)
    b.set_pinned("a", True)
    b.put("a", b"y" * 100, 5)
    s = b.stats()
    assert (s.chunks, s.bytes, s.pinned_chunks) == (1, 100, 1)
    assert b.delete("a") == 5 and b.stats().bytes == 0


def test_cpu_rejects_a_chunk_larger_than_capacity():
    with pytest.raises(StorageFullError, match="max_local_cpu_size"):
        LocalCPUBackend(10).put("a", b"x" * 11, 1)


def test_disk_survives_restart_with_pins(tmp_path):
    b = LocalDiskBackend(tmp_path, capacity_bytes=10_000)
    b.put("k1", b"hello", 3)
    b.put("k2", b"world!", 4)
    b.set_pinned("k2", True)
    again = LocalDiskBackend(tmp_path, capacity_bytes=10_000)
    assert again.get("k1") == b"hello" and again.num_tokens("k2") == 4
    assert again.stats().pinned_chunks == 1 and again.stats().bytes == 11
    assert again.clear() == 7
    assert not list(tmp_path.glob("*.kvc"))


def test_disk_writes_leave_no_temp_files_and_evict(tmp_path):
    b = LocalDiskBackend(tmp_path, capacity_bytes=250)
    for i in range(5):
        b.put(f"k{i}", bytes(100), 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k3-1.kvc", "k4-1.kvc"]


def test_remote_roundtrip_on_real_redis(redis_url):
    b = RemoteBackend(redis_url, namespace="test-ns")
    b.clear()
    b.put("k", b"\x00\x01" * 1000, 12)
    assert b.get("k") == b"\x00\x01" * 1000
    assert b.contains("k") and b.num_tokens("k") == 12
    assert b.set_pinned("k", True) and b.stats().pinned_chunks == 1
    assert b.stats().bytes == 2000
    assert b.delete("k") == 12 and b.get("k") is None and b.stats().chunks == 0


def test_remote_unreachable_is_a_storage_error():
    from tests.conftest import free_port

    b = RemoteBackend(f"redis://127.0.0.1:{free_port()}", namespace="x")
    with pytest.raises(StorageError, match="RemoteBackend"):
        b.ping()


def test_remote_rejects_lm_scheme():
    with pytest.raises(StorageError, match="redis://"):
        RemoteBackend("lm://localhost:65432", namespace="x")
