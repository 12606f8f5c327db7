"""The tables behind :class:`~mimfast.data.masking_generators.BlockwiseMaskingGenerator`:
every rectangle BEiT's blockwise rule can draw as a bit set, and the exact law of a try's
block shape as Walker alias tables, so a try costs one uniform and a few lookups.

- Bit sets. A mask is a set of 4 x 64 bits (grids up to 256 cells; more words for larger
  grids) and every rectangle the rule can draw is precomputed as such a set (one row of a
  table per shape and top-left corner), so a try is a row lookup, an AND with the free cells
  and a popcount.
- Tries from exact tables, one uniform each. A try's shape depends only on the block's limit
  L = min(patches still to mask, max_num_patches): (x, y) = (sqrt(s r), sqrt(s / r)) for
  s ~ U(m, L), log r ~ U(lo, hi), and (h, w) = (round x, round y). In t = log s the cell of
  (h, w) is 2 log(h -+ 1/2) <= t + log r < ..., 2 log(w -+ 1/2) <= t - log r < ..., a region
  bounded by lines, so its probability is an integral of e^t times a piecewise linear width,
  done in closed form between the breakpoints (:func:`_shape_law`; s = m and lo = hi have their
  own closed forms). For every L these probabilities (shapes that do not fit the grid pooled as
  "rejected", the empty set) become a Walker alias table (:func:`_alias_rows`): the integer part
  of K u picks a column, its fraction v picks one of the column's two shapes and, by an affine
  map of the shape's part of [0, 1), one of its top-left corners uniformly, as randint's two
  draws. That replaces an exp, two square roots, the rounding and three uniforms by a few
  lookups on one uniform; the law is the reference's up to float rounding (about 1e-15 per
  rectangle: v has 45 bits, and no map subtracts big numbers).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

_TRIES = 10  # per block, as the reference


class _Rects:
    """Every rectangle the rule can accept, as bit sets over the row-major grid.

    ``rects`` (R, words) uint64: rectangle of shape (h, w) at position p in [0, (H-h+1)(W-w+1))
    is row ``first[h * (max_w + 1) + w] + p``; shapes the rule rejects (h >= H or w >= W, or h or
    w == 0) have npos 0 and point at row 0, the empty set. Each shape has one extra copy of its
    last rectangle, so a float rounding of ``first + u * npos`` up to ``first + npos`` still lands
    on that shape. ``shapes[i]`` is (h, w) of row i; ``grid`` the set of all cells.
    ``rects_py``, ``first_py``, ``npos_py``: the same as Python ints and lists (scalar path).
    """

    def __init__(self, height: int, width: int, max_h: int, max_w: int):
        cells = height * width
        words = max(4, -(-cells // 64))
        words += (-words) % 4  # popcounts are summed four words at a time
        tw = max_w + 1
        first = np.zeros((max_h + 1) * tw, dtype=np.int64)
        npos = np.zeros((max_h + 1) * tw, dtype=np.int64)
        chunks = [np.zeros((1, words * 64), dtype=bool)]
        shapes = [np.zeros((1, 2), dtype=np.int64)]
        n = 1
        rr = np.arange(height)[:, None]
        cc = np.arange(width)[None, :]
        for h in range(1, min(max_h, height - 1) + 1):
            for w in range(1, min(max_w, width - 1) + 1):
                tops, lefts = np.meshgrid(np.arange(height - h + 1), np.arange(width - w + 1), indexing="ij")
                tops, lefts = tops.ravel(), lefts.ravel()
                tops = np.append(tops, tops[-1])
                lefts = np.append(lefts, lefts[-1])
                inside = ((rr >= tops[:, None, None]) & (rr < tops[:, None, None] + h)
                          & (cc >= lefts[:, None, None]) & (cc < lefts[:, None, None] + w))  # (P+1, H, W)
                bits = np.zeros((inside.shape[0], words * 64), dtype=bool)
                bits[:, :cells] = inside.reshape(inside.shape[0], cells)
                first[h * tw + w] = n
                npos[h * tw + w] = inside.shape[0] - 1
                chunks.append(bits)
                shapes.append(np.broadcast_to(np.array([[h, w]]), (inside.shape[0], 2)))
                n += inside.shape[0]
        packed = np.packbits(np.concatenate(chunks), axis=1, bitorder="little")  # (R, words * 8) bytes
        grid = np.zeros((1, words * 64), dtype=bool)
        grid[0, :cells] = True
        self.words, self.tw = words, tw
        self.rects = np.ascontiguousarray(packed.view("<u8").astype(np.uint64))  # (R, words)
        self.rects_t = np.ascontiguousarray(self.rects.T)  # (words, R)
        self.grid = np.packbits(grid, axis=1, bitorder="little").view("<u8").astype(np.uint64)[0]
        self.shapes = np.concatenate(shapes)
        self.first, self.npos = first, npos
        self.rects_py = [int.from_bytes(row.tobytes(), "little") for row in packed]
        self.first_py, self.npos_py = first.tolist(), npos.tolist()


@lru_cache(maxsize=8)
def _rects(height: int, width: int, max_h: int, max_w: int) -> _Rects:
    return _Rects(height, width, max_h, max_w)


def _shape_law(max_h: int, max_w: int, m: float, limits, lo: float, hi: float) -> np.ndarray:
    """(len(limits), (max_h + 1) (max_w + 1)): entry [i, h * (max_w + 1) + w] is the probability
    that one try with block limit L = ``limits[i]`` draws the shape (h, w) = (round(sqrt(s r)),
    round(sqrt(s / r))), s ~ U(m, L), log r ~ U(lo, hi) (either bound may be the larger).

    With t = log s and l = log r the shape is (h, w) iff a0 <= t + l < a1 and b0 <= t - l < b1
    (a = 2 log(h -+ 1/2), b = 2 log(w -+ 1/2)). s has density 1 / |L - m|, so the probability
    is the integral over t of e^t times the length of the l-interval where this holds, divided
    by |L - m| |hi - lo|. That length is max(0, min(l_hi, a1 - t, t - b0) - max(l_lo, a0 - t,
    t - b1)): linear between the points where two of those lines cross, so each piece
    integrates in closed form. Rows with L < 1 (nothing can be accepted) are left zero.
    """
    hs = np.repeat(np.arange(max_h + 1), max_w + 1).astype(np.float64)
    ws = np.tile(np.arange(max_w + 1), max_h + 1).astype(np.float64)
    with np.errstate(divide="ignore"):  # h = 0: x in [0, 1/2), log x from -inf
        a0 = 2 * np.log(np.maximum(hs - 0.5, 0.0))[:, None]
        b0 = 2 * np.log(np.maximum(ws - 0.5, 0.0))[:, None]
    a1 = 2 * np.log(hs + 0.5)[:, None]
    b1 = 2 * np.log(ws + 0.5)[:, None]
    l_lo, l_hi = min(lo, hi), max(lo, hi)

    def width(t):  # length of {l in [l_lo, l_hi]: the shape's conditions hold at t}
        up = np.minimum(np.minimum(l_hi, a1 - t), t - b0)
        down = np.maximum(np.maximum(l_lo, a0 - t), t - b1)
        return np.maximum(up - down, 0.0)

    with np.errstate(invalid="ignore"):  # where two of the six lines cross (-inf where h or w = 0)
        cross = np.concatenate([a0 - l_lo, a0 - l_hi, a1 - l_lo, a1 - l_hi, b0 + l_lo, b0 + l_hi, b1 + l_lo,
                                b1 + l_hi, (a0 + b0) / 2, (a0 + b1) / 2, (a1 + b0) / 2, (a1 + b1) / 2], axis=1)
    out = np.zeros((len(limits), hs.size))
    limits = np.asarray(limits, dtype=np.float64)
    general = np.flatnonzero((limits >= 1) & (limits != m)) if l_hi > l_lo else np.zeros(0, dtype=np.intp)
    chunk = max(1, 2**20 // (14 * hs.size))
    for i in range(0, general.size, chunk):  # several limits at once: (limits, shapes, points)
        rows = general[i:i + chunk]
        t_lo = np.minimum(math.log(m), np.log(limits[rows]))[:, None, None]
        t_hi = np.maximum(math.log(m), np.log(limits[rows]))[:, None, None]
        shape = (rows.size, hs.size, 1)
        pts = np.concatenate([np.clip(cross, t_lo, t_hi), np.broadcast_to(t_lo, shape), np.broadcast_to(t_hi, shape)],
                             axis=2)
        pts.sort(axis=2)
        w = width(pts)
        t0, d = pts[..., :-1], np.diff(pts, axis=2)
        w0, w1 = w[..., :-1], w[..., 1:]
        with np.errstate(invalid="ignore", divide="ignore"):
            # integral over [t0, t0 + d] of e^t (w0 + (w1 - w0) (t - t0) / d)
            em1 = np.expm1(d)
            part = np.exp(t0) * (w0 * em1 + (w1 - w0) * (em1 + 1 - em1 / d))
        out[rows] = np.where(d > 0, part, 0.0).sum(2) / ((np.exp(t_hi) - np.exp(t_lo))[:, :, 0] * (l_hi - l_lo))
    for i, limit in enumerate(limits):
        t_lo, t_hi = sorted((math.log(m), math.log(max(limit, 1))))
        if limit < 1 or (l_hi > l_lo and t_hi > t_lo):
            continue  # nothing can be accepted (any law will do), or done above
        if l_hi > l_lo:  # s = m exactly
            out[i] = width(np.full((hs.size, 1), t_lo))[:, 0] / (l_hi - l_lo)
        elif t_hi > t_lo:  # log r = lo exactly: an interval of t
            a = np.maximum(np.maximum(t_lo, a0 - l_lo), b0 + l_lo)[:, 0]
            b = np.minimum(np.minimum(t_hi, a1 - l_lo), b1 + l_lo)[:, 0]
            out[i] = np.where(b > a, np.exp(b) - np.exp(np.minimum(a, b)), 0.0) / (math.exp(t_hi) - math.exp(t_lo))
        else:  # both fixed: one shape
            h = round(math.sqrt(m * math.exp(lo)))
            w = round(math.sqrt(m / math.exp(lo)))
            out[i, h * (max_w + 1) + w] = 1.0
    return out


def _alias_table(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker's alias table of the law ``p`` (K,): column c = floor(K u) is outcome c when a
    second uniform is < ``threshold[c]``, else ``alias[c]`` (Vose's construction)."""
    k = p.size
    q = (p * (k / p.sum())).tolist()
    threshold = [1.0] * k
    alias = list(range(k))
    small = [i for i in range(k) if q[i] < 1.0]
    large = [i for i in range(k) if q[i] >= 1.0]
    while small and large:
        s, g = small.pop(), large.pop()
        threshold[s], alias[s] = q[s], g
        q[g] -= 1.0 - q[s]
        (small if q[g] < 1.0 else large).append(g)
    return np.array(threshold), np.array(alias, dtype=np.intp)  # leftovers (rounding) keep threshold 1


class _ShapeSampler:
    """Alias tables of the try law for every number r = 0..target of patches still to mask.

    A try of a mask with r to go, from one uniform u (see :func:`_alias_rows`): column
    ``c = floor(K u) + r K``, v = K u - floor(K u); entry ``e = 2 c`` if ``v < split[c]`` else
    ``2 c + 1``; its rectangle is row ``floor(start[e] + v scale[e])`` of the rectangle table
    (row 0, the empty set, for the pooled rejected shapes). ``cap[r]``: the most new patches a
    block may add, floor(min(r, max_num_patches)).

    The first block (empty grid, r = target): a try is accepted iff its shape fits with
    h w <= cap, so the block is a draw from the try law restricted to those shapes (the
    ``first_*`` tables, same layout with K1 columns), and all ten tries fail with probability
    ``first_fail`` = (1 - p)^10."""

    def __init__(self, rects: _Rects, height, width, max_h, max_w, target, m, max_patches, lo, hi):
        tw = max_w + 1
        limits = np.minimum(np.arange(target + 1), max_patches).astype(np.float64)
        law = _shape_law(max_h, max_w, m, limits, lo, hi)  # (target + 1, shapes)
        hh, ww = np.divmod(np.arange(law.shape[1]), tw)
        fit = np.flatnonzero((hh >= 1) & (hh < height) & (ww >= 1) & (ww < width))
        p = np.zeros((target + 1, fit.size + 1))
        p[:, :-1] = law[:, fit]
        p[:, -1] = np.maximum(1.0 - p[:, :-1].sum(1), 0.0)  # shapes that do not fit, pooled
        p[limits < 1] = 0.0
        p[limits < 1, -1] = 1.0
        first = np.append(rects.first[fit], 0).astype(np.float64)
        npos = np.append(rects.npos[fit], 0).astype(np.float64)
        self.k, self.split, start, scale, self.outcome = _alias_rows(p, first, npos)
        self.start_scale = np.stack([start, scale])  # (2, 2 rows): one lookup for both
        self.rows = self.split.size
        self.law = p  # (target + 1, K): the fitting shapes' probabilities, then "rejected"
        self.fit = fit
        cap = np.floor(limits).astype(np.int64)
        self.cap = cap
        # popcounts of a try's new patches (< cells) in uint8 where they fit; a block never adds
        # more than that, so the cap is clipped there
        count_dtype = np.uint8 if height * width < 256 else np.uint16 if height * width < 65536 else np.uint32
        self.cap_small = np.minimum(cap, np.iinfo(count_dtype).max).astype(count_dtype)
        # 0-d constants of the batched rounds (see BlockwiseMaskingGenerator._grow)
        self.consts = (np.array(float(self.k)), np.array(self.k), np.array(_TRIES), np.array(0),
                       np.ones((), count_dtype), np.iinfo(count_dtype).max)
        # the first block: shapes that fit with h w <= cap
        area = hh[fit] * ww[fit]
        p1 = np.where(area <= cap[target], law[target, fit], 0.0) if target > 0 else np.zeros(fit.size)
        p_acc = min(float(p1.sum()), 1.0)
        self.first_fail = math.exp(_TRIES * math.log1p(-p_acc)) if p_acc < 1 else 0.0
        self.first_k = 0
        if p_acc > 0:
            self.first_k, self.first_split, start, scale, self.first_outcome = _alias_rows(
                p1[None, :], first[:-1], npos[:-1])
            self.first_start_scale = np.stack([start, scale])
            self.first_area = area[self.first_outcome].astype(np.int64)


def _alias_rows(p: np.ndarray, first: np.ndarray, npos: np.ndarray):
    """Alias tables of the laws ``p`` (n, K) over outcomes whose rectangles are the rows
    [first, first + npos) of the rectangle table, for sampling a try from one uniform.

    Column c = floor(K u) (plus the law's row times K) holds two outcomes, the fraction
    v = K u - floor(K u) picks one and its rectangle: entry 2c on v in [0, split[c]), entry
    2c + 1 on [split[c], 1), and the rectangle is row floor(start[e] + v scale[e]), an affine map
    of the entry's part of [0, 1) onto its positions. The shorter part comes first, so the
    longer one (at least 1/2 long) has scale <= 2 npos and start is never a difference of big
    numbers. Returns K, split (n K,), start, scale and outcome (2 n K,)."""
    n, k = p.shape
    threshold = np.empty(p.shape)
    other = np.empty(p.shape, dtype=np.intp)
    for r in range(n):
        threshold[r], other[r] = _alias_table(p[r])
    threshold, other = threshold.ravel(), other.ravel()
    own = np.tile(np.arange(k), n)
    swap = threshold > 0.5  # the alias's part is the shorter: it comes first
    split = np.where(swap, 1.0 - threshold, threshold)
    outcome = np.stack([np.where(swap, other, own), np.where(swap, own, other)], 1).ravel()
    part = np.stack([split, 1.0 - split], 1).ravel()  # length of each entry's part of [0, 1)
    offset = np.stack([np.zeros_like(split), split], 1).ravel()  # where it starts
    n_pos = npos[outcome]
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(part > 0, n_pos / part, 0.0)
    start = first[outcome] - offset * scale
    return k, split, start, scale, outcome


@lru_cache(maxsize=8)
def _shape_sampler(*key) -> _ShapeSampler:
    height, width, max_h, max_w = key[:4]
    return _ShapeSampler(_rects(height, width, max_h, max_w), *key)
