"""Load: many concurrent clients on shared prompts against a real `kvctl serve`.

Starts `kvctl serve` on free loopback ports (unless --controller/--engine/--monitor name a
running one), stores the KV of a few prompts through the engine, then runs --clients
asyncio clients for --seconds, each looping over a random mix of /compress, /decompress,
/lookup, /pin, /unpin, /check_finish and GET /events/{id} on the shared prompts. A sampler
reads the queue depth from the monitor's /metrics every half second.

Afterwards it waits for the queue to drain and checks every prompt is intact (the lookup
holds as many tokens as before the load) and reused (a completion of it reports
cached_tokens > 0), then prints a JSON report: throughput, p50/p99 acknowledgement latency
(request sent -> reply read), status counts (5xx, 429), unfinished events, drain time and
queue depth over time.

Usage: python benchmarks/load_test.py [--seconds 60] [--clients 50] [--controller URL
       --engine URL --monitor URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import httpx

INSTANCE = "lmcache_default_instance"
LOCATION = "LocalCPUBackend"
METHOD = "cachegen"
OPS = ("compress", "decompress", "lookup", "pin", "unpin", "check_finish", "event")
# A prompt per topic; each ~1,000 tokens (four 256-token chunks), shared by every client.
TOPICS = ("the river rose through the night", "the harvest came in late that year",
          "the old bridge was closed for repairs", "the library opened a new wing",
          "the ferry ran twice a day in winter", "the market moved to the square")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            sys.exit(f"kvctl serve exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    sys.exit(f"{url} not ready after {timeout} s")


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def queue_depth(metrics_text: str) -> int:
    for line in metrics_text.splitlines():
        if line.startswith("kvctl_queue_depth "):
            return int(float(line.split()[1]))
    raise ValueError("no kvctl_queue_depth in /metrics")


class Load:
    def __init__(self, ctl: str, mon: str, prompts: list[list[int]], seconds: float) -> None:
        self.ctl, self.mon, self.prompts, self.seconds = ctl, mon, prompts, seconds
        self.latency_ms: dict[str, list[float]] = {op: [] for op in OPS}
        self.status: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.event_ids: list[str] = []
        self.depth: list[tuple[float, int]] = []
        self.t0 = 0.0

    def body(self, op: str, tokens: list[int]) -> dict[str, Any]:
        if op in ("compress", "decompress"):
            return {"instance_id": INSTANCE, "method": METHOD, "location": LOCATION,
                    "tokens": tokens}
        if op in ("pin", "unpin"):
            return {"instance_id": INSTANCE, "location": LOCATION, "tokens": tokens}
        return {"tokens": tokens}

    async def client(self, http: httpx.AsyncClient, rng: random.Random) -> None:
        end = self.t0 + self.seconds
        while time.monotonic() < end:
            op = rng.choice(OPS)
            tokens = rng.choice(self.prompts)
            if op in ("check_finish", "event"):
                if not self.event_ids:
                    continue
                eid = rng.choice(self.event_ids[-200:])
                req = (http.build_request("POST", "/check_finish", json={"event_id": eid})
                       if op == "check_finish" else http.build_request("GET", f"/events/{eid}"))
            else:
                req = http.build_request("POST", f"/{op}", json=self.body(op, tokens))
            t = time.perf_counter()
            try:
                r = await http.send(req)
            except httpx.HTTPError as exc:
                self.errors[type(exc).__name__] += 1
                continue
            self.latency_ms[op].append((time.perf_counter() - t) * 1000)
            self.status[r.status_code] += 1
            if r.status_code == 200 and op in ("compress", "decompress", "pin", "unpin"):
                self.event_ids.append(r.json()["event_id"])
            elif r.status_code == 429:
                # what a well-behaved client does with Retry-After
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))

    async def sampler(self, http: httpx.AsyncClient) -> None:
        while True:
            try:
                r = await http.get(self.mon + "/metrics")
                self.depth.append((round(time.monotonic() - self.t0, 1), queue_depth(r.text)))
            except (httpx.HTTPError, ValueError):
                pass
            await asyncio.sleep(0.5)

    async def run(self, clients: int) -> float:
        limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
        async with httpx.AsyncClient(base_url=self.ctl, timeout=120, limits=limits) as http, \
                httpx.AsyncClient(timeout=30) as mon:
            self.t0 = time.monotonic()
            sampling = asyncio.create_task(self.sampler(mon))
            await asyncio.gather(*(self.client(http, random.Random(i)) for i in range(clients)))
            elapsed = time.monotonic() - self.t0
            sampling.cancel()
        return elapsed


def lookup_tokens(http: httpx.Client, ctl: str, tokens: list[int]) -> int:
    r = http.post(ctl + "/lookup", json={"tokens": tokens})
    r.raise_for_status()
    tiers = r.json()["tiers"].get(INSTANCE, {})
    return int(tiers.get(LOCATION, 0))


def versions() -> str:
    from importlib.metadata import version

    parts = [f"python {platform.python_version()}"]
    for pkg in ("torch", "fastapi", "uvicorn", "httpx"):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except Exception:
            pass
    return ", ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--prompts", type=int, default=len(TOPICS))
    ap.add_argument("--controller", help="a running controller (else one is started)")
    ap.add_argument("--engine", help="its engine (with --controller)")
    ap.add_argument("--monitor", help="its monitor (with --controller)")
    ap.add_argument("--drain-timeout", type=float, default=300.0)
    args = ap.parse_args()

    proc = None
    if args.controller:
        if not (args.engine and args.monitor):
            sys.exit("--controller needs --engine and --monitor too")
        ctl, eng, mon = args.controller, args.engine, args.monitor
    else:
        cport, mport, eport = free_port(), free_port(), free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvctl", "serve", "--port", str(cport), "--monitor-port",
             str(mport), "--engine-port", str(eport)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ctl, mon, eng = (f"http://127.0.0.1:{p}" for p in (cport, mport, eport))
    try:
        wait_ready(eng + "/health", proc)
        http = httpx.Client(timeout=300)
        prompts: list[list[int]] = []
        for topic in TOPICS[:args.prompts]:
            text = (f"Report on how {topic}: the town council met at dawn to decide which "
                    "roads to close and which to keep open, and who would tell the farms. ") * 30
            r = http.post(eng + "/v1/completions", json={"prompt": text, "max_tokens": 1})
            r.raise_for_status()
            prompts.append(http.post(eng + "/tokenize", json={"prompt": text}).json()["tokens"])
        before = [lookup_tokens(http, ctl, p) for p in prompts]

        load = Load(ctl, mon, prompts, args.seconds)
        elapsed = asyncio.run(load.run(args.clients))

        # drain: every accepted event must end
        t_end = time.monotonic()
        deadline = t_end + args.drain_timeout
        while time.monotonic() < deadline:
            depth = queue_depth(http.get(mon + "/metrics").text)
            if depth == 0:
                break
            time.sleep(0.2)
        drain_s = time.monotonic() - t_end
        statuses: Counter[str] = Counter()
        for eid in load.event_ids:
            r = http.get(f"{ctl}/events/{eid}")
            statuses[r.json()["status"] if r.status_code == 200 else f"HTTP {r.status_code}"] += 1
        unfinished = statuses["queued"] + statuses["running"]

        after = [lookup_tokens(http, ctl, p) for p in prompts]
        # leave every chunk decodable by the engine either way: the cached prefix is reused
        # from compressed or raw chunks alike
        cached = []
        for p in prompts:
            r = http.post(eng + "/v1/completions", json={"prompt": p, "max_tokens": 1})
            r.raise_for_status()
            cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])

        acks = [x for op in ("compress", "decompress", "pin", "unpin")
                for x in load.latency_ms[op]]
        every = [x for xs in load.latency_ms.values() for x in xs]
        total = sum(load.status.values())
        result = {
            "clients": args.clients, "seconds": round(elapsed, 1), "prompts": len(prompts),
            "prompt_tokens": [len(p) for p in prompts],
            "requests": total,
            "throughput_rps": round(total / elapsed, 1),
            "ack_p50_ms": round(percentile(acks, 0.50), 1),
            "ack_p99_ms": round(percentile(acks, 0.99), 1),
            "all_p50_ms": round(percentile(every, 0.50), 1),
            "all_p99_ms": round(percentile(every, 0.99), 1),
            "per_op": {op: {"n": len(xs), "p50_ms": round(percentile(xs, 0.5), 1),
                            "p99_ms": round(percentile(xs, 0.99), 1)}
                       for op, xs in load.latency_ms.items()},
            "status_counts": {str(k): v for k, v in sorted(load.status.items())},
            "http_5xx": sum(v for k, v in load.status.items() if k >= 500),
            "http_429": load.status.get(429, 0),
            "transport_errors": dict(load.errors),
            "events_accepted": len(load.event_ids),
            "event_statuses_after_drain": dict(statuses),
            "unfinished_events": unfinished,
            "drain_s": round(drain_s, 1),
            "queue_depth_max": max((d for _, d in load.depth), default=0),
            "queue_depth_over_time": load.depth[::4],
            "lookup_tokens_before": before, "lookup_tokens_after": after,
            "intact": before == after and all(b > 0 for b in before),
            "cached_tokens_after": cached,
            "reused": all(c > 0 for c in cached),
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {platform.platform()}",
            "versions": versions(),
        }
        print(json.dumps(result, indent=1))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
