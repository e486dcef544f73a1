"""Baseline codecs an operator compares CacheGen against: raw, int8, fp8 and KIVI.

Lossy baselines keep their scales in fp16 (as the methods they stand for do), so they refuse
inf/nan and values beyond the fp16 range with ``NonFiniteInputError``; ``raw`` stores
anything bit-exactly, inf and nan included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvctl.codecs._io import Reader, tensor_bytes
from kvctl.codecs.base import BaseCodec, register, torch_dtype
from kvctl.codecs.blob import BlobInfo
from kvctl.codecs.errors import InvalidParamsError

if TYPE_CHECKING:
    import torch


class RawCodec(BaseCodec):
    """Lossless: the tensor's own bytes in its own dtype."""

    name = "raw"
    lossless = True
    max_elements_per_byte = 0.5  # fp16/bf16; fp32 needs 4 bytes

    def _encode(self, kv: torch.Tensor) -> bytes:
        return tensor_bytes(kv)

    def _decode(self, payload: memoryview, info: BlobInfo, device: Any) -> torch.Tensor:
        r = Reader(payload)
        out = r.tensor(torch_dtype(info.dtype), info.shape, device)
        r.done()
        return out


class Int8Codec(BaseCodec):
    """Symmetric int8 with one fp16 scale per (layer, K/V, token, head) vector."""

    name = "int8"

    def _encode(self, kv: torch.Tensor) -> bytes:
        import torch

        x = kv.float()
        self.check_finite(x)
        scale = (x.abs().amax(dim=-1, keepdim=True) / 127.0).half().float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(x / scale).clamp_(-127, 127).to(torch.int8)
        return tensor_bytes(scale.half()) + tensor_bytes(q)

    def _decode(self, payload: memoryview, info: BlobInfo, device: Any) -> torch.Tensor:
        import torch

        r = Reader(payload)
        scale = r.tensor(torch.float16, (*info.shape[:-1], 1), device).float()
        q = r.tensor(torch.int8, info.shape, device)
        r.done()
        return q.float() * scale


class Fp8Codec(BaseCodec):
    """float8 e4m3 with one fp16 scale per (layer, K/V, token, head) vector."""

    name = "fp8"
    E4M3_MAX = 448.0

    def _encode(self, kv: torch.Tensor) -> bytes:
        import torch

        x = kv.float()
        self.check_finite(x)
        scale = (x.abs().amax(dim=-1, keepdim=True) / self.E4M3_MAX).half().float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = (x / scale).clamp_(-self.E4M3_MAX, self.E4M3_MAX).to(torch.float8_e4m3fn)
        return tensor_bytes(scale.half()) + tensor_bytes(q.view(torch.uint8))

    def _decode(self, payload: memoryview, info: BlobInfo, device: Any) -> torch.Tensor:
        import torch

        r = Reader(payload)
        scale = r.tensor(torch.float16, (*info.shape[:-1], 1), device).float()
        q = r.tensor(torch.uint8, info.shape, device).view(torch.float8_e4m3fn)
        r.done()
        return q.float() * scale


# ------------------------------------------------------------------ bit packing ----
def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes < 2**bits (bits in 1, 2, 4, 8) into a flat uint8 tensor."""
    import torch

    per = 8 // bits
    flat = codes.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat((flat, flat.new_zeros(pad)))
    grid = flat.view(-1, per).to(torch.int32)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (grid << shifts).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    import torch

    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    grid = (packed.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return grid.reshape(-1)[:count].to(torch.uint8)


def _pad_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """Split the last dim into groups of ``group``; the tail is padded by repeating its last
    element, which leaves every group's min and max unchanged."""
    import torch

    n = x.shape[-1]
    pad = (-n) % group
    if pad:
        x = torch.cat((x, x[..., -1:].expand(*x.shape[:-1], pad)), dim=-1)
    return x.reshape(*x.shape[:-1], -1, group)


class KiviCodec(BaseCodec):
    """KIVI (ICML 2024): asymmetric ``bits``-bit group quantization, keys grouped per channel
    along tokens, values per token along channels; fp16 min and step per group of ``group``.
    (KIVI's full-precision window of recent tokens is a serving-time detail, left out.)"""

    name = "kivi"

    def __init__(self, bits: int = 2, group: int = 32) -> None:
        if bits not in (1, 2, 4, 8):
            raise InvalidParamsError(f"kivi bits must be 1, 2, 4 or 8, got {bits!r}")
        if not isinstance(group, int) or not 1 <= group <= 4096:
            raise InvalidParamsError(f"kivi group must be an int in 1..4096, got {group!r}")
        self.bits = bits
        self.group = group

    @property
    def params(self) -> dict[str, Any]:
        return {"bits": self.bits, "group": self.group}

    @property
    def max_elements_per_byte(self) -> float:  # type: ignore[override]
        # packed codes alone take bits/8 bytes per element; group padding only adds bytes
        return 8 / self.bits

    def _quant(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        import torch

        g = _pad_groups(x, self.group)
        mn = g.amin(dim=-1, keepdim=True).half().float()
        mx = g.amax(dim=-1, keepdim=True)
        levels = (1 << self.bits) - 1
        step = ((mx - mn) / levels).half().float()
        step = torch.where(step > 0, step, torch.ones_like(step))
        q = torch.round((g - mn) / step).clamp_(0, levels)
        return q, mn, step

    def _encode(self, kv: torch.Tensor) -> bytes:
        x = kv.float()
        self.check_finite(x)
        keys = x[:, 0].permute(0, 2, 3, 1)  # [L, H, D, T]: groups run along tokens
        vals = x[:, 1]  # [L, T, H, D]: groups run along channels
        parts = []
        for t in (keys, vals):
            q, mn, step = self._quant(t)
            parts += [tensor_bytes(mn.half()), tensor_bytes(step.half()),
                      tensor_bytes(pack_bits(q, self.bits))]
        return b"".join(parts)

    def _dequant(self, r: Reader, shape: tuple[int, ...], device: Any) -> torch.Tensor:
        import math

        import torch

        n = shape[-1]
        ng = -(-n // self.group)
        gshape = (*shape[:-1], ng, 1)
        mn = r.tensor(torch.float16, gshape, device).float()
        step = r.tensor(torch.float16, gshape, device).float()
        count = math.prod(shape[:-1]) * ng * self.group
        nbytes = -(-count * self.bits // 8)
        q = unpack_bits(r.tensor(torch.uint8, (nbytes,), device), self.bits, count)
        g = q.reshape(*shape[:-1], ng, self.group).float() * step + mn
        return g.reshape(*shape[:-1], ng * self.group)[..., :n]

    def _decode(self, payload: memoryview, info: BlobInfo, device: Any) -> torch.Tensor:
        import torch

        L, _, T, H, D = info.shape
        r = Reader(payload)
        keys = self._dequant(r, (L, H, D, T), device).permute(0, 3, 1, 2)
        vals = self._dequant(r, (L, T, H, D), device)
        r.done()
        return torch.stack((keys, vals), dim=1)


register("raw", RawCodec)
register("int8", Int8Codec)
register("fp8", Fp8Codec)
register("kivi", KiviCodec, {"kivi-2": {"bits": 2}, "kivi-4": {"bits": 4}})
