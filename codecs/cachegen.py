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
* Symbols are entropy coded with one model per (layer, K/V, channel), as in CacheGen, but
  the model is not shipped as a histogram: each context names one table of a fixed bank of
  discretised Laplace/Gaussian tables (one byte instead of LMCache's 33 int16 per channel).
  The step codes are entropy coded the same way, per (layer, K/V, head).
* Values beyond the alphabet are stored exactly as fp16 exceptions, never clipped.

The quantizer is plain torch (runs on the tensor's device); only the rANS coder runs on CPU.
Lossy: refuses inf/nan with ``NonFiniteInputError``.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from kvctl.codecs._io import Reader, tensor_bytes
from kvctl.codecs.base import BaseCodec, register
from kvctl.codecs.blob import BlobInfo
from kvctl.codecs.errors import CorruptBlobError, InvalidParamsError
from kvctl.codecs.profiles import layer_profile
from kvctl.codecs.rans import Bank

if TYPE_CHECKING:
    import torch

ALPHABET = 64
CENTER = 31  # symbol = q + CENTER, q in [-31, 32]
LO, HI = -CENTER, ALPHABET - 1 - CENTER
STEP_RES = 4  # a step is stored as round(STEP_RES * log2(step)) + STEP_BIAS, one byte
STEP_BIAS = 160


@dataclass(frozen=True)
class Level:
    """A level's base step, in units of each (token, head) vector's RMS, before the
    per-(layer, K/V) sensitivity multipliers."""

    step: float


LEVELS: dict[str, Level] = {
    "default": Level(step=0.4),
    "compact": Level(step=0.75),
}


def _code_payload(words: np.ndarray) -> bytes:
    return struct.pack("<I", words.size) + words.tobytes()


class CacheGenCodec(BaseCodec):
    """``get_codec("cachegen", level="default" | "compact")``.

    Payload: the chunk's first token (fp16); per (layer, K/V, head) a reference step code;
    per (layer, K/V, channel) a symbol shift (int8); table indices of both streams; fp16
    exceptions; the rANS stream of step codes; the rANS stream of symbols.
    """

    name = "cachegen"

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

        x = kv.float()
        self.check_finite(x)
        L, _, T, H, D = x.shape
        first = x[:, :, :1].half()
        body = x[:, :, 1:]
        rms = body.square().mean(dim=-1, keepdim=True).sqrt_()
        step = rms.mul_(self._layer_steps(tuple(x.shape), x.device))
        code = torch.round(STEP_RES * torch.log2(step.clamp_min_(2.0 ** -24)) + STEP_BIAS)
        code = code.clamp_(0, 255)
        # Step codes are coded relative to their (layer, K/V, head)'s mean; a code farther
        # off than the alphabet is pulled in, which only makes that token's step finer or
        # coarser, and the decoder sees the same code either way.
        ref = torch.round(code.mean(dim=2, keepdim=True)).clamp_(0, 255)
        code = torch.minimum(torch.maximum(code, ref + LO), ref + HI).clamp_(0, 255)
        code_sym = (code - ref + CENTER).to(torch.uint8)
        step = torch.exp2((code - STEP_BIAS) / STEP_RES)
        q = torch.round(body / step)
        # Channels with an offset (keys' outlier channels) are re-centred in symbol space, so
        # the centred tables of the bank fit them; the quantization itself is unchanged.
        shift = torch.round(q.mean(dim=2, keepdim=True)).clamp_(-127, 127)
        q -= shift
        out = (q < LO) | (q > HI)
        sym = (q.clamp_(LO, HI) + CENTER).to(torch.uint8)
        exc_idx = torch.nonzero(out.reshape(-1)).reshape(-1)
        exc_val = body.reshape(-1)[exc_idx].half()
        bank = self.bank
        csym = code_sym.cpu().numpy().reshape(L * 2, T - 1, H)
        cctx = bank.choose(csym)
        sym_np = sym.cpu().numpy().reshape(L * 2, T - 1, H * D)
        ctx = bank.choose(sym_np)
        return b"".join((
            tensor_bytes(first), tensor_bytes(ref.to(torch.uint8)),
            tensor_bytes(shift.to(torch.int8)), cctx.tobytes(), ctx.tobytes(),
            struct.pack("<I", exc_idx.numel()), tensor_bytes(exc_idx.to(torch.int32)),
            tensor_bytes(exc_val), _code_payload(bank.encode(csym, cctx)),
            bank.encode(sym_np, ctx).tobytes()))

    def _decode(self, payload: memoryview, info: BlobInfo, device: Any) -> torch.Tensor:
        import torch

        L, _, T, H, D = info.shape
        r = Reader(payload)
        first = r.tensor(torch.float16, (L, 2, 1, H, D), device).float()
        ref = r.tensor(torch.uint8, (L, 2, 1, H, 1), device).float()
        shift = r.tensor(torch.int8, (L, 2, 1, H, D), device).float()
        cctx = r.array(np.uint8, L * 2 * H).reshape(L * 2, H)
        ctx = r.array(np.uint8, L * 2 * H * D).reshape(L * 2, H * D)
        (n_exc,) = struct.unpack("<I", r.take(4))
        exc_idx = r.tensor(torch.int32, (n_exc,), device).long()
        exc_val = r.tensor(torch.float16, (n_exc,), device).float()
        (n_cw,) = struct.unpack("<I", r.take(4))
        cwords = r.array(np.uint16, n_cw)
        rest = len(r.buf) - r.pos
        if rest % 2:
            raise CorruptBlobError("entropy-coded stream has an odd number of bytes")
        words = r.array(np.uint16, rest // 2)
        r.done()
        n = L * 2 * (T - 1) * H * D
        if n_exc and (int(exc_idx.min()) < 0 or int(exc_idx.max()) >= n):
            raise CorruptBlobError("exception index outside the tensor")
        bank = self.bank
        csym = bank.decode(cwords, (L * 2, T - 1, H), cctx)
        code = torch.from_numpy(csym).to(device).view(L, 2, T - 1, H, 1).float()
        code += ref - CENTER
        sym = bank.decode(words, (L * 2, T - 1, H * D), ctx)
        q = torch.from_numpy(sym).to(device).view(L, 2, T - 1, H, D).float()
        q += shift - CENTER
        body = q.mul_(torch.exp2((code - STEP_BIAS) / STEP_RES))
        if n_exc:
            body.view(-1)[exc_idx] = exc_val
        return torch.cat((first, body), dim=2)


register("cachegen", CacheGenCodec,
         {"cachegen": {"level": "default"}, "cachegen-compact": {"level": "compact"}})
