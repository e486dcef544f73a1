"""Static interleaved rANS over uint8 symbols, with one probability table per context.

Symbols come as ``[G, T, C]`` (e.g. G = layers x {K, V}, T = tokens, C = heads x head_dim)
and context ``(g, c)`` uses table ``ctx_table[g, c]`` of a shared bank. The tables are not
shipped: the bank is a fixed function of the alphabet size (see ``make_bank``), so the only
side information is one table index per context.

32-bit states, 16-bit renormalisation, 12-bit probabilities, four interleaved states so the
CPU overlaps their dependency chains. numba compiles the loops (cached on disk); the rest of
the codec is torch and runs on any device.
"""

from __future__ import annotations

import functools

import numba
import numpy as np

from kvctl.codecs.errors import CorruptBlobError

PROB_BITS = 12
PROB_SCALE = 1 << PROB_BITS
RANS_L = 1 << 16
NSTATES = 4


@functools.lru_cache(maxsize=8)
def make_bank(alphabet: int, center: int, nscales: int = 40) -> tuple[np.ndarray, np.ndarray,
                                                                      np.ndarray, np.ndarray]:
    """Fixed bank of discretised Laplace and Gaussian tables around ``center``.

    Returns (freq [N, A] uint32, cum [N, A] uint32, lut [N, PROB_SCALE] uint8, scale [N]).
    Scales (in units of one quantisation step) are log-spaced from 0.05 to 64; every symbol
    keeps a frequency of at least 1 so any clamped symbol is encodable.
    """
    scales = np.geomspace(0.05, 64.0, nscales)
    k = np.arange(alphabet, dtype=np.float64) - center
    rows = []
    for s in scales:
        rows.append(np.exp(-np.abs(k) / s))  # Laplace
        rows.append(np.exp(-0.5 * (k / s) ** 2))  # Gaussian
    probs = np.stack(rows)
    probs /= probs.sum(axis=1, keepdims=True)
    freq = _quantize_probs(probs)
    cum = np.zeros_like(freq)
    cum[:, 1:] = np.cumsum(freq, axis=1)[:, :-1]
    lut = np.zeros((len(freq), PROB_SCALE), dtype=np.uint8)
    for i in range(len(freq)):
        lut[i] = np.repeat(np.arange(alphabet, dtype=np.uint8), freq[i])
    return (freq.astype(np.uint32), cum.astype(np.uint32), lut,
            np.repeat(scales, 2).astype(np.float64))


def _quantize_probs(probs: np.ndarray) -> np.ndarray:
    """Integer frequencies summing to PROB_SCALE, each >= 1 (largest-remainder rounding)."""
    n, a = probs.shape
    f = np.maximum(1, np.floor(probs * (PROB_SCALE - a)).astype(np.int64))
    for i in range(n):
        short = PROB_SCALE - f[i].sum()
        # hand the remaining mass to the likeliest symbols, where it costs least
        order = np.argsort(-probs[i])
        j = 0
        while short > 0:
            f[i, order[j % a]] += 1
            short -= 1
            j += 1
        while short < 0:
            idx = order[j % a]
            if f[i, idx] > 1:
                f[i, idx] -= 1
                short += 1
            j += 1
    return f


@numba.njit(cache=True, nogil=True)
def _choose(sym, alphabet, center, logp, log_scales):  # pragma: no cover - compiled
    """Per context, the cheapest of a few bank tables near its moment-matched scales.

    Evaluating all tables on every histogram costs more than the coding itself, so only
    the Laplace and Gaussian tables next to the context's mean |k| and rms are tried.
    """
    g_n, t_n, c_n = sym.shape
    nt = logp.shape[0]
    nsc = nt // 2
    out = np.zeros((g_n, c_n), dtype=np.uint8)
    hist = np.zeros((c_n, alphabet), dtype=np.int64)
    lo = log_scales[0]
    step = (log_scales[nsc - 1] - lo) / (nsc - 1)
    for g in range(g_n):
        hist[:, :] = 0
        for t in range(t_n):
            for c in range(c_n):
                hist[c, sym[g, t, c]] += 1
        for c in range(c_n):
            s1 = 0.0
            s2 = 0.0
            for a in range(alphabet):
                h = hist[c, a]
                d = a - center
                s1 += h * abs(d)
                s2 += h * d * d
            best = 1e300
            bi = 0
            for fam in range(2):
                m = s1 / max(t_n, 1) if fam == 0 else np.sqrt(s2 / max(t_n, 1))
                m = max(m, 1e-3)
                j0 = int(np.round((np.log(m) - lo) / step))
                for j in range(j0 - 1, j0 + 2):
                    if j < 0 or j >= nsc:
                        continue
                    k = 2 * j + fam
                    cost = 0.0
                    for a in range(alphabet):
                        if hist[c, a]:
                            cost += hist[c, a] * logp[k, a]
                    if cost < best:
                        best = cost
                        bi = k
            out[g, c] = bi
    return out


@numba.njit(cache=True, nogil=True)
def _encode(sym, ctx, freq, cum):  # pragma: no cover - compiled
    g_n, t_n, c_n = sym.shape
    n = g_n * t_n * c_n
    buf = np.empty(n + 2 * 4 + 8, dtype=np.uint16)
    p = buf.shape[0]
    x = np.full(4, 1 << 16, dtype=np.uint64)
    i = n
    for g in range(g_n - 1, -1, -1):
        for t in range(t_n - 1, -1, -1):
            for c in range(c_n - 1, -1, -1):
                i -= 1
                lane = i & 3
                s = sym[g, t, c]
                k = ctx[g, c]
                f = np.uint64(freq[k, s])
                xs = x[lane]
                if xs >= (f << np.uint64(20)):  # ((L >> PROB_BITS) << 16) * f, L = 2**16
                    p -= 1
                    buf[p] = xs & np.uint64(0xFFFF)
                    xs >>= np.uint64(16)
                x[lane] = ((xs // f) << np.uint64(12)) + (xs % f) + np.uint64(cum[k, s])
    for lane in range(3, -1, -1):
        p -= 1
        buf[p] = x[lane] >> np.uint64(16)
        p -= 1
        buf[p] = x[lane] & np.uint64(0xFFFF)
    return buf[p:].copy()


@numba.njit(cache=True, nogil=True)
def _decode(words, shape_g, shape_t, shape_c, ctx, freq, cum, lut):  # pragma: no cover
    out = np.empty((shape_g, shape_t, shape_c), dtype=np.uint8)
    nw = words.shape[0]
    if nw < 8:
        return out, -1
    x = np.empty(4, dtype=np.uint64)
    p = 0
    for lane in range(4):
        x[lane] = np.uint64(words[p]) | (np.uint64(words[p + 1]) << np.uint64(16))
        p += 2
    i = 0
    mask = np.uint64(PROB_SCALE - 1)
    for g in range(shape_g):
        for t in range(shape_t):
            for c in range(shape_c):
                lane = i & 3
                i += 1
                k = ctx[g, c]
                xs = x[lane]
                slot = xs & mask
                s = lut[k, slot]
                out[g, t, c] = s
                xs = np.uint64(freq[k, s]) * (xs >> np.uint64(12)) + slot - np.uint64(cum[k, s])
                if xs < np.uint64(1 << 16):
                    if p >= nw:
                        return out, -1
                    xs = (xs << np.uint64(16)) | np.uint64(words[p])
                    p += 1
                x[lane] = xs
    for lane in range(4):
        if x[lane] != np.uint64(1 << 16):
            return out, -2
    if p != nw:
        return out, -3
    return out, 0


class Bank:
    """One alphabet's fixed table bank, with the log-costs used to choose tables."""

    def __init__(self, alphabet: int, center: int) -> None:
        self.alphabet = alphabet
        self.center = center
        self.freq, self.cum, self.lut, self.scales = make_bank(alphabet, center)
        self.logp = -np.log2(self.freq / PROB_SCALE)
        self.ntables = len(self.freq)

    def choose(self, sym: np.ndarray) -> np.ndarray:
        """Table index per context ``[G, C]`` for symbols ``[G, T, C]``."""
        return _choose(np.ascontiguousarray(sym), self.alphabet, self.center, self.logp,
                       np.log(self.scales[::2]))

    def encode(self, sym: np.ndarray, ctx: np.ndarray) -> np.ndarray:
        if sym.size and int(sym.max()) >= self.alphabet:
            raise ValueError("symbol outside the alphabet")
        return _encode(np.ascontiguousarray(sym), ctx, self.freq, self.cum)

    def decode(self, words: np.ndarray, shape: tuple[int, int, int], ctx: np.ndarray
               ) -> np.ndarray:
        if ctx.shape != (shape[0], shape[2]) or (ctx.size and int(ctx.max()) >= self.ntables):
            raise CorruptBlobError("entropy-coder context tables do not match the shape")
        out, status = _decode(words, shape[0], shape[1], shape[2], ctx, self.freq, self.cum,
                              self.lut)
        if status != 0:
            why = ("truncated", "bad final state", "trailing words")[-status - 1]
            raise CorruptBlobError(f"entropy-coded stream is inconsistent ({why})")
        return out
