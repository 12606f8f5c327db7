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

How the blockwise generator is fast: all masks of a batch advance together, one block per
step. A mask is a set of 4 x 64 bits (grids up to 256 cells; more words for larger grids) and
every rectangle the rule can draw is precomputed as such a set, so a try is a table lookup, an
AND-NOT and a popcount. The ten tries of a block are independent given the mask (a rejected
try changes nothing), so two tries of every growing mask are drawn and evaluated at once, the
other eight only for the masks whose two failed, and the first accepted try wins, exactly as
in the sequential loop. Rectangles are drawn from uniforms as the reference draws them.
"""

from __future__ import annotations

import math
import random
from functools import lru_cache

import numpy as np
import torch

__all__ = [
    "BlockwiseMaskingGenerator",
    "RandomMaskingGenerator",
    "SimMIMMaskGenerator",
    "blockwise_mask_reference",
]

_TRIES = 10  # per block, as the reference
_FIRST_TRIES = 2  # drawn for every mask; the rest only where these fail


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


@lru_cache(maxsize=8)
def _rect_table(height: int, width: int, max_h: int, max_w: int):
    """Every rectangle the rule can accept, as bit sets over the row-major grid.

    Returns (first, npos, rects, shape): rectangle of shape (h, w) at position p in
    [0, (H-h+1)(W-w+1)) is ``rects[first[h * (max_w + 1) + w] + p]``; shapes the rule rejects
    (h >= H or w >= W, or h or w == 0) have npos 0 and point at row 0, the empty set. Each
    shape has one extra copy of its last rectangle, so a float rounding of ``u * npos`` up to
    ``npos`` still lands on that shape. ``shape[i]`` is (h, w) of row i.
    """
    cells = height * width
    words = max(4, -(-cells // 64))
    words += (-words) % 4  # popcounts are summed four words at a time
    tw = max_w + 1
    first = np.zeros((max_h + 1) * tw, dtype=np.float64)
    npos = np.zeros((max_h + 1) * tw, dtype=np.float64)
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
    rects = np.packbits(np.concatenate(chunks), axis=1, bitorder="little").view(np.uint64)
    return first, npos, np.ascontiguousarray(rects), np.concatenate(shapes)


def _popcount_rows(sets: np.ndarray) -> np.ndarray:
    """Number of set bits in each (..., words) set, words a multiple of 4; int64."""
    c = _popcount8(sets)  # (..., words) uint8, each <= 64
    # four byte counts (<= 256 only if 256 consecutive cells are set, impossible for w < W)
    # summed by one multiply: view as uint32, times 0x01010101, top byte
    s = ((c.view(np.uint32) * np.uint32(0x01010101)) >> np.uint32(24)).astype(np.int64)
    return s.sum(-1) if s.shape[-1] > 1 else s[..., 0]


class BlockwiseMaskingGenerator:
    """BEiT's blockwise masking with exactly ``num_masking_patches`` masked patches.

    Args:
        input_size: patch grid, an int (square) or (height, width); 14 for 224 px / 16.
        num_masking_patches: patches masked in every mask (75 in BEiT).
        min_num_patches: least target area of a block (16 in BEiT's recipe).
        max_num_patches: most target area of a block; ``num_masking_patches`` if None.
        min_aspect: least aspect ratio; ``max_aspect`` defaults to ``1 / min_aspect``.
    """

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
        self._first, self._npos, self._rects, self._shapes = _rect_table(
            self.height, self.width, self._max_h, self._max_w)

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

    def _tries(self, cur: np.ndarray, limit: np.ndarray, tries: int, rng):
        """``tries`` draws of a rectangle for each of A masks ``cur`` (A, words) with at most
        ``limit`` (A,) patches to add; the first accepted one of each mask.

        Returns (ok (A,) whether a try was accepted, new (A,) patches it adds, its set
        (A, words), its row in the rectangle table (A,))."""
        a = limit.shape[0]
        u = _uniform(rng, (3, a, tries))
        lo, hi = self.log_aspect_ratio
        # random.uniform(a, b) = a + (b - a) * random(), as the reference draws both
        target_area = self.min_num_patches + u[0] * (limit - self.min_num_patches)[:, None]
        aspect = np.exp(lo + u[1] * (hi - lo))
        h = np.rint(np.sqrt(target_area * aspect))  # round half to even, as Python's round()
        w = np.rint(np.sqrt(target_area / aspect))
        k = (h * (self._max_w + 1) + w).astype(np.intp)  # h <= _max_h, w <= _max_w by construction
        # top, left = randint(0, H - h), randint(0, W - w): one uniform over the (top, left) grid
        rows = (self._first.take(k) + u[2] * self._npos.take(k)).astype(np.intp)  # floor (>= 0)
        sets = self._rects.take(rows, axis=0) & ~cur[:, None, :]  # (A, tries, words)
        new = _popcount_rows(sets)  # (A, tries)
        ok = (new > 0) & (new <= limit[:, None])
        pick = np.arange(a) * tries + ok.argmax(1)  # the first accepted try (or try 0)
        return (ok.reshape(-1).take(pick), new.reshape(-1).take(pick),
                sets.reshape(-1, cur.shape[1]).take(pick, axis=0), rows.reshape(-1).take(pick))

    def generate(self, batch_size: int, rng: np.random.Generator | None = None, return_blocks: bool = False):
        """Masks (batch_size, h, w) bool and the count each had before the top-up (int64).

        With ``return_blocks`` also a dict of the accepted blocks: ``sample``, ``h``, ``w`` and
        ``limit`` (the block's ``max_mask_patches``), in acceptance order per sample.
        """
        n = _batch_arg(batch_size)
        target = self.num_masking_patches
        masks = np.zeros((n, self._rects.shape[1]), dtype=np.uint64)
        count = np.zeros(n, dtype=np.float64)  # small integers, exact
        ids = np.arange(n) if target > 0 else np.arange(0)  # masks still growing
        blocks = [] if return_blocks else None
        while ids.size:
            cur, cnt = masks[ids], count[ids]
            limit = np.minimum(target - cnt, self.max_num_patches)
            # most blocks are accepted at the first or second try: draw two for every mask,
            # the other eight only for the masks whose two failed (tries are independent)
            ok, new, sets, rows = self._tries(cur, limit, _FIRST_TRIES, rng)
            miss = np.flatnonzero(~ok)
            if miss.size and _FIRST_TRIES < _TRIES:
                ok[miss], new[miss], sets[miss], rows[miss] = self._tries(
                    cur[miss], limit[miss], _TRIES - _FIRST_TRIES, rng)
            if blocks is not None:
                acc = np.flatnonzero(ok)
                blocks.append((ids[acc], self._shapes[rows[acc]], limit[acc]))
            cur |= sets * ok[:, None].astype(np.uint64)
            cnt += new * ok
            masks[ids], count[ids] = cur, cnt
            ids = ids[ok & (cnt < target)]  # a block that adds nothing ends the mask, as the reference

        masks = np.unpackbits(masks.view(np.uint8), axis=1, count=self.num_patches, bitorder="little").view(bool)
        count = count.astype(np.int64)
        self._top_up(masks, count, rng)
        masks = masks.reshape(n, self.height, self.width)
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
        """Mask ``target - count`` more patches of each short mask, uniformly among the unmasked
        (BEiT v2's fix-up). Counts never exceed the target (a block may add at most the rest)."""
        short = np.flatnonzero(count < self.num_masking_patches)
        if not short.size:
            return
        need = self.num_masking_patches - count[short]
        sub = masks[short]
        keys = _uniform(rng, sub.shape)
        keys[sub] = 2.0  # masked cells sort last
        # the `need` smallest keys among unmasked cells: a uniform subset without replacement
        kmax = int(need.max())
        smallest = np.partition(keys, kmax - 1, axis=1)[:, :kmax]
        smallest.sort(axis=1)
        threshold = smallest[np.arange(short.size), need - 1]
        masks[short] = sub | (keys <= threshold[:, None])


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
        if mask_patch_size <= 0 or model_patch_size <= 0:
            raise ValueError(f"patch sizes must be positive, got {mask_patch_size}, {model_patch_size}")
        if h % mask_patch_size or w % mask_patch_size:
            raise ValueError(f"input_size {h}x{w} is not a multiple of mask_patch_size={mask_patch_size}")
        if mask_patch_size % model_patch_size:
            raise ValueError(f"mask_patch_size={mask_patch_size} is not a multiple of "
                             f"model_patch_size={model_patch_size}")
        if not (math.isfinite(mask_ratio) and 0 <= mask_ratio <= 1):
            raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio!r}")
        self.rand_size = (h // mask_patch_size, w // mask_patch_size)
        self.scale = mask_patch_size // model_patch_size
        self.token_count = self.rand_size[0] * self.rand_size[1]
        self.mask_count = int(np.ceil(self.token_count * mask_ratio))
        self.height, self.width = self.rand_size[0] * self.scale, self.rand_size[1] * self.scale
        self.num_masking_patches = self.mask_count * self.scale * self.scale

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
