"""A real LMCache 0.5.6 instance on CPU, for the fleet tests and benchmarks: an LMCacheEngine
built by LMCacheEngineBuilder from an upstream YAML config, whose LMCacheWorker registers with
the controller the config names. No vLLM: a small CPU connector of ours copies SmolLM2's real
KV ([L, 2, T, H, D]) into LMCache's KV_2LTD memory objects and back.

    python -m tests.lmcache_instance CONFIG.yaml [WORKER_ID WORLD_SIZE]

(WORKER_ID of WORLD_SIZE: one tensor-parallel rank of the instance; its LMCacheWorker takes
``lmcache_worker_ports[WORKER_ID]``.)

Driven by JSON lines on stdin, one answer line on stdout each:
    {"op": "store", "tokens": [...]}      -> {"ok": true}
    {"op": "retrieve", "tokens": [...]}   -> {"ok": true, "retrieved": n, "max_abs_err": x}
    {"op": "lookup", "tokens": [...]}     -> {"ok": true, "hit": n}
    {"op": "warm", "tokens": [...]}       -> {"ok": true}   (KV computed, nothing stored)
    {"op": "formats"}                     -> {"ok": true, "formats": [...], "bytes": n}
The first line it prints is {"ready": true} once the engine is built.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any

import torch


class CpuKVConnector:
    """KV for one request lives in ``kwargs["kv"]`` as [L, 2, T, H, D]; LMCache's
    KV_2LTD objects are [2, L, t, H*D] per chunk."""

    def __init__(self, num_layers: int, heads: int, head_dim: int) -> None:
        self.shape = (num_layers, heads, head_dim)
        self.out: torch.Tensor | None = None

    def get_shape(self, num_tokens: int) -> torch.Size:
        layers, heads, dim = self.shape
        return torch.Size([2, layers, num_tokens, heads * dim])

    def from_gpu(self, memory_obj: Any, start: int, end: int, **kwargs: Any) -> None:
        kv = kwargs["kv"][:, :, start:end]                      # [L, 2, t, H, D]
        t = kv.permute(1, 0, 2, 3, 4).reshape(2, kv.shape[0], end - start, -1)
        memory_obj.tensor.copy_(t.to(memory_obj.tensor.dtype))

    def to_gpu(self, memory_obj: Any, start: int, end: int, **kwargs: Any) -> None:
        layers, heads, dim = self.shape
        t = memory_obj.tensor                                   # [2, L, t, H*D]
        kv = t.reshape(2, layers, end - start, heads, dim).permute(1, 0, 2, 3, 4)
        assert self.out is not None
        self.out[:, :, start:end] = kv.to(self.out.dtype)

    def batched_from_gpu(self, memory_objs: Any, starts: list[int], ends: list[int],
                         **kwargs: Any) -> None:
        for m, s, e in zip(memory_objs, starts, ends, strict=True):
            self.from_gpu(m, s, e, **kwargs)

    def batched_to_gpu(self, memory_objs: Any = None, starts: Any = None, ends: Any = None,
                       **kwargs: Any) -> None:
        for m, s, e in zip(memory_objs, starts, ends, strict=True):
            self.to_gpu(m, s, e, **kwargs)

    def initialize_kvcaches_ptr(self, **kwargs: Any) -> None:
        pass


def main() -> None:
    config_path = sys.argv[1]
    worker_id, world_size = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (0, 1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    from lmcache.v1.cache_engine import LMCacheEngineBuilder
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.gpu_connector.gpu_connectors import GPUConnectorInterface
    from lmcache.v1.metadata import LMCacheMetadata

    from kvctl.common.model import load_model, prefill

    lm = load_model("smollm2")
    model_dir = tempfile.mkdtemp(prefix="smollm2-config-")
    lm.model.config.save_pretrained(model_dir)   # CacheGen reads config.json from here

    class Connector(CpuKVConnector, GPUConnectorInterface):
        pass

    config = LMCacheEngineConfig.from_file(config_path)
    L, H, D = lm.num_layers, lm.num_kv_heads, lm.head_dim
    metadata = LMCacheMetadata(model_name=model_dir, world_size=world_size,
                               local_world_size=world_size, worker_id=worker_id,
                               local_worker_id=worker_id, kv_dtype=torch.float16,
                               kv_shape=(L, 2, config.chunk_size, H, D))
    connector = Connector(L, H, D)
    engine = LMCacheEngineBuilder.get_or_create(
        config.lmcache_instance_id, config, metadata, connector,
        lambda t, r: None, lambda o, r: o)
    engine.post_init()
    kv_cache: dict[tuple[int, ...], torch.Tensor] = {}

    def kv_of(tokens: list[int]) -> torch.Tensor:
        key = tuple(tokens)
        if key not in kv_cache:
            _, kv = prefill(lm, tokens)
            kv_cache[key] = kv.to(torch.float16)
        return kv_cache[key]

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        try:
            tokens = list(req.get("tokens") or [])
            if req["op"] == "store":
                engine.store(tokens, kv=kv_of(tokens))
                out: dict[str, Any] = {"ok": True}
            elif req["op"] == "retrieve":
                ref = kv_of(tokens)
                connector.out = torch.zeros_like(ref)
                mask = engine.retrieve(tokens, kv=None)
                n = int(mask.sum().item())
                err = float((connector.out[:, :, :n].float() - ref[:, :, :n].float())
                            .abs().max().item()) if n else 0.0
                out = {"ok": True, "retrieved": n, "max_abs_err": err}
            elif req["op"] == "warm":   # compute the KV now, so a later store is quick
                kv_of(tokens)
                out = {"ok": True}
            elif req["op"] == "formats":  # the memory format of each object LocalCPU holds
                cpu = engine.storage_manager.local_cpu_backend
                with cpu.cpu_lock:
                    objs = list(cpu.hot_cache.values())
                out = {"ok": True, "formats": sorted(o.get_memory_format().name for o in objs),
                       "bytes": sum(o.get_size() for o in objs)}
            elif req["op"] == "lookup":
                out = {"ok": True, "hit": int(engine.lookup(tokens))}
            else:
                out = {"ok": False, "error": f"unknown op {req['op']!r}"}
        except Exception as exc:
            out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
