"""BEiT's blockwise masks generated on the GPU, one program per mask (shared/DESIGN.md section 6).

Runs microsoft/unilm ``beit/masking_generator.py``'s loop as it is written, on uniforms drawn
beforehand (so any torch generator drives it and the result is reproducible):

    while count < target:                                  # one block
        for attempt in range(10):                          # tries t = 0, 1, ... in order
            limit = min(target - count, max_num_patches)
            area = min_num_patches + u[t, 0] * (limit - min_num_patches)   # random.uniform
            aspect = exp(log_lo + u[t, 1] * (log_hi - log_lo))
            h, w = round(sqrt(area * aspect)), round(sqrt(area / aspect))  # half to even
            top, left = floor(u[t, 2] * (H - h + 1)), floor(u[t, 3] * (W - w + 1))  # randint
            accept if h < H and w < W and 0 < new cells in the rectangle <= limit
        stop when ten tries in a row fail
    then BEiT v2's top-up: the target - count unmasked cells with the smallest keys

with the mask held in registers (one lane per cell) and area / aspect / square roots /
rounding in float64, so a try is the reference's arithmetic. Bytes moved: 16 bytes per try consumed
(about 20 per mask) + 4 L of keys + L of mask per mask: microseconds for a batch.

Supports: any grid with H * W <= 4096 cells, any counts and block limits, aspect ranges given
as log bounds. Does not support: grids above 4096 cells (use the numpy generator).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mimfast.kernels import next_power_of_2

__all__ = ["blockwise_masks", "MAX_CELLS", "TRIES_PER_BLOCK"]

MAX_CELLS = 4096
TRIES_PER_BLOCK = 10


@triton.jit
def _round_half_even(x):
    f = tl.floor(x)
    d = x - f
    odd = f - 2.0 * tl.floor(f * 0.5)
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, f + odd))


@triton.jit
def _blockwise_mask_kernel(
    u_ptr,  # (N, max_tries, 4) fp32: area, aspect, top, left uniforms of each try, in order
    keys_ptr,  # (N, L) fp32: top-up order (smallest key first)
    params_ptr,  # (3,) fp64: min_num_patches, log(min_aspect), log(max_aspect)
    mask_ptr,  # (N, L) uint8 out
    count_ptr,  # (N,) int32 out: masked cells before the top-up
    first_ptr,  # (N, 2) int32 out: (h, w) of the first accepted block, (0, 0) if none
    max_tries,
    target,
    max_patches,
    H: tl.constexpr,
    W: tl.constexpr,
    BLOCK: tl.constexpr,  # power of two >= H * W
    TRIES: tl.constexpr,  # tries per block before the mask is finished
):
    L: tl.constexpr = H * W
    n = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    cell_ok = offs < L
    row = offs // W
    col = offs % W
    min_area = tl.load(params_ptr)
    log_lo = tl.load(params_ptr + 1)
    log_hi = tl.load(params_ptr + 2)
    u_base = u_ptr + n * max_tries * 4

    masked = tl.zeros([BLOCK], dtype=tl.int32)
    zero = tl.sum(masked, axis=0)  # an int32 scalar tensor, so every loop-carried value has one type
    count = zero
    fails = zero
    t = zero
    first_h = zero
    first_w = zero
    while (count < target) & (fails < TRIES) & (t < max_tries):
        ua = tl.load(u_base + t * 4).to(tl.float64)
        ur = tl.load(u_base + t * 4 + 1).to(tl.float64)
        ut = tl.load(u_base + t * 4 + 2).to(tl.float64)
        ul = tl.load(u_base + t * 4 + 3).to(tl.float64)
        t += 1
        limit = tl.minimum(target - count, max_patches)
        area = min_area + ua * (limit.to(tl.float64) - min_area)
        aspect = tl.exp(log_lo + ur * (log_hi - log_lo))
        h = _round_half_even(tl.sqrt(area * aspect)).to(tl.int32)
        w = _round_half_even(tl.sqrt(area / aspect)).to(tl.int32)
        top = tl.floor(ut * (H - h + 1).to(tl.float64)).to(tl.int32)
        left = tl.floor(ul * (W - w + 1).to(tl.float64)).to(tl.int32)
        in_rect = (row >= top) & (row < top + h) & (col >= left) & (col < left + w) & cell_ok
        fresh = in_rect & (masked == 0)
        new = tl.sum(fresh.to(tl.int32), axis=0)
        accept = (h < H) & (w < W) & (new > 0) & (new <= limit)
        masked = tl.where(fresh & accept, 1, masked)
        count = count + tl.where(accept, new, 0)
        fails = tl.where(accept, 0, fails + 1)
        is_first = accept & (first_h == 0)
        first_h = tl.where(is_first, h, first_h)
        first_w = tl.where(is_first, w, first_w)
    tl.store(count_ptr + n, count)
    tl.store(first_ptr + n * 2, first_h)
    tl.store(first_ptr + n * 2 + 1, first_w)

    # top-up: the (target - count) unmasked cells with the smallest keys
    keys = tl.load(keys_ptr + n * L + offs, mask=cell_ok, other=2.0)
    keys = tl.where(masked == 1, 2.0, keys)
    need = target - count
    while need > 0:
        pick = tl.argmin(keys, axis=0)
        masked = tl.where(offs == pick, 1, masked)
        keys = tl.where(offs == pick, 2.0, keys)
        need -= 1
    tl.store(mask_ptr + n * L + offs, masked.to(tl.uint8), mask=cell_ok)


def blockwise_masks(uniforms: torch.Tensor, keys: torch.Tensor, height: int, width: int, num_masking_patches: int,
                    min_num_patches: float, max_num_patches: int, log_aspect_ratio: tuple[float, float]):
    """Blockwise masks from pre-drawn uniforms.

    Args:
        uniforms: (N, T, 4) float32 in [0, 1): per try, area / aspect / top / left uniforms.
            T >= 10 * (num_masking_patches + 1) never runs out (each block adds a patch or ends
            the mask after 10 tries).
        keys: (N, H * W) float32 in [0, 1): top-up order.
        height, width: the patch grid.
        num_masking_patches: masked cells per mask (exactly, after the top-up).
        min_num_patches, max_num_patches: the block area bounds of the rule.
        log_aspect_ratio: (log min_aspect, log max_aspect).

    Returns:
        masks (N, H * W) bool, counts (N,) int32 before the top-up, first (N, 2) int32 (h, w) of
        each mask's first accepted block.
    """
    if not isinstance(uniforms, torch.Tensor) or uniforms.dim() != 3 or uniforms.shape[2] != 4:
        raise ValueError(f"uniforms must be (N, T, 4), got {getattr(uniforms, 'shape', type(uniforms).__name__)}")
    if uniforms.dtype != torch.float32 or keys.dtype != torch.float32:
        raise TypeError(f"uniforms and keys must be float32, got {uniforms.dtype}, {keys.dtype}")
    N, T, _ = uniforms.shape
    L = height * width
    if not 0 < L <= MAX_CELLS:
        raise ValueError(f"height * width must be in [1, {MAX_CELLS}], got {height} x {width}")
    if tuple(keys.shape) != (N, L):
        raise ValueError(f"keys must be (N, H * W) = ({N}, {L}), got {tuple(keys.shape)}")
    if keys.device != uniforms.device:
        raise ValueError(f"keys are on {keys.device}, uniforms on {uniforms.device}")
    if not 0 <= num_masking_patches <= L:
        raise ValueError(f"num_masking_patches must be in [0, {L}], got {num_masking_patches}")
    device = uniforms.device
    uniforms = uniforms.contiguous()
    keys = keys.contiguous()
    params = torch.tensor([float(min_num_patches), *map(float, log_aspect_ratio)], dtype=torch.float64, device=device)
    masks = torch.empty(N, L, dtype=torch.uint8, device=device)
    counts = torch.empty(N, dtype=torch.int32, device=device)
    first = torch.empty(N, 2, dtype=torch.int32, device=device)
    if N == 0:
        return masks.bool(), counts, first
    block = next_power_of_2(L)
    _blockwise_mask_kernel[(N,)](
        uniforms, keys, params, masks, counts, first, T, int(num_masking_patches), int(max_num_patches),
        H=height, W=width, BLOCK=block, TRIES=TRIES_PER_BLOCK, num_warps=1 if block <= 256 else 4,
    )
    return masks.view(torch.bool), counts, first
