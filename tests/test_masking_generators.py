"""Mask generators: exact counts, BEiT's block rule (block sizes, aspect statistics) against the
rule itself and against the reference loop, SimMIM's and MAE's generators, bad arguments."""

import math
import random

import numpy as np
import pytest
import torch

import mimfast.data.masking_generators as mg
from mimfast.data._blockwise_law import _shape_law
from mimfast.data.masking_generators import (
    BlockwiseMaskingGenerator,
    RandomMaskingGenerator,
    ReplayedUniforms,
    SimMIMMaskGenerator,
    blockwise_mask_reference,
)
from mimfast.kernels.blockwise_mask import blockwise_masks
from mimfast.ops import num_kept
from tolerance import DEVICE

LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))
# the numpy generator's paths: batched rounds then the scalar tail (default), batched rounds to
# the end, the scalar loop from the first block
PATHS = {"default": None, "rounds": 0, "scalar": 10**9}


def _gen(*args, path="default", **kwargs):
    gen = BlockwiseMaskingGenerator(*args, **kwargs)
    if PATHS[path] is not None:
        gen._scalar_below = PATHS[path]
    return gen


def _chi2_z(observed: np.ndarray, expected: np.ndarray) -> float:
    """Wilson-Hilferty z of Pearson's chi-square; bins expecting < 5 are pooled."""
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = len(obs) - 1
    return ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))


def _first_block_law(height, width, limit, min_num_patches=16, grid=1000):
    """P(h, w) of an accepted block on an empty grid, integrated from the rule on a fine grid of
    (area, log aspect) uniforms: area ~ U(min, limit), r = exp(U(log .3, log 1/.3)),
    h = round(sqrt(area r)), w = round(sqrt(area / r)), accepted iff h < H, w < W, 0 < h w <= limit."""
    u = (np.arange(grid) + 0.5) / grid
    area = min_num_patches + u[:, None] * (limit - min_num_patches)
    aspect = np.exp(LOG_ASPECT[0] + u[None, :] * (LOG_ASPECT[1] - LOG_ASPECT[0]))
    h = np.rint(np.sqrt(area * aspect)).astype(int)
    w = np.rint(np.sqrt(area / aspect)).astype(int)
    ok = (h < height) & (w < width) & (h * w > 0) & (h * w <= limit)
    law = np.zeros((height, width))
    np.add.at(law, (h[ok], w[ok]), 1.0)
    return law / law.sum()


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize(
    "size,count,min_patches",
    [(14, 75, 16), (14, 0, 16), (14, 196, 16), ((12, 20), 100, 16), (4, 8, 16), (7, 20, 4), (14, 118, 16)],
)
def test_blockwise_exact_count(size, count, min_patches, path):
    gen = _gen(size, count, min_num_patches=min_patches, path=path)
    masks = gen(300, rng=np.random.default_rng(1))
    h, w = (size, size) if isinstance(size, int) else size
    assert masks.shape == (300, h, w) and masks.dtype == bool
    assert np.all(masks.reshape(300, -1).sum(1) == count)
    one = gen(rng=np.random.default_rng(2))
    assert one.shape == (h, w) and one.sum() == count


def test_blockwise_blocks_follow_rule_sizes():
    """Blocks drawn while at least 16 patches remain have a target area >= 16; after the rule's
    rounding h * w can be as small as the rule allows (12 on 14 x 14), never smaller, and most
    are >= 16. Blocks never reach the grid's side (w < W, h < H), as the reference."""
    gen = BlockwiseMaskingGenerator(14, 75, min_num_patches=16)
    masks, count, blocks = gen.generate(2048, rng=np.random.default_rng(3), return_blocks=True)
    # smallest h * w the rule can give for an area >= 16, from the rule itself
    u = (np.arange(2000) + 0.5) / 2000
    area = 16 + u[:, None] * (75 - 16)
    aspect = np.exp(LOG_ASPECT[0] + u[None, :] * (LOG_ASPECT[1] - LOG_ASPECT[0]))
    hw = np.rint(np.sqrt(area * aspect)) * np.rint(np.sqrt(area / aspect))
    min_area = hw.min()
    assert 10 <= min_area < 16
    big = blocks["limit"] >= 16
    areas = blocks["h"] * blocks["w"]
    assert big.sum() > 4000
    assert areas[big].min() >= min_area
    assert np.mean(areas[big] >= 16) > 0.85
    assert blocks["h"].max() < 14 and blocks["w"].max() < 14
    # each sample's accepted blocks add up to its count before the top-up (no block is lost)
    assert np.all(np.bincount(blocks["sample"], minlength=2048) >= 1)
    assert np.all(count <= 75) and np.all(masks.reshape(2048, -1).sum(1) == 75)


@pytest.mark.parametrize("path", ["default", "scalar"])
def test_blockwise_first_block_law_matches_rule(path):
    """The (h, w) law of the first block (empty grid) against the rule integrated numerically:
    this checks the area and log-uniform aspect sampling, the rounding and the acceptance (the
    first-block alias table on the batched path, the reference's formula on the scalar one)."""
    gen = _gen(14, 75, path=path)
    _, _, blocks = gen.generate(6000, rng=np.random.default_rng(4), return_blocks=True)
    first = np.flatnonzero(np.r_[True, blocks["sample"][1:] != blocks["sample"][:-1]])
    assert np.all(blocks["limit"][first] == 75)
    observed = np.zeros((14, 14))
    np.add.at(observed, (blocks["h"][first], blocks["w"][first]), 1)
    expected = _first_block_law(14, 14, 75) * len(first)
    assert _chi2_z(observed.ravel(), expected.ravel()) < 4.0
    # aspect statistics: log(h / w) is symmetric about 0 and spans the rule's range
    log_aspect = np.log(blocks["h"][first] / blocks["w"][first])
    law = _first_block_law(14, 14, 75)
    hh, ww = np.nonzero(law)
    law_mean_sq = (law[hh, ww] * np.log(hh / ww) ** 2).sum()
    assert abs(log_aspect.mean()) < 4 * log_aspect.std() / math.sqrt(len(first))
    assert abs((log_aspect**2).mean() - law_mean_sq) < 0.05 * law_mean_sq


def _reference_stats(n, seed, *args, **kwargs):
    """microsoft/unilm's loop (Python's random), without the top-up: counts, blocks per mask,
    (h, w) of every accepted block."""
    rng = random.Random(seed)
    counts, nblocks, hw = [], [], []
    for _ in range(n):
        blocks = []
        counts.append(blockwise_mask_reference(*args, rng=rng, exact=False, blocks=blocks, **kwargs).sum())
        nblocks.append(len(blocks))
        hw += [b[:2] for b in blocks]
    return np.array(counts), np.array(nblocks), np.array(hw, dtype=np.int64).reshape(-1, 2)


@pytest.fixture(scope="module")
def reference_14x14():
    return _reference_stats(1200, 5, 14, 14, 75)


def _z(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return abs(a.mean() - b.mean()) / math.sqrt(a.var() / len(a) + b.var() / len(b) + 1e-300)


def _hw_chi2_z(ours_h, ours_w, ref_hw, shape):
    """Two-sample chi-square z of the (h, w) laws of accepted blocks."""
    ref = np.zeros(shape)
    np.add.at(ref, (ref_hw[:, 0], ref_hw[:, 1]), 1)
    ours = np.zeros(shape)
    np.add.at(ours, (ours_h, ours_w), 1)
    pooled = (ref + ours) / (ref.sum() + ours.sum())
    return _chi2_z(ours.ravel(), pooled.ravel() * ours.sum())


@pytest.mark.parametrize("path", list(PATHS))
def test_blockwise_statistics_match_reference_loop(path, reference_14x14):
    """Whole-mask statistics against microsoft/unilm's loop (run with Python's random): count
    before the top-up (the reference's mean is about 74.4), how often it is exact, blocks per
    mask, and the (h, w) law of every accepted block; on each path of the generator."""
    ref_counts, ref_nblocks, ref_hw = reference_14x14
    n_ours = 4096
    gen = _gen(14, 75, path=path)
    _, counts, blocks = gen.generate(n_ours, rng=np.random.default_rng(6), return_blocks=True)
    nblocks = np.bincount(blocks["sample"], minlength=n_ours)
    assert 74.0 < counts.mean() < 74.8 and 0.55 < np.mean(counts == 75) < 0.8
    assert _z(counts, ref_counts) < 4
    assert _z(counts == 75, ref_counts == 75) < 4
    assert _z(nblocks, ref_nblocks) < 4
    assert _hw_chi2_z(blocks["h"], blocks["w"], ref_hw, (14, 14)) < 4.0


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", ["rect_float_max", "first_block_fails", "eight_words"])
def test_blockwise_other_settings_match_reference_loop(case, path):
    """Settings off BEiT's defaults against the reference loop: a rectangular grid with a
    fractional max_num_patches below the target (the limit min(r, 12.5), 12 new patches at
    most) and aspects in [0.5, 3]; a 3 x 40 grid where most shapes do not fit, so all ten
    tries of the first block fail about one mask in two (the first block's (1 - p)^10); a
    17 x 17 grid (289 cells: eight 64-bit words, 16-bit popcounts)."""
    if case == "rect_float_max":
        args, kwargs = (9, 13, 40), dict(min_num_patches=6, max_num_patches=12.5, min_aspect=0.5, max_aspect=3.0)
    elif case == "first_block_fails":
        args, kwargs = (3, 40, 20), dict(min_num_patches=16)
    else:
        args, kwargs = (17, 17, 150), {}
    ref_counts, ref_nblocks, ref_hw = _reference_stats(1500, 7, *args, **kwargs)
    gen = _gen((args[0], args[1]), args[2], path=path, **kwargs)
    masks, counts, blocks = gen.generate(4000, rng=np.random.default_rng(8), return_blocks=True)
    nblocks = np.bincount(blocks["sample"], minlength=4000)
    assert np.all(masks.reshape(4000, -1).sum(1) == args[2])
    assert _z(counts, ref_counts) < 4
    assert _z(nblocks, ref_nblocks) < 4
    assert _z(counts == 0, ref_counts == 0) < 4
    if case == "first_block_fails":
        assert 0.3 < np.mean(ref_counts == 0) < 0.7
    assert _hw_chi2_z(blocks["h"], blocks["w"], ref_hw, (args[0], args[1])) < 4.0


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("size,count,kwargs", [(14, 75, {}), ((9, 13), 40, dict(min_num_patches=6, max_num_patches=7)),
                                               ((3, 40), 20, {}), (14, 150, {}), (17, 200, {})])
def test_blockwise_counts_are_the_blocks(size, count, kwargs, path, monkeypatch):
    """Before the top-up every mask holds exactly its count of patches, at most the target; the
    blocks (return_blocks) are what the rule allows: h < H, w < W, recorded limits
    min(remaining, max_num_patches)."""
    gen = _gen(size, count, path=path, **kwargs)
    monkeypatch.setattr(gen, "_top_up", lambda masks, count, rng: None)
    masks, counts, blocks = gen.generate(500, rng=np.random.default_rng(9), return_blocks=True)
    assert np.array_equal(masks.reshape(500, -1).sum(1), counts)
    assert np.all(counts <= count)
    h, w = (size, size) if isinstance(size, int) else size
    assert np.all(blocks["h"] < h) and np.all(blocks["w"] < w) and np.all(blocks["h"] >= 1)
    assert np.all(blocks["limit"] <= kwargs.get("max_num_patches", count))
    # a mask's first block has the whole target as its limit
    first = np.r_[True, blocks["sample"][1:] != blocks["sample"][:-1]]
    assert np.all(blocks["limit"][first] == min(count, kwargs.get("max_num_patches", count)))


def test_blockwise_reference_loop_exact_mode_and_rng():
    rng = random.Random(0)
    for _ in range(50):
        assert blockwise_mask_reference(14, 14, 75, rng=rng).sum() == 75
    gen = BlockwiseMaskingGenerator(14, 75)
    a = gen(8, rng=np.random.default_rng(9))
    b = gen(8, rng=np.random.default_rng(9))
    assert np.array_equal(a, b)
    np.random.seed(3)
    c = gen(8)
    np.random.seed(3)
    assert np.array_equal(c, gen(8))
    assert not np.array_equal(a, gen(8, rng=np.random.default_rng(10)))


def test_blockwise_top_up_is_uniform():
    """On a 2 x 8 grid the rule accepts no block (h < 2 forces h = 1, so area * aspect < 2.25,
    impossible for area >= 8 and aspect >= 0.3): masks are filled by the top-up alone, and every
    cell is chosen with the same frequency."""
    gen = BlockwiseMaskingGenerator((2, 8), 8, min_num_patches=16)
    masks, count, blocks = gen.generate(4000, rng=np.random.default_rng(11), return_blocks=True)
    assert np.all(count == 0) and blocks["h"].size == 0
    masks = masks.reshape(4000, 16)
    assert np.all(masks.sum(1) == 8)
    freq = masks.mean(0)
    assert np.all(np.abs(freq - 0.5) < 4 * math.sqrt(0.25 / 4000))


@pytest.mark.parametrize("way", ["rejection", "fallback", "keys"])
def test_top_up_is_a_uniform_subset(way, monkeypatch):
    """The top-up masks a uniform subset of the free cells: on a 4 x 4 grid with 6 patches
    masked and 9 wanted, every one of the C(10, 3) = 120 subsets comes equally often; on each
    way it has: candidates in one batch (cells drawn twice are frequent here), the per-mask
    fallback (candidates run out), random keys (many missing among few free cells)."""
    if way == "fallback":
        monkeypatch.setattr(mg, "_TOP_UP_SPARE", -4)
    elif way == "keys":
        monkeypatch.setattr(mg, "_TOP_UP_CANDIDATES", 0.0)
    gen = BlockwiseMaskingGenerator(4, 9)
    n = 12000
    before = np.zeros(16, dtype=bool)
    before[[0, 3, 5, 6, 12, 15]] = True
    masks = np.tile(before, (n, 1))
    gen._top_up(masks, np.full(n, 6), np.random.default_rng(10))
    assert np.all(masks.sum(1) == 9) and np.all(masks[:, before])
    free = np.flatnonzero(~before)
    code = (masks[:, free] * (1 << np.arange(free.size))).sum(1)
    subsets = np.unique(code)
    assert subsets.size == math.comb(10, 3)
    observed = np.array([(code == c).sum() for c in subsets])
    assert _chi2_z(observed, np.full(subsets.size, n / subsets.size)) < 4.0


def test_top_up_of_many_masks_and_needs():
    """A batch where masks miss 1 to 9 patches: each free cell of a mask is picked with
    probability need / free, cell by cell (the batch of candidates and the fallback both occur)."""
    gen = BlockwiseMaskingGenerator(14, 75)
    rng = np.random.default_rng(11)
    n = 5000
    need = rng.integers(1, 10, n)
    masks = np.zeros((n, 196), dtype=bool)
    masks[:, :75] = True
    for i, k in enumerate(need):  # unmask `k` of the first 75 cells
        masks[i, rng.choice(75, k, replace=False)] = False
    before = masks.copy()
    gen._top_up(masks, 75 - need, rng)
    assert np.all(masks.sum(1) == 75) and np.all(masks[before])
    picked = (masks & ~before).sum(0)  # (196,)
    expected = np.where(before, 0.0, (need / (196 - 75 + need))[:, None]).sum(0)
    assert _chi2_z(picked, expected) < 4.0


def test_blockwise_masks_drive_the_model_input():
    gen = BlockwiseMaskingGenerator(14, 75)
    bool_masked_pos = torch.from_numpy(gen(4, rng=np.random.default_rng(0))).flatten(1)
    assert bool_masked_pos.dtype == torch.bool and bool_masked_pos.sum().item() == 4 * 75


def _law_by_width(max_h, max_w, m, limit, lo, hi, grid=6000):
    """P(h, w) of one try, by the midpoint rule over s ~ U(m, L) of the exact length of the
    log-aspect interval giving (h, w) (lo == hi: the fraction of s giving it)."""
    s = m + (np.arange(grid) + 0.5) / grid * (limit - m)
    ls = np.log(s)
    out = np.zeros((max_h + 1, max_w + 1))
    l_lo, l_hi = min(lo, hi), max(lo, hi)
    for h in range(max_h + 1):
        for w in range(max_w + 1):
            top = np.minimum(l_hi, 2 * math.log(h + 0.5) - ls)
            bot = np.maximum(l_lo, ls - 2 * math.log(w + 0.5))
            if w > 0:
                top = np.minimum(top, ls - 2 * math.log(w - 0.5))
            if h > 0:
                bot = np.maximum(bot, 2 * math.log(h - 0.5) - ls)
            out[h, w] = (np.maximum(top - bot, 0).mean() / (l_hi - l_lo)) if l_hi > l_lo else np.mean(top >= bot)
    return out.ravel()


@pytest.mark.parametrize("m,limit,lo,hi", [
    (16, 75, *LOG_ASPECT), (16, 40, *LOG_ASPECT), (16, 23.5, *LOG_ASPECT), (16, 16, *LOG_ASPECT),
    (16, 5, *LOG_ASPECT), (6, 12.5, math.log(0.5), math.log(3.0)), (4, 30, 0.4, -0.4), (9, 30, 0.0, 0.0),
])
def test_shape_law_is_the_rule(m, limit, lo, hi):
    """The closed-form law of a try's shape against the rule integrated numerically, for a
    limit above, equal to (s = m exactly) and below min_num_patches, fractional limits, swapped
    and equal aspect bounds."""
    max_h = max_w = 20
    law = _shape_law(max_h, max_w, m, [limit], lo, hi)[0]
    assert abs(law.sum() - 1) < 1e-12 and law.min() >= 0
    tol = 1e-6 if lo != hi else 2e-3  # equal bounds: an indicator on the grid, error ~1 / grid
    assert np.abs(law - _law_by_width(max_h, max_w, m, limit, lo, hi)).max() < tol


def _alias_law_and_maps(k, split, start_scale, outcome, fit_hw, shapes, n_outcomes):
    """The law an alias table gives (entry 2c on a fraction split[c] of column c, entry 2c + 1
    on the rest) and a check of each entry's affine map: the middle of the i-th of n equal
    slices of its part of [0, 1) lands on the i-th position of its outcome's shape."""
    rows = split.size
    law = np.zeros((rows // k, n_outcomes))
    col = np.arange(rows)
    np.add.at(law, (col // k, outcome[0::2]), split / k)
    np.add.at(law, (col // k, outcome[1::2]), (1 - split) / k)
    offset = np.stack([np.zeros(rows), split], 1).ravel()
    part = np.stack([split, 1 - split], 1).ravel()
    start, scale = start_scale
    for e in np.flatnonzero(part > 0):
        o = outcome[e]
        if o >= len(fit_hw):  # the pooled rejected shapes: row 0, the empty set
            assert start[e] == 0 and scale[e] == 0
            continue
        n = int(round(scale[e] * part[e]))
        v = offset[e] + (np.arange(n) + 0.5) / n * part[e]
        got = np.floor(start[e] + scale[e] * v).astype(int)
        assert np.array_equal(got, got[0] + np.arange(n)), e
        assert np.all(shapes[got[0]:got[0] + n + 1] == fit_hw[o]) and np.any(shapes[got[0] - 1] != fit_hw[o]), e
    return law


@pytest.mark.parametrize("size,count,kwargs", [(14, 75, {}), ((9, 13), 40, dict(min_num_patches=6, max_num_patches=12.5,
                                                                                 min_aspect=0.5, max_aspect=3.0))])
def test_alias_tables_give_the_law(size, count, kwargs):
    """Every row of the alias tables gives the try law exactly (up to rounding) and each entry
    maps its part of the uniform onto every position of its shape equally; the first-block
    table is the law restricted to the shapes an empty grid accepts, and all ten tries fail
    with (1 - p)^10."""
    gen = BlockwiseMaskingGenerator(size, count, **kwargs)
    sh, rt = gen._shapes, gen._rects
    fit_hw = np.stack(np.divmod(sh.fit, gen._max_w + 1), 1)
    law = _alias_law_and_maps(sh.k, sh.split, sh.start_scale, sh.outcome, fit_hw, rt.shapes, sh.k)
    assert np.abs(law - sh.law).max() < 1e-12
    # first block
    limit = min(count, kwargs.get("max_num_patches", count))
    p = sh.law[count, :-1] * (fit_hw.prod(1) <= math.floor(limit))
    law1 = _alias_law_and_maps(sh.first_k, sh.first_split, sh.first_start_scale, sh.first_outcome, fit_hw,
                               rt.shapes, sh.first_k)
    assert np.abs(law1[0] - p / p.sum()).max() < 1e-12
    assert abs(sh.first_fail - (1 - p.sum()) ** 10) < 1e-12


@pytest.mark.parametrize("grid,count,min_patches,max_patches,min_aspect", [
    ((14, 14), 75, 16, None, 0.3), ((6, 9), 20, 4, 6, 0.5), ((14, 14), 118, 16, None, 0.3),
])
def test_kernel_is_the_reference_loop_on_the_same_uniforms(grid, count, min_patches, max_patches, min_aspect,
                                                           device):
    """The GPU generator runs microsoft/unilm's loop: fed the same uniforms, the reference
    (with BEiT v2's top-up) gives the same mask, the same count before the top-up and the
    same first block, mask for mask."""
    n = 10 if DEVICE == "cpu" else 512
    h, w = grid
    gen = BlockwiseMaskingGenerator(grid, count, min_num_patches=min_patches, max_num_patches=max_patches,
                                    min_aspect=min_aspect)
    g = torch.Generator(device=device).manual_seed(0)
    u = torch.rand(n, 10 * (count + 1), 4, device=device, generator=g)
    keys = torch.rand(n, h * w, device=device, generator=g)
    masks, counts, first = blockwise_masks(u, keys, h, w, count, gen.min_num_patches, gen.max_num_patches,
                                           gen.log_aspect_ratio)
    masks, counts, first = masks.cpu().numpy(), counts.cpu().numpy(), first.cpu().numpy()
    assert np.all(masks.sum(1) == count)
    for i in range(n):
        blocks = []
        ref_pre = blockwise_mask_reference(h, w, count, min_patches, max_patches, min_aspect,
                                           rng=ReplayedUniforms(u[i], keys[i]), exact=False, blocks=blocks)
        ref = blockwise_mask_reference(h, w, count, min_patches, max_patches, min_aspect,
                                       rng=ReplayedUniforms(u[i], keys[i]))
        assert counts[i] == ref_pre.sum(), i
        assert np.array_equal(masks[i].reshape(h, w), ref), i
        assert tuple(first[i]) == (blocks[0][:2] if blocks else (0, 0)), i


def test_torch_masks(device):
    gen = BlockwiseMaskingGenerator(14, 75)
    n = 4 if DEVICE == "cpu" else 4096
    g = torch.Generator(device=device).manual_seed(1)
    masks, counts, first = gen.torch_masks(n, device=device, generator=g, return_stats=True)
    assert masks.shape == (n, 14, 14) and masks.dtype == torch.bool and masks.device.type == device
    assert torch.all(masks.flatten(1).sum(1) == 75)
    again = gen.torch_masks(n, device=device, generator=torch.Generator(device=device).manual_seed(1))
    assert torch.equal(masks, again)
    eager = gen.torch_masks(3, device=device, backend="eager")
    assert eager.shape == (3, 14, 14) and torch.all(eager.flatten(1).sum(1) == 75)
    if DEVICE == "cuda":  # the first-block law, as for the numpy generator
        observed = np.zeros((14, 14))
        f = first.cpu().numpy()
        np.add.at(observed, (f[:, 0], f[:, 1]), 1)
        expected = _first_block_law(14, 14, 75) * n
        assert _chi2_z(observed.ravel(), expected.ravel()) < 4.0
        c = counts.cpu().numpy()
        assert 74.0 < c.mean() < 74.8 and 0.55 < np.mean(c == 75) < 0.8


def test_simmim_generator():
    gen = SimMIMMaskGenerator(224, mask_patch_size=32, model_patch_size=16, mask_ratio=0.6)
    assert gen.mask_count == 30 and (gen.height, gen.width) == (14, 14)
    masks = gen(2000, rng=np.random.default_rng(12))
    assert masks.shape == (2000, 14, 14)
    assert np.all(masks.reshape(2000, -1).sum(1) == 120)
    cells = masks[:, ::2, ::2]
    assert np.array_equal(masks, cells.repeat(2, axis=1).repeat(2, axis=2))  # 2 x 2 aligned cells
    freq = cells.reshape(2000, -1).mean(0)
    p = 30 / 49
    assert np.all(np.abs(freq - p) < 4.5 * math.sqrt(p * (1 - p) / 2000))
    assert gen().shape == (14, 14)
    # SimMIM's own setting: 192 px, 32 px mask cells, 4 px model patches
    g2 = SimMIMMaskGenerator(192, 32, 4, 0.6)
    assert g2(rng=np.random.default_rng(0)).shape == (48, 48) and g2.mask_count == 22


@pytest.mark.parametrize("ratio", [0.75, 0.6, 0.0, 0.33])
def test_random_masking_generator(ratio):
    gen = RandomMaskingGenerator(14, ratio)
    masks = gen(1000, rng=np.random.default_rng(13))
    assert gen.num_masking_patches == 196 - num_kept(196, ratio)
    assert np.all(masks.reshape(1000, -1).sum(1) == gen.num_masking_patches)
    if 0 < ratio:
        freq = masks.reshape(1000, -1).mean(0)
        p = gen.num_masking_patches / 196
        assert np.all(np.abs(freq - p) < 5 * math.sqrt(p * (1 - p) / 1000))


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_masking_patches"):
        BlockwiseMaskingGenerator(14, 197)
    with pytest.raises(ValueError, match="num_masking_patches"):
        BlockwiseMaskingGenerator(14, -1)
    with pytest.raises(ValueError, match="input_size"):
        BlockwiseMaskingGenerator(0, 1)
    with pytest.raises(ValueError, match="input_size"):
        BlockwiseMaskingGenerator((14, 14, 3), 1)
    with pytest.raises(ValueError, match="aspect"):
        BlockwiseMaskingGenerator(14, 75, min_aspect=-1.0)
    with pytest.raises(ValueError, match="batch_size"):
        BlockwiseMaskingGenerator(14, 75)(-2)
    with pytest.raises(ValueError, match="mask_ratio"):
        RandomMaskingGenerator(14, 1.0)
    with pytest.raises(ValueError, match="mask_ratio"):
        RandomMaskingGenerator(14, float("nan"))
    with pytest.raises(ValueError, match="mask_patch_size"):
        SimMIMMaskGenerator(224, 48, 16)
    with pytest.raises(ValueError, match="model_patch_size"):
        SimMIMMaskGenerator(224, 32, 12)
