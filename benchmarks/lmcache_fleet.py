"""kvctl's controller in front of two real LMCache 0.5.6 instances (CPU, SmolLM2 KV).

Measures, with real processes on loopback ports:
1. /lookup latency answered from the directory vs a fan-out to both workers over their REQ
   sockets (PinWorkerMsg: the only lookup a 0.5.6 worker answers), idle and while the other
   instance compresses;
2. the ack latency of /compress to one instance while the other instance's compress runs;
3. a controller kill -9 + restart with --state and without: time until /lookup is right
   again, full syncs asked for, and whether a store made right after the restart is found.

Usage: python benchmarks/lmcache_fleet.py [--rounds 200] [--markdown benchmarks/lmcache_fleet.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from harness import free_port, git_commit, loadavg, machine, pct, versions

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.cluster_procs import wait_for
from tests.conftest import PROSE
from tests.lmcache_procs import (
    LMCacheInstance,
    lm_workers,
    lookup,
    start_lmcache_controller,
)

LOC = "LocalCPUBackend"


def redis_server(tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port",
                             str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                             "no", "--dir", str(tmp)], stdout=subprocess.DEVNULL)
    import redis

    wait_for(lambda: _ping(redis.Redis(port=port)), 20, "redis did not start")
    return proc, f"redis://127.0.0.1:{port}/0"


def _ping(r) -> bool:
    try:
        return bool(r.ping())
    except Exception:
        return False


def event_end(api: str, eid: str) -> dict:
    return wait_for(lambda: (lambda e: e if e["status"] in ("finished", "failed") else None)(
        httpx.get(f"{api}/events/{eid}", timeout=30).json()), 300, f"{eid} did not end")


def time_lookups(api: str, tokens: list[int], n: int) -> list[float]:
    out = []
    with httpx.Client(base_url=api, timeout=30) as c:
        for _ in range(n):
            t = time.perf_counter()
            r = c.post("/lookup", json={"tokens": tokens})
            out.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200 and len(r.json()["layout_info"]) == 2, r.text
    return out


def time_fanout(workers: list[dict], tokens: list[int], n: int) -> list[float]:
    import zmq.asyncio

    from kvctl.server.lmcache.transport import ZmqWorkerTransport

    async def run() -> list[float]:
        ctx = zmq.asyncio.Context()
        ts = [ZmqWorkerTransport(ctx, w["instance_id"], w["worker_id"], w["ip"], w["port"],
                                 60, 600) for w in workers]
        out = []
        for _ in range(n):
            t = time.perf_counter()
            res = await asyncio.gather(*(x.call("pin", {"location": LOC, "tokens": tokens})
                                         for x in ts))
            out.append((time.perf_counter() - t) * 1000)
            assert all(r["num_tokens"] > 0 for r in res), res
        for x in ts:
            await x.close()
        ctx.term()
        return out

    return asyncio.run(run())


class Busy:
    """Keeps an instance compressing and decompressing ``tokens`` until stopped."""

    def __init__(self, api: str, instance: str, tokens: list[int]) -> None:
        self.api, self.instance, self.tokens = api, instance, tokens
        self.stop = threading.Event()
        self.jobs = 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        ops = ("compress", "decompress")
        while not self.stop.is_set():
            r = httpx.post(f"{self.api}/{ops[self.jobs % 2]}", timeout=30, json={
                "instance_id": self.instance, "method": "cachegen", "location": LOC,
                "tokens": self.tokens})
            event_end(self.api, r.json()["event_id"])
            self.jobs += 1

    def __enter__(self) -> Busy:
        self.thread.start()
        # wait until the first job is on the wire
        wait_for(lambda: any(e["status"] == "running" for e in httpx.get(
            f"{self.api}/events", params={"limit": 5}).json()["events"]), 60, "no busy job")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(600)


def restart(tmp: Path, name: str, ctl, port: int, monitor: int, zmq_ports: dict,
            state: str | None, inst: list[LMCacheInstance], a: list[int], fresh: list[int]
            ) -> tuple[object, dict]:
    """Kill -9 the controller and start it again on the same ports; meanwhile instance 1
    stores ``fresh`` (KV computed beforehand, so the store itself takes milliseconds) as
    soon as the new controller answers HTTP."""
    inst[0].send("warm", fresh)
    ctl.kill9()
    t0 = time.perf_counter()
    new = start_lmcache_controller(tmp, name, port, monitor, zmq_ports, state)
    api = new.urls["api"]
    t_up = time.perf_counter() - t0
    stored = threading.Thread(target=inst[0].send, args=("store", fresh))
    stored.start()
    want = {i.instance_id: [LOC, 512] for i in inst}
    first = lookup(api, a)
    wait_for(lambda: lookup(api, a) == want, 120, "lookup never recovered", new)
    t_ok = time.perf_counter() - t0
    stored.join(120)
    # the fresh store: in the directory (and in the instance) or skipped by a frozen worker
    found = False
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not found:
        found = lookup(api, fresh).get(inst[0].instance_id) == [LOC, 512]
        time.sleep(0.2)
    stats = httpx.get(api + "/lmcache/stats").json()
    return new, {"http_up_s": round(t_up, 2), "lookup_right_at_once": first == want,
                 "lookup_right_after_s": round(t_ok, 2),
                 "full_syncs": stats["full_syncs_requested"],
                 "fresh_store_in_directory": found,
                 "fresh_store_in_instance": inst[0].send("lookup", fresh)["hit"]}


def time_directory_in_process(tokens: list[int], n: int) -> list[float]:
    """What /lookup computes for two workers, without HTTP: hashing + set lookups."""
    from kvctl.server.lmcache import wire
    from kvctl.server.lmcache.directory import Directory, chunk_hashes

    d = Directory(1_000_000)
    keys = [h for _, h in chunk_hashes(tokens, 256)]
    for w in (1, 2):
        d.apply(f"bench-{w}", 0, LOC, [wire.KVOpEvent(wire.OpType.ADMIT, k, i)
                                       for i, k in enumerate(keys)])
    out = []
    for _ in range(n):
        t = time.perf_counter()
        hashes = chunk_hashes(tokens, 256)
        for w in (1, 2):
            d.best(f"bench-{w}", 0, hashes)
        out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--markdown", default="benchmarks/lmcache_fleet.md")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kvctl-lmfleet-"))
    redis_proc, state = redis_server(tmp)
    port, monitor = free_port(), free_port()
    zmq_ports = {"pull": free_port(), "reply": free_port(), "heartbeat": free_port()}
    ctl = start_lmcache_controller(tmp, "controller", port, monitor, zmq_ports, state)
    api = ctl.urls["api"]
    inst = [LMCacheInstance(tmp, f"bench-{i}", zmq_ports["pull"], zmq_ports["reply"])
            for i in (1, 2)]
    res: dict = {}
    try:
        for i in inst:
            i.wait_ready()
        from kvctl.common.model import load_tokenizer_for

        ids = list(load_tokenizer_for("smollm2")(PROSE * 4)["input_ids"])
        a, big = ids[:512], ids[:2048]
        for i in inst:
            i.send("store", a)
        inst[1].send("store", big)
        wait_for(lambda: len(lookup(api, a)) == 2, 60, "stores not seen")
        workers = sorted(lm_workers(api).values(), key=lambda w: w["instance_id"])
        n = args.rounds
        res["lookup_directory_inproc_ms"] = time_directory_in_process(a, n)
        res["lookup_directory_idle_ms"] = time_lookups(api, a, n)
        res["lookup_fanout_idle_ms"] = time_fanout(workers, a, n)
        with Busy(api, "bench-2", big) as busy:
            res["lookup_directory_busy_ms"] = time_lookups(api, a, n)
            res["lookup_fanout_busy_ms"] = time_fanout(workers, a, max(10, n // 10))
            acks = []
            with httpx.Client(base_url=api, timeout=30) as c:
                for k in range(40):
                    t = time.perf_counter()
                    r = c.post("/compress" if k % 2 == 0 else "/decompress", json={
                        "instance_id": "bench-1", "method": "cachegen", "location": LOC,
                        "tokens": a})
                    acks.append((time.perf_counter() - t) * 1000)
                    assert r.status_code == 200, r.text
                    event_end(api, r.json()["event_id"])
            res["ack_compress_other_busy_ms"] = acks
            res["busy_jobs"] = busy.jobs
        fresh1 = [ids[0] + 7, *ids[1:512]]
        fresh2 = [ids[0] + 8, *ids[1:512]]
        ctl, res["restart_with_state"] = restart(tmp, "with-state", ctl, port, monitor,
                                                 zmq_ports, state, inst, a, fresh1)
        ctl, res["restart_without_state"] = restart(tmp, "without-state", ctl, port, monitor,
                                                    zmq_ports, None, inst, a, fresh2)
    finally:
        for i in inst:
            i.stop()
        ctl.stop()
        redis_proc.terminate()
    write(args.markdown, res, args.rounds)


def write(path: str, res: dict, rounds: int) -> None:
    def row(name: str, key: str) -> str:
        xs = res[key]
        return f"| {name} | {len(xs)} | {pct(xs, 0.5)} | {pct(xs, 0.99)} | {pct(xs, 1.0)} |"

    from importlib.metadata import version

    lines = [
        "# kvctl in front of two real LMCache 0.5.6 instances",
        "",
        f"Machine: {machine()}; load average at the end {loadavg()} (a shared machine: other "
        "sessions' work ran meanwhile). Versions: "
        f"{versions()}, lmcache {version('lmcache')}, pyzmq {version('pyzmq')}, "
        f"msgspec {version('msgspec')}; kvctl {git_commit()}.",
        "Setup: `kvctl serve --no-worker --model none --monitor-ports ... --state redis://` "
        "and two LMCacheEngine + LMCacheWorker processes (tests/lmcache_instance.py, CPU, "
        "SmolLM2-135M KV, chunk_size 256), each holding the same 512-token prompt; instance 2 "
        "also a 2048-token one. `python benchmarks/lmcache_fleet.py`.",
        "",
        "## Lookup: directory vs fan-out (ms, client-side)",
        "",
        "| what | n | p50 | p99 | max |",
        "| --- | --- | --- | --- | --- |",
        row("/lookup from the directory, both idle", "lookup_directory_idle_ms"),
        row("the directory's work for both, in-process (hashing + set lookups)",
            "lookup_directory_inproc_ms"),
        row("fan-out to both workers (PinWorkerMsg over REQ, in-process), both idle",
            "lookup_fanout_idle_ms"),
        row("/lookup from the directory, instance 2 compressing", "lookup_directory_busy_ms"),
        row("fan-out, instance 2 compressing", "lookup_fanout_busy_ms"),
        "",
        "/lookup rows are HTTP round trips to the controller (client-side); the fan-out and "
        "in-process rows have no HTTP in them. A 0.5.6 worker runs one command at a time, so "
        "a fan-out waits behind any compress on its way; the directory never asks a worker.",
        "",
        "## Ack of /compress to instance 1 while instance 2 compresses (ms)",
        "",
        "| what | n | p50 | p99 | max |",
        "| --- | --- | --- | --- | --- |",
        row("/compress and /decompress to instance 1, acknowledged", "ack_compress_other_busy_ms"),
        "",
        f"Instance 2 ran {res['busy_jobs']} compress/decompress jobs of 2048 tokens meanwhile. "
        "Upstream's controller answers /compress only when the worker is done (3.4 s for 512 "
        "tokens in legacy_concurrency_http.jsonl) and fails overlapping calls to one worker.",
        "",
        "## Controller kill -9 and restart",
        "",
        "| | with --state | without |",
        "| --- | --- | --- |",
    ]
    w, wo = res["restart_with_state"], res["restart_without_state"]
    for key, label in (("http_up_s", "HTTP up after (s)"),
                       ("lookup_right_at_once", "/lookup right at once"),
                       ("lookup_right_after_s", "/lookup right for both instances after (s)"),
                       ("full_syncs", "full syncs asked for"),
                       ("fresh_store_in_directory", "a store right after restart: in /lookup"),
                       ("fresh_store_in_instance", "... and in the instance (tokens)")):
        lines.append(f"| {label} | {w[key]} | {wo[key]} |")
    lines += ["", "Times count from the kill; the restarted process's start-up (Python, "
              "FastAPI, on this loaded machine) is most of the 'with state' number. Instance "
              "1 stores a new prompt as soon as the new controller answers HTTP. Without "
              "state, each worker is asked for a full sync at its next heartbeat and freezes "
              "for about 5 s while it sends its keys; LMCache skips stores meanwhile, so a "
              "store that lands in that window is lost to the instance itself, not only to "
              "the directory.", ""]
    Path(path).write_text("\n".join(lines))
    Path(path).with_suffix(".json").write_text(json.dumps(res, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
