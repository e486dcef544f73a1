"""The controller's command channel to one LMCache worker: a ZMQ REQ socket to its REP port.

LMCache's REP socket serves one request at a time and a REQ socket allows one in flight, so
upstream's controller, sharing one socket between concurrent HTTP requests, fails the second
with "Operation cannot be accomplished in current state" (LMCache issue #1702). Here every
call waits its turn on a per-worker lock (a bounded queue: `Busy` beyond ``max_queue``), has
a deadline, and a socket that timed out or lost its peer is replaced, so the next call starts
clean. A worker killed mid-call is noticed from the socket's disconnect event, not after the
whole deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from kvctl.server.controller.transport import WorkerTransport
from kvctl.server.errors import BadRequest, Busy, DomainError, WorkerUnavailable
from kvctl.server.lmcache import wire

log = logging.getLogger("kvctl.lmcache")


class WorkerRefused(DomainError):
    """The LMCache worker answered a command with ErrorMsg (its text is the detail)."""

    kind = "worker_refused"


# op -> (message class, reply class)
_OPS: dict[str, tuple[type[msgspec.Struct], type[msgspec.Struct]]] = {
    "compress": (wire.CompressWorkerMsg, wire.CompressWorkerRetMsg),
    "decompress": (wire.DecompressWorkerMsg, wire.DecompressWorkerRetMsg),
    "pin": (wire.PinWorkerMsg, wire.PinWorkerRetMsg),
    "clear": (wire.ClearWorkerMsg, wire.ClearWorkerRetMsg),
    "move": (wire.MoveWorkerMsg, wire.MoveWorkerRetMsg),
    "health": (wire.HealthWorkerMsg, wire.HealthWorkerRetMsg),
}
# what LMCache's own controller prefixes worker_event_id with
_PREFIX = {"compress": "CompressWorker", "decompress": "DecompressWorker", "pin": "Pin",
           "clear": "Clear", "move": "Move", "health": "HealthWorker"}


def build_message(op: str, worker_id: int, body: dict[str, Any]) -> msgspec.Struct:
    """The REQ message for a controller op (body: the seed API's fields)."""
    eid = f"{_PREFIX[op]}{worker_id}{uuid.uuid4()}"
    if op in ("compress", "decompress"):
        return _OPS[op][0](worker_event_id=eid, method=body["method"],
                           location=body["location"], tokens=list(body["tokens"]))
    if op == "pin":
        return wire.PinWorkerMsg(worker_event_id=eid, location=body["location"],
                                 tokens=list(body["tokens"]))
    if op == "clear":
        return wire.ClearWorkerMsg(worker_event_id=eid, location=body["location"])
    if op == "move":
        return wire.MoveWorkerMsg(worker_event_id=eid, old_position=body["old_location"],
                                  new_position=(body["target_url"], body["new_location"]),
                                  tokens=list(body["tokens"]),
                                  copy=bool(body.get("should_copy", True)))
    if op == "health":
        return wire.HealthWorkerMsg(worker_event_id=eid)
    raise BadRequest(f"LMCache workers have no {op!r} command; they run: "
                     f"{', '.join(sorted(_OPS))}")


class ZmqWorkerTransport(WorkerTransport):
    """One LMCache worker (instance, worker_id) at ``tcp://ip:port``.

    `call` runs a command on the wire and returns its result (``num_tokens`` or
    ``error_code``) when the worker answers; unlike a `kvctl worker`, an LMCache worker keeps
    no events, so the controller tracks them (`runs_jobs` is False).
    """

    runs_jobs = False

    def __init__(self, ctx: zmq.asyncio.Context, instance_id: str, worker_id: int, ip: str,
                 port: int, timeout_s: float, job_timeout_s: float, max_queue: int = 64,
                 on_reply: Callable[[], None] | None = None) -> None:
        self.ctx = ctx
        self.instance_id = instance_id
        self.worker_id = worker_id
        self.address = (ip, port)
        self.url = f"tcp://{ip}:{port}"
        self.timeout_s = timeout_s
        self.job_timeout_s = job_timeout_s
        self.max_queue = max_queue
        self.on_reply = on_reply
        self._lock = asyncio.Lock()
        self._waiting = 0
        self._sock: zmq.asyncio.Socket | None = None
        self._mon: zmq.asyncio.Socket | None = None
        self.in_flight_since: float | None = None
        self.closed = False

    @property
    def queued(self) -> int:
        return self._waiting

    def _open(self) -> tuple[zmq.asyncio.Socket, zmq.asyncio.Socket]:
        if self._sock is None:
            sock = self.ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)
            self._mon = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            sock.connect(self.url)
            self._sock = sock
        assert self._mon is not None
        return self._sock, self._mon

    def _reset(self) -> None:
        """A REQ socket that sent without receiving cannot send again: start a new one."""
        if self._sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.disable_monitor()
            self._sock.close(linger=0)
        if self._mon is not None:
            self._mon.close(linger=0)
        self._sock = self._mon = None

    def _who(self) -> str:
        return f"LMCache worker {self.worker_id} of instance {self.instance_id!r} at {self.url}"

    async def request(self, msg: msgspec.Struct, timeout_s: float,
                      started: Callable[[], None] | None = None) -> msgspec.Struct:
        """Send one command and wait for its answer; one in flight per worker, the rest wait."""
        if self.closed:
            raise WorkerUnavailable(f"{self._who()} is no longer registered")
        if self._waiting >= self.max_queue:
            raise Busy(f"{self._who()} has {self._waiting} commands waiting; retry later")
        self._waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self._waiting -= 1
        try:
            if started is not None:
                started()
            return await self._exchange(msg, timeout_s)
        finally:
            self._lock.release()

    async def _exchange(self, msg: msgspec.Struct, timeout_s: float) -> msgspec.Struct:
        sock, mon = self._open()
        self.in_flight_since = time.monotonic()
        recv: asyncio.Future[Any] | None = None
        lost: asyncio.Future[Any] | None = None
        try:
            await asyncio.wait_for(sock.send(wire.encode(msg)), timeout_s)
            recv = asyncio.ensure_future(sock.recv())
            lost = asyncio.ensure_future(mon.recv_multipart())
            done, _ = await asyncio.wait({recv, lost}, timeout=timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if recv in done:
                frame = recv.result()
            elif lost in done:
                self._reset()
                raise WorkerUnavailable(f"{self._who()} dropped the connection while running "
                                        f"{type(msg).__name__} (the process died or restarted)")
            else:
                self._reset()
                raise WorkerUnavailable(f"{self._who()} did not answer "
                                        f"{type(msg).__name__} within {timeout_s:g} s")
        except (TimeoutError, zmq.ZMQError) as exc:
            self._reset()
            raise WorkerUnavailable(f"{self._who()} cannot be reached: "
                                    f"{type(exc).__name__} {exc}") from None
        finally:
            self.in_flight_since = None
            for fut in (recv, lost):
                if fut is not None and not fut.done():
                    fut.cancel()
        if self.on_reply is not None:
            self.on_reply()
        try:
            return wire.decode_control_reply(frame)
        except wire.BadFrame as exc:
            raise WorkerUnavailable(f"{self._who()} answered with a frame that is not a "
                                    f"0.5.6 reply ({exc})") from None

    async def call(self, op: str, body: dict[str, Any]) -> Any:
        """Run ``op`` on the worker: ``{"num_tokens": n}`` or, for health,
        ``{"error_code": c}``; an ErrorMsg answer is `WorkerRefused` with the worker's text."""
        msg = build_message(op, self.worker_id, body)
        timeout = self.job_timeout_s if op in ("compress", "decompress", "move") \
            else self.timeout_s
        reply = await self.request(msg, timeout, body.get("_started"))
        if isinstance(reply, wire.ErrorMsg):
            raise WorkerRefused(reply.error)
        expected = _OPS[op][1]
        if not isinstance(reply, expected):
            raise WorkerUnavailable(f"{self._who()} answered {type(msg).__name__} with "
                                    f"{type(reply).__name__}, expected {expected.__name__}")
        if isinstance(reply, wire.HealthWorkerRetMsg):
            return {"error_code": reply.error_code}
        return {"num_tokens": reply.num_tokens}  # type: ignore[attr-defined]

    async def get_chunk(self, location: str, key: str) -> tuple[bytes, int, str]:
        raise BadRequest("LMCache workers do not hand chunk bytes to the controller; a move "
                         "between LMCache instances uses their P2P transfer")

    async def put_chunk(self, location: str, key: str, blob: bytes, num_tokens: int,
                        digest: str) -> str:
        raise BadRequest("LMCache workers do not take chunk bytes from the controller")

    async def close(self) -> None:
        self.closed = True
        self._reset()
