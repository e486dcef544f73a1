"""Request and response bodies of the controller API (the seed API plus event status)."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from kvctl.common.events import Event, Status
from kvctl.server.chunks import check_chunk_key

# Token ids are vocabulary indices: 0 <= id < 2**31 (no tokenizer comes near; int32 holds
# them wherever they are stored or hashed). A request carries at most MAX_REQUEST_TOKENS
# (4,194,304; the server's max_request_tokens setting may lower it further, with a 413).
MAX_TOKEN_ID = 2**31 - 1
MAX_REQUEST_TOKENS = 2**22
# Names (instance ids, locations, methods, event ids) are short; a longer one is refused
# with a 422 before anything could echo it back.
MAX_NAME_CHARS = 256


def check_token_ids(ids: list[int]) -> list[int]:
    """Refuse ids outside [0, 2**31) in one pass (min/max run in C), naming the first."""
    if ids and (min(ids) < 0 or max(ids) > MAX_TOKEN_ID):
        i, bad = next((i, t) for i, t in enumerate(ids) if not 0 <= t <= MAX_TOKEN_ID)
        shown = str(bad) if len(str(bad)) <= 24 else f"{str(bad)[:12]}...({len(str(bad))} digits)"
        raise ValueError(f"token ids must be integers in [0, 2**31); tokens[{i}] = {shown}")
    return ids


def check_text(text: str) -> str:
    """Refuse text that is not valid Unicode (a lone surrogate, which JSON's \\ud800
    escape can carry): no tokenizer or UTF-8 encoder can handle it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text contains an unpaired surrogate {text[exc.start]!r} at index "
                         f"{exc.start}; send valid UTF-8") from None
    return text


def check_worker_url(url: str) -> str:
    """Where a worker is reached: ``http://host:port`` and nothing else (no credentials,
    path, query; a port that exists). Refused at registration, so that no record the
    controller later fans out to can hold an address it cannot even parse."""
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError as exc:
        raise ValueError(f"{url[:100]!r} is not a worker address ({exc}); expected "
                         "http://host:port") from None
    if (u.scheme != "http" or not u.hostname or port is None or port == 0
            or u.username is not None or u.password is not None or u.path not in ("", "/")
            or u.query or u.fragment):
        raise ValueError(f"{url[:100]!r} is not a worker address; expected http://host:port "
                         "(no credentials, path or query; port 1-65535)")
    return url.rstrip("/")


def check_optional_url(url: str | None) -> str | None:
    return None if url is None else check_worker_url(url)


def check_name(name: str) -> str:
    """An instance id: printable, non-empty (it becomes a Redis key and a metric label)."""
    if not name or not name.isprintable() or name != name.strip():
        raise ValueError(f"{name[:100]!r} is not a usable instance id (printable characters, "
                         "no surrounding spaces)")
    return name


# fail_fast: a million bad items make one error, not a million-part detail
TokenIds = Annotated[list[int], Field(max_length=MAX_REQUEST_TOKENS, fail_fast=True),
                     AfterValidator(check_token_ids)]
Text = Annotated[str, AfterValidator(check_text)]
TokenList = TokenIds


class _Body(BaseModel):
    # str_max_length bounds every string field of every request body
    model_config = ConfigDict(extra="ignore", str_max_length=MAX_NAME_CHARS)

    @field_validator("method", check_fields=False)
    @classmethod
    def _canonical_method(cls, v: Any) -> Any:
        # one spelling per method: events and metric labels never see "CacheGen " variants
        return v.strip().lower() if isinstance(v, str) else v


class CompressRequest(_Body):
    instance_id: str
    method: str
    location: str
    tokens: TokenList
    force: bool = Field(False, description="compress chunks another lossy codec already "
                                           "holds (their losses add up)")


class OpResponse(BaseModel):
    event_id: str
    num_tokens: int


class LookupRequest(_Body):
    tokens: TokenList


class LookupResponse(BaseModel):
    event_id: str
    # LMCache's field, unchanged: per instance, the location with the longest prefix
    layout_info: dict[str, tuple[str, int]]
    # kvctl's detail beside it: per instance, tokens of the prefix each location holds
    tiers: dict[str, dict[str, int]] = Field(default_factory=dict)
    # instances that did not answer by the fan-out deadline (hung or slow): left out above
    late: list[str] = Field(default_factory=list)


class ClearRequest(_Body):
    instance_id: str
    location: str


class PinRequest(_Body):
    instance_id: str
    location: str
    tokens: TokenList


class MoveRequest(_Body):
    old_position: tuple[str, str] = Field(description="[instance_id, location]")
    new_position: tuple[str, str] = Field(description="[instance_id, location]")
    tokens: TokenList
    should_copy: bool = False


class WorkerInfoRequest(_Body):
    instance_id: str = Field(description='an instance, or "all" for every one')
    worker_ids: list[int] | None = None


class LocationInfo(BaseModel):
    location: str = Field(max_length=MAX_NAME_CHARS)
    chunks: int = Field(ge=0)
    bytes: int = Field(ge=0)
    capacity_bytes: int | None = Field(ge=0)
    pinned_chunks: int = Field(ge=0)
    # since the worker started; absent from workers of older kvctl releases (0, empty)
    bytes_by_codec: dict[str, int] = Field(default_factory=dict, max_length=64)
    hits: int = 0
    misses: int = 0
    read_failures: int = 0
    evictions: int = 0


class WorkerInfo(BaseModel):
    instance_id: str
    worker_id: int
    kind: Literal["kvctl", "lmcache"] = Field("kvctl", description="a `kvctl worker` or an "
                                              "LMCache 0.5.6 LMCacheWorker")
    ip: str
    port: int
    url: str
    engine_url: str | None
    distributed_url: str | None
    state: Literal["alive", "dead"]
    error_code: int
    registration_time: float
    last_heartbeat_time: float
    heartbeat_age_s: float
    chunk_size: int
    locations: list[LocationInfo]
    # did not answer by the fan-out deadline: its numbers are the last heartbeat's
    late: bool = False
    # LMCache workers only
    peer_init_url: str | None = None
    key_count: int | None = None
    directory: Literal["ok", "syncing", "missing"] | None = None
    queued_commands: int | None = None
    held_here: bool | None = Field(None, description="this controller holds its sockets "
                                   "(else another one on the same state does)")


class WorkerList(BaseModel):
    workers: list[WorkerInfo]


class HeartbeatRequest(_Body):
    instance_id: Annotated[str, AfterValidator(check_name)]
    worker_id: int = Field(0, ge=0, le=2**31 - 1)
    url: Annotated[str, AfterValidator(check_worker_url)] = Field(
        description="where the controller reaches the worker's command API: http://host:port")
    engine_url: Annotated[str | None, AfterValidator(check_optional_url)] = None
    chunk_size: int = Field(ge=1, le=1 << 20)
    locations: list[LocationInfo] = Field(default_factory=list, max_length=64)
    error_code: int = Field(0, ge=0, le=2)
    pid: int | None = Field(None, ge=0, le=2**31 - 1)
    lease: str | None = Field(None, max_length=128, description="the credential this worker "
                              "was given when it registered; proves it on every heartbeat")


class DeregisterRequest(_Body):
    instance_id: str
    url: str = Field(description="the URL the worker registered with")
    lease: str | None = Field(None, max_length=128, description="the worker's lease: only "
                              "the instance's holder may deregister it")


class DeregisterResponse(BaseModel):
    stopped: bool  # false: no such worker registered at that URL (nothing changed)


class HeartbeatResponse(BaseModel):
    heartbeat_interval_s: float
    dead_after_s: float
    registered_at: float
    controller_id: str
    lease: str = Field(description="this worker's credential for the instance: send it with "
                                   "every heartbeat (it is never shown again)")


class WorkerInfoResponse(BaseModel):
    event_id: str
    worker_infos: list[WorkerInfo]


class ClusterHealth(BaseModel):
    status: Literal["ok"]
    # "instance_id/worker_id" -> 0 healthy, 1 a storage location failed, 2 dead
    error_codes: dict[str, int]


class HealthRequest(_Body):
    instance_id: str


class HealthResponse(BaseModel):
    event_id: str
    error_codes: dict[int, int] = Field(
        description="per worker: 0 healthy, 1 a storage location failed, 2 dead/unreachable")
    workers: list[WorkerInfo] = Field(default_factory=list)


class CheckFinishRequest(_Body):
    event_id: str


class CheckFinishResponse(BaseModel):
    event_id: str
    status: Status


class EventList(BaseModel):
    events: list[Event]


class QueryInstanceRequest(_Body):
    event_id: str = ""
    ip: str


class QueryInstanceResponse(BaseModel):
    event_id: str
    res: str | None


class CodecList(BaseModel):
    methods: list[str]
    default: str


# ---- the worker command port: the same bodies, validated the same way ---------------------
# (`kvctl.server.worker.app.WorkerOps` parses each command with these before it runs.)
ChunkKey = Annotated[str, AfterValidator(check_chunk_key)]
EventIdField = Annotated[str | None, Field(max_length=MAX_NAME_CHARS)]


class CompressCommand(CompressRequest):
    event_id: EventIdField = None


class PinCommand(PinRequest):
    pinned: bool = True
    event_id: EventIdField = None


class ClearCommand(ClearRequest):
    event_id: EventIdField = None


class MoveCommand(MoveRequest):
    event_id: EventIdField = None


class EventsCommand(_Body):
    ids: list[str] = Field(default_factory=list, max_length=100_000)


class InfoCommand(_Body):
    pass


class ChunkPlanCommand(_Body):
    location: str
    tokens: TokenList


class DeleteChunkCommand(_Body):
    location: str
    key: ChunkKey


WORKER_COMMANDS: dict[str, type[_Body]] = {
    "compress": CompressCommand, "decompress": CompressCommand, "pin": PinCommand,
    "clear": ClearCommand, "move": MoveCommand, "lookup": LookupRequest,
    "events": EventsCommand, "info": InfoCommand, "chunk_plan": ChunkPlanCommand,
    "delete_chunk": DeleteChunkCommand,
}
