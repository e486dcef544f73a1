"""A small keep-alive HTTP/1.1 client for the controller's calls to its workers.

httpx's async client spent about two thirds of the controller's event-loop time per routed
request (measured with py-spy under 50 concurrent clients), which made the controller the
bottleneck of a cluster. The controller only ever talks to kvctl workers (uvicorn), with
small JSON bodies or one chunk's bytes, so this client does just that: pooled connections,
Content-Length or chunked bodies, a deadline on every exchange, bounded reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

# uvicorn closes a connection idle for 5 s; drop ours before that to avoid a race.
IDLE_LIMIT_S = 4.0
MAX_HEADER_BYTES = 64 * 1024


class HttpError(Exception):
    """The exchange failed: connect, send, receive, timeout or a malformed response."""


class _Stale(Exception):
    """A connection closed before any byte of the reply: safe to send again."""


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = time.monotonic()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class HttpPool:
    """Connections to one ``http://host:port`` origin."""

    def __init__(self, url: str, timeout_s: float, connect_timeout_s: float,
                 max_idle: int = 64, max_body: int = 512 * 1024 * 1024) -> None:
        u = urlsplit(url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"expected http://host:port, got {url!r}")
        self.host = u.hostname
        self.port = u.port or 80
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_idle = max_idle
        self.max_body = max_body
        self._idle: list[_Conn] = []

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> Reply:
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        conn = self._take()
        if conn is not None:
            try:
                return await self._once(conn, data)
            except _Stale:
                pass  # the server had closed this kept-alive connection: it saw nothing
        try:
            return await self._once(await self._connect(), data)
        except _Stale as exc:
            raise HttpError(str(exc.__cause__ or "connection closed before a reply")
                            ) from None

    async def _once(self, conn: _Conn, data: bytes) -> Reply:
        try:
            return await asyncio.wait_for(self._exchange(conn, data), self.timeout_s)
        except TimeoutError:
            conn.close()
            raise HttpError(f"no answer within {self.timeout_s:g} s") from None
        except asyncio.IncompleteReadError as exc:
            conn.close()
            if not exc.partial:
                raise _Stale() from exc
            raise HttpError("connection closed in the middle of a reply") from None
        except (ConnectionResetError, BrokenPipeError) as exc:
            conn.close()
            raise _Stale() from exc
        except (OSError, asyncio.LimitOverrunError, ValueError) as exc:
            conn.close()
            raise HttpError(f"{type(exc).__name__}: {exc}") from None
        except HttpError:
            conn.close()
            raise

    def _take(self) -> _Conn | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if (now - conn.idle_since < IDLE_LIMIT_S and not conn.reader.at_eof()
                    and not conn.writer.is_closing()):
                return conn
            conn.close()
        return None

    async def _connect(self) -> _Conn:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, limit=MAX_HEADER_BYTES),
                self.connect_timeout_s)
        except TimeoutError:
            raise HttpError(f"connect timed out after {self.connect_timeout_s:g} s") from None
        except OSError as exc:
            raise HttpError(f"cannot connect: {exc.strerror or exc}") from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Conn(reader, writer)

    async def _exchange(self, conn: _Conn, data: bytes) -> Reply:
        if conn.writer.is_closing():
            raise ConnectionResetError("the connection was closed while idle")
        try:
            conn.writer.write(data)
        except RuntimeError as exc:
            # uvloop's answer to a write on a transport the peer's reset has just closed
            raise ConnectionResetError(str(exc)) from exc
        await conn.writer.drain()
        raw = await conn.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            raise HttpError(f"malformed status line {lines[0][:80]!r}") from None
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._read_chunked(conn.reader)
        else:
            length = int(headers.get("content-length", "0"))
            if length > self.max_body:
                raise HttpError(f"response body of {length} B exceeds {self.max_body} B")
            body = await conn.reader.readexactly(length)
        if headers.get("connection", "").lower() == "close" or \
                len(self._idle) >= self.max_idle:
            conn.close()
        else:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        return Reply(status, headers, body)

    async def _read_chunked(self, reader: asyncio.StreamReader) -> bytes:
        parts, size = [], 0
        while True:
            line = await reader.readuntil(b"\r\n")
            n = int(line.split(b";")[0].strip() or b"0", 16)
            if n == 0:
                await reader.readuntil(b"\r\n")
                return b"".join(parts)
            size += n
            if size > self.max_body:
                raise HttpError(f"response body exceeds {self.max_body} B")
            parts.append(await reader.readexactly(n))
            await reader.readexactly(2)

    async def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
