"""Request and response bodies of the controller API (the seed API plus event status)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

TokenList = list[int]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


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


class HealthRequest(_Body):
    instance_id: str


class HealthResponse(BaseModel):
    event_id: str
    error_codes: dict[int, int]


class WorkerInfoRequest(_Body):
    instance_id: str
    worker_ids: list[int] | None = None


class LocationInfo(BaseModel):
    location: str
    chunks: int
    bytes: int
    capacity_bytes: int | None
    pinned_chunks: int


class WorkerInfo(BaseModel):
    instance_id: str
    worker_id: int
    ip: str
    port: int
    distributed_url: str | None
    registration_time: float
    last_heartbeat_time: float
    locations: list[LocationInfo]


class WorkerInfoResponse(BaseModel):
    event_id: str
    worker_infos: list[WorkerInfo]


class CheckFinishRequest(_Body):
    event_id: str


class CheckFinishResponse(BaseModel):
    event_id: str
    status: str


class EventModel(BaseModel):
    event_id: str
    op: str
    instance_id: str
    method: str | None
    location: str | None
    status: str
    num_tokens: int
    chunks_total: int
    chunks_done: int
    bytes_before: int
    bytes_after: int
    error: str | None
    chunk_codecs: list[list[str]] = Field(default_factory=list)
    warning: str | None = None
    created_at: float
    started_at: float | None
    finished_at: float | None


class EventList(BaseModel):
    events: list[EventModel]


class CodecList(BaseModel):
    methods: list[str]
    default: str
