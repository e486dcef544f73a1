"""The OpenAI-compatible engine in-process, with the real embedded model."""

from __future__ import annotations

import anyio
import httpx
import pytest

from kvctl.server.config import ServerSettings
from kvctl.server.engine.core import Engine, create_engine_app
from kvctl.server.http.app import create_app

pytestmark = [pytest.mark.anyio, pytest.mark.model]


@pytest.fixture
async def stack(lm, smollm2_tokenizer):
    settings = ServerSettings(model="none")
    controller = create_app(settings)
    async with controller.router.lifespan_context(controller):
        rt = controller.state.runtime
        engine = create_engine_app(rt, engine=Engine(lm, smollm2_tokenizer, rt, [lm.name]))
        async with engine.router.lifespan_context(engine):
            e = httpx.AsyncClient(transport=httpx.ASGITransport(app=engine), base_url="http://e")
            c = httpx.AsyncClient(transport=httpx.ASGITransport(app=controller),
                                  base_url="http://c")
            async with e, c:
                yield e, c, rt


PROMPT = "Explain the significance of KV cache in language models."


async def complete(e, prompt, **kw):
    r = await e.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8,
                                               "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()


async def test_seed_sequence_reuses_cached_prefix(stack):
    e, c, rt = stack
    first = await complete(e, PROMPT)
    assert first["choices"][0]["text"]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0

    tok = (await e.post("/tokenize", json={"prompt": PROMPT})).json()
    assert tok["count"] == len(tok["tokens"]) == first["usage"]["prompt_tokens"]
    assert tok["max_model_len"] == 8192

    r = await c.post("/compress", json={"instance_id": "lmcache_default_instance",
                                        "method": "cachegen", "location": "LocalCPUBackend",
                                        "tokens": tok["tokens"]})
    assert r.json()["num_tokens"] == tok["count"]
    ev = await anyio.to_thread.run_sync(rt.events.wait, r.json()["event_id"], 120)
    assert ev["status"] == "finished" and 0 < ev["bytes_after"] < ev["bytes_before"]

    # The compressed chunk is decoded on the fly; greedy output of 8 tokens stays the same.
    second = await complete(e, PROMPT)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == tok["count"] - 1
    assert second["choices"][0]["text"] == first["choices"][0]["text"]


async def test_token_prompt_stop_and_detokenize(stack):
    e, _, _ = stack
    ids = (await e.post("/tokenize", json={"prompt": "One, two, three,"})).json()["tokens"]
    out = await complete(e, ids, max_tokens=12, stop=[","])
    assert "," not in out["choices"][0]["text"]
    assert out["choices"][0]["finish_reason"] in ("stop", "length")
    text = (await e.post("/detokenize", json={"tokens": ids})).json()["prompt"]
    assert text == "One, two, three,"


async def test_engine_errors(stack):
    e, _, _ = stack
    r = await e.post("/v1/completions", json={"prompt": "x", "model": "meta-llama/Llama-3.1-8B"})
    assert r.status_code == 404 and "SmolLM2" in r.json()["detail"]
    r = await e.post("/v1/completions", json={"prompt": [10**9]})
    assert r.status_code == 400 and "vocabulary" in r.json()["detail"]
    r = await e.post("/v1/completions", json={"prompt": "x", "max_tokens": -1})
    assert r.status_code == 422 and "max_tokens" in r.json()["detail"]
    models = (await e.get("/v1/models")).json()
    assert models["data"][0]["id"] == "SmolLM2-135M-Instruct"
