"""How fast the controller acknowledges /compress while a codec job is running.

Starts a real `kvctl serve` on loopback ports, lets the engine fill the store with the KV of
a few long prompts, starts compressing one of them, and while that job is `running` times
more /compress requests over HTTP. Usage: python benchmarks/ack_latency.py [--requests 50]
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time

import httpx

INSTANCE = "lmcache_default_instance"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"kvctl serve exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    sys.exit(f"{url} not ready")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--method", default="cachegen")
    args = ap.parse_args()

    cport, mport, eport = free_port(), free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kvctl", "serve", "--port", str(cport),
                             "--monitor-port", str(mport), "--engine-port", str(eport)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ctl, eng = f"http://127.0.0.1:{cport}", f"http://127.0.0.1:{eport}"
    try:
        wait_ready(eng + "/health", proc)
        client = httpx.Client(timeout=300)
        prompts = []
        for i in range(3):
            text = (f"Report {i}: the river rose through the night and the town council met "
                    "at dawn to decide which roads to close and which to keep open. ") * 60
            client.post(f"{eng}/v1/completions", json={"prompt": text, "max_tokens": 1})
            prompts.append(client.post(f"{eng}/tokenize", json={"prompt": text}).json()["tokens"])

        def req(tokens: list[int]) -> dict:
            return {"instance_id": INSTANCE, "method": args.method,
                    "location": "LocalCPUBackend", "tokens": tokens}

        # the long job: decompress/compress cycles keep the codec pool busy
        busy = client.post(f"{ctl}/compress", json=req(prompts[0])).json()["event_id"]
        latencies = []
        states = []
        for i in range(args.requests):
            t0 = time.perf_counter()
            r = client.post(f"{ctl}/compress", json=req(prompts[1 + i % 2]))
            latencies.append((time.perf_counter() - t0) * 1000)
            r.raise_for_status()
            states.append(client.post(f"{ctl}/check_finish", json={"event_id": busy}
                                      ).json()["status"])
        while_busy = [lat for lat, st in zip(latencies, states, strict=True)
                      if st in ("queued", "running")]
        result = {
            "requests": len(latencies),
            "acknowledged_while_job_running": len(while_busy),
            "p50_ms": round(statistics.median(latencies), 2),
            "p95_ms": round(sorted(latencies)[int(0.95 * (len(latencies) - 1))], 2),
            "max_ms": round(max(latencies), 2),
            "max_ms_while_running": round(max(while_busy), 2) if while_busy else None,
            "samples_ms": [round(x, 1) for x in latencies],
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
                       f"python {platform.python_version()}",
        }
        print(json.dumps(result, indent=2))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


if __name__ == "__main__":
    main()
