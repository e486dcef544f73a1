"""Hostile parts for the hostile-cluster tests: a fake worker (a tiny real uvicorn app that
registers with whatever answers a test gives it), raw sockets, blobs that say things."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from tests.cliutil import serve_app

Answer = Callable[[dict[str, Any]], Any]


@dataclass
class FakeWorker:
    """What a fake worker answers, and what it was asked."""

    url: str = ""
    ops: dict[str, Answer] = field(default_factory=dict)
    chunks: dict[str, tuple[bytes, int, str]] = field(default_factory=dict)
    asked: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def register(self, monitor: str, instance_id: str, path: str = "/workers/register",
                 **extra: Any) -> httpx.Response:
        body = {"instance_id": instance_id, "url": self.url, "chunk_size": 256,
                "locations": [{"location": "LocalCPUBackend", "chunks": 0, "bytes": 0,
                               "capacity_bytes": None, "pinned_chunks": 0}],
                "error_code": 0, **extra}
        return httpx.post(monitor + path, json=body, timeout=10)


@contextlib.contextmanager
def fake_worker() -> Iterator[FakeWorker]:
    fake = FakeWorker()
    app = FastAPI()

    @app.post("/worker/ops/{op}")
    async def op(op: str, request: Request) -> Response:
        body = await request.json()
        with fake.lock:
            fake.asked.append((op, body))
        answer = fake.ops.get(op)
        if answer is None:
            if op == "info":
                return JSONResponse({"instance_id": "fake", "worker_id": 0, "chunk_size": 256,
                                     "error_code": 0, "locations": [], "queue_depth": 0,
                                     "started_at": 0})
            if op == "lookup":
                return JSONResponse({"layout_info": {}, "tiers": {}})
            if op == "events":
                return JSONResponse({})
            return JSONResponse({"detail": f"fake worker: no answer for {op}"}, 500)
        return JSONResponse(answer(body))

    @app.get("/worker/chunks/{location}/{key:path}")
    async def chunk(location: str, key: str) -> Response:
        blob, ntok, digest = fake.chunks[key]
        return Response(blob, media_type="application/octet-stream",
                        headers={"x-kvctl-num-tokens": str(ntok), "x-kvctl-checksum": digest})

    with serve_app(app) as url:
        fake.url = url
        yield fake


def raw_blob(payload: bytes, layers: int = 1, heads: int = 1, head_dim: int = 64) -> bytes:
    """A valid raw (fp16) kvctl blob whose tensor bytes are ``payload`` (padded with zeros to
    whole tokens): KV bytes that happen to spell whatever a test wants."""
    import numpy as np
    import torch

    from kvctl.codecs import get_codec

    per_token = layers * 2 * heads * head_dim * 2
    tokens = -(-len(payload) // per_token)
    data = payload.ljust(tokens * per_token, b"\0")
    arr = np.frombuffer(data, dtype="<f2").reshape(layers, 2, tokens, heads, head_dim)
    return get_codec("raw").encode(torch.from_numpy(arr.copy()))
