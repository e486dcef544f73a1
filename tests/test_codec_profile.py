"""cachegen with a per-(layer, K/V) step profile: validated, encoder-only, and every property
of the plain codec (re-encoding fixed point, outlier bound) still holds with one."""

from __future__ import annotations

import math
import re

import pytest
import torch

from kvctl.codecs import InvalidParamsError, decode_blob, get_codec, peek_blob
from kvctl.codecs.cachegen import LEVELS
from kvctl.common import calibration
from tests.test_codec_outliers import abs_error, channel_error, with_outliers
from tests.test_codec_properties import assert_stable, rel_error


@pytest.fixture(scope="module")
def chunk(prose_kv) -> torch.Tensor:
    return prose_kv[:, :, :256].contiguous()


@pytest.fixture(scope="module")
def smollm2_profile():
    prof = calibration.load_profile("SmolLM2-135M-Instruct")
    assert prof is not None, "the committed SmolLM2 profile is missing or stale"
    return prof


@pytest.mark.parametrize("profile,what", [
    ("1,1", "list of [key, value]"),
    ([], "1 to 1024 layers"),
    ([[1.0, 1.0]] * 1025, "1 to 1024 layers"),
    ([[1.0]], "expected [key, value]"),
    ([[1.0, 1.0, 1.0]], "expected [key, value]"),
    ([["1", 1.0]], "expected [key, value]"),
    ([[True, 1.0]], "expected [key, value]"),
    ([[1.0, float("nan")]], "outside"),
    ([[0.0, 1.0]], "outside"),
    ([[1.0, 17.0]], "outside"),
    ([[-1.0, 1.0]], "outside"),
])
def test_bad_profiles_are_refused(profile, what):
    with pytest.raises(InvalidParamsError, match=re.escape(what)):
        get_codec("cachegen", profile=profile)


def test_a_profile_for_another_layer_count_is_an_error(chunk):
    codec = get_codec("cachegen", profile=[[1.0, 1.0]] * 18)
    with pytest.raises(InvalidParamsError, match="18 layers but the chunk has 30"):
        codec.encode(chunk)
    with pytest.raises(InvalidParamsError, match="18 layers but the chunk has 30"):
        codec.encode(chunk[:, :, :1].contiguous())  # a one-token chunk too


def test_the_profile_shapes_the_encoder_only(chunk):
    L = chunk.shape[0]
    plain = get_codec("cachegen").encode(chunk)
    assert get_codec("cachegen", profile=[[1, 1]] * L).encode(chunk) == plain
    prof = [[1.0, 1.0]] * L
    prof[3] = [2.0, 0.5]
    codec = get_codec("cachegen", profile=prof)
    assert codec.params["profile"][3] == [2.0, 0.5]
    blob = codec.encode(chunk)
    info = peek_blob(blob)
    assert info.params == {"level": "default"}  # the header needs no profile ...
    out = decode_blob(blob)  # ... and any cachegen decoder reads the blob
    base = decode_blob(plain)
    # layer 3's keys got twice the step (error ~x2), its values half (~x0.5); others as is
    for layer, kv, factor in ((3, 0, 2.0), (3, 1, 0.5), (2, 0, 1.0), (4, 1, 1.0)):
        e = rel_error(out[layer, kv], chunk[layer, kv])
        e0 = rel_error(base[layer, kv], chunk[layer, kv])
        assert 0.8 * factor <= e / e0 <= 1.25 * factor, (layer, kv, e / e0)


@pytest.mark.parametrize("level", ["default", "compact"])
def test_re_encoding_with_a_profile_is_a_fixed_point(chunk, smollm2_profile, level):
    codec = get_codec("cachegen", level=level, profile=smollm2_profile.multipliers[level])
    x, trace = chunk, []
    for _ in range(50):
        blob = codec.encode(x)
        x = decode_blob(blob)
        trace.append((rel_error(x, chunk), len(blob)))
    assert_stable(trace, f"cachegen {level} with the SmolLM2 profile")


@pytest.mark.parametrize("level", ["default", "compact"])
def test_outlier_channels_with_a_profile(chunk, smollm2_profile, level):
    prof = smollm2_profile.multipliers[level]
    codec = get_codec("cachegen", level=level, profile=prof)
    biased, mask = with_outliers(chunk)
    ordinary = ~mask
    plain_out = decode_blob(codec.encode(chunk))
    out = decode_blob(codec.encode(biased))
    e_plain = (abs_error(plain_out, chunk).square() * ordinary).sum(-1).sqrt()
    e_biased = (abs_error(out, biased).square() * ordinary).sum(-1).sqrt()
    assert float((e_biased / e_plain.clamp_min(1e-6)).max()) <= 1.2
    # each layer's ordinary channels get the error its (scaled) step promises
    rel = channel_error(out, biased)
    for layer in range(chunk.shape[0]):
        bound = LEVELS[level].key_step * prof[layer][0] / math.sqrt(12) * 1.3
        assert float(rel[layer][ordinary[layer]].median()) <= bound, layer
    assert float(rel[mask].max()) < 0.01

