"""The controller's keep-alive client (server/http/pool.py) against a real TCP server on
loopback that resets kept-alive connections, on uvloop as the controller runs it.

Found by benchmarks/cluster_faults.py: a worker killed with -9 left pooled connections
whose transport uvloop had already closed, and the next write raised RuntimeError, which
reached the client of /lookup as a 500.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from kvctl.server.http.pool import HttpError, HttpPool

REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def run(coro_fn) -> object:
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro_fn())


class ResettingServer:
    """Answers one request per connection, keeps it open, and resets every open
    connection (SO_LINGER 0: an RST, as a killed process's kernel sends) on demand."""

    def __init__(self) -> None:
        self.conns: list[asyncio.StreamWriter] = []
        self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.conns.append(writer)
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                writer.write(REPLY)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    def reset_all(self) -> None:
        for w in self.conns:
            sock = w.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.close()
        self.conns.clear()


async def _wait_closed_by_peer(pool: HttpPool) -> None:
    # the client's loop notices the RST once it reads the socket: wait for exactly that
    for _ in range(1000):
        if all(c.writer.is_closing() or c.reader.at_eof() for c in pool._idle):
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the client never saw the reset")


def test_a_connection_the_peer_reset_while_idle_is_replaced_not_raised() -> None:
    async def main() -> tuple[int, int, int]:
        srv = ResettingServer()
        server = await asyncio.start_server(srv.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = HttpPool(f"http://127.0.0.1:{port}", timeout_s=5, connect_timeout_s=5)
        first = await pool.request("POST", "/x", b"{}")
        srv.reset_all()
        await _wait_closed_by_peer(pool)
        second = await pool.request("POST", "/x", b"{}")
        server.close()
        return first.status, second.status, srv.requests

    assert run(main) == (200, 200, 2)


def test_a_peer_that_is_gone_is_an_http_error() -> None:
    async def main() -> str:
        srv = ResettingServer()
        server = await asyncio.start_server(srv.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = HttpPool(f"http://127.0.0.1:{port}", timeout_s=5, connect_timeout_s=5)
        await pool.request("GET", "/x")
        server.close()
        await server.wait_closed()
        srv.reset_all()
        await _wait_closed_by_peer(pool)
        try:
            await pool.request("GET", "/x")
        except HttpError as exc:
            return str(exc)
        return "answered"

    assert "cannot connect" in run(main)
