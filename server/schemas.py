"""Request and response bodies of the controller API (the seed API plus event status)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kvctl.common.events import Event, Status

TokenList = list[int]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CompressRequest(_Body):
    instance_id: str
    method: str
    location: str
    tokens: TokenList


class OpResponse(BaseModel):
    event_id: str
    num_tokens: int


class LookupRequest(_Body):
    tokens: TokenList


class LookupResponse(BaseModel):
    event_id: str
    layout_info: dict[str, tuple[str, int]]


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


class HeartbeatResponse(BaseModel):
    heartbeat_interval_s: float
    dead_after_s: float
    registered_at: float
    controller_id: str


class WorkerInfoResponse(BaseModel):
    event_id: str
    worker_infos: list[WorkerInfo]


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


class CodecList(BaseModel):
    methods: list[str]
    default: str
