"""The three sockets an LMCache 0.5.6 worker talks to, bound by kvctl's controller.

- pull (PULL): the worker's PUSH stream of admits, evicts and full-sync batches;
- reply (ROUTER): registration and full-sync start/status, ``[identity, b"", payload]``;
- heartbeat (ROUTER): heartbeats; its address is handed to the worker at registration.

A frame that does not decode, has the wrong shape or an unknown type is counted by reason and
logged once per reason; on a ROUTER it is answered with ErrorMsg (the worker's DEALER waits
for an answer), on PULL it is dropped. Nothing a bad frame says is registered. Frames above
`wire.MAX_FRAME_BYTES` never reach Python: ZMQ drops them and the peer's connection.

LMCache workers cannot authenticate: whoever reaches these ports can register workers and
feed the directory, which is why they bind loopback unless told otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from typing import Protocol

import msgspec
import zmq
import zmq.asyncio

from kvctl.server.lmcache import wire

log = logging.getLogger("kvctl.lmcache")

SOCKETS = ("pull", "reply", "heartbeat")
# upstream lmcache_controller's defaults; it has no heartbeat port unless configured (its
# workers then never heartbeat): kvctl always binds one, on an OS-chosen port if unnamed
DEFAULT_PORTS = {"pull": 8300, "reply": 8400}


class FrameHandler(Protocol):
    def on_push(self, msg: wire.PushMsg) -> None: ...

    async def on_request(self, msg: wire.RequestMsg, socket: str) -> msgspec.Struct: ...


class BadFrames:
    """Counts of refused frames by reason; each reason is logged the first time only."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        if self.counts[reason] == 1:
            log.warning("LMCache wire: %s (%s); further ones are counted, not logged",
                        reason, detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class ControllerSockets:
    """Binds pull/reply/heartbeat on ``host`` and feeds decoded frames to ``handler``."""

    def __init__(self, ctx: zmq.asyncio.Context, host: str, ports: dict[str, int],
                 handler: FrameHandler, bad: BadFrames) -> None:
        self.ctx = ctx
        self.host = host
        self.handler = handler
        self.bad = bad
        self.socks: dict[str, zmq.asyncio.Socket] = {}
        self.ports: dict[str, int] = {}
        kinds = {"pull": zmq.PULL, "reply": zmq.ROUTER, "heartbeat": zmq.ROUTER}
        try:
            for name in SOCKETS:
                sock = ctx.socket(kinds[name])
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)
                # a ROUTER answering a peer that went away drops the reply, never blocks
                if kinds[name] == zmq.ROUTER:
                    sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
                # a flood waits in ZMQ's bounded queue (and then on the sender), not here
                sock.setsockopt(zmq.RCVHWM, 10_000)
                self.socks[name] = sock
                port = int(ports.get(name, 0))
                addr = f"tcp://{_zmq_host(host)}"
                try:
                    if port:
                        sock.bind(f"{addr}:{port}")
                        self.ports[name] = port
                    else:
                        self.ports[name] = sock.bind_to_random_port(addr)
                except zmq.ZMQError as exc:
                    raise OSError(f"cannot bind the LMCache {name} port {host}:{port}: "
                                  f"{exc.strerror}; pick another in --monitor-ports") from None
        except BaseException:
            self.close()
            raise
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._pull_loop()),
                       asyncio.create_task(self._router_loop("reply")),
                       asyncio.create_task(self._router_loop("heartbeat"))]

    async def _pull_loop(self) -> None:
        sock = self.socks["pull"]
        while True:
            frames = await sock.recv_multipart(copy=True)
            for frame in frames:  # a PUSH may send several messages in one multipart
                try:
                    msg = wire.decode_push(frame)
                except wire.BadFrame as exc:
                    self.bad.add("undecodable push frame", str(exc))
                    continue
                try:
                    self.handler.on_push(msg)
                except Exception:  # a bug must not stop the stream
                    log.exception("LMCache push %s failed", type(msg).__name__)

    async def _router_loop(self, name: str) -> None:
        sock = self.socks[name]
        while True:
            frames = await sock.recv_multipart(copy=True)
            if len(frames) != 3 or frames[1] != b"":
                self.bad.add(f"malformed {name} envelope",
                             f"{len(frames)} frames; expected [identity, empty, payload]")
                if len(frames) >= 2:
                    await self._send(sock, frames[0], wire.ErrorMsg(
                        error="expected frames [empty delimiter, msgpack payload]"))
                continue
            ident, payload = frames[0], frames[2]
            try:
                msg = wire.decode_request(payload)
            except wire.BadFrame as exc:
                self.bad.add(f"undecodable {name} frame", str(exc))
                await self._send(sock, ident, wire.ErrorMsg(
                    error=f"kvctl speaks LMCache {wire.PROTOCOL_VERSION}'s protocol: {exc}"))
                continue
            try:
                ret = await self.handler.on_request(msg, name)
            except Exception as exc:
                log.exception("LMCache %s %s failed", name, type(msg).__name__)
                ret = wire.ErrorMsg(error=f"controller error: {type(exc).__name__}")
            await self._send(sock, ident, ret)

    async def _send(self, sock: zmq.asyncio.Socket, ident: bytes, msg: msgspec.Struct) -> None:
        with contextlib.suppress(zmq.ZMQError):
            await sock.send_multipart([ident, b"", wire.encode(msg)])

    async def close_async(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self.close()

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close(linger=0)
        self.socks = {}


def _zmq_host(host: str) -> str:
    return "*" if host in ("0.0.0.0", "", "*") else (f"[{host}]" if ":" in host else host)
