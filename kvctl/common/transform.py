"""Per-model bases and step profiles for the transform codec (``kvtc``).

A model's basis is learned once from the KV of the bundled calibration texts (never a
benchmark text): per (layer, K/V), the mean and the eigenvectors of the covariance over all
``heads x head_dim`` channels, strongest first (``kvctl.codecs.basis``). Then the step
profile is measured with that basis the way cachegen's is (``calibration.measure``: the KL
of the next-token distribution when one (layer, K/V) alone is quantized, turned into step
multipliers by the same rate-distortion rule), and kept in the basis file's ``meta`` (the
encoder's part; the basis' id covers only what a decoder uses).

Bases are keyed by model name and ``transform_key()`` (this module's version, the codec's
level constants), committed for the bundled models (``codecs/bases/``, made by
``benchmarks/calibrate_profiles.py``), and calibrated once for any other model the first time
kvctl loads it, cached atomically under kvctl's cache folder (``bases/``), where the codec
finds it by id (a worker, the LMCache serde and ``kvctl bench`` all look there).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvctl.common.paths import atomic_write, cache_root

if TYPE_CHECKING:
    from kvctl.codecs.basis import Basis
    from kvctl.common.model import LoadedModel

log = logging.getLogger("kvctl.common")

TRANSFORM_VERSION = 2
# tokens read from each calibration text for the covariances (both texts: ~1800 vectors
# per (layer, K/V), for at most 256 channels on the bundled models)
BASIS_TOKENS = 1024
# the level whose sensitivities set every level's multipliers (one measurement, not three)
PROFILE_LEVEL = "compact"
# component weights from the Fisher information F_j of the next-token distribution:
# weight (F_j / G) ** -WEIGHT_EXPONENT (G their geometric mean per (layer, K/V)). The
# quadratic optimum is 1/2; the Fisher is a local, noisy estimate of what a coarse step
# does, so it is shrunk, as the layer profile's exponent is, and clamped
WEIGHT_EXPONENT = 0.3
WEIGHT_CLAMP = 4.0
# label samples per calibration text (each a backward pass over the continuation)
FISHER_SAMPLES = 4

_LOCK = threading.Lock()
_LOADED: dict[str, Basis | None] = {}


def transform_key() -> str:
    """What a basis depends on besides the model. Not the level steps: the multipliers
    are relative (their geometric mean is 1), so a retuned level keeps its model's basis
    and every blob made with it; a change of the measurement bumps the version."""
    consts = {"tokens": BASIS_TOKENS, "profile_level": PROFILE_LEVEL,
              "weight": [WEIGHT_EXPONENT, WEIGHT_CLAMP, FISHER_SAMPLES]}
    tag = hashlib.blake2b(json.dumps(consts, sort_keys=True).encode(), digest_size=4)
    return f"t{TRANSFORM_VERSION}-{tag.hexdigest()}"


def cache_dir() -> Path:
    return cache_root() / "bases"


def _candidates_stem(model: str) -> str:
    from kvctl.codecs.basis import file_name

    return file_name(model, "kvb-").removesuffix("kvb-.kvb") + "kvb-"


def _candidates(model: str) -> list[Path]:
    from kvctl.codecs.basis import COMMITTED

    stem = _candidates_stem(model)
    return [p for d in (COMMITTED, cache_dir()) if d.is_dir()
            for p in sorted(d.glob(f"{stem}*.kvb"))]


def load_transform(model: str) -> Basis | None:
    """The basis of ``model`` for this codec version, committed or cached; never
    calibrates. Registered with the codec library, so its blobs decode in this process."""
    from kvctl.codecs.basis import from_bytes, register_basis
    from kvctl.codecs.errors import CorruptBlobError

    with _LOCK:
        if model in _LOADED and _LOADED[model] is not None:
            return _LOADED[model]
    found = None
    for path in _candidates(model):
        try:
            b = from_bytes(path.read_bytes(), str(path))
        except (OSError, CorruptBlobError) as exc:
            log.warning("ignoring unreadable basis %s: %s", path, exc)
            continue
        if b.model == model and b.key == transform_key():
            found = b
            break
    if found is not None:
        register_basis(found)
        with _LOCK:
            _LOADED[model] = found
    return found


def compute_basis(model: str, kvs: list[Any]) -> Basis:
    """PCA per (layer, K/V) of fp16 KV tensors ``[L, 2, T, H, D]`` (first tokens left out:
    a sequence's sink is stored exactly and would only skew the covariance)."""
    import numpy as np
    import torch

    from kvctl.codecs.basis import Basis

    x = torch.cat([kv[:, :, 1:].double() for kv in kvs], dim=2)
    L, _, N, H, D = x.shape
    x = x.reshape(L, 2, N, H * D)
    mean = x.mean(dim=2, keepdim=True)
    xc = x - mean
    cov = xc.transpose(-1, -2) @ xc / N
    ev, vec = torch.linalg.eigh(cov)
    ev, vec = ev.flip(-1), vec.flip(-1)
    # a deterministic sign per component (eigh's is arbitrary): largest entry positive
    idx = vec.abs().argmax(dim=-2, keepdim=True)
    vec = vec * torch.sign(vec.gather(-2, idx))
    return Basis(model=model, key=transform_key(), mean=mean[:, :, 0].float().numpy(),
                 vectors=vec.to(torch.float16).numpy(),
                 scale=ev.clamp_min(0).sqrt().float().numpy().astype(np.float32))


def fisher_diagonal(lm: LoadedModel, tokenizer: Any, b: Basis, seed: int = 0) -> Any:
    """The diagonal of the Fisher information of the next-token distribution with respect
    to the basis' coefficients of the prefix KV, ``[L, 2, C]`` float64, summed over the
    calibration texts and tokens (each sequence's first token left out: it is exact).

    Labels are sampled from the model's own prediction, so the squared gradient of their
    summed log-likelihood estimates the Fisher without bias (the cross terms between
    positions vanish in expectation); the KL a small error ``e`` causes is about
    ``e^T F e / 2``, so it says which components the output reads."""
    import torch

    from kvctl.codecs.basis import orthonormal
    from kvctl.common import calibration
    from kvctl.common.model import cache_from_kv, prefill

    u = torch.from_numpy(orthonormal(b.vectors)).double()
    gen = torch.Generator().manual_seed(seed)
    total = None
    prefix, cont = calibration.PREFIX, calibration.CONTINUATION
    for text in calibration.TEXTS:
        ids = list(tokenizer(text.read_text(encoding="utf-8"))["input_ids"])[:prefix + cont]
        _, kv = prefill(lm, ids[:prefix], logits_to_keep=1)
        x = kv.to(torch.float16).float()
        inp = torch.tensor([ids[prefix:]], device=lm.device)
        L, _, T, H, D = x.shape
        for _ in range(FISHER_SAMPLES):
            xg = x.clone().requires_grad_(True)
            with torch.enable_grad():
                out = lm.model(input_ids=inp, cache=cache_from_kv(xg), use_cache=True)
                # the first continuation logit is the prefix's, which reads no cache
                lp = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)
                label = torch.multinomial(lp.detach().exp(), 1, generator=gen)
                lp.gather(1, label).sum().backward()
            g = torch.matmul(xg.grad.reshape(L, 2, T, H * D).double(), u)[:, :, 1:]
            f = g.square().sum(dim=2)
            total = f if total is None else total + f
    return total


def weights_from(fisher: Any) -> Any:
    """Step multipliers per component ``[L, 2, C]`` float32 from a Fisher diagonal."""
    import numpy as np

    f = np.asarray(fisher, dtype=np.float64)
    f = np.maximum(f, f.mean(axis=-1, keepdims=True) * 1e-3 + 1e-30)
    lg = np.log(f)
    lg -= lg.mean(axis=-1, keepdims=True)
    w = np.clip(np.exp(-WEIGHT_EXPONENT * lg), 1 / WEIGHT_CLAMP, WEIGHT_CLAMP)
    return np.round(w, 4).astype(np.float32)


def calibrate_transform(lm: LoadedModel, tokenizer: Any) -> Basis:
    """Learn ``lm``'s basis from the calibration texts, then measure its step profile."""
    import torch

    from kvctl.codecs import get_codec
    from kvctl.codecs.basis import Basis, register_basis
    from kvctl.common import calibration
    from kvctl.common.model import prefill

    need = calibration.PREFIX + calibration.CONTINUATION
    kvs = []
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for text in calibration.TEXTS:
            ids = list(tokenizer(text.read_text(encoding="utf-8"))["input_ids"])
            if len(ids) < need:
                raise calibration.CalibrationError(
                    f"{text.name} has {len(ids)} tokens on this model's tokenizer; "
                    f"calibration reads {need}")
            ids = ids[:min(BASIS_TOKENS, lm.max_model_len)]
            _, kv = prefill(lm, ids, logits_to_keep=1)
            kvs.append(kv.to(torch.float16))
    finally:
        torch.set_num_threads(prev)
    b = compute_basis(lm.name, kvs)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fisher = fisher_diagonal(lm, tokenizer, b)
    finally:
        torch.set_num_threads(prev)
    b = Basis(model=b.model, key=b.key, mean=b.mean, vectors=b.vectors, scale=b.scale,
              weight=weights_from(fisher.numpy()))
    register_basis(b)
    codec = get_codec("kvtc", level=PROFILE_LEVEL, basis=b.id)
    sens = calibration.measure(lm, tokenizer, PROFILE_LEVEL, codec=codec)
    mult = calibration.multipliers_from(sens)
    from kvctl.codecs import kvtc

    meta = {"sensitivity": sens, "multipliers": {lvl: mult for lvl in kvtc.LEVELS},
            "texts": [t.name for t in calibration.TEXTS], "tokens": BASIS_TOKENS}
    out = Basis(model=b.model, key=b.key, mean=b.mean, vectors=b.vectors, scale=b.scale,
                weight=b.weight, meta=meta)
    register_basis(out)
    return out


def write_transform(b: Basis, folder: Path) -> Path:
    from kvctl.codecs.basis import file_name

    path = Path(folder) / file_name(b.model, b.id)
    atomic_write(path, b.to_bytes())
    return path


def transform_for(lm: LoadedModel, tokenizer: Any) -> Basis | None:
    """The model's basis, calibrated once (and cached) if there is none yet; ``None`` when
    the calibration texts are too short for the model (kvtc then codes without a basis)."""
    from kvctl.common.calibration import CalibrationError

    b = load_transform(lm.name)
    if b is not None:
        return b
    log.info("calibrating the kvtc basis for %s (once; cached in %s)", lm.name, cache_dir())
    try:
        b = calibrate_transform(lm, tokenizer)
    except CalibrationError as exc:
        log.warning("no kvtc basis for %s: %s", lm.name, exc)
        return None
    try:
        write_transform(b, cache_dir())
    except OSError as exc:
        log.warning("cannot cache the kvtc basis: %s", exc)
    with _LOCK:
        _LOADED[lm.name] = b
    return b
