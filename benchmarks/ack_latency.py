"""Acknowledgement latency of the controller under 50 concurrent clients while codecs run.

Starts real processes on loopback ports, fills each instance's store through its engine with
the KV of a few long prompts, keeps codec jobs running in the background (a long prompt
compressed, decompressed, compressed again, ...) and meanwhile runs N concurrent clients,
each sending a random mix of /compress, /decompress, /lookup and /check_finish with a random
pause between its requests. Every request is timed from send to reply.

Topologies (``--topology``):
- ``serve``: one `kvctl serve` (controller + embedded worker + engine);
- ``serve-threads``: the same with codec work on threads of the serving process
  (``codec_pool: thread``), to measure what the process pool buys;
- ``cluster``: `kvctl serve --model none --no-worker` and two `kvctl worker` processes.

Usage: python benchmarks/ack_latency.py --topology serve [--clients 50] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml
from harness import (
    Conn,
    cpu_seconds,
    free_port,
    git_commit,
    loadavg,
    machine,
    pct,
    stop,
    versions,
    wait_ready,
)

from kvctl.common.paths import atomic_write

OPS = ("compress", "decompress", "lookup", "check_finish")


def start(topology: str, tmp: Path) -> tuple[str, dict[str, str], list[subprocess.Popen]]:
    """Controller URL, engine URL per instance, the processes."""
    env = dict(os.environ, KVCTL_DEVICE="cpu")
    out = subprocess.DEVNULL
    kvctl = [sys.executable, "-m", "kvctl"]
    cport, mport = free_port(), free_port()
    ctl = f"http://127.0.0.1:{cport}"
    if topology in ("serve", "serve-threads"):
        eport = free_port()
        cfg = tmp / "serve.yaml"
        cfg.write_text(yaml.safe_dump({
            "codec_pool": "thread" if topology == "serve-threads" else "process",
            "torch_threads": 1}))
        proc = subprocess.Popen([*kvctl, "serve", "--config", str(cfg), "--port", str(cport),
                                 "--monitor-port", str(mport), "--engine-port", str(eport)],
                                stdout=out, stderr=out, env=env)
        engines = {"lmcache_default_instance": f"http://127.0.0.1:{eport}"}
        return ctl, engines, [proc]
    procs = [subprocess.Popen([*kvctl, "serve", "--model", "none", "--no-worker", "--port",
                               str(cport), "--monitor-port", str(mport)],
                              stdout=out, stderr=out, env=env)]
    engines = {}
    for iid in ("bench-a", "bench-b"):
        wport, eport = free_port(), free_port()
        cfg = tmp / f"{iid}.yaml"
        cfg.write_text(yaml.safe_dump({
            "lmcache_instance_id": iid, "controller_url": f"127.0.0.1:{mport}",
            "lmcache_worker_port": wport, "torch_threads": 1}))
        procs.append(subprocess.Popen([*kvctl, "worker", "--config", str(cfg),
                                       "--engine-port", str(eport)],
                                      stdout=out, stderr=out, env=env))
        engines[iid] = f"http://127.0.0.1:{eport}"
    return ctl, engines, procs


def fill(engines: dict[str, str]) -> dict[str, list[list[int]]]:
    """Three ~1,700-token prompts per instance, stored by its engine."""
    prompts: dict[str, list[list[int]]] = {}
    with httpx.Client(timeout=600) as c:
        for iid, eng in engines.items():
            prompts[iid] = []
            for i in range(3):
                text = (f"Report {i} from {iid}: the river rose through the night and the "
                        "town council met at dawn to decide which roads to close and which "
                        "to keep open. ") * 60
                c.post(f"{eng}/v1/completions", json={"prompt": text, "max_tokens": 1})
                prompts[iid].append(c.post(f"{eng}/tokenize", json={"prompt": text}
                                           ).json()["tokens"])
    return prompts


def body(iid: str, tokens: list[int]) -> dict:
    return {"instance_id": iid, "method": "cachegen", "location": "LocalCPUBackend",
            "tokens": tokens}


async def keep_codecs_busy(ctl: str, prompts: dict[str, list[list[int]]], stop: asyncio.Event,
                           ended: list[dict]) -> None:
    """Compress, then decompress, then compress ... prompt 0 of each instance, back to back."""

    async def cycle(iid: str) -> None:
        conn = Conn(ctl)
        payloads = {op: json.dumps(body(iid, prompts[iid][0])).encode()
                    for op in ("compress", "decompress")}
        op = "compress"
        try:
            while not stop.is_set():
                status, headers, reply = await conn.request("POST", f"/{op}", payloads[op])
                if status == 429:  # the worker's queue is full: back off, as told
                    await asyncio.sleep(float(headers.get(b"retry-after", b"1")))
                    continue
                if status != 200:
                    raise SystemExit(f"{op} on {iid}: HTTP {status} {reply[:300]!r}")
                eid = json.loads(reply)["event_id"]
                while True:
                    _, _, reply = await conn.request("GET", f"/events/{eid}")
                    ev = json.loads(reply)
                    if ev["status"] in ("finished", "failed"):
                        ended.append(ev)
                        break
                    await asyncio.sleep(0.05)
                op = "decompress" if op == "compress" else "compress"
        finally:
            conn.close()

    await asyncio.gather(*(cycle(iid) for iid in prompts))


async def client(ctl: str, prompts: dict[str, list[list[int]]], seconds: float, pause: float,
                 rng: random.Random, samples: list[tuple[str, float]], errors: list[str]
                 ) -> None:
    iids = list(prompts)
    conn = Conn(ctl)
    # bodies prepared once: prompts 1 and 2 (prompt 0 belongs to the background cycle)
    prepared = {(op, iid, k): json.dumps({"tokens": prompts[iid][k]} if op == "lookup"
                                         else body(iid, prompts[iid][k])).encode()
                for op in ("compress", "decompress", "lookup") for iid in iids for k in (1, 2)}
    last_event: str | None = None
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            await asyncio.sleep(rng.expovariate(1 / pause))
            op = rng.choice(OPS)
            if op == "check_finish" and last_event is None:
                op = "lookup"
            payload = (json.dumps({"event_id": last_event}).encode() if op == "check_finish"
                       else prepared[(op, rng.choice(iids), rng.choice((1, 2)))])
            t0 = time.perf_counter()
            status, _, reply = await conn.request("POST", f"/{op}", payload)
            samples.append((op, (time.perf_counter() - t0) * 1000))
            if status != 200:
                errors.append(f"{op}: HTTP {status} {reply[:200]!r}")
            elif op in ("compress", "decompress"):
                last_event = json.loads(reply)["event_id"]
    finally:
        conn.close()


async def measure(ctl: str, prompts: dict[str, list[list[int]]], clients: int, seconds: float,
                  pause: float, seed: int) -> dict:
    stop = asyncio.Event()
    ended: list[dict] = []
    busy = asyncio.create_task(keep_codecs_busy(ctl, prompts, stop, ended))
    await asyncio.sleep(1.0)  # the first background jobs are running
    samples: list[tuple[str, float]] = []
    errors: list[str] = []
    t0 = time.monotonic()
    await asyncio.gather(*(client(ctl, prompts, seconds, pause, random.Random(seed + i),
                                  samples, errors) for i in range(clients)))
    wall = time.monotonic() - t0
    stop.set()
    await busy
    lat = [ms for _, ms in samples]
    per_op = {op: {"n": len(v), "p50_ms": pct(v, 0.5), "p99_ms": pct(v, 0.99)}
              for op in OPS if (v := [ms for o, ms in samples if o == op])}
    codec_chunks = sum(ev["chunks_done"] for ev in ended)
    # 429 (the worker's queue is full, Retry-After) is an acknowledgement too; anything
    # else that is not 200 is an error
    refused = sum(1 for e in errors if ": HTTP 429 " in e)
    return {"requests": len(lat), "errors": len(errors) - refused, "http_429": refused,
            "first_errors": [e for e in errors if ": HTTP 429 " not in e][:3],
            "rate_per_s": round(len(lat) / wall, 1),
            "p50_ms": pct(lat, 0.5), "p95_ms": pct(lat, 0.95), "p99_ms": pct(lat, 0.99),
            "max_ms": round(max(lat), 2), "mean_ms": round(statistics.fmean(lat), 2),
            "per_op": per_op,
            "background_codec_jobs_ended": len(ended),
            "background_codec_chunks": codec_chunks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topology", choices=("serve", "serve-threads", "cluster"),
                    default="serve")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--pause", type=float, default=0.2,
                    help="mean pause of each client between requests, seconds (exponential)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", help="also write the JSON result to this file")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ctl, engines, procs = start(args.topology, Path(tmp))
        try:
            for eng in engines.values():
                wait_ready(eng + "/health", procs)
            prompts = fill(engines)
            load_before = loadavg()
            cpu0, srv0 = cpu_seconds(), [cpu_seconds(p.pid) for p in procs]
            t0 = time.monotonic()
            result = asyncio.run(measure(ctl, prompts, args.clients, args.seconds, args.pause,
                                         args.seed))
            wall = time.monotonic() - t0
            cpu1, srv1 = cpu_seconds(), [cpu_seconds(p.pid) for p in procs]
            load_after = loadavg()
        finally:
            stop(procs)
    result = {"command": " ".join(["python", *sys.argv]),
              "topology": args.topology, "clients": args.clients, "seconds": args.seconds,
              "mean_pause_s": args.pause, **result,
              # what the measurement cost: a client process near 100% would measure itself
              "client_cpu_pct": round((cpu1 - cpu0) / wall * 100, 1),
              # the serving processes' own CPU (their codec processes not included): the
              # controller (`kvctl serve`), then each worker
              "server_cpu_pct": [round((b - a) / wall * 100, 1)
                                 for a, b in zip(srv0, srv1, strict=True)],
              "loadavg_before": load_before, "loadavg_after": load_after,
              "machine": machine(), "versions": versions(), "commit": git_commit()}
    out = json.dumps(result, indent=2)
    print(out)
    if args.out:
        atomic_write(Path(args.out), (out + "\n").encode(), durable=False)


if __name__ == "__main__":
    main()
