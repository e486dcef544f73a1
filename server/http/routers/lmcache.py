"""Upstream lmcache_controller's read-only routes, in its shapes, for orchestrators and
dashboards written against it: /controller/workers, /controller/key-stats, /query_instance."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request

from kvctl.server.http.routers.cache import controller
from kvctl.server.http.schemas import QueryInstanceRequest, QueryInstanceResponse

router = APIRouter(tags=["lmcache"])


def _key_count(v: dict[str, Any]) -> int:
    if v.get("key_count") is not None:
        return int(v["key_count"])
    return sum(int(loc.get("chunks") or 0) for loc in v.get("locations") or [])


@router.get("/controller/workers")
async def controller_workers(request: Request) -> dict[str, Any]:
    """Every worker as upstream lists it (with kvctl's ``kind`` and ``state`` beside)."""
    views = await controller(request).workers()
    workers = [{"instance_id": v["instance_id"], "worker_id": v["worker_id"], "ip": v["ip"],
                "port": v["port"], "peer_init_url": v.get("peer_init_url"),
                "registration_time": v["registration_time"],
                "last_heartbeat_time": v["last_heartbeat_time"], "key_count": _key_count(v),
                "kind": v.get("kind", "kvctl"), "state": v["state"]} for v in views]
    return {"workers": workers, "total_count": len(workers)}


@router.get("/controller/key-stats")
async def key_stats(request: Request) -> dict[str, Any]:
    """Chunks per instance, as upstream counts them."""
    views = await controller(request).workers()
    per: dict[str, dict[str, Any]] = {}
    for v in views:
        e = per.setdefault(v["instance_id"], {"instance_id": v["instance_id"], "key_count": 0,
                                              "worker_count": 0})
        e["key_count"] += _key_count(v)
        e["worker_count"] += 1
    return {"total_key_count": sum(e["key_count"] for e in per.values()),
            "total_instance_count": len(per), "total_worker_count": len(views),
            "instances": list(per.values())}


@router.post("/query_instance", response_model=QueryInstanceResponse)
async def query_instance(body: QueryInstanceRequest, request: Request) -> QueryInstanceResponse:
    """The instance whose worker runs at ``ip`` (``res`` null if none)."""
    views = await controller(request).workers()
    found = next((v["instance_id"] for v in views if v["ip"] == body.ip), None)
    return QueryInstanceResponse(event_id=body.event_id or f"query-inst-{uuid.uuid4().hex}",
                                 res=found)


@router.get("/lmcache/stats")
async def lmcache_stats(request: Request) -> dict[str, Any]:
    """kvctl's counters for the LMCache wire: refused frames by reason, full syncs asked
    for, admits dropped at the directory bound (all zero without LMCache sockets)."""
    fleet = controller(request).lmcache
    if fleet is None:
        return {"bad_frames": {}, "full_syncs_requested": 0, "dropped_admits": 0,
                "sockets": None}
    return {**fleet.stats(), "sockets": fleet.sockets.ports if fleet.sockets else None}
