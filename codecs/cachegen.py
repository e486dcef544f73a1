"""CacheGen-style KV codec: sensitivity-aware quantization plus per-channel entropy coding.

What is kept from CacheGen (SIGCOMM 2024) and what differs:

* Layer-wise precision driven by sensitivity (CacheGen's Insight 2): each (layer, K/V) gets
  a step multiplier from an offline sensitivity profile of the model (``profiles.py``;
  measured on a calibration text, never on benchmark text), or a generic one for unknown
  models. Keys get finer steps than values: a key error moves every attention logit.
* Quantization is uniform with one step per (layer, K/V, token, head) vector, proportional
  to the vector's RMS. Keys' outlier channels then get the same absolute error as the rest,
  which is what a query's dot product sees (on this model it beat per-channel grouping).
* The first token of a chunk is stored exactly: at the start of a sequence it is the
  attention sink that every later token reads.
* Symbols are entropy coded (rANS) with one model per (layer, K/V, channel), as in
  CacheGen, but the model is not shipped as a histogram: each context names one table of a
  fixed bank of discretised Gaussians (scale x sub-symbol offset), moment-matched at encode
  time: one byte per channel instead of LMCache's 33 int16. The step codes are entropy
  coded the same way, per (layer, K/V, head).
* Keys are coded as residuals of a token-wise prediction from the previous token
  (CacheGen's delta coding, which LMCache's code lacks), in integer arithmetic on the
  decoded symbols so it never changes the error, only the size (about 4% here).
* Values beyond the alphabet are stored exactly as fp16 exceptions, never clipped.
* Idempotent on its own output: a vector that already lies on a grid near the one its RMS
  suggests keeps that grid (``grid.py``), so re-encoding a decoded chunk gives back the
  same blob instead of adding error on every compress -> decompress cycle.

The quantizer is plain torch (runs on the tensor's device); symbolisation, the key
prediction and the rANS coder run on CPU (numba), on one byte per element.
Lossy: refuses inf/nan with ``NonFiniteInputError``.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from kvctl.codecs import grid, predict
from kvctl.codecs._io import Reader, tensor_bytes
from kvctl.codecs.base import FP16_MAX, BaseCodec, dtype_name, register, torch_dtype
from kvctl.codecs.blob import BlobInfo
from kvctl.codecs.errors import CorruptBlobError, InvalidParamsError
from kvctl.codecs.profiles import layer_profile
from kvctl.codecs.rans import Bank, elements_per_byte

if TYPE_CHECKING:
    import torch

ALPHABET = 64
CENTER = 31  # symbol = q + CENTER, q in [-31, 32]
LO, HI = -CENTER, ALPHABET - 1 - CENTER
STEP_RES = 4  # a step is stored as round(STEP_RES * log2(step)) + STEP_BIAS, one byte
STEP_BIAS = 160
_RATIOS = predict.ratio_table(STEP_RES)


@dataclass(frozen=True)
class Level:
    """A level's base step, in units of each (token, head) vector's RMS, before the
    per-(layer, K/V) sensitivity multipliers."""

    step: float


LEVELS: dict[str, Level] = {
    "default": Level(step=0.4),
    "compact": Level(step=0.75),
}


class CacheGenCodec(BaseCodec):
    """``get_codec("cachegen", level="default" | "compact")``.

    Levels: ``default`` (about 5.5x vs fp16 on the benchmark text, top-1 agreement ~97%)
    and ``compact`` (about 7.7x, ~93%); see benchmarks/results.md.

    Payload: the chunk's first token (fp16); per (layer, K/V, head) a reference step code;
    per (layer, K/V, channel) a symbol shift (int8); per (layer, key channel) a 4-bit
    prediction weight; table indices of the three streams; fp16 exceptions; the rANS
    streams of step codes, key residuals and value symbols.
    """

    name = "cachegen"
    max_elements_per_byte = elements_per_byte(ALPHABET)

    def __init__(self, level: str = "default") -> None:
        if level not in LEVELS:
            raise InvalidParamsError(f"unknown cachegen level {level!r}; levels: "
                                     f"{', '.join(LEVELS)}")
        self.level = level
        self.cfg = LEVELS[level]
        self._bank: Bank | None = None

    @property
    def params(self) -> dict[str, Any]:
        return {"level": self.level}

    @property
    def bank(self) -> Bank:
        if self._bank is None:
            self._bank = Bank(ALPHABET, CENTER)
        return self._bank

    def describe(self) -> dict[str, Any]:
        return {"level": self.level, **asdict(self.cfg)}

    def _layer_steps(self, shape: tuple[int, ...], device: Any) -> torch.Tensor:
        import torch

        L, _, _, H, D = shape
        mult = torch.tensor(layer_profile(L, H, D), dtype=torch.float32, device=device)
        return (mult * self.cfg.step).view(L, 2, 1, 1, 1)

    def _encode(self, kv: torch.Tensor) -> bytes:
        import torch

        L, _, T, H, D = kv.shape
        # Each full pass over the chunk costs about a millisecond per core on CPU, so the
        # quantizer is written as few passes as possible, in place where it can be.
        first = kv[:, :, :1]
        body = kv[:, :, 1:].to(torch.float32, copy=True)  # never modify the caller's tensor
        norm = torch.linalg.vector_norm(body, dim=-1, keepdim=True)
        self._check_range(first, norm, body)
        step = norm.mul_(self._layer_steps(tuple(kv.shape), kv.device) / D ** 0.5)
        code = torch.round(STEP_RES * torch.log2(step.clamp_min_(2.0 ** -24)) + STEP_BIAS)
        code = self._recognize(body, code.clamp_(0, 255), kv.dtype)
        # Step codes are coded relative to their (layer, K/V, head)'s mean. A code farther
        # off than the alphabet is pulled in, and only ever downwards: a finer step keeps the
        # error bound (what no longer fits the alphabet becomes an exact exception), while a
        # coarser one would round a vector far quieter than its neighbours to noise. So the
        # reference drops when needed to keep the smallest code in reach.
        ref = torch.round(code.mean(dim=2, keepdim=True))
        if code.shape[2]:  # a one-token chunk has no body and nothing to reach
            ref = torch.minimum(ref, code.amin(dim=2, keepdim=True) - LO)
        ref = ref.nan_to_num_(0.0).clamp_(0, 255)
        code = torch.minimum(torch.maximum(code, ref + LO), ref + HI).clamp_(0, 255)
        code_sym = (code - ref + CENTER).to(torch.uint8)
        q = body.mul_(torch.exp2((STEP_BIAS - code) / STEP_RES)).round_()
        # Channels with an offset (keys' outlier channels) are re-centred in symbol space so
        # the centred tables of the bank fit them; any integer shift decodes exactly, so a
        # sample of the tokens is enough to estimate it.
        shift = torch.round(q[:, :, ::4].mean(dim=2, keepdim=True)).clamp_(-127, 127)
        q.sub_(shift).clamp_(-128, 127)
        rho = self._rho(q[:, 0], code[:, 0])
        # int8 keeps what lies outside the alphabet visible to the CPU passes that clamp it,
        # record it as an exception and gather the table statistics in one sweep. Keys are
        # coded as residuals of a token-wise prediction (CacheGen's delta idea; see
        # predict.py); values, whose neighbours barely correlate, are coded directly.
        bank = self.bank
        q8 = q.to(torch.int8).cpu().numpy().reshape(L, 2, T - 1, H * D)
        code_k = code[:, 0].to(torch.int16).cpu().numpy().reshape(L, T - 1, H)
        rho_np = rho.cpu().numpy().reshape(L, H * D)
        s1, s2, ksym, kexc = predict.symbolize(np.ascontiguousarray(q8[:, 0]), code_k, rho_np,
                                               D, ALPHABET, CENTER, _RATIOS)
        kctx = bank.tables_from_moments(s1, s2, T - 1)
        vsym, vctx, vexc = bank.symbolize(q8[:, 1], CENTER)
        exc_idx = torch.from_numpy(np.concatenate((_full_index(kexc, 0, T, H * D),
                                                   _full_index(vexc, 1, T, H * D))))
        exc_val = self._exact_values(kv, exc_idx)
        csym = code_sym.cpu().numpy().reshape(L * 2, T - 1, H)
        cctx = bank.choose(csym)
        return b"".join((
            tensor_bytes(first.half()), tensor_bytes(ref.to(torch.uint8)),
            tensor_bytes(shift.to(torch.int8)), predict.pack_nibbles(rho_np),
            cctx.tobytes(), kctx.tobytes(), vctx.tobytes(),
            struct.pack("<I", exc_idx.numel()), tensor_bytes(exc_idx.to(torch.int32)),
            tensor_bytes(exc_val), _words_payload(bank.encode(csym, cctx)),
            _words_payload(bank.encode(ksym, kctx)), bank.encode(vsym, vctx).tobytes()))

    @staticmethod
    def _recognize(body: torch.Tensor, code: torch.Tensor, dtype: Any) -> torch.Tensor:
        """Keep the grid a vector already lies on (see grid.py): re-encoding a decoded
        chunk then gives back the same symbols instead of adding error."""
        import torch

        D = body.shape[-1]
        x = body.detach().reshape(-1, D).cpu().numpy()
        c = code.reshape(-1).to(torch.int32).cpu().numpy()
        out = grid.recognize(x, c, STEP_RES, STEP_BIAS, dtype_name(dtype), D // 16)
        return torch.from_numpy(out).to(code.device, torch.float32).view(code.shape)

    @staticmethod
    def _rho(q: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """Per-channel prediction weight in sixteenths, least squares on every fourth pair
        of neighbouring tokens (step-rescaled); it only has to be good, not exact."""
        import torch

        n = q.shape[1] - 1
        scale = 1 << predict.RHO_BITS
        if n < 1:
            return torch.zeros((q.shape[0], *q.shape[2:]), dtype=torch.int32, device=q.device)
        a, b = q[:, 0:n:4], q[:, 1:n + 1:4]
        ratio = torch.exp2((code[:, 0:n:4] - code[:, 1:n + 1:4]) / STEP_RES)
        prev = a * ratio
        num = (b * prev).sum(dim=1)
        den = prev.square_().sum(dim=1).clamp_min_(1e-9)
        return torch.round(num / den * scale).clamp_(0, scale - 1).to(torch.int32)

    @staticmethod
    def _exact_values(kv: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """fp16 copies of body elements by flat index into ``[L * 2, T - 1, H * D]``."""
        _, _, T, H, D = kv.shape
        c = flat % (H * D)
        gt = flat // (H * D)
        t = gt % (T - 1) if T > 1 else gt
        g = gt // max(T - 1, 1)
        idx = [i.to(kv.device) for i in (g // 2, g % 2, t + 1, c // D, c % D)]
        return kv[idx[0], idx[1], idx[2], idx[3], idx[4]].half()

    def _check_range(self, first: torch.Tensor, norm: torch.Tensor, body: torch.Tensor
                     ) -> None:
        """inf/nan anywhere make a vector's norm non-finite, and a norm within fp16 range
        bounds every element of its vector, so the full check runs only when needed."""
        if norm.numel() and not bool(norm.amax() <= FP16_MAX):
            self.check_finite(body)
        self.check_finite(first.float())

    def _decode(self, payload: memoryview, info: BlobInfo, device: Any) -> torch.Tensor:
        import torch

        L, _, T, H, D = info.shape
        C = H * D
        r = Reader(payload)
        first = r.tensor(torch.float16, (L, 2, 1, H, D), device).float()
        ref = r.tensor(torch.uint8, (L, 2, 1, H, 1), device).float()
        shift = r.tensor(torch.int8, (L, 2, 1, H, D), device).float()
        rho = predict.unpack_nibbles(r.array(np.uint8, (L * C + 1) // 2), L * C)
        rho = rho.astype(np.int32).reshape(L, C)
        cctx = r.array(np.uint8, L * 2 * H).reshape(L * 2, H)
        kctx = r.array(np.uint8, L * C).reshape(L, C)
        vctx = r.array(np.uint8, L * C).reshape(L, C)
        (n_exc,) = struct.unpack("<I", r.take(4))
        exc_idx = r.tensor(torch.int32, (n_exc,), device).long()
        exc_val = r.tensor(torch.float16, (n_exc,), device).float()
        cwords = _read_words(r)
        kwords = _read_words(r)
        rest = len(r.buf) - r.pos
        if rest % 2:
            raise CorruptBlobError("entropy-coded stream has an odd number of bytes")
        vwords = r.array(np.uint16, rest // 2)
        r.done()
        n = L * 2 * (T - 1) * C
        if n_exc and (int(exc_idx.min()) < 0 or int(exc_idx.max()) >= n):
            raise CorruptBlobError("exception index outside the tensor")
        if int(rho.max(initial=0)) >= 1 << predict.RHO_BITS:
            raise CorruptBlobError("prediction weight out of range")
        bank = self.bank
        csym = bank.decode(cwords, (L * 2, T - 1, H), cctx)
        code_np = (csym.astype(np.int16).reshape(L, 2, T - 1, H)
                   + ref.cpu().numpy().astype(np.int16).reshape(L, 2, 1, H) - CENTER)
        code = torch.from_numpy(code_np).to(device).view(L, 2, T - 1, H, 1).float()
        ksym = bank.decode(kwords, (L, T - 1, C), kctx)
        vsym = bank.decode(vwords, (L, T - 1, C), vctx)
        # both halves land in one CPU buffer in place, then move to the device once
        qn = np.empty((L, 2, T - 1, C), dtype=np.float32)
        predict.unpredict(ksym, np.ascontiguousarray(code_np[:, 0]), rho, D, CENTER, _RATIOS,
                          qn, 0)
        predict.center_into(vsym, CENTER, qn, 1)
        q = torch.from_numpy(qn).to(device).view(L, 2, T - 1, H, D)
        body = q.add_(shift).mul_(torch.exp2((code - STEP_BIAS) / STEP_RES))
        if n_exc:
            body.view(-1)[exc_idx] = exc_val
        # written straight into the caller's dtype: no concatenation, no second cast
        out = torch.empty(info.shape, dtype=torch_dtype(info.dtype), device=device)
        out[:, :, :1] = first
        out[:, :, 1:] = body
        return out


def _full_index(flat: np.ndarray, kv: int, T: int, C: int) -> np.ndarray:
    """Flat index into ``[L, T - 1, C]`` of K or V -> flat index into ``[L, 2, T - 1, C]``."""
    per = (T - 1) * C
    return (2 * (flat // per) + kv) * per + flat % per if per else flat


def _words_payload(words: np.ndarray) -> bytes:
    return struct.pack("<I", words.size) + words.tobytes()


def _read_words(r: Reader) -> np.ndarray:
    (n,) = struct.unpack("<I", r.take(4))
    return r.array(np.uint16, n)


register("cachegen", CacheGenCodec,
         {"cachegen": {"level": "default"}, "cachegen-compact": {"level": "compact"}})
