"""Mask generators of the MIM recipes (shared/DESIGN.md section 6), batched.

- :class:`BlockwiseMaskingGenerator`: BEiT's blockwise masking (microsoft/unilm
  ``beit/masking_generator.py``): blocks of target area s ~ U(min_num_patches, remaining),
  aspect r = exp(U(log min_aspect, log max_aspect)), h = round(sqrt(s r)), w = round(sqrt(s / r)),
  uniform top-left, accepted when it adds 1..remaining new patches, up to 10 tries per block,
  stop when a block adds nothing. The reference then falls short of the count about one time
  in three; here, as in BEiT v2, missing patches are topped up at random so every mask has
  exactly ``num_masking_patches``. :func:`blockwise_mask_reference` is the reference loop line
  by line (the ground truth of the tests).
- :class:`RandomMaskingGenerator`: MAE's per-sample uniform masking, L - int(L * (1 - ratio))
  patches masked (the same count as ``ops.random_masking``).
- :class:`SimMIMMaskGenerator`: SimMIM's random mask patches (32 px at ratio 0.6 by default),
  ceil(ratio * count) of them, upsampled to the model's patch grid.

Every generator returns numpy bool masks, True = masked: ``gen()`` one (h, w) mask, ``gen(n)``
a batch (n, h, w). ``rng`` is a ``numpy.random.Generator``; without one they draw from
numpy's global RNG, which PyTorch's DataLoader seeds per worker.

How the blockwise generator is fast (256 masks of 14 x 14, 75 masked: about 0.75 ms on one
core of the development machine, where the previous batched version, two then eight tries per
block, took about 1.55 ms; the cost is the number of numpy calls, about 250, and the rounds they
come in, not arithmetic). It samples the reference's law, not its random stream:

- Bit sets and exact tables: see :mod:`mimfast.data._blockwise_law`.
- Rounds. All masks advance together. The first block is drawn at once for every mask: on
  an empty grid a try is accepted iff its shape fits with h w <= L, so the block is a draw from
  the try law restricted to those shapes (all ten tries fail with probability (1 - p)^10). In
  every later round each growing mask draws ``_ROUND_TRIES[k]`` tries at once (2, 3, 5, then
  10: a round costs about as much as a thousand tries, so late rounds, where blocks are
  rarely accepted, try all at once); tries are independent given the mask and a rejected try
  changes nothing, so the first accepted one of the round is the block, exactly as in the
  sequential loop, and tries not accepted count against the block's 10 (tries past them are
  ignored). Masks that are done or failed ride along, accepting nothing, until enough of them
  are dropped. The state is one (words + 2, masks) array, a column per mask (free cells,
  patches to mask, tries left), so the AND with the free cells and the sum of the words'
  popcounts run over long contiguous rows; constants are 0-d arrays, which numpy handles
  faster than Python scalars.
- The long tail. Once few masks still grow (``_SCALAR_BELOW``), each finishes alone in the
  reference's loop with Python ints as bit sets (``int.bit_count``) and the reference's formula
  for the shape, which costs less than a numpy round for a handful of masks (and checks the
  tables: the tests compare both paths with the reference loop).
- Top-up. The missing patches of a short mask are a uniform subset of its free cells: drawn as
  cells one at a time, keeping those neither masked nor drawn before (rejection, exact), all
  short masks at once with a column of candidates each; a mask whose candidates run out or
  repeat a kept cell finishes alone, and when many are missing among few free cells the
  smallest of random keys of the free cells are taken instead.
"""

from __future__ import annotations

import math
import random
from functools import lru_cache

import numpy as np
import torch

from mimfast.data._blockwise_law import _TRIES, _rects, _shape_sampler

__all__ = [
    "BlockwiseMaskingGenerator",
    "RandomMaskingGenerator",
    "SimMIMMaskGenerator",
    "blockwise_mask_reference",
    "ReplayedUniforms",
]

_ROUND_TRIES = (2, 3, 5, 10)  # tries per growing mask in batched rounds 1, 2, ... (then the last)
_COMPACT = 0.8  # done masks are dropped from the batch once fewer than this share still grow
_SCALAR_BELOW = 12  # masks still growing at or below which each finishes alone
_TOP_UP_CANDIDATES = 24.0  # most candidate cells a short mask may expect to draw in the rejection top-up
_TOP_UP_SPARE = 6  # candidates per short mask beyond the expected number for the most missing patches


def _grid(input_size) -> tuple[int, int]:
    if isinstance(input_size, (tuple, list)):
        if len(input_size) != 2:
            raise ValueError(f"input_size must be an int or (height, width), got {input_size!r}")
        h, w = input_size
    else:
        h = w = input_size
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"input_size must hold positive ints, got {input_size!r}")
    return int(h), int(w)


def _uniform(rng, shape) -> np.ndarray:
    return rng.random(shape) if rng is not None else np.random.random_sample(shape)


def _batch_arg(batch_size):
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 0:
        raise ValueError(f"batch_size must be a non-negative int or None, got {batch_size!r}")
    return int(batch_size)


if hasattr(np, "bitwise_count"):
    _popcount8 = np.bitwise_count
else:  # numpy < 2.0
    _POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

    def _popcount8(words):
        b = words.view(np.uint8).reshape(words.shape + (8,))
        return _POP8[b].sum(-1, dtype=np.uint8)


@lru_cache(maxsize=4)
def _round_tries(schedule: tuple) -> list:
    return [(t, np.array(t)) for t in schedule]


def _schedule(schedule: tuple):
    """Tries per mask of batched rounds 1, 2, ...: ``schedule``, then its last entry for ever,
    each with a 0-d array of it."""
    rounds = _round_tries(schedule)
    yield from rounds
    while True:
        yield rounds[-1]


class BlockwiseMaskingGenerator:
    """BEiT's blockwise masking with exactly ``num_masking_patches`` masked patches.

    Args:
        input_size: patch grid, an int (square) or (height, width); 14 for 224 px / 16.
        num_masking_patches: patches masked in every mask (75 in BEiT).
        min_num_patches: least target area of a block (16 in BEiT's recipe).
        max_num_patches: most target area of a block; ``num_masking_patches`` if None.
        min_aspect: least aspect ratio; ``max_aspect`` defaults to ``1 / min_aspect``.
    """

    # masks still growing at or below which each finishes alone (tests move it to force a path)
    _scalar_below = _SCALAR_BELOW

    def __init__(self, input_size=14, num_masking_patches: int = 75, min_num_patches: int = 16,
                 max_num_patches: int | None = None, min_aspect: float = 0.3, max_aspect: float | None = None):
        self.height, self.width = _grid(input_size)
        self.num_patches = self.height * self.width
        if isinstance(num_masking_patches, bool) or not isinstance(num_masking_patches, (int, np.integer)) \
                or not 0 <= num_masking_patches <= self.num_patches:
            raise ValueError(f"num_masking_patches must be an int in [0, {self.num_patches}], "
                             f"got {num_masking_patches!r}")
        if not min_num_patches > 0:
            raise ValueError(f"min_num_patches must be positive, got {min_num_patches!r}")
        max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        if not max_num_patches >= 0:
            raise ValueError(f"max_num_patches must be non-negative, got {max_num_patches!r}")
        if not (min_aspect > 0 and math.isfinite(min_aspect)):
            raise ValueError(f"min_aspect must be positive and finite, got {min_aspect!r}")
        max_aspect = max_aspect or 1 / min_aspect
        if not (max_aspect > 0 and math.isfinite(max_aspect)):
            raise ValueError(f"aspect ratios must be positive and finite, got {min_aspect!r}, {max_aspect!r}")
        self.num_masking_patches = int(num_masking_patches)
        self.min_num_patches = min_num_patches
        self.max_num_patches = max_num_patches
        self.min_aspect, self.max_aspect = min_aspect, max_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        # largest h, w the rule can draw; larger ones (and any >= the grid) are rejected
        s_max = max(min_num_patches, max_num_patches, 1)
        a_max = max(math.exp(self.log_aspect_ratio[0]), math.exp(self.log_aspect_ratio[1]))
        a_min = min(math.exp(self.log_aspect_ratio[0]), math.exp(self.log_aspect_ratio[1]))
        self._max_h = int(math.floor(math.sqrt(s_max * a_max) + 0.5)) + 1
        self._max_w = int(math.floor(math.sqrt(s_max / a_min) + 0.5)) + 1
        self._rects = _rects(self.height, self.width, self._max_h, self._max_w)
        self._shapes = _shape_sampler(self.height, self.width, self._max_h, self._max_w, self.num_masking_patches,
                                      min_num_patches, max_num_patches, *self.log_aspect_ratio)
        # per patches still to mask r = 0..target: the block limit L = min(r, max_num_patches)
        self._limit = np.minimum(np.arange(self.num_masking_patches + 1), max_num_patches).astype(np.float64)

    def __repr__(self) -> str:
        return (f"BlockwiseMaskingGenerator({self.height}x{self.width}, {self.num_masking_patches} masked, "
                f"blocks [{self.min_num_patches} ~ {self.max_num_patches}], log aspect "
                f"{self.log_aspect_ratio[0]:.3f} ~ {self.log_aspect_ratio[1]:.3f})")

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def __call__(self, batch_size: int | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
        """(h, w) bool mask, or (batch_size, h, w) masks; exactly ``num_masking_patches`` True each."""
        n = _batch_arg(batch_size)
        if n is None:  # one mask: the sequential loop is cheaper than a batch step
            seed = int(rng.integers(2**62)) if rng is not None else int(np.random.randint(2**62, dtype=np.int64))
            return blockwise_mask_reference(self.height, self.width, self.num_masking_patches, self.min_num_patches,
                                            self.max_num_patches, self.min_aspect, self.max_aspect,
                                            rng=random.Random(seed))
        return self.generate(n, rng)[0]

    def _first_round(self, st: np.ndarray, random, blocks) -> None:
        """The first block of every mask (all empty), in place on the state ``st`` (see
        :meth:`generate`): a draw from the try law restricted to the shapes accepted on an empty
        grid, unless all ten tries fail."""
        sh, rt = self._shapes, self._rects
        words, n = rt.words, st.shape[1]
        rem = st[words]
        if sh.first_k == 0:  # no shape is ever accepted on an empty grid
            st[words + 1] = 0
            return
        u = random((2, n))  # the block's try (alias column, entry, position), all ten tries fail
        col = u[0]
        col *= sh.first_k
        c = np.floor(col)
        col -= c  # v, the fraction
        c = c.astype(np.intp)
        second = col >= sh.first_split.take(c)
        c += c
        c += second  # the entry
        start_scale = sh.first_start_scale.take(c, axis=1)
        col *= start_scale[1]
        col += start_scale[0]
        rows = col.astype(np.intp)
        got = sh.first_area.take(c)
        if sh.first_fail > 0:
            failed = u[1] < sh.first_fail
            if failed.any():
                rows[failed] = 0  # the empty set
                got[failed] = 0
                st[words + 1, failed] = 0
        if blocks is not None:
            sel = got.nonzero()[0]
            blocks.append((sel, rt.shapes.take(rows.take(sel), axis=0), self._limit.take(rem.take(sel))))
        st[:words].view(np.uint64)[...] ^= rt.rects_t.take(rows, axis=1)
        rem -= got

    def _grow(self, all_st: np.ndarray, random, blocks):
        """Batched rounds on the state ``all_st`` (see :meth:`generate`) until at most
        ``_scalar_below`` masks still grow; returns the state of those (a view) and their indices.

        Round k: ``_ROUND_TRIES[k]`` = T tries for each mask, drawn from its row of the alias
        tables, evaluated together (AND with the free cells, popcount); the first accepted one
        is the block. Masks that are done (nothing to mask) or failed (no tries left) accept
        nothing and ride along until enough of them are dropped. Column 0 of the working state
        is a dummy mask with no free cell that never accepts and never ends: a mask without a
        block this round picks the dummy's first try, the empty set (0 new patches, after the
        wrap-around of new - 1), so nothing needs zeroing. Constants are 0-d arrays: numpy
        handles those faster than Python scalars."""
        sh, rt = self._shapes, self._rects
        split, start_scale_t, cap, rects = sh.split, sh.start_scale, sh.cap_small, rt.rects_t
        k_f, k_i, full, zero, one, minus_one = sh.consts
        words, blocks_on, scalar_below = rt.words, blocks is not None, self._scalar_below
        st = np.empty((words + 2, all_st.shape[1] + 1), dtype=np.int64)
        st[:, 1:] = all_st
        st[:, 0] = 0  # the dummy: no free cell, 1 patch to mask, tries for ever
        st[words, 0], st[words + 1, 0] = 1, 2**62
        ids = np.arange(-1, all_st.shape[1])
        a = ids.size
        a_0, ar = np.array(a), np.arange(a)
        free, rem, left = st[:words].view(np.uint64), st[words], st[words + 1]
        tried = 0  # tries so far: no mask can have run out of them before _TRIES
        for tries, tries_0 in _schedule(_ROUND_TRIES):
            if a <= scalar_below + 1:
                break
            # one uniform per try: alias column, entry and position (see _alias_rows)
            col = random((tries, a))
            col *= k_f
            c = np.floor(col)
            col -= c  # the fraction v
            c = c.astype(np.intp)  # the column in the alias table's row for rem
            c += rem * k_i
            second = col >= split.take(c)
            c += c
            c += second  # the entry
            # top, left = randint(0, H - h), randint(0, W - w): an affine map of v onto the positions
            start_scale = start_scale_t.take(c, axis=1)
            col *= start_scale[1]
            col += start_scale[0]
            pos = col
            sets = rects.take(pos.astype(np.intp), axis=1)  # (words, tries, a)
            sets &= free[:, None, :]
            # new patches of each try, minus 1 (0 wraps around to the dtype's max)
            new = np.add.reduce(_popcount8(sets), axis=0, dtype=cap.dtype, initial=minus_one)
            ok = new < cap.take(rem)  # accepted iff 0 <= new - 1 < cap
            if tries == 1:
                acc = ok[0]
                acc &= left > zero
                pick = ar * acc
            else:
                j = ok.argmax(0)  # the first accepted try (or 0)
                pick = j * a_0
                pick += ar
                acc = ok.ravel().take(pick)
                acc &= j < left  # within the block's tries left
                pick *= acc  # none accepted: the dummy's first try, the empty set
            if blocks_on:
                sel = acc.nonzero()[0]
                blocks.append((ids[sel], rt.shapes.take(pos.ravel().take(pick[sel]).astype(np.intp), axis=0),
                               self._limit.take(rem.take(sel))))
            free ^= sets.reshape(words, -1).take(pick, axis=1)
            got = new.ravel().take(pick)
            got += one
            rem -= got
            left -= tries_0
            np.copyto(left, full, where=acc)  # a new block starts with all its tries
            tried += tries
            if tried < _TRIES:  # only masks with nothing left to mask may have ended: no hurry
                continue
            growing = np.minimum(rem, left) > zero  # a block that adds nothing in 10 tries ends the mask
            still = np.count_nonzero(growing)
            # drop the masks that are done once they are many (until then they ride along)
            if still < _COMPACT * a or still <= scalar_below + 1:
                all_st[:, ids[1:]] = st[:, 1:]
                keep = growing.nonzero()[0]
                st, ids = st.take(keep, axis=1), ids.take(keep)
                free, rem, left = st[:words].view(np.uint64), st[words], st[words + 1]
                a = ids.size
                a_0, ar = np.array(a), ar[:a]
        return st[:, 1:], ids[1:]  # the loop ends after dropping masks: their results are in all_st

    def _finish(self, st: np.ndarray, ids: np.ndarray, rng, blocks) -> None:
        """The reference loop, in place on the state ``st``, for each of the few masks still
        growing, with Python ints as bit sets and the reference's formula for the shape."""
        rt = self._rects
        words = rt.words
        rects, first, npos, tw = rt.rects_py, rt.first_py, rt.npos_py, rt.tw
        height, width = self.height, self.width
        m, max_patches = self.min_num_patches, self.max_num_patches
        lo, hi = self.log_aspect_ratio
        span = hi - lo
        exp, sqrt = math.exp, math.sqrt
        n = ids.size
        raw = np.ascontiguousarray(st[:words].view(np.uint64).T).astype("<u8", copy=False).tobytes()
        rems, lefts = st[words].tolist(), st[words + 1].tolist()
        done = []
        buf, p = [], 0  # uniforms, drawn a chunk at a time
        for i in range(n):
            bits = int.from_bytes(raw[8 * words * i:8 * words * (i + 1)], "little")
            r, tries_left = rems[i], lefts[i]
            while r > 0 and tries_left > 0:
                limit = min(r, max_patches)
                while tries_left > 0:
                    tries_left -= 1
                    if p + 3 > len(buf):
                        buf, p = _uniform(rng, 600).tolist(), 0
                    area = m + buf[p] * (limit - m)
                    aspect = exp(lo + buf[p + 1] * span)
                    u2 = buf[p + 2]
                    p += 3
                    h = round(sqrt(area * aspect))
                    w = round(sqrt(area / aspect))
                    if h < height and w < width:
                        k = h * tw + w
                        add = rects[first[k] + int(u2 * npos[k])] & bits
                        new = add.bit_count()
                        if 0 < new <= limit:
                            bits ^= add
                            r -= new
                            tries_left = _TRIES
                            if blocks is not None:
                                blocks.append((ids[i:i + 1], np.array([[h, w]]), np.array([limit])))
                            break
            done.append(bits.to_bytes(8 * words, "little"))
            rems[i] = r
        st[:words] = np.frombuffer(b"".join(done), dtype="<u8").astype(np.uint64, copy=False).reshape(n, words).T.view(
            np.int64)
        st[words] = rems

    def generate(self, batch_size: int, rng: np.random.Generator | None = None, return_blocks: bool = False):
        """Masks (batch_size, h, w) bool and the count each had before the top-up (int64).

        With ``return_blocks`` also a dict of the accepted blocks: ``sample``, ``h``, ``w`` and
        ``limit`` (the block's ``max_mask_patches``), in acceptance order per sample.
        """
        n = _batch_arg(batch_size)
        rt = self._rects
        target = self.num_masking_patches
        blocks = [] if return_blocks else None
        # the state, a column per mask: free cells (words, as int64), patches still to mask, tries
        # left for the current block
        words = rt.words
        st = np.empty((words + 2, n), dtype=np.int64)
        st[:words] = rt.grid.view(np.int64)[:, None]
        st[words] = target
        st[words + 1] = _TRIES
        random = rng.random if rng is not None else np.random.random_sample
        if target > 0 and n > 0:
            grow, ids = st, np.arange(n)
            if n > self._scalar_below:
                self._first_round(st, random, blocks)  # all masks empty
                grow, ids = self._grow(st, random, blocks)
            if ids.size:
                self._finish(grow, ids, rng, blocks)
            if grow is not st:
                st[:, ids] = grow

        bits = np.invert(st[:words].view(np.uint64))
        bits &= rt.grid[:, None]
        bits = np.ascontiguousarray(bits.T).astype("<u8", copy=False)  # (n, words)
        masks = np.unpackbits(bits.view(np.uint8), bitorder="little").view(bool).reshape(n, 64 * words)
        count = target - st[words]
        self._top_up(masks, count, rng)
        masks = masks[:, :self.num_patches].reshape(n, self.height, self.width)  # a copy
        if blocks is None:
            return masks, count
        if blocks:
            sample = np.concatenate([b[0] for b in blocks])
            shape = np.concatenate([b[1] for b in blocks])
            lim = np.concatenate([b[2] for b in blocks])
            order = np.argsort(sample, kind="stable")
            info = {"sample": sample[order], "h": shape[order, 0], "w": shape[order, 1],
                    "limit": lim[order].astype(np.int64)}
        else:
            info = {k: np.zeros(0, dtype=np.int64) for k in ("sample", "h", "w", "limit")}
        return masks, count, info

    def torch_masks(self, batch_size: int, device="cuda", generator: torch.Generator | None = None,
                    backend: str = "auto", return_stats: bool = False):
        """(batch_size, h, w) bool masks as a torch tensor on ``device``, generated there.

        On CUDA (or the Triton interpreter) a kernel runs the reference's loop for every mask at
        once, one program per mask, on uniforms drawn with ``generator``
        (:mod:`mimfast.kernels.blockwise_mask`); elsewhere the numpy generator runs, seeded from
        ``generator``. ``backend`` forces one (see :mod:`mimfast.backend`). With
        ``return_stats`` also the counts before the top-up and the (h, w) of each first block
        (Triton path only; None on the numpy path).
        """
        from mimfast.backend import resolve

        n = _batch_arg(batch_size)
        device = torch.device(device)
        fits = self.num_patches <= 4096
        which = resolve(backend if fits or backend != "auto" else "eager", torch.empty(0, device=device),
                        op="blockwise masks")
        if which == "eager":
            seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
            masks, _ = self.generate(n, np.random.default_rng(seed))
            masks = torch.from_numpy(masks).to(device)
            return (masks, None, None) if return_stats else masks
        from mimfast.kernels.blockwise_mask import blockwise_masks

        tries = _TRIES * (self.num_masking_patches + 1)  # enough: each block adds a patch or ends the mask
        uniforms = torch.rand(n, tries, 4, device=device, generator=generator)
        keys = torch.rand(n, self.num_patches, device=device, generator=generator)
        masks, counts, first = blockwise_masks(uniforms, keys, self.height, self.width, self.num_masking_patches,
                                               self.min_num_patches, min(self.max_num_patches, self.num_patches),
                                               self.log_aspect_ratio)
        masks = masks.view(n, self.height, self.width)
        return (masks, counts, first) if return_stats else masks

    def _top_up(self, masks: np.ndarray, count: np.ndarray, rng) -> None:
        """Mask ``target - count`` more patches of each short mask (rows of ``masks`` (n, stride),
        cells in the first ``num_patches`` columns), a uniform subset of its unmasked cells (BEiT
        v2's fix-up). Counts never exceed the target (a block may add at most the rest).

        Few missing patches (the usual case): rejection. Drawing uniform cells one at a time and
        keeping those neither masked nor kept before, until enough are kept, picks a uniform
        subset. All short masks draw a column of candidates at once and keep the first ``need``
        that were free before: the sequential draw, unless the column runs out or a cell is
        kept twice. Such a mask has still kept distinct free cells of a prefix of its candidates,
        as the sequential draw would have, and what it misses is a uniform subset of the cells
        still free (:meth:`_top_up_keys`, one mask at a time: this is rare). Many missing
        patches among few free cells: :meth:`_top_up_keys` for those masks.
        """
        cells, target, stride = self.num_patches, self.num_masking_patches, masks.shape[1]
        short = (count < target).nonzero()[0]
        if not short.size:
            return
        need = target - count.take(short)
        # a mask missing `need` draws about need * per candidates (free cells: cells - target + need)
        per = cells / (cells - target + 1)
        if int(need.max()) * per > _TOP_UP_CANDIDATES:
            many = need * per > _TOP_UP_CANDIDATES
            self._top_up_keys(masks, short[many], need[many], rng)
            short, need = short[~many], need[~many]
            if not short.size:
                return
        flat = masks.reshape(-1)
        cand = _uniform(rng, (max(1, int(per * int(need.max())) + _TOP_UP_SPARE), short.size))  # (< 256) per mask
        cand *= np.array(float(cells))  # (0-d arrays: faster than Python scalars)
        cand = cand.astype(np.intp)  # < cells
        offset = short * np.array(stride)
        cand += offset
        keep = flat.take(cand)
        np.invert(keep, out=keep)  # free before
        kept = np.add.accumulate(keep.view(np.uint8), axis=0, dtype=np.uint8)
        keep &= kept <= need
        picked = cand[keep]
        flat[picked] = True
        again = set(short[kept[-1] < need].tolist())  # ran out of candidates
        if picked.size > 1:
            picked.sort()
            twice = picked[1:][picked[1:] == picked[:-1]]  # kept twice
            if twice.size:
                again.update((twice // stride).tolist())
        for row in sorted(again):
            m = masks[row, :cells]
            free = (~m).nonzero()[0]
            k = target - (cells - free.size)
            if k < free.size:  # the k smallest of random keys
                free = free.take(np.argpartition(_uniform(rng, free.size), k - 1)[:k])
            m[free] = True

    def _top_up_keys(self, masks: np.ndarray, rows: np.ndarray, need: np.ndarray, rng) -> None:
        """The top-up of masks ``rows``: the ``need`` free cells of smallest random keys."""
        sub = masks[rows, :self.num_patches]
        keys = _uniform(rng, sub.shape)
        keys[sub] = 2.0  # masked cells sort last
        # the `need` smallest keys among unmasked cells: a uniform subset without replacement
        kmax = int(need.max())
        smallest = np.partition(keys, kmax - 1, axis=1)[:, :kmax]
        smallest.sort(axis=1)
        threshold = smallest[np.arange(rows.size), need - 1]
        masks[rows, :self.num_patches] = sub | (keys <= threshold[:, None])


def blockwise_mask_reference(height: int, width: int, num_masking_patches: int, min_num_patches: int = 16,
                             max_num_patches: int | None = None, min_aspect: float = 0.3,
                             max_aspect: float | None = None, rng: random.Random | None = None,
                             exact: bool = True, blocks: list | None = None) -> np.ndarray:
    """microsoft/unilm ``beit/masking_generator.py`` ``MaskingGenerator.__call__``, line by line
    (``np.int`` -> ``np.int64``), then BEiT v2's top-up when ``exact``. Slow; for tests.

    ``blocks``, when a list, receives (h, w, max_mask_patches) of each accepted block.
    """
    rng = rng or random
    max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
    max_aspect = max_aspect or 1 / min_aspect
    log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
    mask = np.zeros(shape=(height, width), dtype=np.int64)

    def _mask(max_mask_patches):
        delta = 0
        for _attempt in range(_TRIES):
            target_area = rng.uniform(min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < width and h < height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                num_masked = mask[top: top + h, left: left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                    if blocks is not None:
                        blocks.append((h, w, max_mask_patches))
            if delta > 0:
                break
        return delta

    mask_count = 0
    while mask_count < num_masking_patches:
        max_mask_patches = min(num_masking_patches - mask_count, max_num_patches)
        delta = _mask(max_mask_patches)
        if delta == 0:
            break
        mask_count += delta
    if exact and mask_count < num_masking_patches:  # BEiT v2
        free = np.flatnonzero(mask.ravel() == 0)
        pick = rng.sample(list(free), num_masking_patches - mask_count)
        mask.ravel()[pick] = 1
    return mask.astype(bool)


class ReplayedUniforms:
    """A stand-in for Python's ``random`` that makes :func:`blockwise_mask_reference` replay
    pre-drawn uniforms the way the GPU generator (:mod:`mimfast.kernels.blockwise_mask`) reads
    them: try t takes u[t, 0] (area), u[t, 1] (aspect), u[t, 2] (top), u[t, 3] (left); the
    top-up takes the free cells with the smallest keys. ``u`` (tries, 4) and ``keys`` (cells,)
    are numpy arrays (or tensors, converted)."""

    def __init__(self, u, keys):
        if isinstance(u, torch.Tensor):
            u = u.double().cpu().numpy()
        if isinstance(keys, torch.Tensor):
            keys = keys.double().cpu().numpy()
        self.u, self.keys = u, keys
        self.t = -1  # the try being replayed
        self.uniform_calls = self.randint_calls = 0

    def uniform(self, a, b):  # area, then aspect: one pair per try
        if self.uniform_calls % 2 == 0:
            self.t += 1
        slot = self.uniform_calls % 2
        self.uniform_calls += 1
        return a + (b - a) * self.u[self.t, slot]

    def randint(self, a, b):  # top, then left, only for tries whose shape fits
        slot = 2 + self.randint_calls % 2
        self.randint_calls += 1
        return a + int(self.u[self.t, slot] * (b - a + 1))

    def sample(self, population, k):
        return sorted(population, key=lambda i: self.keys[i])[:k]


class RandomMaskingGenerator:
    """MAE's per-sample uniform masking: L - int(L * (1 - mask_ratio)) patches masked.

    Args:
        input_size: patch grid, an int (square) or (height, width).
        mask_ratio: share of patches to mask, in [0, 1).
    """

    def __init__(self, input_size=14, mask_ratio: float = 0.75):
        self.height, self.width = _grid(input_size)
        self.num_patches = self.height * self.width
        if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) \
                or not math.isfinite(mask_ratio) or not 0 <= mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio!r}")
        self.mask_ratio = float(mask_ratio)
        self.num_masking_patches = self.num_patches - int(self.num_patches * (1 - self.mask_ratio))

    def __repr__(self) -> str:
        return f"RandomMaskingGenerator({self.height}x{self.width}, {self.num_masking_patches} masked)"

    def __call__(self, batch_size: int | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
        n = _batch_arg(batch_size)
        noise = _uniform(rng, (1 if n is None else n, self.num_patches))
        # as the reference: small noise is kept; the L - K largest are masked
        order = np.argsort(noise, axis=1)
        masks = np.zeros(noise.shape, dtype=bool)
        np.put_along_axis(masks, order[:, self.num_patches - self.num_masking_patches:], True, axis=1)
        masks = masks.reshape(-1, self.height, self.width)
        return masks[0] if n is None else masks


class SimMIMMaskGenerator:
    """SimMIM's mask (microsoft/SimMIM ``data/data_simmim.py`` ``MaskGenerator``): a random
    ``ceil(count * mask_ratio)`` of the ``mask_patch_size`` cells, upsampled to the model's grid.

    Args:
        input_size: image side in pixels (an int, or (height, width)).
        mask_patch_size: side of a mask cell in pixels (32).
        model_patch_size: the model's patch side in pixels (16 for ViT-B/16).
        mask_ratio: share of mask cells masked (0.6).
    """

    def __init__(self, input_size=224, mask_patch_size: int = 32, model_patch_size: int = 16,
                 mask_ratio: float = 0.6):
        h, w = _grid(input_size)
        for name, v in (("mask_patch_size", mask_patch_size), ("model_patch_size", model_patch_size)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if h % mask_patch_size or w % mask_patch_size:
            raise ValueError(f"input_size {h}x{w} is not a multiple of mask_patch_size={mask_patch_size}")
        if mask_patch_size % model_patch_size:
            raise ValueError(f"mask_patch_size={mask_patch_size} is not a multiple of "
                             f"model_patch_size={model_patch_size}")
        if not (math.isfinite(mask_ratio) and 0 <= mask_ratio <= 1):
            raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio!r}")
        self.rand_size = (h // int(mask_patch_size), w // int(mask_patch_size))
        self.scale = int(mask_patch_size // model_patch_size)
        self.token_count = self.rand_size[0] * self.rand_size[1]
        self.mask_count = int(np.ceil(self.token_count * mask_ratio))
        self.height, self.width = self.rand_size[0] * self.scale, self.rand_size[1] * self.scale
        self.num_masking_patches = self.mask_count * self.scale * self.scale

    def get_shape(self) -> tuple[int, int]:
        """The model's patch grid (h, w) the masks cover."""
        return self.height, self.width

    def __repr__(self) -> str:
        return (f"SimMIMMaskGenerator({self.rand_size[0]}x{self.rand_size[1]} cells of {self.scale}x{self.scale} "
                f"patches, {self.mask_count} masked)")

    def __call__(self, batch_size: int | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
        n = _batch_arg(batch_size)
        keys = _uniform(rng, (1 if n is None else n, self.token_count))
        idx = np.argsort(keys, axis=1)[:, : self.mask_count]  # a uniform random subset, as permutation[:count]
        cells = np.zeros(keys.shape, dtype=bool)
        np.put_along_axis(cells, idx, True, axis=1)
        cells = cells.reshape(-1, *self.rand_size)
        masks = cells.repeat(self.scale, axis=1).repeat(self.scale, axis=2)
        return masks[0] if n is None else masks
