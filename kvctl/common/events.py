"""The one event model: its fields and statuses, shared by the server, the client and the CLI.

An event is one background operation of the controller (compress, decompress, pin, unpin,
move, clear). Its life cycle is queued -> running -> finished | failed. Plain dataclass and
strings, no pydantic, so the CLI imports this without the server's dependencies.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

Status = Literal["queued", "running", "finished", "failed"]

QUEUED: Status = "queued"
RUNNING: Status = "running"
FINISHED: Status = "finished"
FAILED: Status = "failed"
STATUSES: tuple[Status, ...] = (QUEUED, RUNNING, FINISHED, FAILED)
ENDED: frozenset[str] = frozenset({FINISHED, FAILED})
STATUS_PATTERN = "^(" + "|".join(STATUSES) + ")$"


@dataclass
class Event:
    """One controller operation as operators see it (`GET /events/{id}`)."""

    event_id: str
    op: str
    instance_id: str
    method: str | None
    location: str | None
    num_tokens: int
    chunks_total: int
    status: Status = QUEUED
    chunks_done: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    error: str | None = None
    # compress/decompress: [codec before, codec after] per chunk, in chunk order
    chunk_codecs: list[list[str]] = field(default_factory=list)
    # something the operator should know although the event did not fail
    warning: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        """Build from a dict that may carry extra keys (a newer peer's); they are dropped."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
