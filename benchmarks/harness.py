"""What the latency benchmarks share: ports, readiness, a lean HTTP client, percentiles,
and the machine/versions/load lines every committed figure carries.

`ack_latency.py` and `load_test.py` import it as ``harness`` (run them as scripts from the
repository root: ``python benchmarks/load_test.py``; Python puts ``benchmarks/`` on the path).
"""

from __future__ import annotations

import asyncio
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

# The start / wait / stop helpers are the tests' (tests/cluster_procs.py): one copy.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root
from tests.cluster_procs import free_port, stop_all, wait_http

__all__ = ["Conn", "free_port", "stop", "wait_ready"]


def wait_ready(url: str, procs: Sequence[subprocess.Popen] = (), timeout: float = 300) -> None:
    """Poll ``url`` until it answers 200; exit with a message if a process of ``procs`` died
    or the deadline passes."""
    try:
        wait_http(url, timeout, *procs)
    except AssertionError as exc:
        sys.exit(str(exc))


def stop(procs: Sequence[subprocess.Popen]) -> None:
    """SIGINT each process (as Ctrl-C would), then wait; kill what does not leave in 30 s."""
    stop_all(*procs)


class Conn:
    """One keep-alive HTTP/1.1 connection with next to no client-side work per request.

    The clients of a benchmark share one Python process and the machine's cores with the
    server. An HTTP library's own per-request CPU (httpx: several milliseconds) then counts
    as server latency, and with 50 clients it saturates the client process before the server
    (measured: the load script's httpx clients took 75% of a core, the server 15%, while
    every request "took" hundreds of milliseconds). This one writes prepared bytes and reads
    one ``Content-Length`` body; a reply that says ``Connection: close`` (or a connection
    the server closed while idle) makes the next request open a new one.
    """

    def __init__(self, base_url: str) -> None:
        host, _, port = base_url.removeprefix("http://").rstrip("/").rpartition(":")
        self.host, self.port = host, int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP,
                                                        socket.TCP_NODELAY, 1)

    async def request(self, method: str, path: str, payload: bytes | None = None
                      ) -> tuple[int, dict[bytes, bytes], bytes]:
        """(status, lower-cased headers, body). Raises OSError/IncompleteReadError when the
        server breaks the connection mid-request (the next call reconnects)."""
        fresh = self.writer is None
        if fresh:
            await self._open()
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method.encode(), path.encode(),
                                                     self.host.encode())
        if payload is not None:
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(payload)
        try:
            return await self._exchange(head + b"\r\n" + (payload or b""))
        except (OSError, asyncio.IncompleteReadError):
            self.close()
            if fresh:
                raise
        # a kept-alive connection the server had closed: once more on a new one
        await self._open()
        try:
            return await self._exchange(head + b"\r\n" + (payload or b""))
        except (OSError, asyncio.IncompleteReadError):
            self.close()
            raise

    async def _exchange(self, raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        assert self.reader is not None and self.writer is not None
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        headers: dict[bytes, bytes] = {}
        for line in head.split(b"\r\n")[1:]:
            k, sep, v = line.partition(b":")
            if sep:
                headers[k.strip().lower()] = v.strip()
        body = await self.reader.readexactly(int(headers.get(b"content-length", b"0")))
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        return status, headers, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def pct(xs: Sequence[float], q: float) -> float:
    """The q-quantile (nearest rank) of xs, rounded to 0.1 ms; NaN for none."""
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(q * len(s)))], 1) if s else float("nan")


def loadavg() -> str:
    """The 1/5/15-minute load averages, as `uptime` shows them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process so far (this one without ``pid``; Linux)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> str:
    from kvctl.common.bench import cpu_name

    return f"{platform.machine()}, {os.cpu_count()} cpus, {cpu_name()}, {platform.platform()}"


def versions() -> str:
    from importlib.metadata import version

    parts = [f"python {platform.python_version()}"]
    for pkg in ("torch", "fastapi", "starlette", "pydantic", "uvicorn", "uvloop", "httptools",
                "httpx"):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except Exception:  # not installed: say nothing rather than guess
            pass
    return ", ".join(parts)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=False, timeout=10)
        # code only: editing a results file during a run does not make the code dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                "*.py", "*.toml"],
                               capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
