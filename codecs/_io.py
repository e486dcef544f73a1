"""Payload (de)serialisation helpers: tensors to bytes and back, with size checks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from kvctl.codecs.errors import CorruptBlobError

if TYPE_CHECKING:
    import torch


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor (any device); bf16 goes through int16."""
    import torch

    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.cpu().numpy().tobytes()


class Reader:
    """Sequential reader over a payload; every read checks that the bytes are there."""

    def __init__(self, payload: memoryview | bytes) -> None:
        self.buf = memoryview(payload)
        self.pos = 0

    def take(self, nbytes: int) -> memoryview:
        if nbytes < 0 or self.pos + nbytes > len(self.buf):
            raise CorruptBlobError(f"payload too short: need {nbytes} bytes at offset "
                                   f"{self.pos}, have {len(self.buf) - self.pos}")
        out = self.buf[self.pos:self.pos + nbytes]
        self.pos += nbytes
        return out

    def array(self, dtype: np.dtype | type, count: int) -> np.ndarray:
        dt = np.dtype(dtype)
        return np.frombuffer(self.take(dt.itemsize * count), dtype=dt)

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...], device: str | torch.device
               ) -> torch.Tensor:
        import math

        import torch

        n = math.prod(shape)
        if dtype == torch.bfloat16:
            a = self.array(np.int16, n)
            return torch.from_numpy(a.copy()).view(torch.bfloat16).reshape(shape).to(device)
        npdt = {torch.float16: np.float16, torch.float32: np.float32, torch.uint8: np.uint8,
                torch.int8: np.int8, torch.int32: np.int32, torch.int16: np.int16,
                torch.int64: np.int64}[dtype]
        a = self.array(npdt, n)
        return torch.from_numpy(a.copy()).reshape(shape).to(device)

    def done(self) -> None:
        if self.pos != len(self.buf):
            raise CorruptBlobError(f"payload has {len(self.buf) - self.pos} unexpected "
                                   "trailing bytes")
