"""Health, the worker registry, available codecs and metrics."""

from __future__ import annotations

import asyncio
import uuid

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from kvctl.codecs import available_methods
from kvctl.server.http.routers.cache import controller
from kvctl.server.http.schemas import (
    ClusterHealth,
    CodecList,
    DeregisterRequest,
    DeregisterResponse,
    HealthRequest,
    HealthResponse,
    HeartbeatRequest,
    HeartbeatResponse,
    WorkerInfoRequest,
    WorkerInfoResponse,
    WorkerList,
)

router = APIRouter(tags=["cluster"])


@router.post("/health", response_model=HealthResponse)
async def health(body: HealthRequest, request: Request) -> HealthResponse:
    """Error code per worker of an instance: 0 healthy, 1 a storage location failed, 2 dead."""
    codes, views = await controller(request).health_codes(body.instance_id)
    return HealthResponse(event_id=f"health-{uuid.uuid4().hex}", error_codes=codes,
                          workers=views)  # type: ignore[arg-type]


@router.get("/health", response_model=ClusterHealth)
async def cluster_health(request: Request) -> ClusterHealth:
    """The controller answers, with the error code of every registered worker (a probe's
    GET; LMCache's POST /health asks about one instance)."""
    views = await controller(request).workers()
    return ClusterHealth(status="ok", error_codes={
        f"{v['instance_id']}/{v['worker_id']}": v["error_code"] for v in views})


@router.post("/query_worker_info", response_model=WorkerInfoResponse)
async def query_worker_info(body: WorkerInfoRequest, request: Request) -> WorkerInfoResponse:
    """Workers of an instance: address, last heartbeat, alive/dead, storage per location."""
    views = await controller(request).workers(body.instance_id)
    if body.worker_ids is not None:
        views = [v for v in views if v["worker_id"] in body.worker_ids]
    return WorkerInfoResponse(event_id=f"worker-info-{uuid.uuid4().hex}",
                              worker_infos=views)  # type: ignore[arg-type]


@router.get("/workers", response_model=WorkerList)
async def workers(request: Request) -> WorkerList:
    """Every registered worker of every instance."""
    return WorkerList(workers=await controller(request).workers())  # type: ignore[arg-type]


@router.post("/workers/register", response_model=HeartbeatResponse)
async def register(body: HeartbeatRequest, request: Request) -> HeartbeatResponse:
    """A worker joins (or rejoins after a restart of either side)."""
    return HeartbeatResponse(**await controller(request).heartbeat(body.model_dump(), True))


@router.post("/workers/heartbeat", response_model=HeartbeatResponse)
async def heartbeat(body: HeartbeatRequest, request: Request) -> HeartbeatResponse:
    """A worker is alive; its storage numbers ride along. Unknown workers are registered."""
    return HeartbeatResponse(**await controller(request).heartbeat(body.model_dump(), False))


@router.post("/workers/deregister", response_model=DeregisterResponse)
async def deregister(body: DeregisterRequest, request: Request) -> DeregisterResponse:
    """A worker stops cleanly: it is shown dead at once; a later register revives it."""
    return DeregisterResponse(stopped=await controller(request).deregister(body.model_dump()))


@router.get("/codecs", response_model=CodecList)
async def codecs() -> CodecList:
    """Method strings `compress` accepts."""
    return CodecList(methods=available_methods(), default="cachegen")


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    from kvctl.server.controller.metrics import render_controller_metrics

    ctl = controller(request)
    views = await ctl.workers()
    stats = ctl.lmcache.stats() if ctl.lmcache is not None else None
    body = await asyncio.to_thread(render_controller_metrics, ctl.runtime, views,
                                   getattr(request.app.state, "request_metrics", None), stats)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
