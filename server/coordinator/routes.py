"""The coordinator's routers: instances, events, directory, cache control, metrics."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse

from kvctl.common.mpkeys import resolve_keys
from kvctl.server.coordinator.models import (
    DeleteRequest,
    EncodedKey,
    EventsResponse,
    HeartbeatResponse,
    LookupRequest,
    PinRequest,
    PrefetchRequest,
    RegisterRequest,
    RegisterResponse,
    Tier,
    TokensQuery,
    convert_keys,
    decode_events,
    key_from_id,
)
from kvctl.server.coordinator.store import SHARED_OWNER, Instance

instances = APIRouter(tags=["instances"])
events = APIRouter(tags=["events"])
directory = APIRouter(tags=["directory"])
cache = APIRouter(tags=["cache"])
ops = APIRouter(tags=["operations"])


def coord(request: Request) -> Any:
    return request.app.state.coordinator


def _resolve(request: Request, q: TokensQuery) -> tuple[list[str], int]:
    """Key ids of the query's whole chunks, hashed as the servers hash them."""
    try:
        keys, chunks = resolve_keys(q.token_ids, q.model_name, q.world_size, q.cache_salt,
                                    request.app.state.settings.coordinator_chunk_size)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    return [EncodedKey(k.chunk_hash_hex, k.model_name, k.kv_rank, k.object_group_id,
                       k.cache_salt).key_id() for k in keys], chunks


async def _target(request: Request, instance_id: str) -> Instance:
    inst = await coord(request).store.get_instance(instance_id)
    if inst is None:
        raise HTTPException(404, f"no MP server registered with instance_id={instance_id!r}")
    return inst


def _bad_gateway(what: str, instance_id: str, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": f"{what} to {instance_id!r} failed: "
                                   f"{type(exc).__name__}: {exc}"}, status_code=502)


# ---------------------------------------------------------------------- instances ----
@instances.post("/instances", response_model=RegisterResponse)
async def register(body: RegisterRequest, request: Request) -> dict[str, Any]:
    """An MP server joins; an empty instance_id gets one generated."""
    from kvctl.server.coordinator.app import new_instance_id

    iid = body.instance_id or new_instance_id()
    now = time.time()
    again = await coord(request).store.register(Instance(
        instance_id=iid, ip=body.ip, http_port=body.http_port, registration_time=now,
        metadata=dict(body.metadata), p2p_advertised_url=body.p2p_advertised_url,
        mq_port=body.mq_port, last_heartbeat=now))
    return {"instance_id": iid, "re_registered": again}


@instances.put("/instances/{instance_id}/heartbeat", response_model=HeartbeatResponse)
async def heartbeat(instance_id: str, request: Request) -> Any:
    """200, or 404 after which the server registers again (upstream's body: ``error``)."""
    if await coord(request).store.heartbeat(instance_id, time.time()):
        return {"instance_id": instance_id}
    return JSONResponse({"error": f"unknown instance {instance_id}; re-register"},
                        status_code=404)


@instances.delete("/instances/{instance_id}", status_code=204)
async def deregister(instance_id: str, request: Request) -> Response:
    """Idempotent: 204 whether or not it was registered."""
    await coord(request).store.deregister(instance_id)
    return Response(status_code=204)


@instances.get("/instances")
async def list_instances(request: Request) -> dict[str, Any]:
    return {"instances": [i.wire() for i in await coord(request).store.instances()]}


@instances.get("/instances/usage")
async def usage(request: Request) -> dict[str, Any]:
    """Used bytes per instance and compartment, against declared capacity."""
    store = coord(request).store
    registered = {i.instance_id for i in await store.instances()}
    rows = await store.usage()
    out = []
    shared_modules = []
    for owner in sorted(rows):
        modules = []
        for m, (used, cap, declared) in sorted(rows[owner].items()):
            tier, backend, shared = m.rsplit("|", 2)
            modules.append({"tier": tier, "backend": backend, "shared": shared == "1",
                            "used_bytes": used, "capacity_bytes": cap,
                            "usage_ratio": used / cap if cap else None,
                            "_declared": declared})
        if owner == SHARED_OWNER:
            shared_modules = modules
            continue
        out.append({"instance_id": owner, "registered": owner in registered,
                    "declared_capacity": any(m["_declared"] for m in modules),
                    "modules": modules})
    for inst in out:
        for m in inst["modules"]:
            m.pop("_declared")
    for m in shared_modules:
        m.pop("_declared")
    return {"instances": out, "shared_modules": shared_modules}


@instances.get("/instances/ingest")
async def ingest_state(request: Request) -> dict[str, Any]:
    """kvctl's own: each instance's ingest cursor and counts, liveness, fleet counters."""
    c = coord(request)
    store = c.store
    now = time.time()
    cursors = await store.cursors()
    insts = {i.instance_id: i for i in await store.instances()}
    rows = []
    for iid in sorted(set(insts) | set(cursors)):
        inst, cur = insts.get(iid), cursors.get(iid)
        rows.append({
            "instance_id": iid, "registered": inst is not None,
            "address": f"{inst.ip}:{inst.http_port}" if inst else None,
            "heartbeat_age_s": round(now - inst.last_heartbeat, 3) if inst else None,
            "alive": bool(inst and now - inst.last_heartbeat <= c.timeout_s),
            "cursor": vars(cur) if cur else None})
    counters = await store.counters()
    return {"coordinator": "kvctl", "state": store.description,
            "instance_timeout_s": c.timeout_s, "max_keys": store.max_keys,
            **counters, "evicted_instances": c.evicted, "instances": rows}


# ------------------------------------------------------------------------- events ----
@events.post("/events", response_model=EventsResponse)
async def post_events(request: Request) -> Any:
    """Apply batches in order; duplicates, stale, unregistered and refused entries are
    counted, never errors. A malformed body is 422 and changes nothing."""
    raw = await request.body()
    try:
        body = decode_events(raw)
    except ValueError as exc:
        return JSONResponse({"detail": f"invalid request: {exc}"}, status_code=422)
    out = await coord(request).store.ingest(body.batches)
    return out.model_dump()


# ---------------------------------------------------------------------- directory ----
@directory.post("/directory/lookup")
async def lookup(body: LookupRequest, request: Request) -> Any:
    """Placements, token ids and access count per key, by keys or by a token sequence."""
    if body.keys:
        try:
            kids = [k.key_id() for k in convert_keys(body.keys)]
        except ValueError as exc:
            return JSONResponse({"detail": f"invalid request: {exc}"}, status_code=422)
        chunks = len(kids)
    else:
        kids, chunks = _resolve(request, body)  # type: ignore[arg-type]
    rows = await coord(request).store.lookup(kids)
    # plain JSON types already: JSONResponse skips FastAPI's walk over every token id
    return JSONResponse({"chunks": chunks, "results": [
        {"key": key_from_id(kid), "placements": pl, "token_ids": tokens,
         "access_count": access}
        for kid, (pl, tokens, access) in zip(kids, rows, strict=True)]})


@directory.get("/directory/keys")
async def list_keys(request: Request, tier: Tier = Tier.all, instance_id: str = "",
                    backend: str = "", offset: int = Query(default=0, ge=0),
                    limit: int = Query(default=1000, ge=1, le=10000)) -> Any:
    total, page = await coord(request).store.list_keys(tier.value, instance_id, backend,
                                                       offset, limit)
    return JSONResponse({"total": total, "keys": [
        {"key": key_from_id(kid), "placements": pl, "num_tokens": n, "access_count": a}
        for kid, pl, n, a in page]})


@directory.get("/directory/stats")
async def stats(request: Request) -> dict[str, Any]:
    return await coord(request).store.stats()


# -------------------------------------------------------------------------- cache ----
@cache.post("/cache/pins")
async def pin(body: PinRequest, request: Request) -> dict[str, Any]:
    """Protect a sequence's keys from L2 deletes that are not forced (fleet-wide)."""
    kids, chunks = _resolve(request, body)
    await coord(request).store.pin(kids)
    return {"requested": chunks, "affected": len(kids), "status": "pinned"}


@cache.delete("/cache/pins")
async def unpin(body: PinRequest, request: Request) -> dict[str, Any]:
    kids, chunks = _resolve(request, body)
    await coord(request).store.unpin(kids)
    return {"requested": chunks, "affected": len(kids), "status": "unpinned"}


@cache.get("/cache/pins")
async def list_pins(request: Request, cache_salt: str = "", model_name: str = "",
                    offset: int = Query(default=0, ge=0),
                    limit: int = Query(default=1000, ge=1, le=10000)) -> dict[str, Any]:
    total, page = await coord(request).store.pins(cache_salt, model_name, offset, limit)
    return {"total": total, "pins": [{"key": key_from_id(k), "pin_count": n}
                                     for k, n in page]}


@cache.post("/cache/delete")
async def delete(body: DeleteRequest, request: Request) -> Any:
    """Delete a sequence's chunks on one server, per tier (the server's DELETE
    /cache/objects). Without force, L2 keys pinned here are skipped."""
    target = await _target(request, body.instance_id)
    kids, chunks = _resolve(request, body)
    if not chunks:
        return {"instance_id": body.instance_id, "requested": 0, "affected": 0,
                "skipped": 0, "status": "noop"}
    store = coord(request).store
    touches_l2 = body.tier in (Tier.l2, Tier.all)
    keep = await store.pinned(kids) if touches_l2 and not body.force else set()
    todo = [k for k in kids if k not in keep]
    deleted = skipped = 0
    if todo:
        url = f"http://{target.ip}:{target.http_port}/cache/objects"
        payload = {"keys": [key_from_id(k) for k in todo], "tier": body.tier.value,
                   "force": body.force}
        try:
            r = await coord(request).http.request("DELETE", url, json=payload)
            r.raise_for_status()
            result = r.json()
        except (httpx.HTTPError, ValueError) as exc:
            return _bad_gateway("delete", body.instance_id, exc)
        deleted, skipped = int(result.get("deleted", 0)), int(result.get("skipped", 0))
    if touches_l2 and body.force:
        await store.drop_pins(kids)
    return {"instance_id": body.instance_id, "requested": chunks, "affected": deleted,
            "skipped": skipped + len(keep), "status": "deleted"}


@cache.post("/cache/prefetches")
async def prefetch(body: PrefetchRequest, request: Request) -> Any:
    """Warm one server's L1 from its L2 (the server's POST /cache/prefetches); poll the
    returned request_id."""
    target = await _target(request, body.instance_id)
    url = f"http://{target.ip}:{target.http_port}/cache/prefetches"
    payload = {"model_name": body.model_name, "world_size": body.world_size,
               "token_ids": body.token_ids, "cache_salt": body.cache_salt}
    try:
        r = await coord(request).http.post(url, json=payload)
        r.raise_for_status()
        result = r.json()
    except (httpx.HTTPError, ValueError) as exc:
        return _bad_gateway("prefetch submit", body.instance_id, exc)
    return {"instance_id": body.instance_id, "request_id": result.get("request_id", ""),
            "chunks": result.get("chunks", 0), "status": result.get("status", "submitted")}


@cache.get("/cache/prefetches/{instance_id}/{request_id}")
async def prefetch_status(instance_id: str, request_id: str, request: Request) -> Any:
    """The server's own answer, relayed with its status code."""
    target = await _target(request, instance_id)
    url = f"http://{target.ip}:{target.http_port}/cache/prefetches/{request_id}"
    try:
        r = await coord(request).http.get(url)
        payload = r.json()
    except (httpx.HTTPError, ValueError) as exc:
        return _bad_gateway("prefetch status", instance_id, exc)
    return JSONResponse(payload, status_code=r.status_code)


# --------------------------------------------------------------------- operations ----
@ops.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@ops.get("/metrics")
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    from kvctl.server.coordinator.metrics import render

    c = coord(request)
    cursors, counters, insts = await asyncio.gather(
        c.store.cursors(), c.store.counters(), c.store.instances())
    body = render(c, cursors, counters, insts)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


routers = [instances, events, directory, cache, ops]
