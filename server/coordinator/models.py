"""The coordinator's wire objects, one model each, in LMCache 0.5.6's shapes.

An LMCache MP server (``lmcache server --coordinator-url``) builds these bodies with its own
models and parses our replies with them, so field names, defaults and bounds follow
upstream's; kvctl's additions are extra reply fields a client may ignore. Bounds are
tighter where upstream has none (entries per batch, token ids per request, string lengths),
so that what a request costs is paid for by its size.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import msgspec
from pydantic import (
    BaseModel,
    Field,
    StringConstraints,
    model_validator,
)

from kvctl.common.mpkeys import MAX_SALT_CHARS, MAX_TOKEN_ID, MAX_TOKEN_IDS

MAX_BATCHES = 1_000  # per POST /events
MAX_ENTRIES = 8_192  # per batch; a server flushes each second, far fewer in practice
MAX_CHUNK_TOKENS = 4_096  # token_ids on one store entry (one chunk: 256)
MAX_KEYS = 10_000  # per lookup by keys
MAX_ID_CHARS = 256

Str256 = Annotated[str, StringConstraints(max_length=MAX_ID_CHARS)]
HexHash = Annotated[str, StringConstraints(min_length=2, max_length=128,
                                           pattern=r"^([0-9a-fA-F]{2})+$")]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]


class Tier(StrEnum):
    l1 = "l1"
    l2 = "l2"
    all = "all"


class EventType(StrEnum):
    store = "store"
    delete = "delete"
    access = "access"
    config = "config"


class RegisterRequest(BaseModel):
    """``POST /instances``: an MP server joins (again). An empty id asks for one."""

    instance_id: Annotated[str, StringConstraints(strip_whitespace=True,
                                                  max_length=MAX_ID_CHARS)] = ""
    ip: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=255)]
    http_port: int = Field(ge=1, le=65535)
    metadata: dict[Str256, Str256] = Field(default_factory=dict, max_length=64)
    p2p_advertised_url: Annotated[str, StringConstraints(strip_whitespace=True,
                                                         max_length=1024)] = ""
    mq_port: int = Field(default=0, ge=0, le=65535)


class RegisterResponse(BaseModel):
    instance_id: str
    re_registered: bool


class HeartbeatResponse(BaseModel):
    instance_id: str


class EncodedKey(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """One stored object: chunk hash (hex), model, packed kv_rank, object group, tenant salt.
    """

    chunk_hash_hex: Annotated[str, msgspec.Meta(min_length=2, max_length=128,
                                                pattern="^(?:[0-9a-fA-F]{2})+$")]
    model_name: Annotated[str, msgspec.Meta(max_length=MAX_ID_CHARS, pattern="^[^@]*$")]
    kv_rank: Annotated[int, msgspec.Meta(ge=0, lt=1 << 32)]
    object_group_id: Annotated[int, msgspec.Meta(ge=0, lt=1 << 16)] = 0
    cache_salt: Annotated[str, msgspec.Meta(max_length=MAX_SALT_CHARS,
                                            pattern=r"^[^@/\\\x00]*$")] = ""

    def key_id(self) -> str:
        # '@' cannot occur in a model name or a salt: the id splits back unambiguously
        return (f"{self.chunk_hash_hex.lower()}@{self.model_name}@{self.kv_rank}@"
                f"{self.object_group_id}@{self.cache_salt}")


def key_from_id(key_id: str) -> dict[str, object]:
    """The wire form of a key id (``EncodedKey.key_id``)."""
    h, model, rank, group, salt = key_id.split("@", 4)
    return {"chunk_hash_hex": h, "model_name": model, "kv_rank": int(rank),
            "object_group_id": int(group), "cache_salt": salt}


TokenIdM = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKEN_ID)]


class EventEntry(msgspec.Struct, frozen=True):
    key: EncodedKey
    size_bytes: Annotated[int, msgspec.Meta(ge=0, le=1 << 50)] = 0
    token_ids: Annotated[list[TokenIdM], msgspec.Meta(max_length=MAX_CHUNK_TOKENS)] = []
    token_offset: Annotated[int, msgspec.Meta(ge=-1)] = -1


class EventBatch(msgspec.Struct, frozen=True):
    """One same-typed batch of cache events from one server, numbered per incarnation.

    The events path decodes with msgspec, not pydantic: a store entry carries 256 token
    ids, and msgspec turns them into ints 2.6x faster (benchmarks/coordinator_ingest.md).
    """

    instance_id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
    incarnation: Annotated[int, msgspec.Meta(ge=0, lt=1 << 53)]
    seq: Annotated[int, msgspec.Meta(ge=1, lt=1 << 53)]
    event_type: EventType
    tier: Tier
    backend: Annotated[str, msgspec.Meta(max_length=128, pattern="^[^|]*$")]
    entries: Annotated[list[EventEntry], msgspec.Meta(max_length=MAX_ENTRIES)] = []
    shared: bool = False
    ts: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0
    capacity_bytes: Annotated[int, msgspec.Meta(ge=0, le=1 << 62)] = 0
    capacity_revision: Annotated[int, msgspec.Meta(ge=0)] = 0

    def __post_init__(self) -> None:
        if self.tier == Tier.all:
            raise ValueError("cache events name a concrete tier: l1 or l2, not all")
        if not self.backend and self.event_type != EventType.access:
            raise ValueError(f"backend must be non-empty for {self.event_type.value} batches")
        if self.event_type == EventType.config and self.entries:
            raise ValueError("config batches declare capacity and carry no entries")


class EventsRequest(msgspec.Struct, frozen=True):
    batches: Annotated[list[EventBatch], msgspec.Meta(max_length=MAX_BATCHES)] = []


_EVENTS = msgspec.json.Decoder(EventsRequest)
_KEYS = list[EncodedKey]


def decode_events(raw: bytes) -> EventsRequest:
    """The body of ``POST /events``; ValueError says what is wrong and where."""
    try:
        return _EVENTS.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ValueError(str(exc)) from None


def convert_keys(keys: list[dict[str, Any]]) -> list[EncodedKey]:
    try:
        return msgspec.convert(keys, _KEYS)
    except msgspec.ValidationError as exc:
        raise ValueError(f"keys: {exc}") from None


class EventsResponse(BaseModel):
    """Upstream's three counts, then what kvctl also drops and says so."""

    applied: int = 0
    duplicates: int = 0
    stale: int = 0
    unregistered: int = 0
    gaps: int = 0
    dropped_entries: int = 0


class TokensQuery(BaseModel):
    """A token sequence and how to turn it into keys (as the servers did)."""

    model_name: Annotated[str, StringConstraints(max_length=MAX_ID_CHARS)]
    world_size: int = Field(ge=1, le=255)
    token_ids: list[TokenId] = Field(default_factory=list, max_length=MAX_TOKEN_IDS)
    cache_salt: Annotated[str, StringConstraints(max_length=MAX_SALT_CHARS)] = ""


class LookupRequest(BaseModel):
    """``POST /directory/lookup``: exactly one of ``keys`` or ``token_ids`` (+ model)."""

    # checked as EncodedKey by the route (the one model of a key, shared with events)
    keys: list[dict[str, Any]] = Field(default_factory=list, max_length=MAX_KEYS)
    token_ids: list[TokenId] = Field(default_factory=list, max_length=MAX_TOKEN_IDS)
    model_name: Annotated[str, StringConstraints(max_length=MAX_ID_CHARS)] = ""
    world_size: int = Field(default=1, ge=1, le=255)
    cache_salt: Annotated[str, StringConstraints(max_length=MAX_SALT_CHARS)] = ""

    @model_validator(mode="after")
    def _one_form(self) -> LookupRequest:
        if bool(self.keys) == bool(self.token_ids):
            raise ValueError("supply exactly one of 'keys' or 'token_ids'")
        if self.token_ids and not self.model_name:
            raise ValueError("'model_name' is required with 'token_ids'")
        return self


class PinRequest(TokensQuery):
    pass


class DeleteRequest(TokensQuery):
    instance_id: Annotated[str, StringConstraints(max_length=MAX_ID_CHARS)]
    tier: Tier = Tier.all
    force: bool = False


class PrefetchRequest(TokensQuery):
    instance_id: Annotated[str, StringConstraints(max_length=MAX_ID_CHARS)]
