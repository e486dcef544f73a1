"""The commands a worker accepts from its controller, as one table.

Both transports dispatch through `WORKER_OPS`: the in-process one calls it directly, the HTTP
worker app (`kvctl worker`) calls it for each request. So `kvctl serve` and a remote worker
run the same code for every command. Bodies and results are plain JSON-able values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvctl.server.worker.runtime import WorkerRuntime

Op = Callable[[WorkerRuntime, dict[str, Any]], Any]


def _tokens(body: dict[str, Any]) -> list[int]:
    return [int(t) for t in body.get("tokens") or []]


def _compress(rt: WorkerRuntime, b: dict[str, Any]) -> dict[str, Any]:
    return rt.compress(b["instance_id"], b["method"], b["location"], _tokens(b),
                       force=bool(b.get("force")), event_id=b.get("event_id")).to_dict()


def _decompress(rt: WorkerRuntime, b: dict[str, Any]) -> dict[str, Any]:
    return rt.decompress(b["instance_id"], b["method"], b["location"], _tokens(b),
                         event_id=b.get("event_id")).to_dict()


def _pin(rt: WorkerRuntime, b: dict[str, Any]) -> dict[str, Any]:
    return rt.pin(b["instance_id"], b["location"], _tokens(b), bool(b.get("pinned", True)),
                  event_id=b.get("event_id")).to_dict()


def _clear(rt: WorkerRuntime, b: dict[str, Any]) -> dict[str, Any]:
    return rt.clear(b["instance_id"], b["location"], event_id=b.get("event_id")).to_dict()


def _move(rt: WorkerRuntime, b: dict[str, Any]) -> dict[str, Any]:
    return rt.move(tuple(b["old_position"]), tuple(b["new_position"]),  # type: ignore[arg-type]
                   _tokens(b), bool(b.get("should_copy")), event_id=b.get("event_id")).to_dict()


def _lookup(rt: WorkerRuntime, b: dict[str, Any]) -> dict[str, Any]:
    """LMCache's ``layout_info`` entry of this instance and the tokens per location."""
    tiers = rt.lookup_tiers(_tokens(b))
    return {"layout_info": rt.layout_info(tiers),
            "tiers": {rt.instance_id: tiers} if tiers else {}}


def _events(rt: WorkerRuntime, b: dict[str, Any]) -> dict[str, Any]:
    return rt.events.get_many([str(i) for i in b.get("ids") or []])


def _info(rt: WorkerRuntime, b: dict[str, Any]) -> dict[str, Any]:
    return rt.info()


def _chunk_plan(rt: WorkerRuntime, b: dict[str, Any]) -> list[dict[str, Any]]:
    return rt.chunk_plan(b["location"], _tokens(b))


def _delete_chunk(rt: WorkerRuntime, b: dict[str, Any]) -> int:
    return rt.delete_chunk(b["location"], b["key"])


WORKER_OPS: dict[str, Op] = {
    "compress": _compress, "decompress": _decompress, "pin": _pin, "clear": _clear,
    "move": _move, "lookup": _lookup, "events": _events, "info": _info,
    "chunk_plan": _chunk_plan, "delete_chunk": _delete_chunk,
}

# Ops that only read the worker's in-memory tables: cheap enough to run on the event loop.
INLINE_OPS = frozenset({"events"})
# Ops that only hash tokens, look chunks up and queue a job: as cheap as INLINE_OPS when
# every location is in this process (no Redis round trip), cheaper than a thread hand-off.
LOCAL_QUICK_OPS = frozenset({"compress", "decompress", "pin", "lookup", "chunk_plan"})
