"""Static interleaved rANS over uint8 symbols, with one probability table per context.

Symbols come as ``[G, T, C]`` (e.g. G = layers x {K, V}, T = tokens, C = heads x head_dim)
and context ``(g, c)`` uses table ``ctx_table[g, c]`` of a shared bank. The tables are not
shipped: the bank is a fixed function of the alphabet size (see ``make_bank``), so the only
side information is one table index per context. Everything is static (no adaptation), so
decoding needs nothing but the stream and the indices.

32-bit states, 16-bit renormalisation, 12-bit probabilities, four interleaved states so the
CPU overlaps their dependency chains. numba compiles the loops (cached on disk); the rest of
the codec is torch and runs on any device.
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np

from kvctl.codecs.errors import CorruptBlobError

PROB_BITS = 12
PROB_SCALE = 1 << PROB_BITS
RANS_L = 1 << 16
NSTATES = 4


# Bank layout: one discretised Gaussian per (offset, scale). Offsets let a context whose
# mean sits between two integers (re-centring is by whole symbols) keep its skew.
OFFSETS = (-0.5, -0.25, 0.0, 0.25, 0.5)
NSCALES = 48
# the tables' scales (in quantisation steps), log-spaced
SCALES = np.geomspace(0.08, 48.0, NSCALES)


@functools.lru_cache(maxsize=8)
def make_bank(alphabet: int, center: int, tails: bool = False
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fixed bank of discretised Gaussian tables around ``center``.

    ``tails``: the two edge symbols carry the Gaussian's mass beyond them (for a coder
    whose edge symbols are escapes: a value past the edge costs the edge's probability
    plus its overflow), instead of the point mass at the edge.

    Returns (freq [N, A] uint32, cum [N, A] uint32, lut [N, PROB_SCALE] uint8,
    log variance [len(OFFSETS), NSCALES]) with table index ``offset * NSCALES + scale``.
    Scales (in quantisation steps) are log-spaced from 0.08 to 48; every symbol keeps a
    frequency of at least 1, so any symbol of the alphabet is encodable with any table.
    """
    scales = SCALES
    k = np.arange(alphabet, dtype=np.float64) - center
    rows = [np.exp(-0.5 * ((k - o) / s) ** 2) for o in OFFSETS for s in scales]
    probs = np.stack(rows)
    if tails:
        far = np.arange(1, 64 * int(scales[-1]), dtype=np.float64)
        lo, hi = -float(center), float(alphabet - 1 - center)
        for i, (o, s) in enumerate((o, s) for o in OFFSETS for s in scales):
            probs[i, -1] += np.exp(-0.5 * ((hi + far - o) / s) ** 2).sum()
            probs[i, 0] += np.exp(-0.5 * ((lo - far - o) / s) ** 2).sum()
    probs /= probs.sum(axis=1, keepdims=True)
    freq = _quantize_probs(probs)
    cum = np.zeros_like(freq)
    cum[:, 1:] = np.cumsum(freq, axis=1)[:, :-1]
    lut = np.zeros((len(freq), PROB_SCALE), dtype=np.uint8)
    for i in range(len(freq)):
        lut[i] = np.repeat(np.arange(alphabet, dtype=np.uint8), freq[i])
    # moments of the ideal tables: the 1/4096 floor of far symbols would swamp a narrow
    # table's variance
    mean = (probs * k).sum(axis=1, keepdims=True)
    var = (probs * (k - mean) ** 2).sum(axis=1)
    # monotone in the scale, which the moment-matching search relies on
    logvar = np.maximum.accumulate(np.log(var).reshape(len(OFFSETS), NSCALES), axis=1)
    return freq.astype(np.uint32), cum.astype(np.uint32), lut, logvar


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


def elements_per_byte(alphabet: int, prob_bits: int = PROB_BITS, state_bits: int = 16,
                      word_bits: int = 16) -> int:
    """The most symbols a *valid* rANS stream can carry per byte (rounded up, plus one).

    Every symbol keeps a frequency of at least 1, so the likeliest has at most
    ``2**prob_bits - (alphabet - 1)``. Decoding a symbol maps a state x >= 2**state_bits to
    ``f * (x >> prob_bits) + (x % 2**prob_bits) - cum``, which shrinks log2(x) by at least
    ``-log2((f*a + 2**p - 1) / (2**p*a + 2**p - 1))`` with ``a = 2**(state_bits -
    prob_bits)``; a refill word adds at most ``word_bits + log2(1 + 1/a)`` bits. A stream
    that ends in its final state therefore carries at most (refill bits) / (shrink bits)
    symbols per word. This is what bounds a cachegen payload's element count
    (``BaseCodec.max_elements_per_byte``).
    """
    p = 1 << prob_bits
    a = 1 << (state_bits - prob_bits)
    f = p - (alphabet - 1)
    shrink = -math.log2((f * a + p - 1) / (p * a + p - 1))
    grow = word_bits + math.log2(1 + 1 / a)
    return math.floor(grow / shrink * 8 / word_bits) + 1


@numba.njit(cache=True, nogil=True)
def _choose(sym, center, logvar, offsets):  # pragma: no cover - compiled
    """Per context, the bank table matching its mean (offset) and variance (scale).

    Moment matching is the maximum-likelihood fit of a Gaussian and needs one streaming
    pass, where scoring tables against histograms cost more than the coding itself.
    """
    g_n, t_n, c_n = sym.shape
    out = np.zeros((g_n, c_n), dtype=np.uint8)
    s1 = np.zeros(c_n, dtype=np.float64)
    s2 = np.zeros(c_n, dtype=np.float64)
    if t_n == 0:
        return out
    for g in range(g_n):
        s1[:] = 0.0
        s2[:] = 0.0
        for t in range(t_n):
            for c in range(c_n):
                d = np.float64(sym[g, t, c]) - center
                s1[c] += d
                s2[c] += d * d
        for c in range(c_n):
            out[g, c] = _pick(s1[c] / t_n, s2[c] / t_n, logvar, offsets)
    return out


@numba.njit(cache=True, nogil=True)
def _symbolize(q, offset, alphabet, center, logvar, offsets):  # pragma: no cover
    """int8 symbols -> (uint8 symbols clamped to the alphabet, table per context, flat
    indices of the clamped ones). One pass does what would otherwise take three.

    The per-row loop is branch-free so it vectorises; rows that had anything outside the
    alphabet (rare) are revisited to record where.
    """
    g_n, t_n, c_n = q.shape
    sym = np.empty((g_n, t_n, c_n), dtype=np.uint8)
    exc = np.empty(1024, dtype=np.int64)
    n_exc = 0
    s1 = np.zeros((g_n, c_n), dtype=np.int64)
    s2 = np.zeros((g_n, c_n), dtype=np.int64)
    top = alphabet - 1
    for g in range(g_n):
        r1 = s1[g]
        r2 = s2[g]
        for t in range(t_n):
            row = q[g, t]
            out = sym[g, t]
            bad = 0
            for c in range(c_n):
                v = np.int64(row[c]) + offset
                bad |= (v < 0) | (v > top)
                v = min(max(v, 0), top)
                out[c] = v
                r1[c] += v
                r2[c] += v * v
            if bad:
                base = (g * t_n + t) * c_n
                for c in range(c_n):
                    v = np.int64(row[c]) + offset
                    if v < 0 or v > top:
                        if n_exc == exc.shape[0]:
                            bigger = np.empty(2 * n_exc, dtype=np.int64)
                            bigger[:n_exc] = exc
                            exc = bigger
                        exc[n_exc] = base + c
                        n_exc += 1
    ctx = _tables_from_moments(s1, s2, t_n, center, logvar, offsets)
    return sym, ctx, exc[:n_exc].copy()


@numba.njit(cache=True, nogil=True)
def _tables_from_moments(s1, s2, t_n, center, logvar, offsets):  # pragma: no cover
    g_n, c_n = s1.shape
    ctx = np.zeros((g_n, c_n), dtype=np.uint8)
    if t_n:
        for g in range(g_n):
            for c in range(c_n):
                m = s1[g, c] / t_n
                ctx[g, c] = _pick(m - center, s2[g, c] / t_n - m * m + (m - center) ** 2,
                                  logvar, offsets)
    return ctx


@numba.njit(cache=True, nogil=True)
def _pick(m, m2, logvar, offsets):  # pragma: no cover - compiled
    """Table whose offset is nearest the mean and whose variance is nearest (in log)."""
    n_off, nsc = logvar.shape
    v = m2 - m * m
    oi = 0
    best = 1e300
    for j in range(n_off):
        e = abs(offsets[j] - m)
        if e < best:
            best = e
            oi = j
    lv = np.log(max(v, 1e-12))
    si = 0
    best = 1e300
    for j in range(nsc):
        e = abs(logvar[oi, j] - lv)
        if e < best:
            best = e
            si = j
    return oi * nsc + si


@numba.njit(inline="always")
def _enc_step(xs, e, inv_f, buf, p):  # pragma: no cover - compiled
    """Push one symbol into state xs; returns (xs, p). ``e`` packs the symbol's cum
    (bits 0-15), 4096 - freq (bits 16-31) and freq (bits 32-): see ``Bank``.

    Branch-free renormalisation: the low word is always written and the write position
    moves only when the state had to shrink (whether it does is a coin flip for the
    branch predictor). x // f is a product with a reciprocal rounded up by 2**-40, which
    is exact here (below), so x' = (x // f) * 4096 + x % f + cum = x + cum + (x // f) *
    (4096 - f) needs no remainder and no correction.
    """
    cond = np.int64(xs >= ((e >> 32) << 20))  # ((L >> PROB_BITS) << 16) * f, L = 2**16
    buf[p - np.uint64(1)] = xs & 0xFFFF
    p -= np.uint64(cond)
    xs >>= cond << 4
    qt = np.int64(np.float64(xs) * inv_f)
    return xs + (e & 0xFFFF) + qt * ((e >> 16) & 0xFFFF), p


@numba.njit(cache=True, nogil=True)
def _encode(sym, ctx, fc, inv, alphabet):  # pragma: no cover - compiled
    """``fc`` and ``inv`` are the bank's tables flattened to ``[table * alphabet + symbol]``,
    freq and cum packed in one word: one load and one index per symbol instead of three
    two-dimensional lookups, which the loop is bound by. Indices are unsigned (uint64):
    numba wraps negative signed indices around, a compare and select per access that
    LLVM cannot drop for an index it cannot prove non-negative."""
    g_n, t_n, c_n = sym.shape
    n = g_n * t_n * c_n
    buf = np.empty(n + 2 * 4 + 8, dtype=np.uint16)
    p = np.uint64(buf.shape[0])
    # states < 2**32 live in int64: signed integers convert to float natively
    x = np.full(4, 1 << 16, dtype=np.int64)
    kb = np.empty(c_n, dtype=np.uint64)
    if c_n % 4 == 0:
        # symbol (g, t, c) belongs to state c % 4: four independent chains per iteration
        x0 = x[0]
        x1 = x[1]
        x2 = x[2]
        x3 = x[3]
        for g in range(g_n - 1, -1, -1):
            for c in range(c_n):
                kb[c] = np.uint64(ctx[g, c]) * np.uint64(alphabet)
            for t in range(t_n - 1, -1, -1):
                row = sym[g, t]
                for c4 in range(c_n // 4 - 1, -1, -1):
                    c = np.uint64(c4 * 4)
                    i = kb[c + np.uint64(3)] + row[c + np.uint64(3)]
                    x3, p = _enc_step(x3, fc[i], inv[i], buf, p)
                    i = kb[c + np.uint64(2)] + row[c + np.uint64(2)]
                    x2, p = _enc_step(x2, fc[i], inv[i], buf, p)
                    i = kb[c + np.uint64(1)] + row[c + np.uint64(1)]
                    x1, p = _enc_step(x1, fc[i], inv[i], buf, p)
                    i = kb[c] + row[c]
                    x0, p = _enc_step(x0, fc[i], inv[i], buf, p)
        x[0] = x0
        x[1] = x1
        x[2] = x2
        x[3] = x3
    else:
        j = n
        for g in range(g_n - 1, -1, -1):
            for t in range(t_n - 1, -1, -1):
                for c in range(c_n - 1, -1, -1):
                    j -= 1
                    lane = j & 3
                    i = np.uint64(ctx[g, c]) * np.uint64(alphabet) + sym[g, t, c]
                    x[lane], p = _enc_step(x[lane], fc[i], inv[i], buf, p)
    q = np.int64(p)
    for lane in range(3, -1, -1):
        q -= 1
        buf[q] = x[lane] >> 16
        q -= 1
        buf[q] = x[lane] & 0xFFFF
    return buf[q:].copy()


@numba.njit(inline="always")
def _dec_step(xs, k, freq, cum, lut, words, p, nw):  # pragma: no cover - compiled
    """Pop one symbol from state xs; returns (symbol, xs, p). Branch-free refill: the
    read position is clamped so a truncated stream never reads out of bounds; the caller
    checks p afterwards. Indices are unsigned, as in the encoder, so numba adds no
    negative-index wraparound to the lookups on the state's dependency chain."""
    slot = np.uint64(xs & (PROB_SCALE - 1))
    s = lut[k, slot]
    xs = np.int64(freq[k, s]) * (xs >> 12) + np.int64(slot) - np.int64(cum[k, s])
    cond = np.int64(xs < (1 << 16))
    w = np.int64(words[min(p, nw)])
    xs = (xs << (cond << 4)) | (w & -cond)
    return s, xs, p + np.uint64(cond)


@numba.njit(cache=True, nogil=True)
def _decode(words, shape_g, shape_t, shape_c, ctx, freq, cum, lut):  # pragma: no cover
    out = np.empty((shape_g, shape_t, shape_c), dtype=np.uint8)
    if words.shape[0] < 8:
        return out, -1
    nw = np.uint64(words.shape[0])
    padded = np.zeros(words.shape[0] + 1, dtype=np.uint16)
    padded[:words.shape[0]] = words
    x = np.empty(4, dtype=np.int64)
    for lane in range(4):
        x[lane] = np.int64(words[2 * lane]) | (np.int64(words[2 * lane + 1]) << 16)
    p = np.uint64(8)
    if shape_c % 4 == 0:
        x0 = x[0]
        x1 = x[1]
        x2 = x[2]
        x3 = x[3]
        for g in range(shape_g):
            kr = ctx[g]
            for t in range(shape_t):
                row = out[g, t]
                for c4 in range(shape_c // 4):
                    c = np.uint64(4 * c4)
                    c1 = c + np.uint64(1)
                    c2 = c + np.uint64(2)
                    c3 = c + np.uint64(3)
                    s, x0, p = _dec_step(x0, kr[c], freq, cum, lut, padded, p, nw)
                    row[c] = s
                    s, x1, p = _dec_step(x1, kr[c1], freq, cum, lut, padded, p, nw)
                    row[c1] = s
                    s, x2, p = _dec_step(x2, kr[c2], freq, cum, lut, padded, p, nw)
                    row[c2] = s
                    s, x3, p = _dec_step(x3, kr[c3], freq, cum, lut, padded, p, nw)
                    row[c3] = s
            if p > nw:
                return out, -1
        x[0] = x0
        x[1] = x1
        x[2] = x2
        x[3] = x3
    else:
        i = 0
        for g in range(shape_g):
            for t in range(shape_t):
                for c in range(shape_c):
                    lane = i & 3
                    i += 1
                    s, x[lane], p = _dec_step(x[lane], ctx[g, c], freq, cum, lut, padded,
                                              p, nw)
                    out[g, t, c] = s
            if p > nw:
                return out, -1
    if p > nw:
        return out, -1
    for lane in range(4):
        if x[lane] != (1 << 16):
            return out, -2
    if p != nw:
        return out, -3
    return out, 0


class Bank:
    """One alphabet's fixed table bank, with the log-costs used to choose tables."""

    def __init__(self, alphabet: int, center: int, tails: bool = False) -> None:
        self.alphabet = alphabet
        self.center = center
        self.freq, self.cum, self.lut, self.logvar = make_bank(alphabet, center, tails)
        # The encoder's flat tables (see _encode, _enc_step): cum | (4096 - freq) << 16 |
        # freq << 32, and 1 / freq raised by a relative 2**-40. With x < freq * 2**20
        # after renormalisation, the float product lies in [x / freq, x / freq + 2**-19)
        # (the raise outweighs the two roundings, 2**-53 relative each), while x / freq is
        # whole or at least 1 / freq >= 2**-12 short of the next integer: truncating it
        # gives exactly x // freq.
        f = self.freq.astype(np.int64)
        self.fc = (self.cum.astype(np.int64) | ((PROB_SCALE - f) << 16) | (f << 32)).ravel()
        self.inv = (1.0 / f.astype(np.float64) * (1.0 + 2.0 ** -40)).ravel()
        self.offsets = np.array(OFFSETS, dtype=np.float64)
        self.ntables = len(self.freq)

    def choose(self, sym: np.ndarray) -> np.ndarray:
        """Table index per context ``[G, C]`` for symbols ``[G, T, C]``."""
        return _choose(np.ascontiguousarray(sym), float(self.center), self.logvar,
                       self.offsets)

    def symbolize(self, q: np.ndarray, offset: int = 0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """int8 ``[G, T, C]`` plus ``offset`` -> (uint8 symbols, tables ``[G, C]``, flat
        indices of the entries that fell outside the alphabet and were clamped)."""
        return _symbolize(np.ascontiguousarray(q), offset, self.alphabet,
                          float(self.center), self.logvar, self.offsets)

    def tables_from_moments(self, s1: np.ndarray, s2: np.ndarray, count: int) -> np.ndarray:
        """Table per context from sums of symbols and of their squares over ``count``."""
        return _tables_from_moments(s1, s2, count, float(self.center), self.logvar,
                                    self.offsets)

    def max_symbols(self, n_words: int) -> int:
        """The most symbols ``n_words`` 16-bit words can carry: every symbol costs at least
        -log2(largest frequency / 4096) bits. Bounds what a decoder allocates for a stream."""
        bits = -np.log2(float(self.freq.max()) / PROB_SCALE)
        return int(16 * n_words / bits) + 64

    def encode(self, sym: np.ndarray, ctx: np.ndarray) -> np.ndarray:
        if sym.size and int(sym.max()) >= self.alphabet:
            raise ValueError("symbol outside the alphabet")
        return _encode(np.ascontiguousarray(sym), np.ascontiguousarray(ctx), self.fc, self.inv,
                       self.alphabet)

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
