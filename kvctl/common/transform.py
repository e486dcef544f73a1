"""Per-model transforms for the transform codec (``kvtc``), learned once per model.

A model's basis (``kvctl.codecs.basis``) comes from the bundled calibration texts (never a
benchmark text), in three measurements:

1. The KV of both texts (``BASIS_TOKENS`` each), keys rotated back to before their rotary
   embedding: mean and covariance per (layer, K/V) over all ``heads x head_dim`` channels.
2. The Fisher information of the next-token distribution with respect to the prefix KV
   (labels sampled from the model's own prediction, so the squared gradient estimates it
   without bias): per (layer, K/V) the full channel matrix ``F``, and per token its trace.
   The KL divergence a small error ``e`` causes is about ``e^T F e / 2``.
3. The transform: channels scaled by ``(F + SHRINK * mean diag)^ALPHA`` (``ALPHA = 1/2``
   makes squared error there the KL; the shrinkage keeps directions the calibration never
   excited from being coded as if they did not matter), then rotated onto the principal
   axes of the scaled KV. And the token predictor: ridge regression of each token's
   log-Fisher trace (centred per text) on its key's top ``PREDICTOR_COMPONENTS`` principal
   coordinates and the log of its value norm.

Bases are keyed by model name and ``transform_key()`` (this module's version and
constants), committed for the bundled models (``codecs/bases/``, made by
``benchmarks/calibrate_bases.py``), and calibrated once for any other model the first time
kvctl loads it (a minute or two on one core for the bundled sizes), cached atomically
under kvctl's cache folder (``bases/``), where the codec finds it by id (a worker, the
LMCache serde and ``kvctl bench`` all look there).
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

TRANSFORM_VERSION = 3
# tokens read from each calibration text for the covariances (both texts: ~2000 vectors
# per (layer, K/V), for at most 256 channels on the bundled models)
BASIS_TOKENS = 1024
# label samples per calibration text (each a backward pass over the continuation)
FISHER_SAMPLES = 8
ALPHA = 0.5
SHRINK = 0.1
PREDICTOR_COMPONENTS = 32
# ridge penalty per sample (the features are unit-variance coordinates)
RIDGE = 0.01

_LOCK = threading.Lock()
_LOADED: dict[str, Basis | None] = {}


def transform_key() -> str:
    """What a basis depends on besides the model: this module's measurement constants.
    Not the level steps (the basis' ``meta``, encoder-only: a retuned level keeps its
    model's basis and every blob made with it)."""
    consts = {"tokens": BASIS_TOKENS, "samples": FISHER_SAMPLES, "alpha": ALPHA,
              "shrink": SHRINK, "predictor": [PREDICTOR_COMPONENTS, RIDGE]}
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


def rope_spec(lm: LoadedModel) -> dict[str, Any] | None:
    """The model's rotary embedding as a basis stores it (neox layout, one base per
    layer), or ``None`` when it is not plain RoPE over whole heads (scaled or partial
    rotary embeddings: keys are then coded as they are, which only costs ratio)."""
    c = lm.model.config
    params = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {
        "rope_theta": getattr(c, "rope_theta", None)}
    layers = int(c.num_hidden_layers)
    types = getattr(c, "layer_types", None)
    try:
        if types and all(t in params for t in set(types)):
            per = [params[t] for t in types]
        else:
            per = [params] * layers
        if any(p.get("rope_type", "default") != "default" for p in per):
            return None
        if float(getattr(c, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
            return None
        head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
        return {"head_dim": head_dim, "base": [float(p["rope_theta"]) for p in per]}
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def rope_frequencies(rope: dict[str, Any] | None) -> Any:
    from kvctl.codecs.basis import rope_frequencies as freqs

    return freqs(rope)


def _pre_rope(kv: Any, freq: Any) -> Any:
    """fp64 ``[L, 2, T, C]`` of a KV ``[L, 2, T, H, D]`` at positions 0.., keys unrotated."""
    from kvctl.codecs.kvtc import rotate

    x = kv.double().clone()
    if freq is not None:
        x[:, 0] = rotate(x[:, 0], freq, 0, inverse=True)
    return x.reshape(*x.shape[:3], -1)


def _sym_power(m: Any, p: float) -> Any:
    import torch

    ev, v = torch.linalg.eigh(m)
    return (v * ev.clamp_min(1e-300).pow(p).unsqueeze(-2)) @ v.transpose(-1, -2)


def fisher(lm: LoadedModel, tokenizer: Any, freq: Any, seed: int = 0
           ) -> tuple[Any, list[Any], list[Any]]:
    """(``F`` ``[L, 2, C, C]`` float64, the mean over samples and texts of the summed outer
    products of the gradients; per text the tokens' Fisher traces ``[L, 2, T-1]``; per text
    the prefix KV ``[L, 2, T-1, C]``), keys pre-RoPE, each sequence's first token left out
    (it is stored exactly)."""
    import torch

    from kvctl.codecs.kvtc import rotate
    from kvctl.common import calibration
    from kvctl.common.model import cache_from_kv, prefill

    gen = torch.Generator().manual_seed(seed)
    total, traces, feats = None, [], []
    prefix, cont = calibration.PREFIX, calibration.CONTINUATION
    for text in calibration.TEXTS:
        ids = list(tokenizer(text.read_text(encoding="utf-8"))["input_ids"])[:prefix + cont]
        _, kv = prefill(lm, ids[:prefix], logits_to_keep=1)
        x = kv.to(torch.float16).float()
        inp = torch.tensor([ids[prefix:]], device=lm.device)
        L, _, T, H, D = x.shape
        trace = None
        for _ in range(FISHER_SAMPLES):
            xg = x.clone().requires_grad_(True)
            with torch.enable_grad():
                out = lm.model(input_ids=inp, cache=cache_from_kv(xg), use_cache=True)
                # the first continuation logit is the prefix's, which reads no cache
                lp = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)
                label = torch.multinomial(lp.detach().exp(), 1, generator=gen)
                lp.gather(1, label).sum().backward()
            g = xg.grad.double()
            if freq is not None:  # the gradient of a pre-RoPE key is R^T g
                g[:, 0] = rotate(g[:, 0], freq, 0, inverse=True)
            g = g.reshape(L, 2, T, H * D)[:, :, 1:]
            f = g.transpose(-1, -2) @ g
            total = f if total is None else total + f
            t = g.square().sum(-1)
            trace = t if trace is None else trace + t
        traces.append(trace)
        feats.append(_pre_rope(kv.to(torch.float16), freq)[:, :, 1:])
    return total / (len(calibration.TEXTS) * FISHER_SAMPLES), traces, feats


def compute_basis(model: str, kvs: list[Any], fisher_matrix: Any, traces: list[Any],
                  feats: list[Any], rope: dict[str, Any] | None) -> Basis:
    """The basis from calibration KV ``kvs`` (``[L, 2, T, H, D]``, positions from 0) and
    the Fisher measurements (``fisher``)."""
    import numpy as np
    import torch

    from kvctl.codecs.basis import Basis

    freq = rope_frequencies(rope)
    x = torch.cat([_pre_rope(kv, freq)[:, :, 1:] for kv in kvs], dim=2)
    _, _, N, C = x.shape
    mean = x.mean(dim=2, keepdim=True)
    xc = x - mean
    cov = xc.transpose(-1, -2) @ xc / N
    f = fisher_matrix
    diag = torch.diagonal(f, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    m = f + SHRINK * diag[..., None, None] * torch.eye(C, dtype=f.dtype)
    w = _sym_power(m, ALPHA)
    ev, u = torch.linalg.eigh(w.transpose(-1, -2) @ cov @ w)
    ev, u = ev.flip(-1).clamp_min(0), u.flip(-1)
    encoder = w @ u
    unit = float(ev.mean().sqrt())
    # the token predictor, on the key's principal coordinates (unweighted)
    kev, kvec = torch.linalg.eigh(cov[:, 0])
    n = min(PREDICTOR_COMPONENTS, C)
    kvec = kvec.flip(-1)[..., :n] / kev.flip(-1)[:, None, :n].clamp_min(1e-30).sqrt()

    def features(z: Any) -> Any:  # [L, 2, T, C] -> [L, T, n + 2]
        kp = (z[:, 0] - mean[:, 0]) @ kvec
        vn = z[:, 1].norm(dim=-1, keepdim=True).clamp_min(1e-6).log()
        return torch.cat([kp, vn, torch.ones_like(vn)], -1)

    xf = torch.cat([features(z) for z in feats], 1)  # [L, M, n + 2]
    yf = torch.cat([(t.clamp_min(1e-300).log() - t.clamp_min(1e-300).log().mean(
        -1, keepdim=True)) for t in traces], 2).transpose(1, 2)  # [L, M, 2]
    reg = RIDGE * xf.shape[1] * torch.eye(n + 2, dtype=xf.dtype)
    reg[-1, -1] = 0  # the intercept is free
    coef = torch.linalg.solve(xf.transpose(1, 2) @ xf + reg, xf.transpose(1, 2) @ yf)
    pred = torch.cat([(kvec @ coef[:, :n]).transpose(1, 2), coef[:, n:n + 1].transpose(1, 2)],
                     -1)  # [L, 2, C + 1]
    return Basis(model=model, key=transform_key(), mean=mean[:, :, 0].float().numpy(),
                 encoder=encoder.float().numpy(), scale=ev.sqrt().float().numpy(),
                 unit=unit, rope=rope, predictor=pred.float().numpy().astype(np.float32))


def calibrate_transform(lm: LoadedModel, tokenizer: Any) -> Basis:
    """Learn ``lm``'s basis from the calibration texts."""
    import torch

    from kvctl.codecs.basis import register_basis
    from kvctl.common import calibration
    from kvctl.common.model import prefill

    need = calibration.PREFIX + calibration.CONTINUATION
    rope = rope_spec(lm)
    freq = rope_frequencies(rope)
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
        f, traces, feats = fisher(lm, tokenizer, freq)
    finally:
        torch.set_num_threads(prev)
    b = compute_basis(lm.name, kvs, f, traces, feats, rope)
    register_basis(b)
    b.meta.update({"texts": [t.name for t in calibration.TEXTS], "tokens": BASIS_TOKENS,
                   "steps": level_steps(b, kvs)})
    return b


def level_steps(b: Basis, kvs: list[Any], chunk: int = 256) -> dict[str, float]:
    """Per kvtc level, the step (in ``b``'s units) at which the calibration KV ``kvs``
    compresses by the level's ratio: bisection on the log of the step, the ratio being
    monotone in it. ``b`` must be registered."""
    import math

    import torch

    from kvctl.codecs import get_codec
    from kvctl.codecs.kvtc import LEVELS

    chunks = [(kv[:, :, i:i + chunk].contiguous(), i) for kv in kvs
              for i in range(0, kv.shape[2], chunk)]
    fp16 = sum(2 * c.numel() for c, _ in chunks)
    out = {}
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, level in LEVELS.items():
            lo, hi = math.log(0.01), math.log(10.0)
            for _ in range(14):
                mid = (lo + hi) / 2
                codec = get_codec("kvtc", level=name, basis=b.id, step=math.exp(mid))
                ratio = fp16 / sum(len(codec.encode(c, position=p)) for c, p in chunks)
                lo, hi = (mid, hi) if ratio < level.ratio else (lo, mid)
            out[name] = float(f"{math.exp(hi):.4g}")
    finally:
        torch.set_num_threads(prev)
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
