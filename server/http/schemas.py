"""Request and response bodies of the controller API (the seed API plus event status)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from kvctl.common.events import Event, Status

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
    location: str
    chunks: int
    bytes: int
    capacity_bytes: int | None
    pinned_chunks: int
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
    instance_id: str
    worker_id: int = 0
    url: str = Field(description="where the controller reaches the worker's command API")
    engine_url: str | None = None
    chunk_size: int = Field(ge=1)
    locations: list[LocationInfo] = Field(default_factory=list, max_length=64)
    error_code: int = 0
    pid: int | None = None


class DeregisterRequest(_Body):
    instance_id: str
    url: str = Field(description="the URL the worker registered with")


class DeregisterResponse(BaseModel):
    stopped: bool  # false: no such worker registered at that URL (nothing changed)


class HeartbeatResponse(BaseModel):
    heartbeat_interval_s: float
    dead_after_s: float
    registered_at: float
    controller_id: str


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
