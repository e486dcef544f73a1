"""Token-wise prediction of quantized symbols (CacheGen's delta idea, in integer form).

Neighbouring tokens' keys are correlated (lag-1 correlation ~0.4-0.6 in the middle layers
of the model measured here), so each symbol is coded as its residual from
``rho * previous symbol``, rescaled by the ratio of the two tokens' steps. ``rho`` is one
of 0, 1/16, ..., 15/16 per (layer, key channel); values barely correlate (~0.2) and are
coded directly. The prediction is integer arithmetic on
the symbols that the decoder reconstructs, so encoder and decoder agree bit for bit on any
machine, and the quantization itself (hence the error) is unchanged: this only shrinks the
entropy. Residuals outside the alphabet are clamped; the decoder follows the same clamped
chain and the exact values come from the exception list.
"""

from __future__ import annotations

import numba
import numpy as np

RHO_BITS = 4
# step ratio 2**(d / 4) for code differences d in [-16, 16], 12 fractional bits. With the
# previous symbol held in int8 range, rho * prev * ratio < 2**27: the chain runs in int32,
# which vectorises where int64 multiplies do not.
RATIO_RANGE = 16


def ratio_table(step_res: int) -> np.ndarray:
    d = np.arange(-RATIO_RANGE, RATIO_RANGE + 1, dtype=np.float64)
    return np.round(np.exp2(d / step_res) * 4096.0).astype(np.int32)


@numba.njit(inline="always")
def _weights(code, rt, w, g, t, head_dim, m):  # pragma: no cover - compiled
    """Token t's multiplier per channel, rho * step ratio (below 2**20), into ``m``."""
    for h in range(m.shape[0] // head_dim):
        if t > 0:
            d = np.int64(code[g, t - 1, h]) - np.int64(code[g, t, h])
            d = min(max(d, -RATIO_RANGE), RATIO_RANGE)
            r = rt[d + RATIO_RANGE]
        else:
            r = np.int32(0)
        for j in range(h * head_dim, (h + 1) * head_dim):
            m[j] = np.int32(w[j] * r)


@numba.njit(inline="always")
def _pred(m, prev):  # pragma: no cover - compiled
    """floor(rho * prev * ratio / 2**16 + 1/2): the product is below 2**27, so int32 is
    exact, and int32 lanes are the widest the loops vectorise over (the casts keep numba
    from promoting to int64, which AVX2 cannot multiply)."""
    return np.int32(np.int32(m * prev) + np.int32(32768)) >> np.int32(16)


@numba.njit(cache=True, nogil=True)
def symbolize(q, code, rho, head_dim, alphabet, center, rt):  # pragma: no cover - compiled
    """Centred int8 symbols -> (uint8 residual symbols, per-context sums of the symbols and
    of their squares, flat indices of entries stored as exceptions).

    An entry is an exception when its residual leaves the alphabet or its int8 value was
    saturated (the symbol it carries is then not the true one). The hot loop runs over a
    whole token (all heads) and only counts them, so it stays branch-free and vectorises;
    rows that had any (rare) are redone from the kept predictions to record where.
    """
    g_n, t_n, c_n = q.shape
    sym = np.empty((g_n, t_n, c_n), dtype=np.uint8)
    exc = np.empty(1024, dtype=np.int64)
    n_exc = 0
    s1 = np.zeros((g_n, c_n), dtype=np.int32)
    s2 = np.zeros((g_n, c_n), dtype=np.int32)
    prev = np.zeros(c_n, dtype=np.int32)
    pred = np.zeros(c_n, dtype=np.int32)
    m = np.zeros(c_n, dtype=np.int32)
    top = np.int32(alphabet - 1)
    cen = np.int32(center)
    for g in range(g_n):
        prev[:] = 0
        w = rho[g]
        r1 = s1[g]
        r2 = s2[g]
        for t in range(t_n):
            row = q[g, t]
            out = sym[g, t]
            _weights(code, rt, w, g, t, head_dim, m)
            nbad = np.int32(0)
            for j in range(c_n):
                pr = _pred(m[j], prev[j])
                pred[j] = pr
                v = np.int32(row[j])
                s = v - pr + cen
                sc = min(max(s, np.int32(0)), top)
                nbad += np.int32((s != sc) | (v == 127) | (v == -128))
                out[j] = sc
                prev[j] = min(max(pr - cen + sc, np.int32(-128)), np.int32(127))
                r1[j] += sc
                r2[j] += sc * sc
            if nbad:
                base = (g * t_n + t) * c_n
                for j in range(c_n):
                    v = np.int32(row[j])
                    s = v - pred[j] + cen
                    if s < 0 or s > top or v == 127 or v == -128:
                        if n_exc == exc.shape[0]:
                            bigger = np.empty(2 * n_exc, dtype=np.int64)
                            bigger[:n_exc] = exc
                            exc = bigger
                        exc[n_exc] = base + j
                        n_exc += 1
    return s1.astype(np.int64), s2.astype(np.int64), sym, exc[:n_exc].copy()


@numba.njit(cache=True, nogil=True)
def unpredict(sym, code, rho, head_dim, center, rt, out, half):  # pragma: no cover
    """Residual symbols -> centred symbols, written as float32 into ``out[:, half]`` of the
    decoder's ``[G, 2, T, C]`` buffer: the decoder's half of the chain. The whole buffer
    comes in, not a strided view of it, so numba sees contiguous rows and vectorises."""
    g_n, t_n, c_n = sym.shape
    prev = np.zeros(c_n, dtype=np.int32)
    m = np.zeros(c_n, dtype=np.int32)
    cen = np.int32(center)
    for g in range(g_n):
        prev[:] = 0
        w = rho[g]
        for t in range(t_n):
            row = sym[g, t]
            dst = out[g, half, t]
            _weights(code, rt, w, g, t, head_dim, m)
            for j in range(c_n):
                v = _pred(m[j], prev[j]) + np.int32(row[j]) - cen
                prev[j] = min(max(v, np.int32(-128)), np.int32(127))
                dst[j] = v


@numba.njit(cache=True, nogil=True)
def center_into(sym, center, out, half):  # pragma: no cover - compiled
    """uint8 symbols minus ``center`` as float32 into ``out[:, half]`` (as ``unpredict``)."""
    g_n, t_n, c_n = sym.shape
    for g in range(g_n):
        for t in range(t_n):
            src = sym[g, t]
            dst = out[g, half, t]
            for j in range(c_n):
                dst[j] = np.float32(np.int32(src[j]) - center)


def pack_nibbles(a: np.ndarray) -> bytes:
    flat = a.reshape(-1).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate((flat, np.zeros(1, np.uint8)))
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


def unpack_nibbles(buf: np.ndarray, count: int) -> np.ndarray:
    out = np.empty(buf.size * 2, dtype=np.uint8)
    out[0::2] = buf & 15
    out[1::2] = buf >> 4
    return out[:count]
