"""Properties of the codecs on real KV that a single round trip cannot show.

Re-encoding: a KV cache can go through a codec many times (compress, decompress for a
request, compress again), so every codec must be idempotent on its own output: after 50
compress -> decompress cycles the error against the original and the blob size are those of
one cycle, within 2%.
"""

from __future__ import annotations

import anyio
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvctl.codecs import available_methods, codec_for_method, decode_blob
from tests.conftest import in_process_api

METHODS = available_methods()
CYCLES = 50


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def cycle(method: str, kv: torch.Tensor, n: int) -> list[tuple[float, int]]:
    """(error against ``kv``, blob bytes) after each of ``n`` encode -> decode cycles."""
    codec = codec_for_method(method)
    x, out = kv, []
    for _ in range(n):
        blob = codec.encode(x)
        x = decode_blob(blob)
        assert torch.isfinite(x.float()).all()
        out.append((rel_error(x, kv), len(blob)))
    return out


def assert_stable(trace: list[tuple[float, int]], what: str) -> None:
    (e1, s1), (en, sn) = trace[0], trace[-1]
    n = len(trace)
    assert en <= e1 * 1.02 + 1e-6, f"{what}: error {e1:.4f} after 1 cycle, {en:.4f} after {n}"
    assert abs(sn - s1) <= 0.02 * s1, f"{what}: {s1} bytes after 1 cycle, {sn} after {n}"


@pytest.mark.parametrize("method", METHODS)
def test_fifty_cycles_of_a_real_chunk_add_no_error(method, prose_kv):
    # six layers of a full 256-token chunk: real statistics, a fifth of the time
    trace = cycle(method, prose_kv[:6, :, :256].contiguous(), CYCLES)
    assert_stable(trace, method)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_property_re_encoding_is_stable(prose_kv, data):
    """Slices of real KV, rescaled and cast, through any codec: 50 cycles == 1 cycle."""
    L, _, T, H, _ = prose_kv.shape
    method = data.draw(st.sampled_from(METHODS), label="method")
    l0 = data.draw(st.integers(0, L - 1), label="layer")
    nl = data.draw(st.integers(1, min(3, L - l0)), label="layers")
    t0 = data.draw(st.integers(0, T - 2), label="first token")
    nt = data.draw(st.integers(2, min(80, T - t0)), label="tokens")
    h = data.draw(st.integers(0, H - 1), label="head")
    scale = data.draw(st.sampled_from([1.0, 2.0 ** -6, 2.0 ** 5, 0.3, 37.0]), label="scale")
    dtype = data.draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
                      label="dtype")
    kv = (prose_kv[l0:l0 + nl, :, t0:t0 + nt, h:h + 1].float() * scale).to(dtype)
    assert_stable(cycle(method, kv.contiguous(), CYCLES), f"{method} {dtype} x{scale}")


# ------------------------------------------------------------------------- API ----
INSTANCE = "lmcache_default_instance"


@pytest.fixture
async def api(tmp_path):
    from kvctl.server.config import ServerSettings

    settings_ = ServerSettings(model="none", local_disk=str(tmp_path / "disk"),
                               max_local_disk_size=1, max_request_tokens=5000)
    async with in_process_api(settings_) as client:
        yield client


async def _run(api, path: str, tokens: list[int], method: str) -> dict:
    r = await api.post(path, json={"instance_id": INSTANCE, "method": method,
                                   "location": "LocalCPUBackend", "tokens": tokens})
    assert r.status_code == 200, r.text
    event_id = r.json()["event_id"]
    ended = await anyio.to_thread.run_sync(api.runtime.events.wait, event_id, 120)
    assert ended is not None
    ev = (await api.get(f"/events/{event_id}")).json()
    assert ev["status"] == "finished", ev
    return ev


@pytest.mark.anyio
@pytest.mark.parametrize("method", ["cachegen", "cachegen-compact", "kivi-2"])
async def test_api_fifty_compress_decompress_cycles(api, prose_ids, prose_kv, method):
    """One served chunk (256 tokens, every layer) through /compress and /decompress."""
    ids, ref = prose_ids[:256], prose_kv[:, :, :256].contiguous()
    api.runtime.store_kv(ids, ref)
    trace = []
    for _ in range(CYCLES):
        ev = await _run(api, "/compress", ids, method)
        await _run(api, "/decompress", ids, method)
        n, kv = api.runtime.load_prefix(ids)
        assert n == len(ids)
        trace.append((rel_error(kv, ref), ev["bytes_after"]))
    assert_stable(trace, f"API {method}")


@pytest.mark.parametrize("method", ["cachegen", "cachegen-compact"])
def test_cachegen_re_encodes_a_decoded_chunk_to_the_same_blob(method, prose_kv):
    # a decoded chunk lies on the grids it was quantized to; the encoder keeps them, so
    # from the second cycle on the blob is a fixed point, bit for bit
    codec = codec_for_method(method)
    once = decode_blob(codec.encode(prose_kv[:4, :, 256:512].contiguous()))
    twice = codec.encode(once)
    assert torch.equal(decode_blob(twice), once)
    assert codec.encode(decode_blob(twice)) == twice
