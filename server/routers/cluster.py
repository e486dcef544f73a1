"""Health, worker information, available codecs and metrics."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from kvctl.codecs import available_methods
from kvctl.server.metrics import render_metrics
from kvctl.server.schemas import (
    CodecList,
    HealthRequest,
    HealthResponse,
    LocationInfo,
    WorkerInfo,
    WorkerInfoRequest,
    WorkerInfoResponse,
)
from kvctl.server.worker import WorkerRuntime

router = APIRouter(tags=["cluster"])


def _rt(request: Request) -> WorkerRuntime:
    return request.app.state.runtime


def _locations(rt: WorkerRuntime) -> tuple[list[LocationInfo], int]:
    """Stats per location and an error code: 0 healthy, 1 a location is unreachable."""
    out, code = [], 0
    for name, backend in rt.backends.items():
        try:
            s = backend.stats()
        except Exception:
            code = 1
            continue
        out.append(LocationInfo(location=name, chunks=s.chunks, bytes=s.bytes,
                                capacity_bytes=s.capacity_bytes, pinned_chunks=s.pinned_chunks))
    return out, code


@router.post("/health", response_model=HealthResponse)
async def health(body: HealthRequest, request: Request) -> HealthResponse:
    """Error code per worker of an instance (0 = healthy)."""
    rt = _rt(request)
    rt.check_instance(body.instance_id)
    _, code = await asyncio.to_thread(_locations, rt)
    return HealthResponse(event_id=f"health-{uuid.uuid4().hex}", error_codes={rt.worker_id: code})


@router.post("/query_worker_info", response_model=WorkerInfoResponse)
async def query_worker_info(body: WorkerInfoRequest, request: Request) -> WorkerInfoResponse:
    """Workers of an instance with their storage locations."""
    rt = _rt(request)
    rt.check_instance(body.instance_id)
    infos = []
    if body.worker_ids is None or rt.worker_id in body.worker_ids:
        locs, _ = await asyncio.to_thread(_locations, rt)
        s = rt.settings
        infos.append(WorkerInfo(
            instance_id=rt.instance_id, worker_id=rt.worker_id, ip=s.host, port=s.port,
            distributed_url=s.distributed_url, registration_time=rt.started_at,
            last_heartbeat_time=time.time(),
            locations=locs))
    return WorkerInfoResponse(event_id=f"worker-info-{uuid.uuid4().hex}", worker_infos=infos)


@router.get("/codecs", response_model=CodecList)
async def codecs() -> CodecList:
    """Method strings `compress` accepts."""
    return CodecList(methods=available_methods(), default="cachegen")


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    body = await asyncio.to_thread(render_metrics, _rt(request))
    return Response(body, media_type=CONTENT_TYPE_LATEST)
