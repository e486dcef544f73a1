"""Load: many concurrent clients on shared prompts against a real `kvctl serve`.

Starts `kvctl serve` on free loopback ports (unless --controller/--engine/--monitor name a
running one), stores the KV of a few prompts through the engine, then runs --clients
asyncio clients for --seconds, each looping over a random mix of /compress, /decompress,
/lookup, /pin, /unpin, /check_finish and GET /events/{id} on the shared prompts, with an
exponential pause of mean --pause seconds between its requests (--pause 0: no pause, a
closed loop that measures saturation). A client answered 429 waits its Retry-After. A
sampler reads the queue depth from the monitor's /metrics every half second.

Afterwards it waits for the queue to drain and checks every prompt is intact (the lookup
holds as many tokens as before the load) and reused (a completion of it reports
cached_tokens > 0), then prints a JSON report: throughput, p50/p99 acknowledgement latency
(request written -> whole reply read), status counts (5xx, 429), unfinished events, drain
time, queue depth over time, the CPU share of the client process and of the server, and the
load average. It exits 1 if a check failed (a 5xx, a transport error, an event left
unfinished, a prompt not intact or not reused).

Usage: python benchmarks/load_test.py [--seconds 60] [--clients 50] [--pause 0.2]
       [--out FILE] [--controller URL --engine URL --monitor URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
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

INSTANCE = "lmcache_default_instance"
LOCATION = "LocalCPUBackend"
METHOD = "cachegen"
OPS = ("compress", "decompress", "lookup", "pin", "unpin", "check_finish", "event")
ACKS = ("compress", "decompress", "pin", "unpin")
# A prompt per topic; each ~1,000 tokens (four 256-token chunks), shared by every client.
TOPICS = ("the river rose through the night", "the harvest came in late that year",
          "the old bridge was closed for repairs", "the library opened a new wing",
          "the ferry ran twice a day in winter", "the market moved to the square")


def queue_depth(metrics_text: str) -> int:
    for line in metrics_text.splitlines():
        if line.startswith("kvctl_queue_depth "):
            return int(float(line.split()[1]))
    raise ValueError("no kvctl_queue_depth in /metrics")


def body(op: str, tokens: list[int]) -> dict[str, Any]:
    if op in ("compress", "decompress"):
        return {"instance_id": INSTANCE, "method": METHOD, "location": LOCATION,
                "tokens": tokens}
    if op in ("pin", "unpin"):
        return {"instance_id": INSTANCE, "location": LOCATION, "tokens": tokens}
    return {"tokens": tokens}


class Load:
    def __init__(self, ctl: str, mon: str, prompts: list[list[int]], seconds: float,
                 pause: float) -> None:
        self.ctl, self.mon, self.seconds, self.pause = ctl, mon, seconds, pause
        # bodies encoded once: the client's per-request work stays next to nothing
        self.bodies = {(op, i): json.dumps(body(op, p)).encode()
                       for op in ("compress", "decompress", "lookup", "pin", "unpin")
                       for i, p in enumerate(prompts)}
        self.n_prompts = len(prompts)
        self.latency_ms: dict[str, list[float]] = {op: [] for op in OPS}
        self.status: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.event_ids: list[str] = []
        self.depth: list[tuple[float, int]] = []
        self.t0 = 0.0

    async def client(self, rng: random.Random) -> None:
        conn = Conn(self.ctl)
        end = self.t0 + self.seconds
        try:
            while time.monotonic() < end:
                if self.pause > 0:
                    await asyncio.sleep(rng.expovariate(1 / self.pause))
                op = rng.choice(OPS)
                if op in ("check_finish", "event"):
                    if not self.event_ids:
                        continue
                    eid = rng.choice(self.event_ids[-200:])
                    method, path, payload = (
                        ("POST", "/check_finish", json.dumps({"event_id": eid}).encode())
                        if op == "check_finish" else ("GET", f"/events/{eid}", None))
                else:
                    method, path = "POST", f"/{op}"
                    payload = self.bodies[(op, rng.randrange(self.n_prompts))]
                t = time.perf_counter()
                try:
                    status, headers, reply = await conn.request(method, path, payload)
                except (OSError, asyncio.IncompleteReadError) as exc:
                    self.errors[type(exc).__name__] += 1
                    continue
                self.latency_ms[op].append((time.perf_counter() - t) * 1000)
                self.status[status] += 1
                if status == 200 and op in ACKS:
                    self.event_ids.append(json.loads(reply)["event_id"])
                elif status == 429:
                    # what a well-behaved client does with Retry-After
                    await asyncio.sleep(float(headers.get(b"retry-after", b"1")))
        finally:
            conn.close()

    async def sampler(self) -> None:
        conn = Conn(self.mon)
        try:
            while True:
                try:
                    _, _, text = await conn.request("GET", "/metrics")
                    self.depth.append((round(time.monotonic() - self.t0, 1),
                                       queue_depth(text.decode())))
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    pass
                await asyncio.sleep(0.5)
        finally:
            conn.close()

    async def run(self, clients: int) -> float:
        self.t0 = time.monotonic()
        sampling = asyncio.create_task(self.sampler())
        await asyncio.gather(*(self.client(random.Random(i)) for i in range(clients)))
        elapsed = time.monotonic() - self.t0
        sampling.cancel()
        return elapsed


def lookup_tokens(http: httpx.Client, ctl: str, tokens: list[int]) -> int:
    r = http.post(ctl + "/lookup", json={"tokens": tokens})
    r.raise_for_status()
    tiers = r.json()["tiers"].get(INSTANCE, {})
    return int(tiers.get(LOCATION, 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--pause", type=float, default=0.2,
                    help="mean pause of each client between its requests, seconds "
                         "(exponential); 0 = closed loop without pause (saturation)")
    ap.add_argument("--prompts", type=int, default=len(TOPICS))
    ap.add_argument("--out", help="also write the JSON report to this file")
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
        wait_ready(eng + "/health", [proc] if proc else [])
        http = httpx.Client(timeout=300)
        prompts: list[list[int]] = []
        for topic in TOPICS[:args.prompts]:
            text = (f"Report on how {topic}: the town council met at dawn to decide which "
                    "roads to close and which to keep open, and who would tell the farms. ") * 30
            r = http.post(eng + "/v1/completions", json={"prompt": text, "max_tokens": 1})
            r.raise_for_status()
            prompts.append(http.post(eng + "/tokenize", json={"prompt": text}).json()["tokens"])
        before = [lookup_tokens(http, ctl, p) for p in prompts]

        load = Load(ctl, mon, prompts, args.seconds, args.pause)
        load_before = loadavg()
        cpu0, srv0 = cpu_seconds(), cpu_seconds(proc.pid) if proc else None
        elapsed = asyncio.run(load.run(args.clients))
        cpu1, srv1 = cpu_seconds(), cpu_seconds(proc.pid) if proc else None
        load_after = loadavg()

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

        acks = [x for op in ACKS for x in load.latency_ms[op]]
        every = [x for xs in load.latency_ms.values() for x in xs]
        total = sum(load.status.values())
        mean_ms = sum(every) / len(every) if every else float("nan")
        result = {
            "command": " ".join(["python", *sys.argv]),
            "clients": args.clients, "mean_pause_s": args.pause,
            "seconds": round(elapsed, 1), "prompts": len(prompts),
            "prompt_tokens": [len(p) for p in prompts],
            "requests": total,
            "throughput_rps": round(total / elapsed, 1),
            "ack_p50_ms": pct(acks, 0.50),
            "ack_p99_ms": pct(acks, 0.99),
            "all_p50_ms": pct(every, 0.50),
            "all_p99_ms": pct(every, 0.99),
            "all_mean_ms": round(mean_ms, 1),
            # Little's law: requests in flight on average = throughput x mean latency; with
            # no pause it is the client count, and the latency is clients / throughput
            "mean_in_flight": round(total / elapsed * mean_ms / 1000, 1),
            "per_op": {op: {"n": len(xs), "p50_ms": pct(xs, 0.5), "p99_ms": pct(xs, 0.99)}
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
            # what the measurement cost: a client process near 100% would be measuring itself
            "client_cpu_pct": round((cpu1 - cpu0) / elapsed * 100, 1),
            "server_cpu_pct": (round((srv1 - srv0) / elapsed * 100, 1)
                               if srv0 is not None and srv1 is not None else None),
            "loadavg_before": load_before, "loadavg_after": load_after,
            "machine": machine(), "versions": versions(), "commit": git_commit(),
        }
        out = json.dumps(result, indent=1)
        print(out)
        if args.out:
            atomic_write(Path(args.out), (out + "\n").encode(), durable=False)
        failed = [name for name, bad in (
            ("5xx answers", result["http_5xx"]), ("transport errors", sum(load.errors.values())),
            ("unfinished events", unfinished), ("prompts not intact", not result["intact"]),
            ("prompts not reused", not result["reused"])) if bad]
        if failed:
            sys.exit("load test failed: " + ", ".join(failed))
    finally:
        if proc is not None:
            stop([proc])


if __name__ == "__main__":
    main()
