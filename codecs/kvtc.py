"""Transform codec (``kvtc``): the model's own transform, then entropy-coded uniform
quantization of the coefficients with a step per token.

* Keys are rotated back to before their rotary embedding (the blob carries the chunk's
  first position; ``encode(kv, position=...)``), then every (layer, K/V) of a chunk goes
  through its basis' ``encoder`` (``basis.py``): channels whitened by the model's output
  sensitivity, then decorrelated. One batched matmul per chunk, on the tensor's device.
* In those coordinates one uniform step is what the model's output asks for across
  components and layers (reverse water-filling on the whitened coefficients: strong
  components get many bits, weak ones next to none), so a level is one number, the step
  in units of the basis' RMS coefficient. Calibration finds each model's step for each
  level so that a level means one ratio on the model's calibration KV (``Level.ratio``).
* Tokens differ: attention reads a few of them heavily and most hardly at all. The basis'
  predictor estimates from each token's key and value norm how much the output reads it;
  its step is the level's times ``exp(-GAMMA / 2 * (log-importance - chunk mean))`` (the
  square-root rule of rate-distortion, shrunk by ``GAMMA`` since the estimate is noisy,
  and clamped to ``STEP_RANGE``). The steps travel in the blob (one byte per token and
  (layer, K/V), rANS-coded), so decoding never runs the predictor; a decoded token whose
  prediction moves keeps the grid it lies on, so re-encoding is a fixed point.
* A chunk at the start of its sequence (position 0) keeps its first token exactly (fp16):
  the attention sink, which every later query reads.
* Symbols: rANS over a fixed bank of discretised Gaussians, a table per coefficient from a
  scale-mixture model (``_scales``: a spread per component times an energy per token,
  over the token's step), derived alike by encoder and decoder (``_contexts``). The
  alphabet's edge symbols are escapes: their tables carry the Gaussian's tails, and how
  far an escaped coefficient lies past the edge travels deflated.
* Without a basis (``basis=None``: a model never calibrated, odd shapes) the transform is
  the identity and the step comes from the chunk (its median channel spread per (layer,
  K/V)), so the codec works on any tensor; the blob says ``"basis": null``.

A blob's header names its basis by content hash; decoding looks it up (``find_basis``) and
raises ``MissingBasisError`` naming it when this machine lacks it.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from kvctl.codecs import basis as _basis
from kvctl.codecs._io import Reader, tensor_bytes
from kvctl.codecs.base import FP16_MAX, BaseCodec, dtype_name, register, torch_dtype
from kvctl.codecs.blob import BlobInfo
from kvctl.codecs.cachegen import check_profile
from kvctl.codecs.errors import CorruptBlobError, InvalidParamsError
from kvctl.codecs.rans import NSCALES, OFFSETS, SCALES, Bank, elements_per_byte

if TYPE_CHECKING:
    import torch

ALPHABET = 64
CENTER = 31
LO, HI = -CENTER, ALPHABET - 1 - CENTER
STEP_RES = 4  # step code = round(STEP_RES * log2(step)) + STEP_BIAS, one byte
STEP_BIAS = 160
QMAX = 1 << 30  # a coefficient's symbol before the shift, refused beyond (never on fp16)
# set in the payload's position word (positions are below 2**31): this layout
FORMAT_BIT = 1 << 31
# quarter-log2 bias of a component's scale code (sigma / reference step from 1/256)
SC_BIAS = 32
# how much of the predicted importance spread a token's step follows (1 = the full
# square-root rule), and how far a token's step may move from the level's
GAMMA = 0.5
STEP_RANGE = (0.1, 10.0)


@dataclass(frozen=True)
class Level:
    """``ratio``: what the level is for, the compression ratio against fp16 on the
    model's calibration KV; calibration finds each model's step for it (the basis'
    ``meta["steps"]``). ``step``: the step when the basis carries none, in units of the
    basis' RMS coefficient. ``plain``: without a basis, in units of the chunk's median
    channel spread."""

    ratio: float
    step: float
    plain: float


LEVELS: dict[str, Level] = {
    "default": Level(ratio=5.65, step=0.17, plain=0.255),
    "compact": Level(ratio=9.2, step=0.27, plain=0.60),
    "max": Level(ratio=14.0, step=0.42, plain=1.00),
}
MIN_STEP, MAX_STEP = 1e-3, 1e3


def _code(step: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.round(STEP_RES * torch.log2(step.clamp_min(2.0 ** -30)) + STEP_BIAS
                       ).clamp_(0, 255)


def _step(code: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.exp2((code - STEP_BIAS) / STEP_RES)


def rotate(k: torch.Tensor, freq: torch.Tensor, position: int, inverse: bool
           ) -> torch.Tensor:
    """Keys ``[L, T, H, D]`` with (``inverse=False``) or without their rotary embedding
    (neox layout: channel i pairs with i + D/2) for tokens ``position, position + 1, ...``;
    ``freq`` ``[L, D/2]`` float64. Angles in float64: positions run into the millions."""
    import torch

    L, T, _, D = k.shape
    pos = torch.arange(position, position + T, dtype=torch.float64, device=k.device)
    ang = pos.view(1, T, 1) * freq.view(L, 1, -1)  # [L, T, D/2]
    cos = torch.cos(ang).to(k.dtype).unsqueeze(2)
    sin = torch.sin(ang).to(k.dtype).unsqueeze(2)
    if inverse:
        sin = -sin
    a, b = k[..., :D // 2], k[..., D // 2:]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


class TransformCodec(BaseCodec):
    """``get_codec("kvtc", level="default" | "compact" | "max", basis=None)``.

    ``basis``: the id of a basis (``kvctl.codecs.basis``) for chunks of this model, or
    ``None`` for the identity transform. The header holds level and basis; ``profile`` is
    accepted for the callers that pass one to every profiled codec and must be ``None``
    or empty (the basis is the profile).

    Payload: the first position (u32, ``FORMAT_BIT`` set) and, at position 0, the first
    token (fp16); deflated side information (step reference per (layer, K/V), int16 symbol
    shift and scale code per (layer, K/V, component), the token stream's two tables); the
    token stream (step code and energy per (layer, K/V, token), rANS); the escapes'
    overflows (deflated); the coefficients' rANS stream.
    """

    name = "kvtc"
    takes_profile = True
    takes_basis = True
    takes_position = True
    max_elements_per_byte = elements_per_byte(ALPHABET)

    def __init__(self, level: str = "default", basis: str | None = None,
                 profile: Any = None, step: float | None = None) -> None:
        if not isinstance(level, str) or level not in LEVELS:
            raise InvalidParamsError(f"unknown kvtc level {str(level)[:40]!r}; levels: "
                                     f"{', '.join(LEVELS)}")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int | float)
                                 or not MIN_STEP <= step <= MAX_STEP):
            raise InvalidParamsError(f"kvtc step must be a number in [{MIN_STEP:g}, "
                                     f"{MAX_STEP:g}], got {str(step)[:40]}")
        self.level = level
        self.cfg = LEVELS[level]
        self.step = None if step is None else float(step)
        self.basis_id = None if basis is None else _basis.check_id(basis)
        if check_profile(profile):
            raise InvalidParamsError("kvtc takes no step profile: its basis allocates the "
                                     "bits (pass basis=..., or none)")
        self._bank: Bank | None = None

    @property
    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"level": self.level, "basis": self.basis_id}
        if self.step is not None:
            out["step"] = self.step
        return out

    def step_for(self, b: _basis.Basis) -> float:
        """The step in units of ``b``'s RMS coefficient: the one given, else the one
        calibration found for this level on the model, else the level's constant."""
        if self.step is not None:
            return self.step
        found = (b.meta.get("steps") or {}).get(self.level)
        if isinstance(found, int | float) and MIN_STEP <= found <= MAX_STEP:
            return float(found)
        return self.cfg.step

    @property
    def header_params(self) -> dict[str, Any]:
        return {"level": self.level, "basis": self.basis_id}

    def describe(self) -> dict[str, Any]:
        return {**self.params, **asdict(self.cfg), "gamma": GAMMA}

    @property
    def bank(self) -> Bank:
        if self._bank is None:
            self._bank = Bank(ALPHABET, CENTER, tails=True)
        return self._bank

    def _basis(self, L: int, C: int, encoding: bool) -> _basis.Basis | None:
        if self.basis_id is None:
            return None
        b = _basis.find_basis(self.basis_id)
        if (b.layers, b.channels) != (L, C):
            what = (f"basis {self.basis_id} is for {b.layers} layers x {b.channels} channels "
                    f"(model {b.model!r}); the chunk has {L} x {C}")
            if encoding:
                raise InvalidParamsError(what + ": use that model's basis or none")
            raise CorruptBlobError(what)
        return b

    # ----------------------------------------------------------------- encoder ----
    def _encode(self, kv: torch.Tensor, position: int = 0) -> bytes:
        import torch

        L, _, T, H, D = kv.shape
        keep = _kept(position)
        B, C = T - keep, H * D
        b = self._basis(L, C, True)
        first = kv[:, :, :keep]
        if keep:
            self.check_finite(first.float())
        x = kv[:, :, keep:].to(torch.float32)
        if B:
            self.check_finite(x)
        dt = dtype_name(kv.dtype)
        if b is None:
            y = x.reshape(L, 2, B, C)
            code = self._plain_codes(y, dt)
        else:
            a, _, mean, pred, freq = b.tensors(kv.device)
            if freq is not None:
                x[:, 0] = rotate(x[:, 0], freq, position + keep, inverse=True)
            xc = x.reshape(L, 2, B, C) - mean
            y = torch.matmul(xc, a)
            code = self._token_codes(y, xc, x[:, 1], pred, b.unit * self.step_for(b), dt,
                                     _slack(kv[:, :, keep:], a, dt, freq is not None))
        code, ref = _relative(code)
        st = _step(code)
        q = torch.div(y, st).round_().clamp_(-QMAX, QMAX)
        shift = torch.round(q.mean(dim=2, keepdim=True)).clamp_(-32767, 32767) if B else \
            q.new_zeros((L, 2, 1, C))
        r = q.sub_(shift)
        sc, ec = _scales(r * st, st, _step(ref))
        sym_t = (r.clamp(LO, HI) + CENTER).to(torch.uint8)
        edge = (sym_t == 0) | (sym_t == ALPHABET - 1)
        re_ = r[edge]
        over = torch.where(re_ > 0, re_ - HI, LO - re_)
        sym = sym_t.cpu().numpy().reshape(L * 2, B, C)
        dcode = (code - ref).to(torch.int16).cpu().numpy().reshape(L * 2, B)
        tok = np.stack((dcode + CENTER, ec.cpu().numpy().reshape(L * 2, B) + CENTER),
                       axis=-1).astype(np.uint8)
        bank = self.bank
        tctx = bank.choose(tok)
        sc_u8 = sc.cpu().numpy().reshape(L * 2, C).astype(np.uint8)
        ctx = _contexts(sc_u8, tok)
        side = b"".join((tensor_bytes(ref.to(torch.uint8)), tensor_bytes(shift.to(torch.int16)),
                         sc_u8.tobytes(), tctx.tobytes()))
        z = zlib.compress(side, 6)
        return b"".join((
            struct.pack("<I", position | FORMAT_BIT), tensor_bytes(first.half()),
            struct.pack("<I", len(z)), z, _words(bank.encode(tok, tctx)),
            _overflow_bytes(over.to(torch.int64).cpu().numpy()),
            bank.encode(sym.reshape(L * 2 * B, 1, C), ctx.reshape(L * 2 * B, C)).tobytes()))

    def _token_codes(self, y: torch.Tensor, xc: torch.Tensor, vals: torch.Tensor,
                     pred: torch.Tensor, step: float, dtype: str, slack: torch.Tensor
                     ) -> torch.Tensor:
        """Step code per (layer, K/V, token) ``[L, 2, B, 1]``: ``step``, finer for
        the tokens the predictor says the output reads (``xc``: centred pre-RoPE KV,
        ``vals``: the values ``[L, B, H, D]``)."""
        import torch

        L, _, B, C = y.shape
        if B == 0:
            return y.new_zeros((L, 2, 0, 1))
        vn = torch.linalg.vector_norm(vals.reshape(L, B, C), dim=-1).clamp_min_(1e-6).log_()
        # [L, B, C] @ [L, C, 2] -> [L, B, 2]: one importance per token for K and for V
        lg = torch.matmul(xc[:, 0], pred[:, :, :C].transpose(1, 2)) + \
            vn.unsqueeze(-1) * pred[:, :, C].view(L, 1, 2)
        lg = lg.transpose(1, 2)
        lg = lg - lg.mean(dim=-1, keepdim=True)
        f = torch.exp(lg.mul_(-GAMMA / 2)).clamp_(*STEP_RANGE)
        return _on_grid(y, _code(step * f.unsqueeze(-1)), dtype, slack)

    def _plain_codes(self, y: torch.Tensor, dtype: str) -> torch.Tensor:
        """Without a basis: one step per (layer, K/V) from the chunk's median channel
        spread, ``[L, 2, B, 1]``."""
        L, _, B, C = y.shape
        if B == 0:
            return y.new_zeros((L, 2, 0, 1))
        spread = y.var(dim=2, unbiased=False).sqrt_().median(dim=-1).values  # [L, 2]
        c0 = _code(spread.clamp_min(1e-12) * (self.step or self.cfg.plain)).view(L, 2, 1, 1)
        c = _on_grid(y.reshape(L, 2, 1, B * C), c0, dtype)
        return c.expand(L, 2, B, 1).contiguous()

    # ----------------------------------------------------------------- decoder ----
    def _decode(self, payload: memoryview, info: BlobInfo, device: Any) -> torch.Tensor:
        import torch

        L, _, T, H, D = info.shape
        b = self._basis(L, H * D, False)
        bank = self.bank
        r = Reader(payload)
        (position,) = struct.unpack("<I", r.take(4))
        if not position & FORMAT_BIT:
            raise CorruptBlobError("kvtc blob of an earlier format (per-component tables, "
                                   "explicit exceptions): re-encode it from its source KV")
        position &= ~FORMAT_BIT
        keep = _kept(position)
        B, C = T - keep, H * D
        first = r.tensor(torch.float16, (L, 2, keep, H, D), device)
        (zlen,) = struct.unpack("<I", r.take(4))
        limit = 2 * L + 4 * L * C + 2 * L * C + 4 * L
        d = zlib.decompressobj()
        try:
            raw = d.decompress(r.take(zlen), limit + 1)
        except zlib.error as exc:
            raise CorruptBlobError(f"side information does not inflate: {exc}") from None
        if len(raw) != limit or not d.eof or d.unconsumed_tail or d.unused_data:
            raise CorruptBlobError("side information does not match the shape")
        side = Reader(raw)
        ref = side.array(np.uint8, 2 * L).astype(np.int16).reshape(L, 2, 1, 1)
        shift = side.tensor(torch.int16, (L, 2, 1, C), device).float()
        sc_u8 = side.array(np.uint8, 2 * L * C).reshape(2 * L, C)
        tctx = side.array(np.uint8, 4 * L).reshape(2 * L, 2)
        side.done()
        twords = _read_words(r)
        if 4 * L * B > bank.max_symbols(twords.size):
            raise CorruptBlobError("the header's shape needs more token steps than the "
                                   "payload holds")
        tok = bank.decode(twords, (2 * L, B, 2), tctx)
        (olen,) = struct.unpack("<I", r.take(4))
        ozip = r.take(olen)
        rest = len(r.buf) - r.pos
        if rest % 2:
            raise CorruptBlobError("entropy-coded stream has an odd number of bytes")
        words = r.array(np.uint16, rest // 2)
        r.done()
        if 2 * L * B * C > bank.max_symbols(words.size):
            raise CorruptBlobError("the header's shape needs more symbols than the payload "
                                   "can hold")
        ctx = _contexts(sc_u8, tok)
        sym = bank.decode(words, (2 * L * B, 1, C), ctx.reshape(2 * L * B, C))
        code = torch.from_numpy((tok[..., 0].astype(np.int16).reshape(L, 2, B, 1) + ref
                                 - CENTER).astype(np.float32)).to(device)
        q = torch.from_numpy(sym).to(device).view(L, 2, B, C).float().sub_(CENTER)
        edge = (q == LO) | (q == HI)
        n_edge = int(edge.sum())
        if n_edge:
            over = torch.from_numpy(_read_overflow(ozip, n_edge)).to(device)
            qe = q[edge]
            q[edge] = qe + torch.where(qe > 0, over, -over)
        elif olen:
            raise CorruptBlobError("overflow stream without escaped coefficients")
        q.add_(shift).mul_(_step(code))
        if b is None:
            x = q.view(L, 2, B, H, D)
        else:
            _, inv, mean, _, freq = b.tensors(device)
            x = torch.matmul(q, inv).add_(mean).view(L, 2, B, H, D)
            if freq is not None:
                x[:, 0] = rotate(x[:, 0], freq, position + keep, inverse=False)
        if info.dtype == "float16":  # a rounding past the largest half must not be inf
            x.clamp_(-FP16_MAX, FP16_MAX)
        out = torch.empty(info.shape, dtype=torch_dtype(info.dtype), device=device)
        out[:, :, :keep] = first
        out[:, :, keep:] = x
        return out


def _kept(position: int) -> int:
    """Tokens stored exactly at the chunk's start: the sequence's first (the attention
    sink) when the chunk starts the sequence, none otherwise."""
    return 1 if position == 0 else 0


def _relative(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[L, 2, B, 1]`` made to travel relative to a reference per (layer, K/V),
    within the alphabet: one far below the rest pulls the reference down (a finer step
    only costs bits), one far above is made finer. Returns (codes, reference
    ``[L, 2, 1, 1]``)."""
    import torch

    if code.shape[2] == 0:
        return code, code.new_zeros((*code.shape[:2], 1, 1))
    ref = torch.minimum(torch.round(code.mean(dim=2, keepdim=True)),
                        code.amin(dim=2, keepdim=True) - LO).clamp_(0, 255)
    code = torch.minimum(torch.maximum(code, ref + LO), ref + HI).clamp_(0, 255)
    return code, ref


# how far (in steps) a decoded coefficient may miss its grid: what storing the decoded
# tensor in its dtype moved it (relative ``_EPS``) plus a little for the rotation back
GRID_TOL = 0.05
_EPS = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7, "float32": 2.0 ** -20}
_NEIGHBOURS = tuple(float(s * d) for d in range(1, 9) for s in (-1, 1))


def _slack(kv: torch.Tensor, a: torch.Tensor, dtype: str, rotated: bool) -> torch.Tensor:
    """How far storing a decoded chunk in its dtype can move each coefficient: the
    rounding of every channel (relative ``_EPS``; a rotated key's pair shares it), carried
    through the encoder. ``kv`` ``[L, 2, B, H, D]`` as stored."""
    import torch

    u = kv.abs().to(torch.float32)
    if rotated:
        d = u.shape[-1] // 2
        pair = u[:, 0, ..., :d] + u[:, 0, ..., d:]
        u[:, 0] = torch.cat((pair, pair), dim=-1)
    L, _, B = u.shape[:3]
    return torch.matmul(u.reshape(L, 2, B, -1), a.abs()).mul_(_EPS.get(dtype, 2.0 ** -10))


def _on_grid(y: torch.Tensor, code: torch.Tensor, dtype: str,
             slack: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of ``y`` ``[..., n]``, the step code ``code`` ``[..., 1]`` suggests, unless
    the row lies on the grid of a nearby code and not on its own: a decoded row's statistic
    can move to another code, and keeping the grid it came from makes re-encoding a fixed
    point instead of adding error on every cycle. A row lies on a grid when every
    coefficient does (a row of zeros lies on all of them, and keeps its own code).
    ``slack``: how far each coefficient may have moved since it was decoded (by default
    its own rounding, relative ``_EPS``).

    Only a tensor most of whose rows lie on their own grid is a decoded one; for any other
    (fresh KV) the search is skipped, so it costs one pass, and for a decoded one it runs
    over the few rows that moved."""
    import torch

    eps = _EPS.get(dtype, 2.0 ** -10)
    n = y.shape[-1]
    rows = y.reshape(-1, n)
    sl = None if slack is None else slack.reshape(-1, n)

    def on(r: torch.Tensor, c: torch.Tensor, s_: torch.Tensor | None) -> torch.Tensor:
        st = _step(c)
        q = r / st
        off = q.abs().mul_(eps) if s_ is None else s_ / st
        return (q - torch.round(q)).abs_().sub_(off).amax(dim=-1, keepdim=True) <= GRID_TOL

    flat = code.reshape(-1, 1)
    found = on(rows, flat, sl)
    if bool(found.all()) or float(found.float().mean()) < 0.5:
        return code
    idx = torch.nonzero(~found.view(-1)).view(-1)
    r, c0 = rows[idx], flat[idx]
    s_ = None if sl is None else sl[idx]
    best, hit_any = c0.clone(), torch.zeros_like(c0, dtype=torch.bool)
    for off in _NEIGHBOURS:
        c = (c0 + off).clamp_(0, 255)
        hit = ~hit_any & on(r, c, s_)
        best = torch.where(hit, c, best)
        hit_any |= hit
        if bool(hit_any.all()):
            break
    out = flat.clone()
    out[idx] = best
    return out.view(code.shape)


def _scales(y: torch.Tensor, step: torch.Tensor, ref_step: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The entropy coder's model of a chunk's quantized coefficients ``y`` (symbols times
    their token's ``step``, ``[L, 2, B, C]``, plus the rounding's step^2 / 12: fitted to
    what is coded, so a decoded chunk gets the same model and re-encoding the same size): a
    Gaussian scale mixture, coefficient (t, c) ~ N(0, (sigma_c * e_t)^2), a spread per
    component times an energy per token (tokens differ in norm far more than a component's
    spread says). Fitted by alternating moment matching, then quantised: ``sc`` ``[L, 2,
    1, C]`` = 4 log2(sigma / reference step) + ``SC_BIAS`` in [0, 255], ``ec`` ``[L, 2, B,
    1]`` = round(2 log2 e) in the alphabet. Only the rate depends on them, never the
    decoded values, so the encoder may fit them however it likes."""
    import torch

    L, _, B, C = y.shape
    if B == 0:
        return y.new_zeros((L, 2, 1, C)), y.new_zeros((L, 2, 0, 1))
    y2 = (y * y).add_(step.square().div_(12))
    sig2 = y2.mean(dim=2, keepdim=True).clamp_min_(1e-30)
    e2 = y2.new_ones((L, 2, B, 1))
    for _ in range(2):
        e2 = (y2 / sig2).mean(dim=-1, keepdim=True).clamp_min_(1e-12)
        sig2 = (y2 / e2).mean(dim=2, keepdim=True).clamp_min_(1e-30)
    sc = torch.round(2 * torch.log2(sig2 / ref_step.square()) + SC_BIAS).clamp_(0, 255)
    ec = torch.round(torch.log2(e2)).clamp_(LO, HI)
    return sc, ec


def _table_lut() -> np.ndarray:
    """Bank table (offset 0) per quarter-log2 symbol scale ``v``, at ``v + 512``: the
    Gaussian of that scale (measured: nearer the best table than matching the
    variance of the escaped, floored tables)."""
    v = (np.arange(1024) - 512) / 4.0
    idx = np.abs(np.log2(SCALES)[None, :] - v[:, None]).argmin(axis=1)
    return (OFFSETS.index(0.0) * NSCALES + idx).astype(np.uint8)


_LUT = _table_lut()


def _contexts(sc_u8: np.ndarray, tok: np.ndarray) -> np.ndarray:
    """Table per coefficient ``[2L, B, C]`` from the component scales ``sc_u8`` ``[2L, C]``
    and the token symbols ``tok`` ``[2L, B, 2]`` (step code relative to the reference,
    energy): the symbol's scale is sigma_c * e_t / step_t, in quarter-log2 units
    ``(sc - SC_BIAS) + 2 * e - (code - ref)``. Integer arithmetic and a table: encoder and
    decoder derive the same tables on any machine."""
    t = tok.astype(np.int16) - CENTER
    v = (sc_u8.astype(np.int16)[:, None, :] - SC_BIAS + 512
         + (2 * t[..., 1] - t[..., 0])[..., None])
    return _LUT[v]


def _overflow_bytes(over: np.ndarray) -> bytes:
    """How far each escaped coefficient (an edge symbol) lies past the edge, in order:
    one width byte and the values in that width, deflated; nothing when none escaped."""
    if over.size == 0:
        return struct.pack("<I", 0)
    top = int(over.max())
    w = 1 if top < 1 << 8 else 2 if top < 1 << 16 else 4
    z = zlib.compress(bytes((w,)) + over.astype(f"<u{w}").tobytes(), 6)
    return struct.pack("<I", len(z)) + z


def _read_overflow(z: bytes, n: int) -> np.ndarray:
    d = zlib.decompressobj()
    try:
        raw = d.decompress(z, 4 * n + 2)
    except zlib.error as exc:
        raise CorruptBlobError(f"overflow stream does not inflate: {exc}") from None
    if not raw or raw[0] not in (1, 2, 4) or len(raw) != 1 + raw[0] * n or not d.eof \
            or d.unconsumed_tail or d.unused_data:
        raise CorruptBlobError("overflow stream does not match the escaped coefficients")
    return np.frombuffer(raw, dtype=f"<u{raw[0]}", offset=1).astype(np.float32)


def _words(words: np.ndarray) -> bytes:
    return struct.pack("<I", words.size) + words.tobytes()


def _read_words(r: Reader) -> np.ndarray:
    (n,) = struct.unpack("<I", r.take(4))
    return r.array(np.uint16, n)


register("kvtc", TransformCodec,
         {"kvtc": {"level": "default"}, "kvtc-compact": {"level": "compact"},
          "kvtc-max": {"level": "max"}})
