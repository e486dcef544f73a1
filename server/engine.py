"""A small OpenAI-compatible inference engine whose prompt KV lives in the worker's store.

It is the stand-in for vLLM + LMCache on a laptop: each prompt's KV is saved chunk by chunk
(fp16, the `raw` codec) into the worker, and a later prompt that shares a prefix starts from
the stored chunks — compressed ones are decoded on the fly — instead of recomputing them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from kvctl.common.model import LoadedModel, load_model, load_tokenizer_for
from kvctl.server.app import describe_validation
from kvctl.server.limits import install_guards
from kvctl.server.schemas import Text, TokenIds
from kvctl.server.storage import StorageError
from kvctl.server.worker import WorkerRuntime

log = logging.getLogger("kvctl.engine")


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: Text | TokenIds
    max_tokens: int = Field(16, ge=0, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = None
    # what torch's generator takes
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: Text
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: TokenIds


@dataclass
class Generation:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class Engine:
    """The model, its tokenizer and the worker store it caches into."""

    def __init__(self, lm: LoadedModel, tokenizer: Any, runtime: WorkerRuntime,
                 served_names: list[str]) -> None:
        self.lm = lm
        self.tokenizer = tokenizer
        self.runtime = runtime
        self.served_names = served_names
        eos = tokenizer.eos_token_id
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        self.vocab_size = int(lm.model.config.vocab_size)

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.served_names:
            raise HTTPException(404, f"The model `{name}` does not exist; this engine serves "
                                     f"{', '.join(self.served_names)}")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def generate(self, req: CompletionRequest) -> Generation:
        import torch

        from kvctl.common.model import cache_from_kv, empty_cache, kv_from_cache

        ids = self.encode(req.prompt) if isinstance(req.prompt, str) else list(req.prompt)
        if not ids:
            raise HTTPException(400, "prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise HTTPException(400, f"token id {bad[0]} is outside the vocabulary "
                                     f"(0..{self.vocab_size - 1})")
        if len(ids) + req.max_tokens > self.lm.max_model_len:
            raise HTTPException(400, f"prompt ({len(ids)} tokens) + max_tokens "
                                     f"({req.max_tokens}) exceeds max_model_len "
                                     f"{self.lm.max_model_len}")
        # The last prompt token is always recomputed: its logits start the generation.
        # Read-through: each stored chunk from the fastest tier holding it. A store that
        # cannot answer means recomputing, never a failed completion.
        try:
            n_cached, cached_kv = self.runtime.load_prefix(ids, max_tokens=len(ids) - 1)
        except StorageError as exc:
            log.warning("cached KV unavailable (%s); computing the whole prompt", exc)
            n_cached, cached_kv = 0, None
        model = self.lm.model
        dev = self.lm.device
        dtype = next(model.parameters()).dtype
        # empty_cache: every layer keeps every token, so the KV stacks (sliding-window layers)
        cache = (cache_from_kv(cached_kv.to(dev), dtype) if cached_kv is not None
                 else empty_cache())
        gen = torch.Generator(device="cpu")
        if req.seed is not None:
            gen.manual_seed(req.seed)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        out_ids: list[int] = []
        finish = "length"
        text = ""
        with torch.inference_mode():
            step = torch.tensor([ids[n_cached:]], device=dev)
            res = model(input_ids=step, cache=cache, use_cache=True)
            cache = res.cache
            # fp16, as a serving engine's paged cache would hold it; written through to every
            # tier. A store that is full or down leaves this completion uncached, not failed.
            try:
                self.runtime.store_kv(ids, kv_from_cache(cache).to(torch.float16).cpu())
            except StorageError as exc:
                log.warning("prompt KV not stored (%s); served uncached", exc)
            logits = res.logits[0, -1]
            for _ in range(req.max_tokens):
                nxt = _sample(logits, req.temperature, req.top_p, gen)
                if nxt in self.eos_ids:
                    finish = "stop"
                    break
                out_ids.append(nxt)
                text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
                hit = _first_stop(text, stops)
                if hit is not None:
                    text, finish = text[:hit], "stop"
                    break
                res = model(input_ids=torch.tensor([[nxt]], device=dev), cache=cache,
                            use_cache=True)
                cache = res.cache
                logits = res.logits[0, -1]
        return Generation(text, finish, len(ids), len(out_ids), n_cached)


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _sample(logits: Any, temperature: float, top_p: float, gen: Any) -> int:
    import torch

    if temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


def create_engine_app(runtime: WorkerRuntime, model_spec: str = "smollm2",
                      engine: Engine | None = None) -> FastAPI:
    """The OpenAI-compatible engine. Loads the model in the background unless given one."""
    state: dict[str, Any] = {"engine": engine, "error": None}
    # One generation at a time: the model is not re-entrant and the machine is small.
    pool = ThreadPoolExecutor(1, thread_name_prefix="kvctl-engine")
    ready = threading.Event()
    if engine is not None:
        ready.set()

    def _load() -> None:
        try:
            t0 = time.perf_counter()
            lm = load_model(model_spec, device=runtime.device)
            tok = load_tokenizer_for(model_spec)
            names = [lm.name] + ([model_spec] if model_spec != lm.name else [])
            state["engine"] = Engine(lm, tok, runtime, names)
            log.info("engine ready: %s (%.1f s)", lm.name, time.perf_counter() - t0)
        except Exception as exc:
            log.error("engine failed to load %s: %s", model_spec, exc)
            state["error"] = str(exc)
        finally:
            ready.set()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine is None:
            pool.submit(_load)
        try:
            yield
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="kvctl engine", lifespan=lifespan,
                  description="OpenAI-compatible completions over the embedded model.")
    app.state.ready = ready
    install_guards(app, runtime.settings)

    def get_engine() -> Engine:
        if state["error"]:
            raise HTTPException(503, f"model failed to load: {state['error']}")
        if state["engine"] is None:
            raise HTTPException(503, "model is still loading; retry in a few seconds")
        return state["engine"]

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": describe_validation(exc)}, status_code=422)

    @app.get("/health")
    async def health() -> dict[str, str]:
        """200 once the model is loaded."""
        get_engine()
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """The served model (OpenAI list format)."""
        eng = get_engine()
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": int(runtime.started_at), "owned_by": "kvctl",
             "root": eng.lm.name, "max_model_len": eng.lm.max_model_len}
            for n in eng.served_names]}

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        """Token ids of a prompt, as vLLM's /tokenize returns them."""
        eng = get_engine()
        eng.check_model(body.model)
        ids = eng.encode(body.prompt, body.add_special_tokens)
        strs = eng.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=eng.lm.max_model_len, tokens=ids,
                                token_strs=strs)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        """Text of token ids."""
        eng = get_engine()
        eng.check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < eng.vocab_size]
        if bad:
            raise HTTPException(400, f"token id {bad[0]} is outside the vocabulary")
        return {"prompt": eng.tokenizer.decode(body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> dict[str, Any]:
        """Complete a prompt; reuses stored KV of any cached prefix."""
        eng = get_engine()
        eng.check_model(body.model)
        if body.stream:
            raise HTTPException(400, "stream=true is not supported by the kvctl engine")
        loop = asyncio.get_running_loop()
        g = await loop.run_in_executor(pool, eng.generate, body)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": body.model or eng.served_names[0],
            "choices": [{"index": 0, "text": g.text, "logprobs": None,
                         "finish_reason": g.finish_reason}],
            "usage": {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
                      "total_tokens": g.prompt_tokens + g.completion_tokens,
                      "prompt_tokens_details": {"cached_tokens": g.cached_tokens}},
        }

    return app
