"""CacheGen-style KV codec: sensitivity-aware quantization plus per-channel entropy coding.

What is kept from CacheGen (SIGCOMM 2024) and what differs:

* Quantization is uniform with a step chosen per (layer, K/V, head, channel) relative to that
  channel's spread, finer for the first layers, which the model is most sensitive to
  (CacheGen's layer-wise precision). Keys are grouped per channel, as KIVI found keys'
  outliers live in channels.
* The symbols are entropy coded with one probability model per (layer, K/V, channel), as in
  CacheGen, but the model is not shipped as a histogram: each context names one table of a
  fixed bank of discretised Laplace/Gaussian tables (one byte of side information instead
  of LMCache's 33 int16 per channel).
* Values too far out for the alphabet (the attention-sink token, rare outliers) are stored
  exactly as fp16 exceptions, so clamping never distorts them.

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
from kvctl.codecs.rans import Bank

if TYPE_CHECKING:
    import torch

ALPHABET = 64
CENTER = 31  # symbol = q + CENTER, q in [-31, 32]
STEP_RES = 8  # steps are stored as round(STEP_RES * log2(step)) + STEP_BIAS in one byte
STEP_BIAS = 192


@dataclass(frozen=True)
class Level:
    """Quantization steps, in units of each (token, head) vector's root mean square."""

    key_step: float
    value_step: float
    early_layers: int  # this many first layers get the finer steps
    early_scale: float  # step multiplier of the early layers


LEVELS: dict[str, Level] = {
    "default": Level(key_step=0.5, value_step=0.5, early_layers=3, early_scale=0.5),
    "compact": Level(key_step=0.75, value_step=0.75, early_layers=3, early_scale=0.5),
}


class CacheGenCodec(BaseCodec):
    """``get_codec("cachegen", level="default" | "compact")``.

    Payload: first token of the chunk as fp16; one step byte per (layer, K/V, token, head);
    one symbol shift (int8) and one table index per (layer, K/V, channel); fp16 exceptions;
    the rANS stream.
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

    def _layer_steps(self, num_layers: int, device: Any) -> torch.Tensor:
        import torch

        c = self.cfg
        mult = torch.empty(num_layers, 2, device=device)
        mult[:, 0] = c.key_step
        mult[:, 1] = c.value_step
        mult[:c.early_layers] *= c.early_scale
        return mult.view(num_layers, 2, 1, 1, 1)

    def _encode(self, kv: torch.Tensor) -> bytes:
        import torch

        x = kv.float()
        self.check_finite(x)
        L, _, T, H, D = x.shape
        # The first token is kept exactly: at the start of a sequence it is the attention
        # sink, whose keys and values every later token reads, and quantizing it costs far
        # more fidelity than its 1/chunk_size share of the bytes.
        first = x[:, :, :1].half()
        body = x[:, :, 1:]
        # One step per (token, head) vector: keys' outlier channels then get the same
        # absolute error as the rest, which is what a query's dot product sees.
        rms = body.square().mean(dim=-1, keepdim=True).sqrt_()
        step = rms.mul_(self._layer_steps(L, x.device))
        code = torch.round(STEP_RES * torch.log2(step.clamp_min_(2.0 ** -23)) + STEP_BIAS)
        code = code.clamp_(0, 255)
        step = torch.exp2((code - STEP_BIAS) / STEP_RES)
        q = torch.round(body / step)
        # Channels with an offset (keys' outlier channels) are re-centred in symbol space, so
        # the centred tables of the bank fit them; the quantization itself is unchanged.
        shift = torch.round(q.mean(dim=2, keepdim=True)).clamp_(-127, 127)
        q -= shift
        lo, hi = -CENTER, ALPHABET - 1 - CENTER
        out = (q < lo) | (q > hi)
        sym = (q.clamp_(lo, hi) + CENTER).to(torch.uint8)
        exc_idx = torch.nonzero(out.reshape(-1)).reshape(-1)
        exc_val = body.reshape(-1)[exc_idx].half()
        sym_np = sym.cpu().numpy().reshape(L * 2, T - 1, H * D)
        ctx = self.bank.choose(sym_np)
        words = self.bank.encode(sym_np, ctx)
        return b"".join((
            tensor_bytes(first), tensor_bytes(code.to(torch.uint8)),
            tensor_bytes(shift.to(torch.int8)), ctx.tobytes(),
            struct.pack("<I", exc_idx.numel()), tensor_bytes(exc_idx.to(torch.int32)),
            tensor_bytes(exc_val), words.tobytes()))

    def _decode(self, payload: memoryview, info: BlobInfo, device: Any) -> torch.Tensor:
        import torch

        L, _, T, H, D = info.shape
        r = Reader(payload)
        first = r.tensor(torch.float16, (L, 2, 1, H, D), device).float()
        code = r.tensor(torch.uint8, (L, 2, T - 1, H, 1), device).float()
        shift = r.tensor(torch.int8, (L, 2, 1, H, D), device).float()
        ctx = r.array(np.uint8, L * 2 * H * D).reshape(L * 2, H * D)
        (n_exc,) = struct.unpack("<I", r.take(4))
        exc_idx = r.tensor(torch.int32, (n_exc,), device).long()
        exc_val = r.tensor(torch.float16, (n_exc,), device).float()
        rest = len(r.buf) - r.pos
        if rest % 2:
            raise CorruptBlobError("entropy-coded stream has an odd number of bytes")
        words = r.array(np.uint16, rest // 2)
        r.done()
        n = L * 2 * (T - 1) * H * D
        if n_exc and (int(exc_idx.min()) < 0 or int(exc_idx.max()) >= n):
            raise CorruptBlobError("exception index outside the tensor")
        sym = self.bank.decode(words, (L * 2, T - 1, H * D), ctx)
        q = torch.from_numpy(sym).to(device).view(L, 2, T - 1, H, D).float()
        q += shift - CENTER
        body = q.mul_(torch.exp2((code - STEP_BIAS) / STEP_RES))
        if n_exc:
            body.view(-1)[exc_idx] = exc_val
        return torch.cat((first, body), dim=2)


register("cachegen", CacheGenCodec,
         {"cachegen": {"level": "default"}, "cachegen-compact": {"level": "compact"}})
