"""LMCache 0.5.6's controller wire protocol, written down as kvctl's own schema.

Every frame is msgpack of a struct tagged ``"type"`` = the class name; heartbeat commands are
tagged ``"command_type"``. The field names, order, defaults and tags below are those a real
0.5.6 worker sends and accepts (tests/test_lmcache_fleet_wire.py checks them against the
recordings in shared/lmcache-0.5.6/ and against the real classes). Upstream's schemas change
between minor versions, so this module is pinned to one: a frame from another version fails to
decode here and is answered or dropped as a bad frame, never half-understood.

Decoding is bounded: frames larger than `MAX_FRAME_BYTES` are refused before msgpack sees
them, and msgspec allocates only what the frame's bytes describe.
"""

from __future__ import annotations

import functools
import operator
from enum import Enum
from typing import Any

import msgspec

PROTOCOL_VERSION = "0.5.6"
# A BatchedKVOperationMsg of ~30 bytes per op: 4 MiB is >100k ops, far above a real batch.
MAX_FRAME_BYTES = 4 * 1024 * 1024


class _Msg(msgspec.Struct, tag=True):
    """Tag field ``type``, tag value the class name (msgspec's default, as upstream)."""


# ---- heartbeat commands (controller -> worker, inside HeartbeatRetMsg) ------------------
class _Command(msgspec.Struct, tag_field="command_type"):
    reason: str | None = None
    args: dict[str, Any] | None = None


class FullSyncCommand(_Command, tag="full_sync"):
    """Makes the worker freeze and re-send every key it holds (about 5 s)."""


# ---- worker -> controller, PUSH -> PULL -------------------------------------------------
class OpType(Enum):
    ADMIT = "admit"
    EVICT = "evict"


class KVOpEvent(msgspec.Struct):
    op_type: OpType
    key: int
    seq_num: int


class BatchedKVOperationMsg(_Msg):
    instance_id: str
    worker_id: int
    location: str
    operations: list[KVOpEvent]


class KVAdmitMsg(_Msg):
    instance_id: str
    worker_id: int
    key: int
    location: str
    seq_num: int = 0


class KVEvictMsg(_Msg):
    instance_id: str
    worker_id: int
    key: int
    location: str
    seq_num: int = 0


class DeRegisterMsg(_Msg):
    instance_id: str
    worker_id: int
    ip: str
    port: int


class FullSyncBatchMsg(_Msg):
    instance_id: str
    worker_id: int
    location: str
    sync_id: str
    batch_id: int
    keys: list[int]


class FullSyncEndMsg(_Msg):
    instance_id: str
    worker_id: int
    location: str
    sync_id: str
    actual_total_keys: int


# ---- worker -> controller, DEALER -> ROUTER (reply and heartbeat sockets) ---------------
class RegisterMsg(_Msg):
    instance_id: str
    worker_id: int
    ip: str
    port: int
    peer_init_url: str | None


class HeartbeatMsg(_Msg):
    instance_id: str
    worker_id: int
    ip: str
    port: int
    peer_init_url: str | None


class FullSyncStartMsg(_Msg):
    instance_id: str
    worker_id: int
    location: str
    sync_id: str
    total_keys: int
    batch_count: int


class FullSyncStatusMsg(_Msg):
    instance_id: str
    worker_id: int
    sync_id: str


class BatchedP2PLookupMsg(_Msg):
    hashes: list[int]
    instance_id: str
    worker_id: int


class RegisterRetMsg(_Msg):
    extra_config: dict[str, str] = msgspec.field(default_factory=dict)


class HeartbeatRetMsg(_Msg):
    commands: list[FullSyncCommand] = []


class FullSyncStartRetMsg(_Msg):
    sync_id: str
    accepted: bool
    error_msg: str | None = None


class FullSyncStatusRetMsg(_Msg):
    sync_id: str
    is_complete: bool
    global_progress: float
    can_exit_freeze: bool
    missing_batches: list[int] = []


class ErrorMsg(_Msg):
    error: str


# ---- controller -> worker, REQ -> REP ---------------------------------------------------
class ClearWorkerMsg(_Msg):
    worker_event_id: str
    location: str


class PinWorkerMsg(_Msg):
    worker_event_id: str
    location: str
    tokens: list[int]


class CompressWorkerMsg(_Msg):
    worker_event_id: str
    method: str
    location: str
    tokens: list[int] | None = None


class DecompressWorkerMsg(_Msg):
    worker_event_id: str
    method: str
    location: str
    tokens: list[int] | None = None


class MoveWorkerMsg(_Msg):
    worker_event_id: str
    old_position: str
    new_position: tuple[str, str]
    tokens: list[int] | None = None
    copy: bool | None = True


class HealthWorkerMsg(_Msg):
    worker_event_id: str


class ClearWorkerRetMsg(_Msg):
    num_tokens: int


class PinWorkerRetMsg(_Msg):
    num_tokens: int


class CompressWorkerRetMsg(_Msg):
    num_tokens: int


class DecompressWorkerRetMsg(_Msg):
    num_tokens: int


class MoveWorkerRetMsg(_Msg):
    num_tokens: int


class HealthWorkerRetMsg(_Msg):
    error_code: int


PushMsg = (BatchedKVOperationMsg | KVAdmitMsg | KVEvictMsg | DeRegisterMsg
           | FullSyncBatchMsg | FullSyncEndMsg)
RequestMsg = (RegisterMsg | HeartbeatMsg | FullSyncStartMsg | FullSyncStatusMsg
              | BatchedP2PLookupMsg)
ControlMsg = (ClearWorkerMsg | PinWorkerMsg | CompressWorkerMsg | DecompressWorkerMsg
              | MoveWorkerMsg | HealthWorkerMsg)
ControlRetMsg = (ClearWorkerRetMsg | PinWorkerRetMsg | CompressWorkerRetMsg
                 | DecompressWorkerRetMsg | MoveWorkerRetMsg | HealthWorkerRetMsg | ErrorMsg)
ReplyMsg = (RegisterRetMsg | HeartbeatRetMsg | FullSyncStartRetMsg | FullSyncStatusRetMsg
            | ErrorMsg)

# every message of the protocol, by tag, for tests and tools
ALL_MESSAGES: dict[str, type[msgspec.Struct]] = {
    cls.__name__: cls for cls in (
        BatchedKVOperationMsg, KVAdmitMsg, KVEvictMsg, DeRegisterMsg, FullSyncBatchMsg,
        FullSyncEndMsg, RegisterMsg, HeartbeatMsg, FullSyncStartMsg, FullSyncStatusMsg,
        BatchedP2PLookupMsg, RegisterRetMsg, HeartbeatRetMsg, FullSyncStartRetMsg,
        FullSyncStatusRetMsg, ErrorMsg, ClearWorkerMsg, PinWorkerMsg, CompressWorkerMsg,
        DecompressWorkerMsg, MoveWorkerMsg, HealthWorkerMsg, ClearWorkerRetMsg,
        PinWorkerRetMsg, CompressWorkerRetMsg, DecompressWorkerRetMsg, MoveWorkerRetMsg,
        HealthWorkerRetMsg)}


class BadFrame(ValueError):
    """A frame that is not a message of this protocol (reason says why, briefly)."""


_encoder = msgspec.msgpack.Encoder()
_push = msgspec.msgpack.Decoder(PushMsg)
_request = msgspec.msgpack.Decoder(RequestMsg)
_control_ret = msgspec.msgpack.Decoder(ControlRetMsg)
_any = msgspec.msgpack.Decoder(functools.reduce(operator.or_, ALL_MESSAGES.values()))


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def _decode(decoder: msgspec.msgpack.Decoder, frame: bytes, what: str) -> Any:
    if len(frame) > MAX_FRAME_BYTES:
        raise BadFrame(f"{what} frame of {len(frame)} bytes (at most {MAX_FRAME_BYTES})")
    try:
        return decoder.decode(frame)
    except msgspec.ValidationError as exc:
        raise BadFrame(f"{what}: {_short(str(exc))}") from None
    except msgspec.DecodeError as exc:
        raise BadFrame(f"{what} frame is not msgpack: {_short(str(exc))}") from None


def decode_push(frame: bytes) -> PushMsg:
    """A frame from a worker's PUSH socket."""
    return _decode(_push, frame, "push")


def decode_request(frame: bytes) -> RequestMsg:
    """A frame from a worker's DEALER (reply or heartbeat socket)."""
    return _decode(_request, frame, "request")


def decode_control_reply(frame: bytes) -> ControlRetMsg:
    """A worker's REP answer to a command."""
    return _decode(_control_ret, frame, "command reply")


def decode_any(frame: bytes) -> msgspec.Struct:
    return _decode(_any, frame, "frame")


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
