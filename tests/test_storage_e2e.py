"""Storage tiers through real `kvctl serve` processes, real Redis and the real model.

Write-through to memory, disk and Redis (single server and a three-node cluster), compress in
each tier, kill -9 and restart, read-through after a move, a Redis outage in the middle of a
compress, and kill -9 at random points of a disk compress.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import PROSE, RedisProc, free_port
from tests.test_e2e_serve import Stack, poll_status, wait_until_ready

pytestmark = [pytest.mark.e2e]

INSTANCE = "lmcache_default_instance"
TIERS = ("LocalCPUBackend", "LocalDiskBackend", "RemoteBackend")


def write_config(path: Path, disk: Path | None, remote_url: str | None,
                 remote_serde: str = "naive", chunk_size: int = 256) -> Path:
    lines = [f"chunk_size: {chunk_size}", "local_cpu: true", "max_local_cpu_size: 1",
             "torch_threads: 1",
             f'lmcache_instance_id: "{INSTANCE}"']
    if disk is not None:
        lines += [f'local_disk: "file://{disk}/"', "max_local_disk_size: 2"]
    if remote_url is not None:
        lines += [f'remote_url: "{remote_url}"', f'remote_serde: "{remote_serde}"']
    path.write_text("\n".join(lines) + "\n")
    return path


class Serve:
    """`kvctl serve` as a child process we may kill -9 and start again on the same ports."""

    def __init__(self, config: Path, model: bool = True) -> None:
        self.config = config
        self.model = model
        self.ports = [free_port() for _ in range(3)]
        self.stack: Stack | None = None
        self.starts = 0

    def start(self) -> Stack:
        args = [sys.executable, "-m", "kvctl", "serve", "--config", str(self.config),
                "--port", str(self.ports[0]), "--monitor-port", str(self.ports[1]),
                "--engine-port", str(self.ports[2])]
        if not self.model:
            args += ["--model", "none"]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # a file, not a pipe nobody reads: a chatty server must never block on its stderr
        self.starts += 1
        self.log = self.config.parent / f"serve-{self.starts}.log"
        with open(self.log, "w") as log:
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, text=True,
                                    env=env)
        self.stack = Stack(proc, *(f"http://127.0.0.1:{p}" for p in self.ports))
        ready = self.stack.engine + "/health" if self.model else \
            self.stack.monitor + "/healthz"
        try:
            wait_until_ready(proc, ready)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log.read_text()}") from None
        return self.stack

    def kill9(self) -> None:
        assert self.stack is not None
        self.stack.proc.send_signal(signal.SIGKILL)
        self.stack.proc.wait(30)

    def stop(self) -> None:
        if self.stack is not None and self.stack.proc.poll() is None:
            self.stack.proc.send_signal(signal.SIGINT)
            try:
                self.stack.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.stack.proc.kill()
                self.stack.proc.wait(10)


@pytest.fixture
def serve_factory() -> Iterator:
    started: list[Serve] = []

    def make(config: Path, model: bool = True) -> Serve:
        s = Serve(config, model)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


# ---------------------------------------------------------------- small HTTP helpers ----
def complete(s: Stack, prompt: str) -> dict:
    r = httpx.post(f"{s.engine}/v1/completions",
                   json={"prompt": prompt, "max_tokens": 4, "temperature": 0}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["usage"]


def cached(s: Stack, prompt: str) -> int:
    return complete(s, prompt)["prompt_tokens_details"]["cached_tokens"]


def token_ids(s: Stack, prompt: str) -> list[int]:
    return httpx.post(f"{s.engine}/tokenize", json={"prompt": prompt}).json()["tokens"]


def lookup(s: Stack, ids: list[int]) -> dict:
    r = httpx.post(f"{s.controller}/lookup", json={"tokens": ids}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def op(s: Stack, path: str, **body) -> dict:
    r = httpx.post(f"{s.controller}{path}", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def transcode(s: Stack, path: str, location: str, ids: list[int],
              method: str = "cachegen") -> dict:
    reply = op(s, path, instance_id=INSTANCE, method=method, location=location, tokens=ids)
    status = poll_status(s.controller, reply["event_id"], timeout=300)
    ev = httpx.get(f"{s.controller}/events/{reply['event_id']}").json()
    assert status == "finished", ev
    return reply | {"event": ev}


def metric(s: Stack, name: str, **labels: str) -> float:
    """One sample of the Prometheus text /metrics serves (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{s.monitor}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def store_compress_lookup(s: Stack, prompt: str, remote_serde_label: str) -> list[int]:
    """A served prompt lands in all three tiers; compress in Redis and on disk covers it."""
    usage = complete(s, prompt)
    ids = token_ids(s, prompt)
    assert usage["prompt_tokens"] == len(ids) > 256
    found = lookup(s, ids)
    assert found["layout_info"] == {INSTANCE: ["LocalCPUBackend", len(ids)]}
    assert found["tiers"] == {INSTANCE: {t: len(ids) for t in TIERS}}
    # remote_serde is the codec chunks are written to Redis with
    assert metric(s, "kvctl_store_codec_bytes", location="RemoteBackend",
                  codec=remote_serde_label) > 0
    for location in ("RemoteBackend", "LocalDiskBackend"):
        done = transcode(s, "/compress", location, ids)
        assert done["num_tokens"] == len(ids)
        assert done["event"]["chunks_done"] == done["event"]["chunks_total"] == 3
    assert metric(s, "kvctl_store_codec_bytes", location="LocalDiskBackend",
                  codec="cachegen") > 0
    return ids


def reuse_from_redis(s: Stack, prompt: str, ids: list[int]) -> None:
    """With memory and disk emptied, the completion reads its prefix from Redis."""
    for location in ("LocalCPUBackend", "LocalDiskBackend"):
        op(s, "/clear", instance_id=INSTANCE, location=location)
    assert lookup(s, ids)["tiers"] == {INSTANCE: {"RemoteBackend": len(ids)}}
    hits = metric(s, "kvctl_tier_hits_total", location="RemoteBackend")
    assert cached(s, prompt) > 0
    assert metric(s, "kvctl_tier_hits_total", location="RemoteBackend") == hits + 3
    # what came from Redis was promoted into memory
    assert lookup(s, ids)["tiers"][INSTANCE]["LocalCPUBackend"] == len(ids)


# ------------------------------------------------------------------------- tests ----
@pytest.mark.model
def test_three_tiers_single_redis_survive_kill9(tmp_path, redis_proc, serve_factory):
    cfg = write_config(tmp_path / "lmcache.yaml", tmp_path / "disk", redis_proc.url)
    serve = serve_factory(cfg)
    s = serve.start()
    ids = store_compress_lookup(s, PROSE, "raw")

    serve.kill9()
    s = serve.start()
    found = lookup(s, ids)
    assert found["layout_info"][INSTANCE][1] == len(ids)
    assert found["tiers"] == {INSTANCE: {"LocalDiskBackend": len(ids),
                                         "RemoteBackend": len(ids)}}
    done = transcode(s, "/decompress", "RemoteBackend", ids, method="int8")
    assert done["num_tokens"] == len(ids)
    assert done["event"]["chunk_codecs"] == [["cachegen", "raw"]] * 3
    # counted under the codec it decoded, not the method the request named
    assert metric(s, "kvctl_codec_chunks_total", op="decompress", method="cachegen") == 3
    assert metric(s, "kvctl_codec_chunks_total", op="decompress", method="int8") == 0
    assert cached(s, PROSE) > 0
    moved_to_disk_is_reused(s, PROSE[: len(PROSE) // 2])
    reuse_from_redis(s, PROSE, ids)


def moved_to_disk_is_reused(s: Stack, prompt: str) -> None:
    """After a move memory -> disk the engine still finds the prefix (it read only memory
    before read-through)."""
    complete(s, prompt)
    ids = token_ids(s, prompt)
    reply = op(s, "/move", old_position=[INSTANCE, "LocalCPUBackend"],
               new_position=[INSTANCE, "LocalDiskBackend"], tokens=ids, should_copy=False)
    assert poll_status(s.controller, reply["event_id"]) == "finished"
    assert "LocalCPUBackend" not in lookup(s, ids)["tiers"][INSTANCE]
    hits = metric(s, "kvctl_tier_hits_total", location="LocalDiskBackend")
    misses = metric(s, "kvctl_tier_misses_total", location="LocalCPUBackend")
    assert cached(s, prompt) > 0
    assert metric(s, "kvctl_tier_hits_total", location="LocalDiskBackend") > hits
    assert metric(s, "kvctl_tier_misses_total", location="LocalCPUBackend") > misses


@pytest.mark.model
def test_three_tiers_redis_cluster(tmp_path, redis_cluster, serve_factory):
    import redis

    cfg = write_config(tmp_path / "lmcache.yaml", tmp_path / "disk", redis_cluster,
                       remote_serde="cachegen")
    s = serve_factory(cfg).start()
    prompt = "A different text for the cluster. " + PROSE
    ids = store_compress_lookup(s, prompt, "cachegen")
    reuse_from_redis(s, prompt, ids)
    # three chunks, each its own key: spread over slots, so (very likely) over nodes too
    ports = [int(a.rsplit(":", 1)[1]) for a in redis_cluster.removeprefix("redis://").split(",")]
    assert sum(redis.Redis(port=p).dbsize() for p in ports) >= 3


def put_chunks(root_or_url: str | Path, ids: list[int], chunk_size: int, backend: str) -> int:
    """Fill a tier with raw chunks of real-sized random KV for ``ids`` (the tier's own code
    writes them, as the engine would)."""
    import torch

    from kvctl.codecs import get_codec
    from kvctl.server.chunks import chunk_refs
    from kvctl.server.storage import LocalDiskBackend, RemoteBackend

    b = (LocalDiskBackend(Path(root_or_url), 2 * 1024**3) if backend == "disk"
         else RemoteBackend(str(root_or_url), INSTANCE))
    raw = get_codec("raw")
    gen = torch.Generator().manual_seed(7)
    refs = chunk_refs(ids, chunk_size)
    for ref in refs:
        kv = torch.randn(30, 2, ref.num_tokens, 3, 64, generator=gen).to(torch.float16)
        b.put(ref.key, raw.encode(kv), ref.num_tokens)
    b.close()
    return len(refs)


@pytest.fixture
def redis_with_password(tmp_path) -> Iterator[RedisProc]:
    workdir = tmp_path / "redis-auth"
    workdir.mkdir()
    r = RedisProc(workdir, ("--requirepass", PASSWORD))
    r.start()
    try:
        yield r
    finally:
        r.stop()


PASSWORD = "hunter2-not-for-logs"


def test_redis_stopped_mid_compress_fails_fast_then_recovers(tmp_path, redis_with_password,
                                                             serve_factory):
    redis_proc = redis_with_password
    url = f"redis://:{PASSWORD}@127.0.0.1:{redis_proc.port}/0"
    chunk = 64
    ids = list(range(1000, 1000 + 120 * chunk))
    n = put_chunks(url, ids, chunk, "remote")
    cfg = write_config(tmp_path / "lmcache.yaml", None, url, chunk_size=chunk)
    s = serve_factory(cfg, model=False).start()
    reply = op(s, "/compress", instance_id=INSTANCE, method="cachegen",
               location="RemoteBackend", tokens=ids)
    assert reply["num_tokens"] == len(ids)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ev = httpx.get(f"{s.controller}/events/{reply['event_id']}").json()
        if ev["chunks_done"] >= 1:
            break
        time.sleep(0.01)
    assert ev["status"] == "running" and ev["chunks_done"] < n, ev

    redis_proc.stop()
    stopped = time.monotonic()
    while time.monotonic() - stopped < 5:
        ev = httpx.get(f"{s.controller}/events/{reply['event_id']}", timeout=5).json()
        if ev["status"] in ("finished", "failed"):
            break
        time.sleep(0.05)
    assert ev["status"] == "failed", ev
    assert "RemoteBackend" in ev["error"] and ev["chunks_done"] < n
    # the reason names the server, never its password (GET /events has no authentication)
    assert f"127.0.0.1:{redis_proc.port}" in ev["error"]
    assert PASSWORD not in httpx.get(f"{s.controller}/events").text
    # the rest of the server still answers: lookup, and work on another tier
    assert lookup(s, ids[:chunk])["layout_info"] == {}

    redis_proc.start()
    put_chunks(url, ids[: 4 * chunk], chunk, "remote")
    done = transcode(s, "/compress", "RemoteBackend", ids[: 4 * chunk])
    assert done["num_tokens"] == 4 * chunk and done["event"]["chunks_done"] == 4


def test_kill9_during_disk_compress_leaves_every_chunk_whole(tmp_path, serve_factory):
    from kvctl.codecs import decode_blob
    from kvctl.server.storage import LocalDiskBackend

    chunk = 128
    ids = list(range(2000, 2000 + 16 * chunk))
    disk = tmp_path / "disk"
    n = put_chunks(disk, ids, chunk, "disk")
    cfg = write_config(tmp_path / "lmcache.yaml", disk, None, chunk_size=chunk)
    rng = random.Random(11)
    serve = serve_factory(cfg, model=False)
    for round_, kill_at in enumerate(sorted(rng.sample(range(n), 4))):
        s = serve.start()
        # every chunk of the disk tier was found again at start, and no temporary is left
        assert lookup(s, ids)["tiers"] == {INSTANCE: {"LocalDiskBackend": len(ids)}}
        assert not list(disk.glob(".*.tmp"))
        # alternate the codec, so that every chunk of every round is rewritten (forced:
        # stacking losses does not matter to this test)
        reply = op(s, "/compress", instance_id=INSTANCE, method=("int8", "cachegen")[round_ % 2],
                   location="LocalDiskBackend", tokens=ids, force=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ev = httpx.get(f"{s.controller}/events/{reply['event_id']}").json()
            if ev["chunks_done"] >= kill_at or ev["status"] in ("finished", "failed"):
                break
            time.sleep(0.005)
        serve.kill9()
    s = serve.start()
    assert not list(disk.glob(".*.tmp"))
    assert lookup(s, ids)["tiers"] == {INSTANCE: {"LocalDiskBackend": len(ids)}}
    serve.stop()
    b = LocalDiskBackend(disk, 2 * 1024**3)
    assert len(b.keys()) == n
    codecs = set()
    for key in b.keys():
        kv = decode_blob(b.get(key))  # checksum verified: whole, raw or compressed
        assert tuple(kv.shape) == (30, 2, chunk, 3, 64)
        codecs.add(b.codec_of(key))
    assert codecs <= {"raw", "int8", "cachegen"}
