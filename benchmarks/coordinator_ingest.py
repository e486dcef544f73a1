"""kvctl's MP coordinator under a fleet's event stream.

1. ingest: 100 simulated MP servers post ``POST /events`` batches at once to one `kvctl serve
   --coordinator-port` process (one Python process: one core), memory and Redis state;
   entries/s applied, counted from the coordinator's own cursors.
2. lookup: p50/p99 of a 4-chunk lookup at 10^5 and 10^6 keys, in-process (the directory
   itself) and over HTTP; memory per key (process RSS, and Redis used_memory).
3. failover: two coordinators on one Redis, the 100 servers send to either (a request that
   cannot reach one goes to the other, as a load balancer does); one coordinator is killed
   with SIGKILL mid-run. Then every server's cursor must be at its last batch, with no gap.

    .venv/bin/python benchmarks/coordinator_ingest.py [--quick] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from harness import free_port

ROOT = Path(__file__).resolve().parent.parent
SERVERS = 100
CHUNK = 256


def key(n: int, model: str = "bench-model") -> dict[str, Any]:
    return {"chunk_hash_hex": n.to_bytes(32, "big").hex(), "model_name": model,
            "kv_rank": 16777472, "object_group_id": 0, "cache_salt": ""}


def store_batch(iid: str, inc: int, seq: int, first: int, n: int, tokens: bool,
                tier: str = "l1") -> dict[str, Any]:
    ents = [{"key": key(first + i), "size_bytes": 5898240,
             "token_ids": list(range(CHUNK)) if tokens else [],
             "token_offset": 0 if tokens else -1} for i in range(n)]
    return {"instance_id": iid, "incarnation": inc, "seq": seq, "event_type": "store",
            "tier": tier, "backend": "dram" if tier == "l1" else "fs", "entries": ents,
            "shared": False, "ts": time.time(), "capacity_bytes": 0, "capacity_revision": 0}


_TOKENS_JSON = json.dumps(list(range(CHUNK)))


def store_body(iid: str, inc: int, seq: int, first: int, n: int, tokens: bool) -> bytes:
    """`{"batches": [store_batch(...)]}` as JSON, built from text pieces: json.dumps of
    25,600 token ids per request would make the load generator the thing measured."""
    toks = _TOKENS_JSON if tokens else "[]"
    off = 0 if tokens else -1
    tail = (',"model_name":"bench-model","kv_rank":16777472,"object_group_id":0,'
            f'"cache_salt":""}},"size_bytes":5898240,"token_ids":{toks},"token_offset":{off}}}')
    ents = ",".join(f'{{"key":{{"chunk_hash_hex":"{first + i:064x}"{tail}' for i in range(n))
    head = (f'{{"batches":[{{"instance_id":"{iid}","incarnation":{inc},"seq":{seq},'
            '"event_type":"store","tier":"l1","backend":"dram","entries":[')
    return (head + ents + f'],"shared":false,"ts":{time.time()},"capacity_bytes":0,'
            '"capacity_revision":0}]}').encode()


# ------------------------------------------------------------------- processes ----
def start_redis(tmp: Path) -> tuple[subprocess.Popen, str]:
    import redis

    port = free_port()
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port",
                             str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                             "no", "--dir", str(tmp)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    r = redis.Redis(port=port)
    for _ in range(200):
        try:
            r.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def start_coordinator(tmp: Path, state: str | None, max_keys: int, prefix: str
                      ) -> tuple[subprocess.Popen, str]:
    import yaml

    port = free_port()
    cfg = tmp / f"c-{port}.yaml"
    cfg.write_text(yaml.safe_dump({"coordinator_max_keys": max_keys,
                                   "remote_key_prefix": prefix,
                                   "coordinator_instance_timeout_s": 600.0,
                                   **({"state": state} if state else {})}))
    log = open(tmp / f"c-{port}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "kvctl", "serve", "--config", str(cfg),
                             "--no-worker", "--model", "none", "--port", str(free_port()),
                             "--monitor-port", str(free_port()), "--coordinator-port",
                             str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"coordinator did not start: {(tmp / f'c-{port}.log').read_text()}")


def kill(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


# -------------------------------------------------------------------- 1. ingest ----
async def fleet(urls: list[str], batches: int, entries: int, tokens: bool,
                kill_after: float | None = None, victim: subprocess.Popen | None = None,
                retry: bool = True) -> dict[str, Any]:
    """100 servers, each posting ``batches`` batches in order (one request in flight per
    server, as an MP server's flush thread does). The bodies are made before the clock
    starts, so that the load generator, on the same cores, costs as little as it can."""
    limits = httpx.Limits(max_connections=SERVERS * 2, max_keepalive_connections=SERVERS * 2)
    sent = [0] * SERVERS
    dropped = [0] * SERVERS
    retried = [0]
    failed_over = [0]
    inc = int(time.time())
    bodies = [[store_body(f"bench-{s}", inc, seq, (s << 32) + seq * entries, entries, tokens)
               for seq in range(1, batches + 1)] for s in range(SERVERS)]
    async with httpx.AsyncClient(limits=limits, timeout=30) as http:
        for s in range(SERVERS):
            r = await http.post(urls[s % len(urls)] + "/instances",
                                json={"instance_id": f"bench-{s}", "ip": "127.0.0.1",
                                      "http_port": 1})
            r.raise_for_status()

        async def server(s: int) -> None:
            which = s % len(urls)
            for seq, body in enumerate(bodies[s], 1):
                while True:
                    try:
                        r = await http.post(urls[which] + "/events", content=body,
                                            headers={"content-type": "application/json"})
                        r.raise_for_status()
                        break
                    except (httpx.TransportError, httpx.HTTPStatusError):
                        if len(urls) > 1:
                            which = (which + 1) % len(urls)
                            failed_over[0] += 1
                        if not retry:  # an LMCache server drops what it could not post
                            dropped[s] += 1
                            break
                        # the load balancer's part: the other coordinator gets it
                        retried[0] += 1
                        await asyncio.sleep(0.05)
                sent[s] = seq

        async def killer() -> None:
            if kill_after is not None and victim is not None:
                await asyncio.sleep(kill_after)
                victim.send_signal(signal.SIGKILL)

        t0 = time.monotonic()
        await asyncio.gather(killer(), *(server(s) for s in range(SERVERS)))
        wall = time.monotonic() - t0
    return {"sent_batches": sum(sent), "per_server": sent, "wall_s": wall,
            "retried": retried[0], "failed_over": failed_over[0],
            "dropped_by_servers": sum(dropped)}


def run_ingest(tmp: Path, state: str | None, batches: int, entries: int, tokens: bool,
               redis_pid: int) -> dict[str, Any]:
    proc, url = start_coordinator(tmp, state, 10_000_000, f"b{uuid.uuid4().hex[:8]}")
    try:
        cpu0, rcpu0 = cpu_seconds(proc.pid), cpu_seconds(redis_pid)
        res = asyncio.run(fleet([url], batches, entries, tokens))
        cpu = cpu_seconds(proc.pid) - cpu0
        rcpu = cpu_seconds(redis_pid) - rcpu0 if state else 0.0
        ing = httpx.get(url + "/instances/ingest", timeout=60).json()
        applied = sum(r["cursor"]["applied"] for r in ing["instances"] if r["cursor"])
        applied_entries = applied * entries
        return {"state": "redis" if state else "memory", "entries_per_batch": entries,
                "token_ids": tokens, "batches": applied, "entries": applied_entries,
                "wall_s": res["wall_s"], "coordinator_cpu_s": cpu,
                "entries_per_s": applied_entries / res["wall_s"],
                "entries_per_cpu_s": applied_entries / cpu if cpu else 0.0,
                "redis_cpu_s": rcpu,
                "keys": ing["keys"]}
    finally:
        kill(proc)


# -------------------------------------------------------------------- 2. lookup ----
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def populate(store: Any, n: int, tokens: bool, per: int = 512) -> None:
    import msgspec

    from kvctl.server.coordinator.models import EventBatch
    from kvctl.server.coordinator.store import Instance

    await store.register(Instance("pop", "127.0.0.1", 1, time.time()))
    seq = 0
    for first in range(0, n, per):
        seq += 1
        # through JSON, as a POST arrives: token ids are kept as the JSON they came in
        b = msgspec.json.decode(json.dumps(store_batch("pop", 1, seq, first,
                                                       min(per, n - first), tokens)),
                                type=EventBatch)
        await store.ingest([b])


def percentiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"p50_ms": xs[len(xs) // 2] * 1e3, "p99_ms": xs[int(len(xs) * 0.99)] * 1e3,
            "max_ms": xs[-1] * 1e3}


async def lookup_latency(store: Any, n: int, rounds: int) -> dict[str, float]:
    import random

    import msgspec

    from kvctl.server.coordinator.models import EncodedKey

    rng = random.Random(1)
    ids = [[msgspec.convert(key(rng.randrange(n)), EncodedKey).key_id() for _ in range(4)]
           for _ in range(rounds)]

    out = []
    for kids in ids:
        t = time.perf_counter()
        res = await store.lookup(kids)
        out.append(time.perf_counter() - t)
        assert all(r[0] for r in res)
    return percentiles(out)


def http_lookup_latency(url: str, n: int, rounds: int) -> dict[str, float]:
    import random

    rng = random.Random(2)
    lat = []
    with httpx.Client(timeout=30) as http:
        for _ in range(rounds):
            body = {"keys": [key(rng.randrange(n)) for _ in range(4)]}
            t = time.perf_counter()
            r = http.post(url + "/directory/lookup", json=body)
            lat.append(time.perf_counter() - t)
            assert r.status_code == 200 and r.json()["results"][0]["placements"]
    return percentiles(lat)


def memory_case(n: int, tokens: bool, rounds: int) -> dict[str, Any]:
    from kvctl.server.coordinator.store import MemoryStore

    asyncio.run(populate(MemoryStore(), 10, tokens))  # imports and first-use allocations
    gc.collect()
    before = rss_bytes()
    store = MemoryStore(max_keys=n + 1, keep_token_ids=tokens)
    t = time.perf_counter()
    asyncio.run(populate(store, n, tokens))
    fill_s = time.perf_counter() - t
    gc.collect()
    per_key = (rss_bytes() - before) / n
    return {"state": "memory", "keys": n, "token_ids": tokens, "bytes_per_key": per_key,
            "fill_entries_per_s": n / fill_s, **asyncio.run(lookup_latency(store, n, rounds))}


def run_lookup(sizes: list[int], rounds: int, redis_url: str) -> list[dict[str, Any]]:
    import redis as redis_sync

    from kvctl.server.coordinator.store import RedisStore

    out = []
    for n in sizes:
        for tokens in (False, True):
            if tokens and n > 100_000:
                continue  # 1 KiB of token ids per key: 10^6 keys is a GiB; measured at 10^5
            # a fresh process per case: RSS growth of this one would reuse freed memory
            proc = subprocess.run([sys.executable, __file__, "--memory-case", str(n),
                                   str(int(tokens)), str(rounds)], capture_output=True,
                                  text=True, check=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            out.append(row)
        # Redis: the same directory, shared (10^6 keys take a while to fill; 10^5 here)
        if n <= 100_000:
            r = redis_sync.Redis.from_url(redis_url, socket_timeout=300)
            r.flushdb(asynchronous=False)
            mem0 = int(r.info("memory")["used_memory"])

            async def redis_case(n: int = n, r: Any = r, mem0: int = mem0) -> dict[str, Any]:
                store = RedisStore(redis_url, max_keys=n + 1, keep_token_ids=False,
                                   prefix=f"l{n}:")
                t = time.perf_counter()
                await populate(store, n, False)
                fill_s = time.perf_counter() - t
                per_key = (int(r.info("memory")["used_memory"]) - mem0) / n
                lat = await lookup_latency(store, n, rounds)
                await store.close()
                return {"state": "redis", "keys": n, "token_ids": False,
                        "bytes_per_key": per_key, "fill_entries_per_s": n / fill_s, **lat}
            row = asyncio.run(redis_case())
            print(json.dumps(row), flush=True)
            out.append(row)
            r.flushdb(asynchronous=False)
    return out


# ------------------------------------------------------------------ 3. failover ----
def run_failover(tmp: Path, redis_url: str, batches: int, entries: int, kill_after: float,
                 retry: bool = True) -> dict[str, Any]:
    prefix = f"f{uuid.uuid4().hex[:8]}"
    a, url_a = start_coordinator(tmp, redis_url, 10_000_000, prefix)
    b, url_b = start_coordinator(tmp, redis_url, 10_000_000, prefix)
    try:
        res = asyncio.run(fleet([url_a, url_b], batches, entries, True,
                                kill_after=kill_after, victim=a, retry=retry))
        ing = httpx.get(url_b + "/instances/ingest", timeout=60).json()
        cur = {r["instance_id"]: r["cursor"] for r in ing["instances"]}
        applied = sum(cur[f"bench-{s}"]["applied"] for s in range(SERVERS))
        if retry:  # acknowledged batches the shared state does not hold
            lost = sum(max(0, res["per_server"][s] - cur[f"bench-{s}"]["last_seq"])
                       for s in range(SERVERS))
        else:  # batches a server sent (or tried to) that the state does not hold
            lost = res["sent_batches"] - applied
        gaps = sum(c["gaps"] for c in cur.values())
        dups = sum(c["duplicates"] for c in cur.values())
        expected_keys = (sum(res["per_server"]) if retry else applied) * entries
        return {"sent_batches": res["sent_batches"], "batches_lost": lost, "gaps": gaps,
                "duplicates": dups, "retried_requests": res["retried"],
                "failed_over": res["failed_over"], "keys": ing["keys"],
                "expected_keys": expected_keys, "killed": a.poll() == -9,
                "wall_s": res["wall_s"], "batches_per_server": batches, "entries": entries,
                "kill_after_s": kill_after, "retry": retry, "applied": applied,
                "dropped_by_servers": res["dropped_by_servers"]}
    finally:
        kill(a)
        kill(b)


def versions() -> dict[str, str]:
    import fastapi
    import pydantic
    import redis

    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"python": platform.python_version(), "fastapi": fastapi.__version__,
            "pydantic": pydantic.__version__, "redis-py": redis.__version__,
            "redis-server": out.stdout.split()[2] if out.stdout else "?",
            "cpu": cpu, "cores": str(os.cpu_count()), "kernel": platform.release()}


def markdown(res: dict[str, Any]) -> str:
    v = res["versions"]
    lines = ["# kvctl MP coordinator: ingest, lookup, failover", "",
             f"Machine: {v['cpu']}, {v['cores']} cores (shared with other work while "
             f"measured), Linux {v['kernel']}; Python {v['python']}, FastAPI "
             f"{v['fastapi']}, pydantic {v['pydantic']}, redis-py {v['redis-py']}, "
             f"redis-server {v['redis-server']}. Command: `{res['command']}`. Load average "
             f"(1 min) at the start {res['load'][0]:.1f}, at the end {res['load'][1]:.1f}: "
             "the wall-clock rates below are what a process got on a machine that busy; "
             "the per-CPU-second rates are the coordinator's own cost.", "",
             "## Ingest: 100 servers posting at once to one coordinator process", "",
             "Each server keeps one request in flight (as an MP server's flush thread does); "
             "every entry is a `store` of a new key (256 token ids each where noted). "
             "Entries/s counts what the coordinator's cursors applied over the wall time; "
             "per CPU-second divides by the coordinator process's own CPU time (one "
             "process: one core at most).", "",
             "| state | entries/batch | token ids | batches | entries/s (wall) | "
             "entries per coordinator CPU-s | redis-server CPU-s | target |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["ingest"]:
        lines.append(f"| {r['state']} | {r['entries_per_batch']} | "
                     f"{'yes' if r['token_ids'] else 'no'} | {r['batches']} | "
                     f"{r['entries_per_s']:,.0f} | {r['entries_per_cpu_s']:,.0f} | "
                     f"{r['redis_cpu_s']:.2f} | 50,000 |")
    lines += ["", "## Directory lookup (4 keys, random) and memory per key", "",
              "| state | keys | token ids kept | p50 ms | p99 ms | max ms | bytes/key |",
              "|---|---|---|---|---|---|---|"]
    for r in res["lookup"]:
        lines.append(f"| {r['state']} | {r['keys']:,} | {'yes' if r['token_ids'] else 'no'} "
                     f"| {r['p50_ms']:.4f} | {r['p99_ms']:.4f} | {r['max_ms']:.3f} | "
                     f"{r['bytes_per_key']:,.0f} |")
    h = res.get("http_lookup")
    if h:
        lines += ["", f"Over HTTP (`POST /directory/lookup`, 4 keys, a coordinator holding "
                      f"{h['keys']:,} keys, memory state): p50 {h['p50_ms']:.2f} ms, "
                      f"p99 {h['p99_ms']:.2f} ms (target: p99 < 5 ms at 10^6 keys)."]
    f = res.get("failover")
    if f:
        lines += ["", "## kill -9 of one of two coordinators during ingest", "",
                  f"Two coordinators on one Redis; the 100 servers split between them, "
                  f"{f['batches_per_server']} batches of {f['entries']} store entries (with "
                  f"token ids) each; coordinator A killed with SIGKILL {f['kill_after_s']:g} s "
                  f"into the run ({f['wall_s']:.1f} s in all); a request that fails is sent "
                  f"again to the other one (a load balancer's retry). "
                  f"Sent {f['sent_batches']:,} batches; **batches lost: "
                  f"{f['batches_lost']}**; seq gaps: {f['gaps']}; duplicates (a batch A "
                  f"applied before it died, sent again to B): {f['duplicates']}; requests "
                  f"retried: {f['retried_requests']}; keys {f['keys']:,} of "
                  f"{f['expected_keys']:,} expected."]
    g = res.get("failover_no_retry")
    if g:
        lines += ["", f"The same without retries, as an LMCache server behaves (its event sink "
                      f"drops a batch whose POST failed and goes on with the next seq): "
                      f"{g['sent_batches']:,} batches sent, {g['dropped_by_servers']} dropped "
                      f"by the servers (their POST failed: in flight to A when it died, or "
                      f"sent to A before they noticed), {g['applied']:,} applied; the state "
                      f"lacks {g['batches_lost']} of them and flags {g['gaps']} seq gaps, "
                      f"so `kvctl instances` shows which servers' directory slices are "
                      f"incomplete. Nothing already applied was lost."]
    if res.get("merged"):
        lines += ["", f"Sections {', '.join(res['merged'])} are from an earlier run on the same "
                      "machine (this one ran with `--merge`, keeping them)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="short runs, 10^4/10^5 keys")
    ap.add_argument("--batches", type=int, default=8, help="per server, per ingest run")
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--skip", default="", help="comma list of ingest,lookup,failover")
    ap.add_argument("--merge", action="store_true",
                    help="keep the sections of --json's file that this run skips")
    ap.add_argument("--memory-case", nargs=3, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_case:
        n, tokens, rounds = args.memory_case
        print(json.dumps(memory_case(n, bool(tokens), rounds)))
        return
    skip = set(filter(None, args.skip.split(",")))
    nb = 2 if args.quick else args.batches
    tmp = Path(tempfile.mkdtemp(prefix="coord-bench-"))
    load0 = os.getloadavg()[0]
    redis_proc, redis_url = start_redis(tmp)
    res: dict[str, Any] = {"versions": versions(), "command": " ".join(
        ["benchmarks/coordinator_ingest.py", *sys.argv[1:]])}
    try:
        if "ingest" not in skip:
            res["ingest"] = []
            for state in (None, redis_url):
                for entries, tokens in ((100, True), (500, True), (500, False)):
                    r = run_ingest(tmp, state, nb, entries, tokens, redis_proc.pid)
                    print(json.dumps(r), flush=True)
                    res["ingest"].append(r)
        if "lookup" not in skip:
            sizes = [10_000, 100_000] if args.quick else [100_000, 1_000_000]
            res["lookup"] = run_lookup(sizes, 2000, redis_url)
            n = sizes[-1]
            proc, url = start_coordinator(tmp, None, n + 1, "h")
            try:
                populate_http(url, n)
                res["http_lookup"] = {"keys": n, **http_lookup_latency(url, n, 1000)}
                print(json.dumps(res["http_lookup"]), flush=True)
            finally:
                kill(proc)
        if "failover" not in skip:
            nbf, after = (5, 1.0) if args.quick else (40, 4.0)
            res["failover"] = run_failover(tmp, redis_url, nbf, 20, after)
            print(json.dumps(res["failover"]), flush=True)
            res["failover_no_retry"] = run_failover(tmp, redis_url, nbf, 20, after, retry=False)
            print(json.dumps(res["failover_no_retry"]), flush=True)
    finally:
        kill(redis_proc)
        shutil.rmtree(tmp, ignore_errors=True)
    res["load"] = [load0, os.getloadavg()[0]]
    if args.merge and args.json and args.json.exists():
        old = json.loads(args.json.read_text())
        res["merged"] = []
        for k in ("ingest", "lookup", "http_lookup", "failover", "failover_no_retry"):
            if k not in res and k in old:
                res[k] = old[k]
                res["merged"].append(k)
    res["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(res))
    print(markdown(res))


def populate_http(url: str, n: int) -> None:
    with httpx.Client(timeout=120) as http:
        http.post(url + "/instances", json={"instance_id": "pop", "ip": "127.0.0.1",
                                            "http_port": 1}).raise_for_status()
        per, seq = 8192, 0
        for first in range(0, n, per):
            seq += 1
            r = http.post(url + "/events", json={"batches": [store_batch(
                "pop", 1, seq, first, min(per, n - first), False)]})
            r.raise_for_status()


if __name__ == "__main__":
    main()
