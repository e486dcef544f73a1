"""What a worker answers is input: each reply the controller acts on is checked here.

A worker (or anything registered as one) may answer anything. The controller takes from a
reply only what it would accept in a request: chunk keys that the tokens actually produce,
token counts that fit them, layout entries for the worker's own instance only, events it
asked for. A reply that does not fit is a `WorkerUnavailable` naming the worker and what was
wrong, so the caller treats that worker as it treats one that did not answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import TypeAdapter, ValidationError

from kvctl.common.events import Event
from kvctl.server.chunks import chunk_refs
from kvctl.server.controller.state import WorkerRecord
from kvctl.server.errors import WorkerUnavailable
from kvctl.server.http.schemas import LocationInfo

_LOCATIONS = TypeAdapter(list[LocationInfo])
_EVENT = TypeAdapter(Event)  # the dataclass's field types, checked (status one of four...)
HEALTH_CODES = (0, 1, 2)


def _bad(rec: WorkerRecord, op: str, what: str) -> WorkerUnavailable:
    return WorkerUnavailable(f"the worker of instance {rec.instance_id!r} at {rec.url} answered "
                             f"{op} with {what}; its answer was not used")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def chunk_plan(rec: WorkerRecord, reply: Any, tokens: Sequence[int]) -> list[dict[str, Any]]:
    """The source's chunk plan of a cross-instance move: a prefix of the chunks ``tokens``
    make at the source's chunk size, key for key and token count for token count. Nothing
    else can name a file or a Redis key at the destination."""
    if not isinstance(reply, list):
        raise _bad(rec, "chunk_plan", f"{type(reply).__name__}, not a list")
    refs = chunk_refs(tokens, rec.chunk_size)
    if len(reply) > len(refs):
        raise _bad(rec, "chunk_plan", f"{len(reply)} chunks for tokens that make {len(refs)}")
    out = []
    for i, (item, ref) in enumerate(zip(reply, refs, strict=False)):
        key = item.get("key") if isinstance(item, dict) else None
        if key != ref.key:
            raise _bad(rec, "chunk_plan", f"{_shown(key)} as chunk {i}, which is not the chunk "
                                          "key of these tokens")
        ntok = item.get("num_tokens")
        if type(ntok) is not int or ntok != ref.num_tokens:
            raise _bad(rec, "chunk_plan", f"num_tokens {_shown(ntok)} for chunk {i} "
                                          f"(it covers {ref.num_tokens})")
        out.append({"key": ref.key, "num_tokens": ref.num_tokens})
    return out


def lookup(rec: WorkerRecord, reply: Any) -> tuple[dict[str, list[Any]], dict[str, dict[str, int]]]:
    """A worker's lookup answer, for its own instance only (never another's entry)."""
    if not isinstance(reply, dict):
        raise _bad(rec, "lookup", f"{type(reply).__name__}, not an object")
    layout, tiers = reply.get("layout_info"), reply.get("tiers", {})
    if not isinstance(layout, dict) or not isinstance(tiers, dict):
        raise _bad(rec, "lookup", "no layout_info/tiers objects")
    for name, table in (("layout_info", layout), ("tiers", tiers)):
        others = [k for k in table if k != rec.instance_id]
        if others:
            raise _bad(rec, "lookup", f"{name} for instance {_shown(others[0])}")
    out_layout: dict[str, list[Any]] = {}
    entry = layout.get(rec.instance_id)
    if entry is not None:
        if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str)
                or type(entry[1]) is not int or entry[1] < 0 or len(entry[0]) > 256):
            raise _bad(rec, "lookup", f"layout_info entry {_shown(entry)}")
        out_layout[rec.instance_id] = [entry[0], entry[1]]
    out_tiers: dict[str, dict[str, int]] = {}
    per = tiers.get(rec.instance_id)
    if per is not None:
        if not isinstance(per, dict) or len(per) > 64 or not all(
                isinstance(k, str) and len(k) <= 256 and type(v) is int and v >= 0
                for k, v in per.items()):
            raise _bad(rec, "lookup", f"tiers {_shown(per)}")
        out_tiers[rec.instance_id] = dict(per)
    return out_layout, out_tiers


def info(rec: WorkerRecord, reply: Any) -> tuple[list[dict[str, Any]], int]:
    """Locations and health code from a worker's ``info`` answer."""
    if not isinstance(reply, dict):
        raise _bad(rec, "info", f"{type(reply).__name__}, not an object")
    code = reply.get("error_code")
    if type(code) is not int or code not in HEALTH_CODES:
        raise _bad(rec, "info", f"error_code {_shown(code)}")
    raw = reply.get("locations")
    if not isinstance(raw, list) or len(raw) > 64:
        raise _bad(rec, "info", "no list of at most 64 locations")
    try:
        locations = _LOCATIONS.validate_python(raw)
    except ValidationError as exc:
        raise _bad(rec, "info", f"invalid locations ({exc.error_count()} errors)") from None
    return [loc.model_dump() for loc in locations], code


def events(rec: WorkerRecord, reply: Any, asked: dict[str, Event]) -> dict[str, Event]:
    """The events a worker reports, for the ids asked only, each still the same event (id,
    op, instance) as the controller recorded."""
    if not isinstance(reply, dict):
        raise _bad(rec, "events", f"{type(reply).__name__}, not an object")
    out: dict[str, Event] = {}
    for event_id, data in reply.items():
        old = asked.get(event_id)
        if old is None:
            continue  # not asked for: ignored
        try:
            new = _EVENT.validate_python(data)
        except ValidationError as exc:
            raise _bad(rec, "events", f"an invalid event {event_id!r} "
                                      f"({exc.error_count()} errors)") from None
        if (new.event_id, new.op, new.instance_id) != (old.event_id, old.op, old.instance_id):
            raise _bad(rec, "events", f"event {event_id!r} as another event")
        out[event_id] = new
    return out


def submitted(rec: WorkerRecord, reply: Any, event_id: str, instance_id: str) -> Event:
    """The event a worker says it scheduled: the one the controller created (same id, same
    instance), so that no reply can overwrite another event."""
    if not isinstance(reply, dict):
        raise _bad(rec, "a command", f"{type(reply).__name__}, not an event")
    try:
        ev = _EVENT.validate_python(reply)
    except ValidationError as exc:
        raise _bad(rec, "a command", f"an invalid event ({exc.error_count()} errors)"
                   ) from None
    if (ev.event_id, ev.instance_id) != (event_id, instance_id):
        raise _bad(rec, "a command", f"event {ev.event_id!r} of instance {ev.instance_id!r}"
                                     f" for {event_id!r}")
    return ev
