"""Per-model cachegen step profiles: the committed ones are what a fresh calibration measures,
the rule gives the more sensitive tensor the finer step, and profiles are keyed by name and
codec version (never by shape), cached atomically, and used where the model is known."""

from __future__ import annotations

import json

import pytest
import torch

from kvctl.codecs import get_codec
from kvctl.common import calibration
from kvctl.common.model import BUILTINS

SMOL = "SmolLM2-135M-Instruct"


def test_the_rule_equalises_damage_at_equal_rate():
    # a = 1, 4, 16, 4: geometric mean 4, so steps x2, x1, x0.5, x1 (a * m^2 = 4 for each)
    assert calibration.multipliers_from([[1.0, 4.0], [16.0, 4.0]], exponent=0.5) == [
        [2.0, 1.0], [0.5, 1.0]]
    # shrunk towards equal steps by the default exponent: 4 ** 0.35 = 1.625
    assert calibration.multipliers_from([[1.0, 4.0], [16.0, 4.0]]) == [
        [1.625, 1.0], [0.616, 1.0]]
    # equal sensitivities: equal steps
    assert calibration.multipliers_from([[3e-5, 3e-5]] * 4) == [[1.0, 1.0]] * 4
    # a tensor that looked harmless is not quantized to nothing: clamped at CLAMP
    m = calibration.multipliers_from([[1e-12, 1.0], [1.0, 1.0]], exponent=0.5)
    assert m[0][0] == calibration.CLAMP
    # AM / GM: 1 for equal sensitivities, (1+4+16+4)/4 / 4 for the example
    assert calibration.am_over_gm([[2.0, 2.0]]) == pytest.approx(1.0)
    assert calibration.am_over_gm([[1.0, 4.0], [16.0, 4.0]]) == pytest.approx(25 / 16)


@pytest.mark.parametrize("spec", list(BUILTINS))
def test_committed_profiles_are_current(spec):
    """A committed profile exists for every bundled model, was measured under this codec's
    constants (else it is stale: rerun benchmarks/calibrate_profiles.py), and its
    multipliers are the rule applied to its sensitivities."""
    name = BUILTINS[spec].served_name
    path = calibration.committed_path(name)
    prof = calibration.ModelProfile.from_json(path.read_text())
    assert prof.model == name
    assert prof.key == calibration.codec_key(), f"{path.name} is stale"
    for level in calibration.LEVELS:
        assert len(prof.sensitivity[level]) == prof.layers
        assert prof.multipliers[level] == calibration.multipliers_from(prof.sensitivity[level])
        get_codec("cachegen", level=level, profile=prof.multipliers[level])  # valid params
    assert calibration.load_profile(name) == prof


def test_a_fresh_calibration_reproduces_the_committed_one(lm, smollm2_tokenizer):
    """Three layers of SmolLM2 measured again now (the whole model takes minutes) give the
    committed sensitivities: the calibration is deterministic, and the committed file is
    what it measures."""
    prof = calibration.load_profile(SMOL)
    layers = [0, 14, 29]
    fresh = calibration.measure(lm, smollm2_tokenizer, "default", layers=layers)
    for layer in layers:
        for j in range(2):
            assert fresh[layer][j] == pytest.approx(prof.sensitivity["default"][layer][j],
                                                    rel=0.05), (layer, j)


def test_a_more_sensitive_layer_gets_a_finer_step(lm, smollm2_tokenizer):
    """Scaling one layer's attention output by 4 makes the model 16x as sensitive to that
    layer's value errors (they reach the residual stream 4x as large); calibration must see
    that and give the layer's values a finer step than before."""
    layer = 10
    proj = lm.model.model.layers[layer].self_attn.o_proj
    before = calibration.measure(lm, smollm2_tokenizer, "default", layers=[layer])[layer]
    with torch.no_grad():
        proj.weight.mul_(4.0)
    try:
        after = calibration.measure(lm, smollm2_tokenizer, "default", layers=[layer])[layer]
    finally:
        with torch.no_grad():
            proj.weight.div_(4.0)  # a power of two: the weights come back bit for bit
    assert after[1] > 5 * before[1], (before, after)
    prof = calibration.load_profile(SMOL)
    sens = [list(p) for p in prof.sensitivity["default"]]
    old = calibration.multipliers_from(sens)[layer][1]
    sens[layer] = after
    new = calibration.multipliers_from(sens)[layer][1]
    assert new < 0.6 * old


def test_profile_for_calibrates_once_and_caches_atomically(lm, smollm2_tokenizer, tmp_path,
                                                          monkeypatch):
    """A model kvctl has no profile for is measured on first use and cached under kvctl's
    cache folder, keyed by its name; the second call reads the cache."""
    monkeypatch.setenv("KVCTL_CACHE_DIR", str(tmp_path))
    calls = []

    def measure(lm_, tok, level, layers=None, texts=calibration.TEXTS, **kw):
        if "codec" not in kw:  # cachegen's levels; kvtc's basis calibration passes its codec
            calls.append(level)
        return [[1e-5 * (i + 1), 2e-5] for i in range(lm_.num_layers)]

    monkeypatch.setattr(calibration, "measure", measure)
    monkeypatch.setattr(lm, "name", "acme/never-seen")
    prof = calibration.profile_for(lm, smollm2_tokenizer)
    assert calls == list(calibration.LEVELS)
    path = calibration.cache_path("acme/never-seen")
    assert path.is_file() and path.is_relative_to(tmp_path)
    assert json.loads(path.read_text())["model"] == "acme/never-seen"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    again = calibration.profile_for(lm, smollm2_tokenizer)
    assert again == prof and calls == list(calibration.LEVELS)  # not measured again
    # another model of the same shape has no profile: keyed by name, not by shape
    assert calibration.load_profile("acme/same-shape-other-model") is None


def test_a_stale_or_foreign_cached_profile_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCTL_CACHE_DIR", str(tmp_path))
    prof = calibration.ModelProfile(model="m", key="v0-old", layers=1,
                                    sensitivity={"default": [[1.0, 1.0]]},
                                    multipliers={"default": [[1.0, 1.0]]})
    path = calibration.cache_path("m")
    path.parent.mkdir(parents=True)
    path.write_text(prof.to_json())
    assert calibration.load_profile("m") is None  # measured under other codec constants
    path.write_text("{not json")
    assert calibration.load_profile("m") is None


def test_codec_for_adds_the_profile_only_to_cachegen():
    prof = calibration.load_profile(SMOL)
    c = calibration.codec_for("cachegen-compact", prof)
    assert c.params == {"level": "compact", "profile": prof.multipliers["compact"]}
    assert c.header_params == {"level": "compact"}
    assert calibration.codec_for("int8", prof).params == get_codec("int8").params
    assert calibration.codec_for("cachegen", None).params == {"level": "default"}


# ------------------------------------------------------------------ server path ----
@pytest.mark.anyio
@pytest.mark.parametrize("model", ["smollm2", "none"])
async def test_a_worker_compresses_with_its_models_profile(prose_kv, model):
    """A worker whose engine runs SmolLM2 encodes /compress jobs (in its codec processes)
    with SmolLM2's profile; one without a model uses equal steps. Either way the chunk's
    label stays the method's, so compressing it again is no new loss (no 409)."""
    import anyio
    import httpx

    from kvctl.server.config import ServerSettings
    from kvctl.server.http.app import create_app

    chunk = prose_kv[:, :, :256].contiguous()
    ids = list(range(256))
    app = create_app(ServerSettings(model=model))
    async with app.router.lifespan_context(app):
        rt = app.state.runtime
        rt.store_kv(ids, chunk)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as c:
            for _ in range(2):
                r = await c.post("/compress", json={
                    "instance_id": rt.instance_id, "method": "cachegen",
                    "location": "LocalCPUBackend", "tokens": ids})
                assert r.status_code == 200, r.text
                ev = await anyio.to_thread.run_sync(rt.events.wait, r.json()["event_id"], 120)
                assert ev["status"] == "finished", ev
        assert ev["chunk_codecs"] == [["cachegen", "cachegen"]]
        (ref,) = rt.refs(ids)
        stored = rt.backends["LocalCPUBackend"].get(ref.key)
    profile = calibration.load_profile(SMOL) if model == "smollm2" else None
    assert profile is not None or model == "none"
    want = calibration.codec_for("cachegen", profile).encode(chunk)
    assert stored == want
    assert (stored == get_codec("cachegen").encode(chunk)) == (model == "none")


def test_set_profile_switches_jobs_and_the_remote_tier():
    """What the engine does once it has loaded (and, for a new model, calibrated) its model:
    later jobs and the remote tier's write-through use the profile; none restores equal
    steps."""
    from kvctl.server.config import ServerSettings
    from kvctl.server.worker.runtime import WorkerRuntime

    rt = WorkerRuntime(ServerSettings(model="none", remote_serde="cachegen"))
    try:
        assert rt.profile is None and "profile" not in rt.codec("cachegen").params
        prof = calibration.load_profile(SMOL)
        rt.set_profile(prof)
        assert rt.codec("cachegen-compact").params["profile"] == prof.multipliers["compact"]
        assert rt.store.remote_codec.params.get("profile") == prof.multipliers["default"]
        rt.set_profile(None)
        assert "profile" not in rt.codec("cachegen").params
    finally:
        rt.close()
