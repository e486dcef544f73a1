"""A real ``lmcache server`` (CPU, lmcache_driven) with kvctl's plugin, from config alone.

``lmcache bench server`` stores two chunks of its own KV (30 layers of seeded
``torch.randn``, as the bench allocates them), ``lmcache kvcache clear`` empties L1, and a
second bench run retrieves them from L2 through the kvctl serde. The server's own
``/cache/checksums`` digest, which the bench prints, must equal the digest of kvctl's
``decode(encode(chunk))``, recomputed here from the bench's seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip(
    "lmcache", reason="LMCache is not installed: `make setup` installs it "
    "(pip install --no-deps lmcache==0.5.6 plus its pure-Python dependencies)")

import torch

from kvctl.codecs import get_codec, peek_blob
from tests.conftest import free_port

pytestmark = pytest.mark.e2e

LAYERS, BLOCKS, BLOCK, HEADS, DIM = 30, 64, 16, 3, 64
CHUNK = 256
SHAPE_SPEC = f"(2,{BLOCKS},{BLOCK},{HEADS},{DIM}):bfloat16:{LAYERS}"
BENCH_SEED = 42  # lmcache.cli.commands.bench.server_bench.helpers allocates after this seed
START_S = 180
RUN_S = 180


def lmcache_exe() -> str:
    exe = Path(sys.executable).with_name("lmcache")
    if not exe.exists():
        pytest.skip(f"the lmcache console script is missing next to {sys.executable}")
    return str(exe)


def env() -> dict[str, str]:
    return {**os.environ, "LMCACHE_DISABLE_BANNER": "1", "LMCACHE_TRACK_USAGE": "false",
            "DO_NOT_TRACK": "1", "OMP_NUM_THREADS": "2"}


class Server:
    def __init__(self, proc: subprocess.Popen, rpc: str, http: str, log: Path, l2: Path):
        self.proc, self.rpc, self.http, self.log, self.l2 = proc, rpc, http, log, l2

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("lmcache-server")
    l2 = work / "l2"
    log = work / "server.log"
    adapter = {"type": "plugin", "module_path": "kvctl.integrations.lmcache.plugin",
               "class_name": "KvctlFSL2Adapter", "adapter_params": {"base_path": str(l2)},
               "serde": {"type": "kvctl-cachegen", "head_dim": DIM}}
    rpc_port, http_port = free_port(), free_port()
    cmd = [lmcache_exe(), "server", "--host", "127.0.0.1", "--port", str(rpc_port),
           "--http-host", "127.0.0.1", "--http-port", str(http_port),
           "--chunk-size", str(CHUNK), "--l1-size-gb", "0.25", "--eviction-policy", "LRU",
           "--supported-transfer-mode", "lmcache_driven", "--max-workers", "1",
           "--disable-observability", "--disable-metrics", "--l2-adapter", json.dumps(adapter)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env(),
                                start_new_session=True)
    http = f"http://127.0.0.1:{http_port}"
    srv = Server(proc, f"tcp://127.0.0.1:{rpc_port}", http, log, l2)
    try:
        deadline = time.monotonic() + START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"lmcache server exited with {proc.returncode}:\n"
                            f"{srv.log_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{http}/healthcheck", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"lmcache server not healthy after {START_S} s:\n"
                            f"{srv.log_text()[-3000:]}")
            time.sleep(0.2)
        yield srv
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def run(*args: str) -> str:
    proc = subprocess.run([lmcache_exe(), *args], capture_output=True, text=True, env=env(),
                          timeout=RUN_S)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"lmcache {' '.join(args)} failed:\n{output[-3000:]}"
    return output


def bench(server: Server) -> str:
    # LMCache's bench client gives each RPC a fixed 10 s; on a loaded 2-core machine a
    # store or retrieve can outlast it ("... timeout" in its output). Such a run is repeated
    # (the keys are the same, so a repeat stores or retrieves the same chunks); any other
    # failure is not.
    for _ in range(3):
        output = run("bench", "server", "--rpc-url", server.rpc, "--mode", "cpu",
                     "--transfer-mode", "lmcache_driven", "--kvcache-shape-spec", SHAPE_SPEC,
                     "--num-tokens", "512", "--start", "0", "--end", "1", "--interval", "0",
                     "--url", server.http)
        if not re.search(r"\[seq 0/(cold|warm)\] (LOOKUP timeout|\w+: timeout)", output):
            break
    return output


def bench_until_warm(server: Server) -> list[str]:
    """Bench runs until one prints a warm checksum (three at most). The bench looks its keys up
    again right after the cold request; on a loaded machine that lookup can come before the
    server has committed them, and then the warm request retrieves nothing and prints no
    checksum. A repeat finds the keys (same ids) and retrieves them."""
    outputs: list[str] = []
    for _ in range(3):
        outputs.append(bench(server))
        if re.search(r"\[seq 0/warm\] CHECKSUM", outputs[-1]):
            break
    return outputs


def checksum(output: str, kind: str) -> str:
    m = re.search(rf"\[seq 0/{kind}\] CHECKSUM: ([0-9a-f]{{16}})", output)
    assert m, f"no {kind} checksum in the bench output:\n{output[-3000:]}"
    return m.group(1)


def bench_kv() -> list[torch.Tensor]:
    """The bench's paged KV: one [2, blocks, block, heads, dim] bf16 tensor per layer."""
    torch.manual_seed(BENCH_SEED)
    return [torch.randn((2, BLOCKS, BLOCK, HEADS, DIM), dtype=torch.bfloat16)
            for _ in range(LAYERS)]


def chunk_kv(layers: list[torch.Tensor], c: int) -> torch.Tensor:
    """Chunk ``c`` (sequence 0 starts at block 0) as kvctl KV [L, 2, 256, H, D]."""
    per = CHUNK // BLOCK
    return torch.stack([t[:, c * per:(c + 1) * per].reshape(2, CHUNK, HEADS, DIM)
                        for t in layers])


def server_digest(layers: list[torch.Tensor], chunks: int) -> str:
    """What the server's /cache/checksums reports and the bench prints for these blocks:
    per chunk one MD5 over every layer's blocks (bf16 upcast to fp32), then an MD5 of the
    joined hex digests, first 16 characters."""
    per = CHUNK // BLOCK
    sums = []
    for c in range(chunks):
        h = hashlib.md5()
        for t in layers:
            h.update(t.narrow(1, c * per, per).float().contiguous().numpy().tobytes())
        sums.append(h.hexdigest())
    return hashlib.md5("".join(sums).encode()).hexdigest()[:16]


def test_store_clear_and_retrieve_from_l2_through_kvctl_serde(server):
    layers = bench_kv()
    codec = get_codec("cachegen")
    blobs = [codec.encode(chunk_kv(layers, c)) for c in range(2)]
    decoded = [t.clone() for t in layers]
    per = CHUNK // BLOCK
    for c, blob in enumerate(blobs):
        out = codec.decode(blob)
        for i, t in enumerate(decoded):
            t[:, c * per:(c + 1) * per] = out[i].reshape(2, per, BLOCK, HEADS, DIM)
    exact, lossy = server_digest(layers, 2), server_digest(decoded, 2)
    assert exact != lossy

    first = bench_until_warm(server)
    assert checksum(first[0], "cold") == exact  # stored, then warm-retrieved from L1
    assert checksum(first[-1], "warm") == exact

    deadline = time.monotonic() + RUN_S
    while len(list(server.l2.glob("*.kvc"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    files = sorted(server.l2.glob("*.kvc"))
    assert len(files) == 2, f"chunk files in L2: {files}"
    assert sorted(p.stat().st_size for p in files) == sorted(len(b) for b in blobs)
    for p in files:
        info = peek_blob(p.read_bytes(), verify=True)
        assert (info.codec, info.shape) == ("cachegen", (LAYERS, 2, CHUNK, HEADS, DIM))

    run("kvcache", "clear", "--url", server.http)

    second = bench_until_warm(server)
    assert "[seq 0/cold] LOOKUP: 2/2 chunks hit" in second[0]
    assert "[seq 0/cold] RETRIEVE: retrieved (512 tokens" in second[0]
    assert checksum(second[-1], "warm") == lossy  # what L2 held, decoded by the kvctl serde
    assert re.search(r"2/2 retained keys \(0 L1, 2 L2\)[^\n]*req-0-cold", server.log_text())
