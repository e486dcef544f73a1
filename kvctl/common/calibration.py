"""Per-model step profiles for cachegen: how much each layer's K and V matter to the output.

Rate-distortion: if quantizing layer l's K (or V) with step ``m * s`` costs the output about
``a_l * m**2`` (KL divergence of the next-token distributions) and every tensor costs about
``-log2(m)`` bits per element (an entropy-coded uniform quantizer), then at a fixed total
rate the summed damage is least when ``a_l * m_l**2`` is the same for every tensor:
``m_l = (a_l / G) ** -0.5`` with ``G`` the geometric mean of the ``a``. The gain over equal
steps is the ratio of the arithmetic to the geometric mean of the ``a``: measured 1.50
(SmolLM2) and 1.57 (Gemma 3) at the default level on one text. Measured sensitivities are
noisy (they depend on the text), so the exponent is shrunk (``EXPONENT``) and averaged over
two texts.

``a`` is measured, not guessed: for each (layer, K/V) the codec at a level quantizes that one
tensor of the prefix KV of the bundled calibration texts (never a benchmark text) while
everything else stays exact, and the model reads the continuation through it. Damage adds
up (the sum of the single-tensor KLs is within 10% of the KL with every tensor quantized),
which is what makes one measurement per tensor enough.

A profile is keyed by the model's name (never by KV shape: two models of one shape differ),
and by ``CALIBRATION_VERSION`` and the codec's level constants, so a codec change makes
old profiles stale instead of wrong. Profiles of the bundled models are committed
(``profiles/``, made by ``benchmarks/calibrate_profiles.py``); any other model is calibrated
once, the first time kvctl loads it (``kvctl serve``'s engine, ``kvctl bench``), and the
result cached under kvctl's cache folder (written atomically).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvctl.common.paths import atomic_write, cache_root

if TYPE_CHECKING:
    import torch

    from kvctl.codecs import BaseCodec
    from kvctl.common.model import LoadedModel

log = logging.getLogger("kvctl.common")

CALIBRATION_VERSION = 1
_TEXTS = Path(__file__).resolve().parent / "texts"
# Two windows of bundled calibration text (never a benchmark text): prose, and a mix of code,
# config, Spanish, a chat and a table. A tensor's sensitivity depends on what the model
# reads (Gemma 3's layer 8 keys: 5x apart between two prose windows), so it is averaged
# over both.
TEXTS = (_TEXTS / "calibration.txt", _TEXTS / "calibration_mixed.txt")
COMMITTED = Path(__file__).resolve().parent / "profiles"
PREFIX, CONTINUATION, CHUNK = 512, 256, 256
# The rule's exponent is -1/2 for exact sensitivities; measured ones are noisy (on Gemma 3
# the log-sensitivities of two prose windows correlate at only 0.54, and a profile from
# one window with the full exponent bought 1.13x less damage on the other, where its own
# AM/GM promised 1.57x). Shrinking the exponent towards equal steps gives up little of a
# true spread and most of the noise: 0.35 did best across windows (1.19x, and 1.07x the
# other way round, against 0.98x with -1/2).
EXPONENT = 0.35
# A multiplier is kept within this factor of 1: a tensor that looked harmless on the
# calibration text should not be quantized to nothing elsewhere.
CLAMP = 4.0
# the profiled levels (cachegen's)
LEVELS = ("default", "compact")


class CalibrationError(RuntimeError):
    """The model cannot be calibrated (text too short for its tokenizer, context too small)."""


@dataclass
class ModelProfile:
    """One model's step multipliers per cachegen level, with what they were measured from."""

    model: str
    key: str  # CALIBRATION_VERSION + codec fingerprint this was measured under
    layers: int
    # level -> per layer [KL of quantizing K alone, V alone] (nats per token)
    sensitivity: dict[str, list[list[float]]]
    # level -> per layer [key step multiplier, value step multiplier]
    multipliers: dict[str, list[list[float]]]
    texts: list[str] = field(default_factory=lambda: [t.name for t in TEXTS])
    prefix: int = PREFIX
    continuation: int = CONTINUATION

    def to_json(self) -> str:
        text = json.dumps(asdict(self), indent=1)
        # one line per layer's [K, V] pair: a reviewable diff when a profile is regenerated
        return re.sub(r"\[\s*([^\[\]]*?)\s*\]",
                      lambda m: "[" + re.sub(r"\s*\n\s*", " ", m.group(1)) + "]", text) + "\n"

    @classmethod
    def from_json(cls, data: str) -> ModelProfile:
        d = json.loads(data)
        return cls(**d)

    def gain(self, level: str) -> float:
        """Expected damage ratio, equal steps / profiled steps, at equal rate (AM / GM)."""
        return am_over_gm(self.sensitivity[level])


def codec_key() -> str:
    """What a profile depends on besides the model: this module's version and the level
    constants the sensitivities were measured with."""
    from kvctl.codecs import cachegen

    consts = {"levels": {k: asdict(v) for k, v in cachegen.LEVELS.items()},
              "key_wide": cachegen.KEY_WIDE}
    tag = hashlib.blake2b(json.dumps(consts, sort_keys=True).encode(), digest_size=4)
    return f"v{CALIBRATION_VERSION}-{tag.hexdigest()}"


def am_over_gm(sens: list[list[float]]) -> float:
    a = [max(x, 1e-12) for pair in sens for x in pair]
    return (sum(a) / len(a)) / math.exp(sum(math.log(x) for x in a) / len(a))


def multipliers_from(sens: list[list[float]], exponent: float = EXPONENT
                     ) -> list[list[float]]:
    """Step multipliers ``(a / G) ** -exponent`` (G: geometric mean of every a; the
    rate-distortion optimum is exponent 1/2, see ``EXPONENT``), clamped to
    ``[1 / CLAMP, CLAMP]`` and rounded to 3 digits (they travel as codec params)."""
    a = [[max(x, 1e-12) for x in pair] for pair in sens]
    g = math.exp(sum(math.log(x) for pair in a for x in pair) / (2 * len(a)))
    return [[round(min(max((x / g) ** -exponent, 1 / CLAMP), CLAMP), 3) for x in pair]
            for pair in a]


def _kl(lm: LoadedModel, ids: list[int], kv: torch.Tensor, ref_lp: torch.Tensor) -> float:
    import torch

    from kvctl.common.model import prefill

    logits, _ = prefill(lm, ids, past_kv=kv)
    lp = torch.log_softmax(logits[:-1].float(), dim=-1)
    # the first continuation token's logit is the prefix's, which reads no cache
    return float((ref_lp.exp() * (ref_lp - lp)).sum(-1).mean())


def measure(lm: LoadedModel, tokenizer: Any, level: str,
            layers: list[int] | None = None, texts: tuple[Path, ...] = TEXTS,
            codec: BaseCodec | None = None) -> list[list[float]]:
    """Per layer ``[KL(K alone quantized), KL(V alone quantized)]`` at ``level`` with equal
    steps, the mean over ``texts`` (``layers``: only those, the others reported as 0).
    ``codec``: the codec to measure (default: cachegen at ``level``)."""
    per_text = [_measure_text(lm, tokenizer, level, layers, t, codec) for t in texts]
    return [[sum(m[i][j] for m in per_text) / len(per_text) for j in range(2)]
            for i in range(len(per_text[0]))]


def _measure_text(lm: LoadedModel, tokenizer: Any, level: str, layers: list[int] | None,
                  text: Path, codec: BaseCodec | None = None) -> list[list[float]]:
    import torch

    from kvctl.codecs import decode_blob, get_codec
    from kvctl.common.model import prefill

    ids = list(tokenizer(text.read_text(encoding="utf-8"))["input_ids"])
    need = PREFIX + CONTINUATION
    if len(ids) < need:
        raise CalibrationError(f"{text.name} has {len(ids)} tokens on this model's tokenizer; "
                               f"calibration reads {need}")
    if need > lm.max_model_len:
        raise CalibrationError(f"calibration reads {need} tokens; the model's context is "
                               f"{lm.max_model_len}")
    ids = ids[:need]
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic sums, and a polite neighbour
    try:
        _, kv = prefill(lm, ids[:PREFIX], logits_to_keep=1)
        x16 = kv.to(torch.float16)
        x = x16.float()
        ref, _ = prefill(lm, ids[PREFIX:], past_kv=x)
        ref_lp = torch.log_softmax(ref[:-1].float(), dim=-1)
        codec = codec or get_codec("cachegen", level=level)
        y = torch.cat([decode_blob(codec.encode(x16[:, :, i:i + CHUNK].contiguous())).float()
                       for i in range(0, PREFIX, CHUNK)], dim=2)
        L = x.shape[0]
        out = [[0.0, 0.0] for _ in range(L)]
        for layer in (range(L) if layers is None else layers):
            for j in range(2):
                z = x.clone()
                z[layer, j] = y[layer, j]
                out[layer][j] = _kl(lm, ids[PREFIX:], z, ref_lp)
    finally:
        torch.set_num_threads(prev)
    return out


def calibrate(lm: LoadedModel, tokenizer: Any) -> ModelProfile:
    """Measure a model's profile (2 x layers x levels forward passes over 256 tokens)."""
    sens = {level: measure(lm, tokenizer, level) for level in LEVELS}
    return ModelProfile(model=lm.name, key=codec_key(), layers=lm.num_layers,
                        sensitivity=sens,
                        multipliers={k: multipliers_from(v) for k, v in sens.items()})


def _file_name(model: str) -> str:
    """A file name for a model name: readable, and unique through a hash of the name."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model)[:80].strip("._") or "model"
    return f"{safe}-{hashlib.blake2b(model.encode(), digest_size=4).hexdigest()}.json"


def cache_path(model: str) -> Path:
    return cache_root() / "calibration" / codec_key() / _file_name(model)


def committed_path(model: str) -> Path:
    return COMMITTED / _file_name(model)


def _read(path: Path, model: str) -> ModelProfile | None:
    try:
        prof = ModelProfile.from_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        log.warning("ignoring unreadable calibration profile %s: %s", path, exc)
        return None
    if prof.model != model or prof.key != codec_key():
        return None  # another model's (a hash collision) or a stale codec's
    return prof


def load_profile(model: str) -> ModelProfile | None:
    """The profile of ``model`` (a served name), committed or cached, if one exists for
    this codec; never calibrates."""
    return _read(committed_path(model), model) or _read(cache_path(model), model)


def profile_for(lm: LoadedModel, tokenizer: Any) -> ModelProfile | None:
    """The model's profile, calibrating it once (and caching it) if there is none yet.

    ``None`` when the model cannot be calibrated (the bundled text is too short for it):
    cachegen then uses equal steps, which is what it did before profiles existed.
    The model's transform basis (``kvctl.common.transform``, for ``kvtc``) is made the
    same way, once, beside it.
    """
    from kvctl.common.transform import transform_for

    transform_for(lm, tokenizer)
    prof = load_profile(lm.name)
    if prof is not None:
        return prof
    log.info("calibrating cachegen step profile for %s (once; cached in %s)", lm.name,
             cache_path(lm.name).parent)
    try:
        prof = calibrate(lm, tokenizer)
    except CalibrationError as exc:
        log.warning("no cachegen profile for %s: %s", lm.name, exc)
        return None
    try:
        atomic_write(cache_path(lm.name), prof.to_json().encode())
    except OSError as exc:  # a read-only home costs a recalibration next time, no more
        log.warning("cannot cache the calibration profile: %s", exc)
    return prof


def codec_params(method: str, profile: ModelProfile | None) -> tuple[str, dict[str, Any]]:
    """(codec name, params) of ``method``, with the profile's step multipliers for the
    method's level when the codec takes a profile (cachegen); plain JSON types."""
    from kvctl.codecs import codec_for_method

    codec = codec_for_method(method)
    params = dict(codec.params)
    if getattr(codec, "takes_basis", False):
        # the transform codec's basis (its allocation and level steps included) is the
        # model's own (transform.py), found by the same model name as the cachegen profile
        from kvctl.common.transform import load_transform

        t = load_transform(profile.model) if profile is not None else None
        if t is not None:
            params["basis"] = t.id
        return codec.name, params
    if profile is not None and getattr(codec, "takes_profile", False):
        steps = profile.multipliers.get(str(params.get("level")))
        if steps is not None:
            params["profile"] = steps
    return codec.name, params


def codec_for(method: str, profile: ModelProfile | None) -> BaseCodec:
    """The codec of ``method``, profiled for the model when there is a profile."""
    from kvctl.codecs import get_codec

    name, params = codec_params(method, profile)
    return get_codec(name, **params)
