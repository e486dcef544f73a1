"""Grid recognition: what keeps re-encoding a decoded tensor from adding error.

A step chosen from a statistic of the data (a vector's RMS, a channel's spread) is not a
function of what the decoder gives back: quantization moves the statistic (an RMS grows by
about step**2 / 12 in the mean), so on every round trip some steps cross a code boundary,
a coarser step adds new error, that error raises the statistic again, and over repeated
compress -> decompress cycles the error grew without bound (0.12 -> 4.1 after 20 cycles).

So the encoder first asks whether a group of elements already lies on one of the grids
near the one its statistic suggests (every element an integer multiple of that step, up to
the rounding of the tensor's dtype) and keeps that grid if so. A decoded tensor then
quantizes to exactly the symbols it came from and re-encodes to the same blob: the codec is
idempotent on its own output. Original data lies on such a grid only by coincidence, and
then only within a tolerance of the grid points, so its error stays as small as the
suggested step would give.
"""

from __future__ import annotations

import numba
import numpy as np

# candidate offsets from the suggested code, nearest first; a round trip moves an RMS far
# less than the two quarter-octaves this spans
SPAN = np.array([0, -1, 1, -2, 2], dtype=np.int32)
# how far from its grid point a decoded element may lie: the dtype rounded ``q * step``
# to a relative ``u`` (unit roundoff), plus slack for float32 arithmetic
UNIT_ROUNDOFF = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8, "float32": 2.0 ** -24}
ABS_TOL = 0.05


@numba.njit(cache=True, nogil=True)
def _recognize(x, code, span, res, bias, u, allow):  # pragma: no cover - compiled
    n_g = x.shape[0]
    out = code.copy()
    for g in range(n_g):
        c0 = np.int32(code[g])
        row = x[g]
        for k in range(span.shape[0]):
            c = c0 + span[k]
            if c < 0 or c > 255:
                continue
            inv = np.float32(2.0 ** ((bias - c) / res))
            bad, good = _count(row, inv, u, allow)
            # zeros lie on every grid, so only non-zero grid points are evidence, and the
            # exceptions let through must be few against it
            if bad <= allow and 4 * bad <= good:
                out[g] = c
                break
    return out


@numba.njit(inline="always")
def _count(row, inv, u, allow):  # pragma: no cover - compiled
    """(elements off the grid of step 1 / inv, non-zero elements on it); stops early once
    the row is clearly off: more than ``allow``, more than 8 + 1/8 of those seen, or two
    off before any non-zero one on (original data, nearly always: exceptions are rare, so
    a decoded row almost never opens with two of them)."""
    bad = 0
    good = 0
    for j in range(row.shape[0]):
        y = row[j] * inv
        r = np.round(y)
        if abs(y - r) > ABS_TOL + 1.5 * u * abs(y):
            bad += 1
            if bad > allow or bad > 8 + (j >> 3) or (bad >= 2 and good == 0):
                return allow + 1, good
        elif r != 0:
            good += 1
    return bad, good


def recognize(x: np.ndarray, code: np.ndarray, step_res: int, step_bias: int, dtype: str,
              allow: int) -> np.ndarray:
    """Step codes for the groups (rows) of ``x [G, D]`` (float32): ``code [G]`` (suggested)
    unless a row lies, all but ``allow`` of its elements (and at most a quarter as many
    as its non-zero grid points), on the grid of a code within
    ``SPAN`` of it; then the first such code. Step of code c: 2**((c - step_bias) /
    step_res). ``allow`` leaves room for the exact exceptions a decoded blob may carry."""
    u = UNIT_ROUNDOFF.get(dtype, 2.0 ** -8)
    return _recognize(np.ascontiguousarray(x, dtype=np.float32),
                      np.ascontiguousarray(code, dtype=np.int32), SPAN, float(step_res),
                      float(step_bias), u, int(allow))
