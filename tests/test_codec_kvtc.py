"""The transform codec (kvtc): its bases are checksummed data named by content hash, a blob
names the basis it needs and never decodes with another, and with the committed SmolLM2
basis every property of the other codecs holds (re-encoding a fixed point, bf16, typed
errors, device-agnostic torch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvctl.codecs import (
    CorruptBlobError,
    InvalidParamsError,
    MissingBasisError,
    codec_for_method,
    decode_blob,
    get_codec,
    peek_blob,
)
from kvctl.codecs import basis as kvb
from kvctl.common import calibration, transform
from tests.test_codec_properties import CYCLES, assert_stable, cycle, rel_error

SMOL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def smol_basis():
    b = transform.load_transform(SMOL)
    assert b is not None, "the committed SmolLM2 basis is missing or stale"
    return b


@pytest.fixture(scope="module")
def chunk(prose_kv) -> torch.Tensor:
    return prose_kv[:, :, :256].contiguous()


def toy_basis(L: int = 2, C: int = 8, seed: int = 0, model: str = "toy") -> kvb.Basis:
    g = np.random.default_rng(seed)
    q, _ = np.linalg.qr(g.standard_normal((L, 2, C, C)))
    return kvb.Basis(model=model, key="test", mean=g.standard_normal((L, 2, C)).astype(
        np.float32), vectors=q.astype(np.float16), scale=np.ones((L, 2, C), np.float32))


def test_basis_file_round_trips_and_its_id_is_its_content():
    b = toy_basis()
    again = kvb.from_bytes(b.to_bytes())
    assert again.id == b.id and np.array_equal(again.vectors, b.vectors)
    assert np.array_equal(again.weight, np.ones((2, 2, 8), np.float32))
    assert toy_basis(seed=1).id != b.id
    # the component weights are what a decoder multiplies by: part of the id
    w = np.full((2, 2, 8), 0.5, np.float32)
    weighted = kvb.Basis(model="toy", key="test", mean=b.mean, vectors=b.vectors,
                         scale=b.scale, weight=w)
    assert weighted.id != b.id
    assert np.array_equal(kvb.from_bytes(weighted.to_bytes()).weight, w)
    with pytest.raises(InvalidParamsError):
        kvb.Basis(model="toy", key="test", mean=b.mean, vectors=b.vectors, scale=b.scale,
                  weight=-w)


def test_weights_scale_the_error_per_component():
    """A component weighted 4x coarser carries about 4x the error of one weighted 1x."""
    L, C = 1, 8
    w = np.ones((L, 2, C), np.float32)
    w[:, :, 4:] = 4.0
    b = kvb.Basis(model="toy", key="test", mean=np.zeros((L, 2, C), np.float32),
                  vectors=np.eye(C, dtype=np.float16)[None, None].repeat(2, 1),
                  scale=np.ones((L, 2, C), np.float32), weight=w)
    kvb.register_basis(b)
    kv = torch.randn(L, 2, 2000, 1, C, generator=torch.Generator().manual_seed(0)) * 3
    err = (decode_blob(get_codec("kvtc", basis=b.id).encode(kv)) - kv)[:, :, 1:, 0]
    fine, coarse = err[..., :4].square().mean().sqrt(), err[..., 4:].square().mean().sqrt()
    assert 3.0 < float(coarse / fine) < 5.0
    # the encoder-only meta is not part of the id
    assert kvb.Basis(model="other", key="k", mean=b.mean, vectors=b.vectors, scale=b.scale,
                     weight=b.weight, meta={"multipliers": {}}).id == b.id


@pytest.mark.parametrize("where", [10, 200, -5])
def test_a_damaged_basis_file_is_refused(where):
    data = bytearray(toy_basis().to_bytes())
    data[where] ^= 0x40
    with pytest.raises(CorruptBlobError):
        kvb.from_bytes(bytes(data))
    with pytest.raises(CorruptBlobError):
        kvb.from_bytes(bytes(data[:50]))


def test_a_blob_names_its_basis_and_fails_typed_without_it(tmp_path, monkeypatch):
    b = toy_basis(L=2, C=2 * 4)
    kv = torch.randn(2, 2, 20, 2, 4).half()
    kvb.register_basis(b)
    blob = get_codec("kvtc", basis=b.id).encode(kv)
    assert peek_blob(blob).params == {"level": "default", "basis": b.id}
    assert rel_error(decode_blob(blob), kv) < 0.2
    # another process: not in memory, not in any folder
    monkeypatch.setattr(kvb, "_BY_ID", {})
    monkeypatch.setenv("KVCTL_CACHE_DIR", str(tmp_path / "empty"))
    with pytest.raises(MissingBasisError) as err:
        decode_blob(blob)
    assert err.value.basis == b.id and b.id in str(err.value)
    # found again once its file is in a basis folder, and checked against its id
    folder = tmp_path / "cache" / "bases"
    folder.mkdir(parents=True)
    (folder / kvb.file_name("toy", b.id)).write_bytes(b.to_bytes())
    monkeypatch.setenv("KVCTL_CACHE_DIR", str(tmp_path / "cache"))
    assert torch.equal(decode_blob(blob), decode_blob(blob))


def test_a_file_whose_content_is_another_basis_is_not_taken(tmp_path, monkeypatch):
    want, other = toy_basis(seed=3), toy_basis(seed=4)
    kvb.register_basis(want)
    blob = get_codec("kvtc", basis=want.id).encode(torch.randn(2, 2, 10, 1, 8))
    monkeypatch.setattr(kvb, "_BY_ID", {})
    folder = tmp_path / "bases"
    folder.mkdir()
    (folder / kvb.file_name("toy", want.id)).write_bytes(other.to_bytes())
    monkeypatch.setenv("KVCTL_CACHE_DIR", str(tmp_path))
    with pytest.raises(MissingBasisError):
        decode_blob(blob)


def test_a_basis_for_another_shape_is_a_params_error():
    b = toy_basis(L=2, C=8)
    kvb.register_basis(b)
    with pytest.raises(InvalidParamsError, match="2 layers x 8 channels"):
        get_codec("kvtc", basis=b.id).encode(torch.randn(3, 2, 10, 2, 4))
    with pytest.raises(InvalidParamsError):
        get_codec("kvtc", basis="not-a-hash")
    with pytest.raises(InvalidParamsError, match="levels"):
        get_codec("kvtc", level="extreme")


def test_the_bundled_models_have_committed_bases(smol_basis):
    assert transform.load_transform("gemma-3-270m") is not None
    assert smol_basis.layers == 30 and smol_basis.channels == 3 * 64
    # orthonormal to fp16 precision, strongest component first
    u = smol_basis.vectors.astype(np.float64)
    gram = np.swapaxes(u, -1, -2) @ u
    assert np.abs(gram - np.eye(192)).max() < 0.01
    assert (np.diff(smol_basis.scale, axis=-1) <= 1e-6).all()


def test_the_model_codec_carries_basis_and_profile(smol_basis):
    prof = calibration.load_profile(SMOL)
    for method, level in (("kvtc", "default"), ("kvtc-compact", "compact"),
                          ("kvtc-max", "max")):
        c = calibration.codec_for(method, prof)
        assert c.params["basis"] == smol_basis.id and c.params["level"] == level
        assert c.params["profile"] == smol_basis.meta["multipliers"][level]
    assert calibration.codec_for("kvtc", None).params["basis"] is None


@pytest.mark.parametrize("method", ["kvtc", "kvtc-compact", "kvtc-max"])
def test_the_basis_buys_ratio_at_equal_error(method, chunk):
    prof = calibration.load_profile(SMOL)
    with_basis = calibration.codec_for(method, prof)
    plain = codec_for_method(method)
    b1, b2 = with_basis.encode(chunk), plain.encode(chunk)
    assert len(b1) < 0.97 * len(b2)
    # the profile and the component weights move squared error to what the model reads
    # least, so the plain relative error is allowed to grow a little
    assert rel_error(decode_blob(b1), chunk) < 1.35 * rel_error(decode_blob(b2), chunk)


@pytest.mark.parametrize("method", ["kvtc", "kvtc-max"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_re_encoding_with_the_basis_is_a_fixed_point(method, dtype, chunk):
    prof = calibration.load_profile(SMOL)
    codec = calibration.codec_for(method, prof)
    x = chunk[:, :, :96].to(dtype).contiguous()
    assert_stable(cycle_with(codec, x, CYCLES), f"{method} {dtype}")
    if dtype == torch.float16:  # bf16's rounding moves a coefficient a little: stable only
        once = decode_blob(codec.encode(x))
        twice = codec.encode(once)
        assert torch.equal(decode_blob(twice), once)


def cycle_with(codec, kv: torch.Tensor, n: int) -> list[tuple[float, int]]:
    x, out = kv, []
    for _ in range(n):
        blob = codec.encode(x)
        x = decode_blob(blob)
        out.append((rel_error(x, kv), len(blob)))
    return out


def test_the_first_token_is_exact_and_odd_shapes_work():
    kv = torch.randn(3, 2, 33, 3, 13).half()
    out = decode_blob(codec_for_method("kvtc").encode(kv))
    assert torch.equal(out[:, :, 0], kv[:, :, 0])
    one = kv[:, :, :1].contiguous()
    assert torch.equal(decode_blob(codec_for_method("kvtc-max").encode(one)), one)
    assert_stable(cycle("kvtc-compact", kv, 10), "odd shape")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_decodes_as_cpu_does(chunk, smol_basis):  # pragma: no cover - GPU only
    codec = calibration.codec_for("kvtc", calibration.load_profile(SMOL))
    blob = codec.encode(chunk)
    gpu = decode_blob(blob, device="cuda")
    assert rel_error(gpu.cpu(), decode_blob(blob)) < 1e-3
    assert rel_error(decode_blob(codec.encode(chunk.cuda())), decode_blob(blob)) < 0.02
