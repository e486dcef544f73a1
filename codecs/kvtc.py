"""Transform codec (``kvtc``): a per-model decorrelating basis, then entropy-coded
uniform quantization of the coefficients.

* Each (layer, K/V) of a chunk is rotated into its basis (``basis.py``: the eigenvectors
  of the model's calibration KV over all ``heads x head_dim`` channels, so correlated
  heads and channels share their bits): one batched matmul per chunk, on the tensor's
  device.
* Bit allocation is reverse water-filling: every coefficient of a (layer, K/V) gets the
  same step, so strong components get many bits and weak ones (variance below the step)
  next to none, which is what an entropy-coded uniform quantizer of decorrelated
  Gaussians should do for least squared error. What the model's output cares about is
  not squared error everywhere alike: the steps of each (layer, K/V) are scaled by a
  measured profile (the KL divergence of the next-token distribution when that tensor
  alone is quantized, ``kvctl.common.transform``), the same rule as cachegen's profiles.
  Within a (layer, K/V), the basis' component weights scale each component's step by what
  the output reads of it (the diagonal Fisher information of the next-token distribution,
  geometric mean 1): a component the model's attention barely reads gets a coarser step.
* Keys: one step per layer, in units of the RMS of the basis' components (a constant of
  the model, so re-encoding finds the same step). Values: one step per (token, layer), in
  units of the token's RMS (a value that attention reads heavily may be small; a step
  relative to the layer would round it to noise), chosen so that the decoded token
  selects the same step again (re-encoding is a fixed point).
* The chunk's first token is stored exactly (fp16): at the start of a sequence it is the
  attention sink.
* Symbols: rANS with one table per (layer, K/V, component) from cachegen's fixed bank of
  discretised Gaussians; coefficients beyond the alphabet are stored exactly as integers.
* Without a basis (``basis=None``: a model never calibrated, odd shapes) the transform is
  the identity and the key step comes from the chunk (its median channel spread), so the
  codec works on any tensor; the blob says ``"basis": null``.

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
from kvctl.codecs.rans import Bank, elements_per_byte

if TYPE_CHECKING:
    import torch

ALPHABET = 64
CENTER = 31
LO, HI = -CENTER, ALPHABET - 1 - CENTER
STEP_RES = 4  # step code = round(STEP_RES * log2(step)) + STEP_BIAS, one byte
STEP_BIAS = 160
QMAX = 1 << 30  # a coefficient's symbol before the shift, refused beyond (never on fp16)


@dataclass(frozen=True)
class Level:
    """Key step in units of the RMS of the basis' key components (the chunk's median
    channel spread without a basis); value step in units of the token vector's RMS."""

    key_step: float
    value_step: float


LEVELS: dict[str, Level] = {
    "default": Level(key_step=0.255, value_step=0.51),
    "compact": Level(key_step=0.60, value_step=1.20),
    "max": Level(key_step=1.00, value_step=2.00),
}


def _code(step: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.round(STEP_RES * torch.log2(step.clamp_min(2.0 ** -30)) + STEP_BIAS
                       ).clamp_(0, 255)


def _step(code: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.exp2((code - STEP_BIAS) / STEP_RES)


class TransformCodec(BaseCodec):
    """``get_codec("kvtc", level="default" | "compact" | "max", basis=None, profile=None)``.

    ``basis``: the id of a basis (``kvctl.codecs.basis``) for chunks of this model, or
    ``None`` for the identity transform. ``profile``: step multipliers ``[[key, value],
    ...]`` per layer (encoder only, like cachegen's). The header holds level and basis.

    Payload: the first token (fp16); deflated side information (key step code per layer,
    value step reference per layer, int16 symbol shift per (layer, K/V, component), table
    indices); exceptions (int32 flat index, int32 value); the value step codes' rANS
    stream; the coefficients' rANS stream.
    """

    name = "kvtc"
    takes_profile = True
    takes_basis = True
    max_elements_per_byte = elements_per_byte(ALPHABET)

    def __init__(self, level: str = "default", basis: str | None = None,
                 profile: Any = None) -> None:
        if not isinstance(level, str) or level not in LEVELS:
            raise InvalidParamsError(f"unknown kvtc level {str(level)[:40]!r}; levels: "
                                     f"{', '.join(LEVELS)}")
        self.level = level
        self.cfg = LEVELS[level]
        self.basis_id = None if basis is None else _basis.check_id(basis)
        self.profile = check_profile(profile)
        self._bank: Bank | None = None

    @property
    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"level": self.level, "basis": self.basis_id}
        if self.profile is not None:
            out["profile"] = [list(p) for p in self.profile]
        return out

    @property
    def header_params(self) -> dict[str, Any]:
        return {"level": self.level, "basis": self.basis_id}

    def describe(self) -> dict[str, Any]:
        return {**self.params, **asdict(self.cfg)}

    @property
    def bank(self) -> Bank:
        if self._bank is None:
            self._bank = Bank(ALPHABET, CENTER)
        return self._bank

    def _transform(self, L: int, C: int, device: Any, encoding: bool) -> tuple[Any, ...]:
        """(vectors, transposed, mean, mean in coefficients, weight, basis) or all None."""
        if self.basis_id is None:
            return None, None, None, None, None, None
        b = _basis.find_basis(self.basis_id)
        if (b.layers, b.channels) != (L, C):
            what = (f"basis {self.basis_id} is for {b.layers} layers x {b.channels} channels "
                    f"(model {b.model!r}); the chunk has {L} x {C}")
            if encoding:
                raise InvalidParamsError(what + ": use that model's basis or none")
            raise CorruptBlobError(what)
        return (*b.tensors(device), b)

    def _multipliers(self, L: int, kv: int, like: torch.Tensor) -> torch.Tensor | float:
        import torch

        if self.profile is None:
            return 1.0
        return torch.tensor([p[kv] for p in self.profile], dtype=torch.float32,
                            device=like.device).view(L, 1, 1)

    # ----------------------------------------------------------------- encoder ----
    def _encode(self, kv: torch.Tensor) -> bytes:
        import torch

        L, _, T, H, D = kv.shape
        B, C = T - 1, H * D
        if self.profile is not None and len(self.profile) != L:
            raise InvalidParamsError(
                f"kvtc profile has {len(self.profile)} layers but the chunk has {L}: it was "
                "measured for another model (or shard); use that model's profile or none")
        u, _, _, mc, w, b = self._transform(L, C, kv.device, True)
        first = kv[:, :, :1]
        self.check_finite(kv[:, :, :1].float())
        x = kv[:, :, 1:].reshape(L, 2, B, C).to(torch.float32)
        if B:
            self.check_finite(x)
        # [L, 2, B, C] coefficients; with the mean in coefficients (mc) a token's norm
        # is known without going back
        y = x if u is None else torch.matmul(x, u).sub_(mc)
        # a token's value norm, for its step: of the vector itself, not the weighted
        # coefficients
        vnorm = torch.linalg.vector_norm(x[:, 1], dim=-1, keepdim=True)
        if w is not None:  # the basis' weights: a component's step is its weight times
            y.div_(w)      # the (layer, K/V, token)'s
        keys, vals = y[:, 0], y[:, 1]
        kcode = self._key_codes(keys, b, kv.device, dtype_name(kv.dtype))
        vcode, vref = self._value_codes(vals, vnorm, dtype_name(kv.dtype))
        ks = _step(kcode).view(L, 1, 1)
        vs = _step(vcode)  # [L, B, 1]
        q = torch.empty_like(y)
        torch.div(keys, ks, out=q[:, 0])
        torch.div(vals, vs, out=q[:, 1])
        q.round_().clamp_(-QMAX, QMAX)
        shift = torch.round(q.mean(dim=2, keepdim=True)).clamp_(-32767, 32767) if B else \
            q.new_zeros((L, 2, 1, C))
        r = q.sub_(shift).to(torch.int32)
        outside = (r < LO) | (r > HI)
        exc_idx = torch.nonzero(outside.view(-1)).view(-1).to(torch.int32)
        exc_val = r.view(-1)[exc_idx.long()]
        sym = (r.clamp_(LO, HI) + CENTER).to(torch.uint8).cpu().numpy().reshape(L * 2, B, C)
        bank = self.bank
        ctx = bank.choose(sym)
        csym = (vcode - vref.view(L, 1, 1) + CENTER).to(torch.uint8).cpu().numpy()
        cctx = bank.choose(csym)
        side = b"".join((tensor_bytes(kcode.to(torch.uint8)), tensor_bytes(vref.to(torch.uint8)),
                         tensor_bytes(shift.to(torch.int16)), cctx.tobytes(), ctx.tobytes()))
        z = zlib.compress(side, 6)
        return b"".join((
            tensor_bytes(first.half()), struct.pack("<I", len(z)), z,
            struct.pack("<I", exc_idx.numel()), tensor_bytes(exc_idx), tensor_bytes(exc_val),
            _words(bank.encode(csym, cctx)), bank.encode(sym, ctx).tobytes()))

    def _key_codes(self, keys: torch.Tensor, b: _basis.Basis | None, device: Any,
                   dtype: str) -> torch.Tensor:
        """Step code per layer ``[L]``."""
        import torch

        L = keys.shape[0]
        mult = self._multipliers(L, 0, keys)
        if b is not None:
            ref = torch.from_numpy(b.scale[:, 0]).to(device).square().mean(-1).sqrt()
            return _code(ref.view(L, 1, 1) * mult * self.cfg.key_step).view(L)
        if keys.shape[1] == 0:
            return keys.new_full((L,), float(STEP_BIAS))

        spread = keys.var(dim=1, unbiased=False).sqrt_().median(dim=-1).values
        c0 = _code(spread.view(L, 1, 1) * mult * self.cfg.key_step)
        return _on_grid(keys.reshape(L, 1, -1), c0, dtype).view(L)

    def _value_codes(self, vals: torch.Tensor, vnorm: torch.Tensor, dtype: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(step code per (layer, token) ``[L, B, 1]``, reference per layer ``[L]``) for the
        coefficients ``vals`` of value vectors whose norms are ``vnorm`` ``[L, B, 1]``."""
        import torch

        L, B, C = vals.shape
        k = self._multipliers(L, 1, vals) * (self.cfg.value_step / C ** 0.5)
        if B == 0:
            return vals.new_zeros((L, 0, 1)), vals.new_zeros((L,))
        code = _on_grid(vals, _code(vnorm * k), dtype)
        # codes travel relative to their layer's reference, within the alphabet: one far
        # below the rest pulls the reference down (a finer step only costs bits), one far
        # above is made finer
        ref = torch.minimum(torch.round(code.mean(dim=1, keepdim=True)),
                            code.amin(dim=1, keepdim=True) - LO).clamp_(0, 255)
        code = torch.minimum(torch.maximum(code, ref + LO), ref + HI).clamp_(0, 255)
        return code, ref.view(L)

    # ----------------------------------------------------------------- decoder ----
    def _decode(self, payload: memoryview, info: BlobInfo, device: Any) -> torch.Tensor:
        import torch

        L, _, T, H, D = info.shape
        B, C = T - 1, H * D
        _, ut, mean, _, weight, _ = self._transform(L, C, device, False)
        bank = self.bank
        r = Reader(payload)
        first = r.tensor(torch.float16, (L, 2, 1, H, D), device)
        (zlen,) = struct.unpack("<I", r.take(4))
        limit = 2 * L + 4 * L * C + L + 2 * L * C
        d = zlib.decompressobj()
        try:
            raw = d.decompress(r.take(zlen), limit + 1)
        except zlib.error as exc:
            raise CorruptBlobError(f"side information does not inflate: {exc}") from None
        if len(raw) != limit or not d.eof or d.unconsumed_tail or d.unused_data:
            raise CorruptBlobError("side information does not match the shape")
        side = Reader(raw)
        kcode = side.tensor(torch.uint8, (L,), device).float()
        vref = side.array(np.uint8, L).astype(np.int16).reshape(L, 1, 1)
        shift = side.tensor(torch.int16, (L, 2, 1, C), device).float()
        cctx = side.array(np.uint8, L).reshape(L, 1)
        ctx = side.array(np.uint8, 2 * L * C).reshape(2 * L, C)
        side.done()
        (n_exc,) = struct.unpack("<I", r.take(4))
        if n_exc > L * 2 * B * C:
            raise CorruptBlobError("more exceptions than coefficients")
        exc_idx = r.tensor(torch.int32, (n_exc,), device).long()
        exc_val = r.tensor(torch.int32, (n_exc,), device).float()
        cwords = _read_words(r)
        rest = len(r.buf) - r.pos
        if rest % 2:
            raise CorruptBlobError("entropy-coded stream has an odd number of bytes")
        words = r.array(np.uint16, rest // 2)
        r.done()
        for w, count in ((cwords, L * B), (words, 2 * L * B * C)):
            if count > bank.max_symbols(w.size):
                raise CorruptBlobError("the header's shape needs more symbols than the "
                                       "payload can hold")
        if n_exc and (int(exc_idx.min()) < 0 or int(exc_idx.max()) >= L * 2 * B * C):
            raise CorruptBlobError("exception index outside the tensor")
        csym = bank.decode(cwords, (L, B, 1), cctx)
        vcode = torch.from_numpy((csym.astype(np.int16) + vref - CENTER).astype(np.float32)
                                 ).to(device)
        sym = bank.decode(words, (2 * L, B, C), ctx)
        q = torch.from_numpy(sym).to(device).view(L, 2, B, C).float().sub_(CENTER)
        if n_exc:
            q.view(-1)[exc_idx] = exc_val
        q.add_(shift)
        q[:, 0].mul_(_step(kcode).view(L, 1, 1))
        q[:, 1].mul_(_step(vcode))
        if weight is not None:
            q.mul_(weight)
        x = q if ut is None else torch.matmul(q, ut).add_(mean)
        if info.dtype == "float16":  # a rounding past the largest half must not be inf
            x.clamp_(-FP16_MAX, FP16_MAX)
        out = torch.empty(info.shape, dtype=torch_dtype(info.dtype), device=device)
        out[:, :, :1] = first
        out[:, :, 1:] = x.view(L, 2, B, H, D)
        return out


# how far (in steps) a decoded coefficient may miss its grid: what storing the decoded
# tensor in its dtype moved it (relative ``_EPS``) plus a little for the rotation back
GRID_TOL = 0.02
_EPS = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7, "float32": 2.0 ** -20}
_NEIGHBOURS = (-1.0, 1.0, -2.0, 2.0)


def _on_grid(y: torch.Tensor, code: torch.Tensor, dtype: str) -> torch.Tensor:
    """Per row of ``y`` ``[..., n]``, the step code ``code`` ``[..., 1]`` suggests, unless
    the row lies on the grid of a nearby code and not on its own: a decoded row's statistic
    can move to another code, and keeping the grid it came from makes re-encoding a fixed
    point instead of adding error on every cycle. A row lies on a grid when every
    coefficient does (a row of zeros lies on all of them, and keeps its own code)."""
    import torch

    eps = _EPS.get(dtype, 2.0 ** -10)

    def on(c: torch.Tensor) -> torch.Tensor:
        r = y / _step(c)
        miss = (r - torch.round(r)).abs_().sub_(r.abs_().mul_(eps)).amax(dim=-1,
                                                                          keepdim=True)
        return miss <= GRID_TOL

    found = on(code)
    out = code
    for off in _NEIGHBOURS:
        if bool(found.all()):
            break
        c = (code + off).clamp_(0, 255)
        hit = ~found & on(c)
        out = torch.where(hit, c, out)
        found = found | hit
    return out


def _words(words: np.ndarray) -> bytes:
    return struct.pack("<I", words.size) + words.tobytes()


def _read_words(r: Reader) -> np.ndarray:
    (n,) = struct.unpack("<I", r.take(4))
    return r.array(np.uint16, n)


register("kvtc", TransformCodec,
         {"kvtc": {"level": "default"}, "kvtc-compact": {"level": "compact"},
          "kvtc-max": {"level": "max"}})
