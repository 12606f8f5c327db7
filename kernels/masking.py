"""MAE's token shuffles as Triton kernels (shared/DESIGN.md sections 1 and 2).

Random masking + gather, forward. Replaces, per sample n of the reference::

    x = x + pos_embed                                   # read + write N*L*D
    ids_shuffle = argsort(noise); ids_restore = argsort(ids_shuffle)
    x_masked = gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, D))   # + an (N, K, D) int64 index
    mask = gather(ones-then-zeros, 1, ids_restore)

with one kernel that needs no sort: the rank of position l is the number of positions that
come before it, ``rank[l] = #{j : noise[j] < noise[l] or (noise[j] == noise[l] and j < l)}``
(argsort ascending, ties broken by index, i.e. a stable argsort), so ``ids_restore = rank``,
``mask = rank >= K``, and row l, when kept, is written to row ``rank[l]`` of the output with
the positional add on the way. Each program ranks BLOCK_R positions against the L noise values
(O(L) compares per position, cheap next to the row traffic) and moves only the kept rows.
Bytes: read N*K*D (kept rows of x) + K*D per sample of pos_embed (cached) + N*L noise; write
N*K*D + N*L*(4 + 8) (mask, ids_restore). The other design, ranks from two ``torch.argsort``
calls and then only the gather (``ids_restore=`` of :func:`masking_forward`), stays for the
benchmark (``triton_argsort``); rank counting is the default as one launch instead of three
and no sort.

Sort variant (``method="sort"``), also one launch: each sample's noise becomes int64 keys
``(float32 bits in the floats' order) << 32 | l``, padded to a power of two and sorted by a
bitonic network (``tl.sort``'s, see :func:`_sort_keys`); the sorted keys' low halves are
``ids_shuffle``, so ``ids_restore[ids_shuffle[r]] = r``, ``mask[ids_shuffle[r]] = r >= K`` are
scattered and kept rank r reads row ``ids_shuffle[r]`` of x (+ pos) into row r of the output.
Equal noise values order by position, as in the counting kernel. Program (n, c) sorts the whole
row (O(L log^2 L) compare-swaps, repeated by the cdiv(K, BLOCK_R) programs of a sample) and
gathers BLOCK_R ranks. Same bytes as above. Noise must be float32 / float16 / bfloat16 (float64
does not fit the key); -0.0 ranks as +0.0.

Backward: ``grad_x[n, l] = grad_visible[n, ids_restore[n, l]]`` if that is < K, else 0, a
gather (no atomics). pos_embed's gradient is the sum over the batch: fp32 partial sums over
fixed chunks of samples, then a second pass (:func:`sum_partials`), so it is bit-identical run
to run. Bytes: read N*K*D + N*L*8, write N*L*D.

Un-shuffle with mask tokens, forward: ``out[n, 0] = x[n, 0] + dpos[0]``, ``out[n, 1 + l] =
(x[n, 1 + ids_restore[n, l]] if ids_restore[n, l] < K else mask_token) + dpos[1 + l]``, one
pass, replacing the reference's repeat + cat + expanded-index gather + cat + add. Bytes: read
N*(1+K)*D + N*L*8, write N*(1+L)*D.

Backward: each gradient row of the output goes to its visible row of grad_x (cls row through)
or, for mask-token rows, into an fp32 per-program partial sum; the partials are reduced by a
second pass (no float atomics, bit-identical run to run). Same for the positional gradient.
Bytes: read N*(1+L)*D, write N*(1+K)*D.

Supports: float32 / float16 / bfloat16 tokens (sums in fp32; the output dtype is the caller's
choice, normally the type promotion of the inputs), float noise of any dtype (compared in its
own dtype, half precision as float32, exactly; the sort variant: float32 / float16 / bfloat16),
any strides on the inputs, int64 offsets. Does not support: non-finite noise (NaN
has no rank), ``ids_restore`` that is not a permutation of 0..L-1 (out-of-range entries read as
mask tokens, so memory stays safe, but gradient rows of x may be left unwritten).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from mimfast.kernels import cdiv, next_power_of_2, sm_count, tuning

__all__ = [
    "cast",
    "gpu_tiles",
    "masking_forward",
    "masking_backward",
    "unshuffle_forward",
    "unshuffle_backward",
    "sum_partials",
    "TOKEN_DTYPES",
]

TOKEN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Triton's interpreter converts float32 to bfloat16 by truncation; compiled Triton rounds to
# nearest even, as PyTorch does. ``cast`` rounds to nearest even in both.
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on"))

# Tiles: on a GPU, small tiles and many programs keep the whole chip busy on these memory-bound
# kernels; the interpreter pays a fixed cost per program and per nested call, so on the CPU
# whole rows go to few programs. Tests set GPU_TILES_ON_CPU to run the GPU tiling interpreted.
GPU_TILES_ON_CPU = False
# masking_forward(method="sort") sorts with tl.sort instead of this file's copy of its network
# (same PTX but add/sub for xor; under the interpreter the copy takes 0.1 s per row of 576
# keys, tl.sort 3.3 s: see _sort_keys).
USE_TL_SORT = False


@triton.jit
def cast(v, dtype: tl.constexpr):
    """``v.to(dtype)``, rounding float32 -> bfloat16 to nearest even under the interpreter too."""
    if _INTERPRETED and dtype == tl.bfloat16 and v.dtype == tl.float32:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _masking_fwd_kernel(
    x_ptr,  # (N, L, D) patch tokens, any strides
    pos_ptr,  # (L, D) positional embedding, any strides (read when HAS_POS)
    noise_ptr,  # (N, L) noise, any strides; small is kept
    ranks_in_ptr,  # (N, L) int64 given ranks (read when RANKS_GIVEN)
    out_ptr,  # (N, K, D) visible tokens, contiguous (written when GATHER)
    mask_ptr,  # (N, L) float32, 1 = removed, contiguous (written unless RANKS_GIVEN)
    ids_restore_ptr,  # (N, L) int64, contiguous (written unless RANKS_GIVEN)
    ids_keep_ptr,  # (N, K) int32 kept positions in rank order, contiguous (when WRITE_IDS_KEEP)
    L, D, K,
    stride_xn, stride_xl, stride_xd,
    stride_pl, stride_pd,
    stride_nn, stride_nl,
    stride_rn, stride_rl,
    HAS_POS: tl.constexpr,
    GATHER: tl.constexpr,
    WRITE_IDS_KEEP: tl.constexpr,
    RANKS_GIVEN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # positions l of this program
    row_ok = rows < L
    rows64 = rows.to(tl.int64)  # for products with strides (any strides: they may pass 2^31)
    if RANKS_GIVEN:
        rank = tl.load(ranks_in_ptr + n * stride_rn + rows64 * stride_rl, mask=row_ok, other=0).to(tl.int32)
    else:
        # half-precision noise compared in float32 (exact): the interpreter holds bfloat16 as
        # uint16 and would compare the bit patterns, wrong for negative values
        v = tl.load(noise_ptr + n * stride_nn + rows64 * stride_nl, mask=row_ok, other=0.0)
        if noise_ptr.dtype.element_ty.primitive_bitwidth < 32:
            v = v.to(tl.float32)
        rank = tl.zeros([BLOCK_R], dtype=tl.int32)
        for j0 in range(0, L, BLOCK_L):
            cols = j0 + tl.arange(0, BLOCK_L)
            col_ok = cols < L
            w = tl.load(noise_ptr + n * stride_nn + cols.to(tl.int64) * stride_nl, mask=col_ok, other=0.0)
            if noise_ptr.dtype.element_ty.primitive_bitwidth < 32:
                w = w.to(tl.float32)
            before = (w[None, :] < v[:, None]) | ((w[None, :] == v[:, None]) & (cols[None, :] < rows[:, None]))
            before = before & col_ok[None, :]
            rank += tl.sum(before.to(tl.int32), axis=1)
        tl.store(mask_ptr + n * L + rows, (rank >= K).to(tl.float32), mask=row_ok)
        tl.store(ids_restore_ptr + n * L + rows, rank.to(tl.int64), mask=row_ok)
    keep = row_ok & (rank >= 0) & (rank < K)
    if WRITE_IDS_KEEP:
        tl.store(ids_keep_ptr + n * K + rank, rows, mask=keep)
    if GATHER:
        src = x_ptr + n * stride_xn + rows64 * stride_xl  # (BLOCK_R,) row starts
        dst = out_ptr + (n * K + rank.to(tl.int64)) * D
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            offs_d64 = offs_d.to(tl.int64)
            m = keep[:, None] & (offs_d[None, :] < D)
            val = tl.load(src[:, None] + offs_d64[None, :] * stride_xd, mask=m, other=0.0).to(tl.float32)
            if HAS_POS:
                p = tl.load(pos_ptr + rows64[:, None] * stride_pl + offs_d64[None, :] * stride_pd, mask=m, other=0.0)
                val += p.to(tl.float32)
            tl.store(dst[:, None] + offs_d[None, :], cast(val, out_ptr.dtype.element_ty), mask=m)


# Bitonic sort of a power-of-two block, the network of ``tl.sort`` (triton/language/standard.py:
# reshape to a [2] * N_DIMS hypercube, compare-and-swap along one axis at a time). One change:
# the partner along an axis is ``sum(pair) - self`` instead of ``self ^ xor_sum(pair)``. The
# interpreter runs ``xor_sum`` (a reduce with a custom combine function) element by element in
# Python, about 3 s per row of 1024 keys, and ``tl.sum`` as one numpy call; compiled for sm_90
# (triton 3.6 and 3.8), the two give the same PTX but for add/sub in place of xor. Integer
# overflow in the pair sum wraps and cancels. ``TL_SORT`` selects ``tl.sort`` itself.
@triton.jit
def _sort_keys(keys, LOG_N: tl.constexpr, TL_SORT: tl.constexpr):
    """keys (2**LOG_N,) sorted ascending; duplicates are allowed. One function without nested
    calls: the interpreter pays for each call of a jit function."""
    if TL_SORT:
        return tl.sort(keys)
    else:
        h = tl.reshape(keys, [2] * LOG_N)  # hypercube: axis LOG_N - 1 - j flips bit j of the index
        for i in tl.static_range(1, LOG_N + 1):
            # merge runs of 2**i: ascending / descending alternating by bit i of the index, all
            # ascending in the last stage
            if i < LOG_N:
                flip = tl.reshape(tl.arange(0, 2), [1] * (LOG_N - i - 1) + [2] + [1] * i)
            else:
                flip = 0
            for j in tl.static_range(i - 1, -1, -1):
                partner = tl.sum(h, axis=LOG_N - 1 - j, keep_dims=True) - h  # element with bit j flipped
                is_right = tl.reshape(tl.arange(0, 2), [1] * (LOG_N - j - 1) + [2] + [1] * j)
                h = tl.where((h > partner) != (flip ^ is_right), partner, h)
        return tl.reshape(h, keys.shape)


@triton.jit
def _masking_sort_fwd_kernel(
    x_ptr,  # (N, L, D) patch tokens, any strides
    pos_ptr,  # (L, D) positional embedding, any strides (read when HAS_POS)
    noise_ptr,  # (N, L) float32 / float16 / bfloat16 noise, any strides; small is kept
    out_ptr,  # (N, K, D) visible tokens, contiguous (written when GATHER)
    mask_ptr,  # (N, L) float32, 1 = removed, contiguous
    ids_restore_ptr,  # (N, L) int64, contiguous
    ids_keep_ptr,  # (N, K) int32 kept positions in rank order, contiguous (when WRITE_IDS_KEEP)
    L, D, K,
    stride_xn, stride_xl, stride_xd,
    stride_pl, stride_pd,
    stride_nn, stride_nl,
    HAS_POS: tl.constexpr,
    GATHER: tl.constexpr,
    WRITE_IDS_KEEP: tl.constexpr,
    TL_SORT: tl.constexpr,
    BLOCK_R: tl.constexpr,  # ranks gathered per program, divides BLOCK_L
    BLOCK_L: tl.constexpr,  # 2**LOG_L >= L keys sorted per program
    LOG_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Program (n, c) sorts all of sample n's keys and gathers the ranks [c * BLOCK_R, (c + 1) *
    # BLOCK_R) of K; the sort is repeated by each program of a sample, the row traffic is not.
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    pos_l = tl.arange(0, BLOCK_L)
    ok = pos_l < L
    v = tl.load(noise_ptr + n * stride_nn + pos_l.to(tl.int64) * stride_nl, mask=ok, other=0.0).to(tl.float32)
    # float32 bits -> int32 in the floats' order: -0.0 as +0.0 (they compare equal), negative
    # values with their 31 low bits flipped. Key = (bits, position): the sort is stable.
    bits = v.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    keys = (bits.to(tl.int64) << 32) | pos_l.to(tl.int64)
    keys = tl.where(ok, keys, 0x7FFFFFFFFFFFFFFF)  # padding sorts last
    ids_shuffle = (_sort_keys(keys, LOG_L, TL_SORT) & 0xFFFFFFFF).to(tl.int32)  # (BLOCK_L,) by rank

    # mask, ids_restore (scattered) and ids_keep: each program of the sample writes its share
    rank = pos_l
    share = tl.cdiv(L, tl.num_programs(1))
    mine = (rank >= c * share) & (rank < (c + 1) * share) & ok
    tl.store(ids_restore_ptr + n * L + ids_shuffle, rank.to(tl.int64), mask=mine)
    tl.store(mask_ptr + n * L + ids_shuffle, (rank >= K).to(tl.float32), mask=mine)
    if WRITE_IDS_KEEP:
        tl.store(ids_keep_ptr + n * K + rank, ids_shuffle, mask=mine & (rank < K))
    if GATHER:
        # this program's ranks: row c of ids_shuffle seen as (BLOCK_L // BLOCK_R, BLOCK_R)
        chunks = tl.reshape(ids_shuffle, (BLOCK_L // BLOCK_R, BLOCK_R))
        sel = tl.arange(0, BLOCK_L // BLOCK_R)[:, None] == c
        src_l = tl.sum(tl.where(sel, chunks, 0), axis=0)  # (BLOCK_R,) positions l
        r = c * BLOCK_R + tl.arange(0, BLOCK_R)
        keep = r < K
        src_l64 = src_l.to(tl.int64)
        src = x_ptr + n * stride_xn + src_l64 * stride_xl  # (BLOCK_R,) row starts
        dst = out_ptr + (n * K + r.to(tl.int64)) * D
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            offs_d64 = offs_d.to(tl.int64)
            m = keep[:, None] & (offs_d[None, :] < D)
            val = tl.load(src[:, None] + offs_d64[None, :] * stride_xd, mask=m, other=0.0).to(tl.float32)
            if HAS_POS:
                p = tl.load(pos_ptr + src_l64[:, None] * stride_pl + offs_d64[None, :] * stride_pd, mask=m, other=0.0)
                val += p.to(tl.float32)
            tl.store(dst[:, None] + offs_d[None, :], cast(val, out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _masking_bwd_kernel(
    g_ptr,  # (N, K, D) gradient of the visible tokens, any strides
    ids_ptr,  # (N, L) int64 ids_restore, any strides
    gx_ptr,  # (N, L, D) gradient of x, contiguous (written when WRITE_GX)
    gpos_ptr,  # (num_chunks, L, D) float32 per-chunk sums over samples (written when POS_GRAD)
    N, L, D, K, n_per_prog,
    stride_gn, stride_gk, stride_gd,
    stride_in, stride_il,
    WRITE_GX: tl.constexpr,
    POS_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    chunk = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < L
    d_ok = offs_d < D
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    n_start = chunk * n_per_prog
    n_end = tl.minimum(n_start + n_per_prog, N)
    # per-sample pointers advance by one sample per iteration (int64 from the start); products
    # with the other strides in int64 too (any strides: they may pass 2^31)
    ids_n = ids_ptr + n_start.to(tl.int64) * stride_in
    g_n = g_ptr + n_start.to(tl.int64) * stride_gn
    gx_n = gx_ptr + n_start.to(tl.int64) * L * D
    ids_off = rows.to(tl.int64) * stride_il
    g_col = offs_d.to(tl.int64) * stride_gd
    for _ in range(n_start, n_end):
        r = tl.load(ids_n + ids_off, mask=row_ok, other=K)
        keep = row_ok & (r >= 0) & (r < K)
        g = tl.load(
            g_n + r[:, None] * stride_gk + g_col[None, :],
            mask=keep[:, None] & d_ok[None, :], other=0.0,
        )
        if WRITE_GX:
            tl.store(
                gx_n + rows[:, None] * D + offs_d[None, :],
                cast(g, gx_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :],
            )
        if POS_GRAD:
            acc += g.to(tl.float32)
        ids_n += stride_in
        g_n += stride_gn
        gx_n += L * D
    if POS_GRAD:
        tl.store(
            gpos_ptr + (chunk.to(tl.int64) * L + rows[:, None]) * D + offs_d[None, :],
            acc, mask=row_ok[:, None] & d_ok[None, :],
        )


@triton.jit
def _unshuffle_fwd_kernel(
    x_ptr,  # (N, 1 + K, D) decoder tokens, cls row first, any strides
    mt_ptr,  # (D,) mask token, any stride
    ids_ptr,  # (N, L) int64 ids_restore, any strides
    pos_ptr,  # (1 + L, D) decoder positional embedding, any strides (read when HAS_POS)
    out_ptr,  # (N, 1 + L, D) contiguous
    L, D, K,
    stride_xn, stride_xk, stride_xd,
    stride_mt,
    stride_in, stride_il,
    stride_pt, stride_pd,
    HAS_POS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # output row, 0 = cls
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = t < L + 1
    d_ok = offs_d < D
    t64 = t.to(tl.int64)  # products with strides in int64 (any strides: they may pass 2^31)
    offs_d64 = offs_d.to(tl.int64)
    r = tl.load(ids_ptr + n * stride_in + (t64 - 1) * stride_il, mask=t_ok & (t > 0), other=0)
    from_x = t_ok & ((t == 0) | ((r >= 0) & (r < K)))
    src = tl.where(t == 0, 0, r + 1)  # row of x
    val = tl.load(
        x_ptr + n * stride_xn + src[:, None] * stride_xk + offs_d64[None, :] * stride_xd,
        mask=from_x[:, None] & d_ok[None, :], other=0.0,
    ).to(tl.float32)
    mt = tl.load(mt_ptr + offs_d64 * stride_mt, mask=d_ok, other=0.0).to(tl.float32)
    val = tl.where(from_x[:, None], val, mt[None, :])
    m = t_ok[:, None] & d_ok[None, :]
    if HAS_POS:
        val += tl.load(pos_ptr + t64[:, None] * stride_pt + offs_d64[None, :] * stride_pd, mask=m,
                       other=0.0).to(tl.float32)
    tl.store(out_ptr + (n * (L + 1) + t[:, None]) * D + offs_d[None, :], cast(val, out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _unshuffle_bwd_kernel(
    g_ptr,  # (N, 1 + L, D) gradient of the output, any strides
    ids_ptr,  # (N, L) int64 ids_restore, any strides
    gx_ptr,  # (N, 1 + K, D) gradient of x, contiguous
    gmt_ptr,  # (num_chunks, num_row_blocks, D) float32 partial sums of mask-token rows
    gpos_ptr,  # (num_chunks, 1 + L, D) float32 partial sums over samples (when POS_GRAD)
    N, L, D, K, n_per_prog,
    stride_gn, stride_gt, stride_gd,
    stride_in, stride_il,
    POS_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    chunk = tl.program_id(0)
    rb = tl.program_id(1)
    t = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = t < L + 1
    d_ok = offs_d < D
    m = t_ok[:, None] & d_ok[None, :]
    mt_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    pos_acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    n_start = chunk * n_per_prog
    n_end = tl.minimum(n_start + n_per_prog, N)
    # per-sample pointers advance by one sample per iteration (int64 from the start)
    ids_n = ids_ptr + n_start.to(tl.int64) * stride_in
    g_n = g_ptr + n_start.to(tl.int64) * stride_gn
    gx_n = gx_ptr + n_start.to(tl.int64) * (K + 1) * D
    # products with the other strides in int64 too (any strides: they may pass 2^31)
    t64 = t.to(tl.int64)
    ids_off = (t64 - 1) * stride_il
    g_row = t64 * stride_gt
    g_col = offs_d.to(tl.int64) * stride_gd
    for _ in range(n_start, n_end):
        r = tl.load(ids_n + ids_off, mask=t_ok & (t > 0), other=0)
        to_x = t_ok & ((t == 0) | ((r >= 0) & (r < K)))
        dst = tl.where(t == 0, 0, r + 1)  # row of grad_x
        g = tl.load(g_n + g_row[:, None] + g_col[None, :], mask=m, other=0.0)
        tl.store(gx_n + dst[:, None] * D + offs_d[None, :], cast(g, gx_ptr.dtype.element_ty),
                 mask=to_x[:, None] & d_ok[None, :])
        gf = g.to(tl.float32)
        mt_acc += tl.sum(tl.where(to_x[:, None], 0.0, gf), axis=0)
        if POS_GRAD:
            pos_acc += gf
        ids_n += stride_in
        g_n += stride_gn
        gx_n += (K + 1) * D
    num_rb = tl.num_programs(1)
    tl.store(gmt_ptr + (chunk.to(tl.int64) * num_rb + rb) * D + offs_d, mt_acc, mask=d_ok)
    if POS_GRAD:
        tl.store(gpos_ptr + (chunk.to(tl.int64) * (L + 1) + t[:, None]) * D + offs_d[None, :], pos_acc, mask=m)


@triton.jit
def _sum_partials_kernel(
    p_ptr,  # (R, M) float32 partial sums, contiguous
    out_ptr,  # (M,) the sums, in out's dtype
    R, M,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        p = tl.load(p_ptr + rows[:, None].to(tl.int64) * M + offs_m[None, :],
                    mask=(rows[:, None] < R) & m_ok[None, :], other=0.0)
        acc += tl.sum(p, axis=0)
    tl.store(out_ptr + offs_m, cast(acc, out_ptr.dtype.element_ty), mask=m_ok)


# --------------------------------------------------------------------------------------------
# launch functions
# --------------------------------------------------------------------------------------------
def gpu_tiles(device: torch.device) -> bool:
    return device.type == "cuda" or GPU_TILES_ON_CPU


def _row_tiles(device: torch.device, rows: int, D: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D) for kernels that move (rows, D) tiles of tokens."""
    return _row_tiles_of(gpu_tiles(device), rows, D)


@functools.lru_cache(maxsize=256)  # every launch asks, with one of a few shapes
def _row_tiles_of(gpu: bool, rows: int, D: int) -> tuple[int, int]:
    if gpu:
        block_d = min(next_power_of_2(D), 256)
        return max(1, min(32, 4096 // block_d)), block_d
    block_d = next_power_of_2(D)
    return max(1, min(next_power_of_2(rows), 65536 // block_d)), block_d


@functools.lru_cache(maxsize=256)
def _tile_candidates(rows: int, D: int) -> tuple[tuple[str, tuple[int, int, int]], ...]:
    """(name, (BLOCK_R, BLOCK_D, num_warps)) of the row-tile kernels a GPU launch may choose
    among (:mod:`mimfast.kernels.tuning`), the GPU tiling of :func:`_row_tiles_of` first."""
    block_r, block_d = _row_tiles_of(True, rows, D)
    cands = {"default": (block_r, block_d, 4),
             "rows_x2_8warps": (min(64, block_r * 2), block_d, 8),
             "half_rows": (max(1, block_r // 2), block_d, 4)}
    wide = min(next_power_of_2(D), 1024)
    if wide > block_d:  # whole rows per program, fewer of them
        cands["whole_rows"] = (max(1, 4096 // wide), wide, 8 if wide >= 1024 else 4)  # 4 warps at 1024 spill
    return tuning.distinct(cands.items())


@functools.lru_cache(maxsize=256)
def _unshuffle_bwd_candidates(rows: int, D: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The row-tile candidates, and for the un-shuffle backward (whose programs each loop over a
    chunk of the batch for the mask token's partial sums) the same tiles with four times the
    programs, each looping over a quarter as many samples: fewer dependent trips a program
    (``(BLOCK_R, BLOCK_D, num_warps, programs factor)``)."""
    cands = _tile_candidates(rows, D)
    more = [(f"{name}_x4_programs", (*t, 4)) for name, t in cands if name in ("default", "whole_rows")]
    return tuning.distinct(list(cands) + more)


def _tiles(device: torch.device, rows: int, D: int, key: tuple, run, candidates=None) -> tuple[int, ...]:
    """(BLOCK_R, BLOCK_D, num_warps) of a row-tile launch: the tuner's choice on a GPU."""
    if tuning.applies(device):
        return tuning.choose(key, candidates or _tile_candidates(rows, D), run, device)
    return (*_row_tiles(device, rows, D), 4)


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 8 * sm_count(device)
    # the interpreter runs programs one by one: fewer, longer programs are faster
    return 8 if GPU_TILES_ON_CPU else 1


def _chunking(N: int, base_programs: int, device: torch.device, factor: int = 1) -> tuple[int, int]:
    """(samples per program, number of chunks) so that the grid has about ``factor`` times the
    target size."""
    chunks = max(1, min(N, cdiv(_target_programs(device) * factor, base_programs)))
    n_per = cdiv(N, chunks)
    return n_per, cdiv(N, n_per)


def _check_tokens(name: str, t: torch.Tensor, dims: int) -> None:
    if isinstance(t, torch.Tensor) and t.dtype in TOKEN_DTYPES and t.dim() == dims:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in TOKEN_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_ids(ids_restore: torch.Tensor, N: int, L: int, device: torch.device) -> None:
    if not isinstance(ids_restore, torch.Tensor) or ids_restore.dtype != torch.int64:
        raise TypeError(f"ids_restore must be an int64 tensor, got {getattr(ids_restore, 'dtype', ids_restore)}")
    if ids_restore.shape != (N, L):
        raise ValueError(f"ids_restore must be (N, L) = ({N}, {L}), got {tuple(ids_restore.shape)}")
    if ids_restore.device != device:
        raise ValueError(f"ids_restore is on {ids_restore.device}, expected {device}")


def sum_partials(partials: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (M,) = partials (R, M) summed over R in fp32, in a fixed order (deterministic)."""
    R, M = partials.shape
    if partials.dtype != torch.float32 or not partials.is_contiguous():
        raise ValueError("partials must be a contiguous float32 (R, M) tensor")
    if out.numel() != M or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous tensor of {M} elements, got shape {tuple(out.shape)}")
    grid, meta = _sum_partials_launch(gpu_tiles(partials.device), R, M)
    _sum_partials_kernel[grid](partials, out, R, M, **meta)
    return out


@functools.lru_cache(maxsize=256)
def _sum_partials_launch(gpu: bool, R: int, M: int) -> tuple[tuple[int], dict]:
    """(grid, compile-time kwargs) of sum_partials (read only: shared by every call of this key)."""
    if gpu:
        # each program's loop over R is latency-bound (one tile in flight at a time): narrow column
        # strips for many programs (about 128 where M allows), tall tiles of ~4096 elements for few
        # trips. (256 columns x 16 rows left the mask token's 512 columns to 2 programs of ~30 trips
        # each: most of the un-shuffle backward's time on the H200.)
        BLOCK_M = max(16, min(256, next_power_of_2(cdiv(M, 128))))
        BLOCK_R = max(1, min(next_power_of_2(R), 4096 // BLOCK_M))
    else:
        BLOCK_M = min(next_power_of_2(M), 65536)
        BLOCK_R = max(1, min(next_power_of_2(R), 262144 // BLOCK_M))
    return (cdiv(M, BLOCK_M),), dict(BLOCK_R=BLOCK_R, BLOCK_M=BLOCK_M)


def masking_forward(
    x: torch.Tensor | None,
    pos: torch.Tensor | None,
    noise: torch.Tensor,
    K: int,
    out_dtype: torch.dtype | None = None,
    ids_restore: torch.Tensor | None = None,
    write_ids_keep: bool = False,
    method: str = "count",
):
    """Rank the noise and gather the kept rows of x (+ pos).

    Args:
        x: (N, L, D) tokens, or None to compute only the masks (``mask``, ``ids_restore``,
            ``ids_keep``).
        pos: optional (L, D) positional embedding added to the gathered rows.
        noise: (N, L) float noise, small is kept; ties broken by index.
        K: number of kept rows, 1 <= K <= L.
        out_dtype: dtype of x_visible (default x's).
        ids_restore: (N, L) int64 ranks computed elsewhere (e.g. by ``torch.argsort``); then
            only the gather runs and ``mask`` is derived from them.
        write_ids_keep: also return ids_keep (N, K) int32, the kept positions in rank order.
        method: how the ranks are found when ``ids_restore`` is not given: ``"count"`` (each
            position counts the positions before it; any float noise) or ``"sort"`` (a bitonic
            sort of packed (noise bits, position) keys per sample; float32 / float16 / bfloat16
            noise). Both give the same ranks, masks and outputs.

    Returns:
        (x_visible (N, K, D) or None, mask (N, L) float32, ids_restore (N, L) int64,
        ids_keep (N, K) int32 or None).
    """
    if not isinstance(noise, torch.Tensor) or noise.dim() != 2 or not noise.is_floating_point():
        raise ValueError(f"noise must be a floating-point (N, L) tensor, got {getattr(noise, 'shape', noise)}")
    N, L = noise.shape
    device = noise.device
    if not 1 <= K <= L:
        raise ValueError(f"K must be in [1, L={L}], got {K}")
    D = 1
    if x is not None:
        _check_tokens("x", x, 3)
        if x.shape[0] != N or x.shape[1] != L:
            raise ValueError(f"x must be (N, L, D) with (N, L) = ({N}, {L}) from noise, got {tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"x is on {x.device}, noise on {device}")
        D = x.shape[2]
    if pos is not None:
        if x is None:
            raise ValueError("pos needs x")
        _check_tokens("pos", pos, 2)
        if pos.shape != (L, D):
            raise ValueError(f"pos must be (L, D) = ({L}, {D}), got {tuple(pos.shape)}")
        if pos.device != device:
            raise ValueError(f"pos is on {pos.device}, noise on {device}")
    if method not in ("count", "sort"):
        raise ValueError(f"method must be 'count' or 'sort', got {method!r}")
    ranks_given = ids_restore is not None
    if ranks_given:
        _check_ids(ids_restore, N, L, device)
    if method == "sort":
        if ranks_given:
            raise ValueError("ids_restore must be None with method='sort' (the kernel sorts the noise itself)")
        if noise.dtype not in TOKEN_DTYPES:
            raise TypeError(f"noise must be float32, float16 or bfloat16 for method='sort', got {noise.dtype}")
    out = None
    if x is not None:
        out_dtype = out_dtype or x.dtype
        if out_dtype not in TOKEN_DTYPES:
            raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
        out = torch.empty((N, K, D), dtype=out_dtype, device=device)
    if ranks_given:
        mask = (ids_restore >= K).to(torch.float32)
        ids_out = ids_restore
    else:
        mask = torch.empty((N, L), dtype=torch.float32, device=device)
        ids_out = torch.empty((N, L), dtype=torch.int64, device=device)
    ids_keep = torch.empty((N, K), dtype=torch.int32, device=device) if write_ids_keep else None
    if method == "sort":
        _masking_sort_forward(x, pos, noise, K, out, mask, ids_out, ids_keep)
        return out, mask, ids_out, ids_keep
    block_r, meta = _masking_fwd_meta(gpu_tiles(device), L, D, pos is not None, x is not None, bool(write_ids_keep),
                                      ranks_given)
    rs = ids_restore if ranks_given else ids_out
    _masking_fwd_kernel[(N, cdiv(L, block_r))](
        x if x is not None else noise, pos if pos is not None else noise, noise, rs,
        out if out is not None else mask, mask, ids_out, ids_keep if ids_keep is not None else ids_out,
        L, D, K,
        *(x.stride() if x is not None else (0, 0, 0)),
        *(pos.stride() if pos is not None else (0, 0)),
        *noise.stride(), *rs.stride(), **meta,
    )
    return out, mask, ids_out, ids_keep


@functools.lru_cache(maxsize=256)
def _masking_fwd_meta(gpu: bool, L: int, D: int, has_pos: bool, gather: bool, write_ids_keep: bool,
                      ranks_given: bool) -> tuple[int, dict]:
    """(BLOCK_R, compile-time kwargs) of the count forward (read only: shared by every call of this key)."""
    if gpu:
        BLOCK_R, BLOCK_L, BLOCK_D = 16, min(next_power_of_2(L), 256), min(next_power_of_2(D), 256)
    else:
        BLOCK_R, BLOCK_L = min(next_power_of_2(L), 64), next_power_of_2(L)
        BLOCK_D = next_power_of_2(D)
    return BLOCK_R, dict(HAS_POS=has_pos, GATHER=gather, WRITE_IDS_KEEP=write_ids_keep, RANKS_GIVEN=ranks_given,
                         BLOCK_R=BLOCK_R, BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D, num_warps=4)


def _masking_sort_forward(x, pos, noise, K, out, mask, ids_restore, ids_keep):
    N, L = noise.shape
    D = x.shape[2] if x is not None else 1
    BLOCK_L = max(16, next_power_of_2(L))
    if x is None:
        BLOCK_R, BLOCK_D = BLOCK_L, 16  # masks only: one program per sample
    elif gpu_tiles(noise.device):
        BLOCK_R, BLOCK_D = 16, min(next_power_of_2(D), 256)
    else:
        BLOCK_R, BLOCK_D = BLOCK_L, next_power_of_2(D)
    xs = x if x is not None else noise
    _masking_sort_fwd_kernel[(N, cdiv(K, BLOCK_R))](
        xs, pos if pos is not None else xs, noise, out if out is not None else mask, mask, ids_restore,
        ids_keep if ids_keep is not None else ids_restore,
        L, D, K,
        *(x.stride() if x is not None else (0, 0, 0)),
        *(pos.stride() if pos is not None else (0, 0)),
        noise.stride(0), noise.stride(1),
        HAS_POS=pos is not None, GATHER=x is not None, WRITE_IDS_KEEP=ids_keep is not None, TL_SORT=USE_TL_SORT,
        BLOCK_R=BLOCK_R, BLOCK_L=BLOCK_L, LOG_L=BLOCK_L.bit_length() - 1, BLOCK_D=BLOCK_D,
        num_warps=4,
    )


def masking_backward(
    grad_visible: torch.Tensor,
    ids_restore: torch.Tensor,
    L: int,
    grad_x_dtype: torch.dtype | None,
    grad_pos_dtype: torch.dtype | None,
    tiles: tuple[int, int, int] | None = None,
):
    """Gradients of :func:`masking_forward`'s gather.

    Args:
        grad_visible: (N, K, D) gradient of x_visible.
        ids_restore: (N, L) int64.
        L: number of patches.
        grad_x_dtype: dtype of grad_x (N, L, D), or None to skip it.
        grad_pos_dtype: dtype of grad_pos (L, D) = sum over the batch, or None to skip it.
        tiles: (BLOCK_R, BLOCK_D, num_warps); default the tuner's choice on a GPU
            (:func:`_tile_candidates`).

    Returns:
        (grad_x or None, grad_pos or None).
    """
    _check_tokens("grad_visible", grad_visible, 3)
    N, K, D = grad_visible.shape
    device = grad_visible.device
    _check_ids(ids_restore, N, L, device)
    if grad_x_dtype is None and grad_pos_dtype is None:
        return None, None
    if tiles is None:
        tiles = _tiles(device, L, D, ("masking_bwd", N, L, D, K, grad_visible.dtype, grad_visible.stride(),
                                      grad_x_dtype, grad_pos_dtype, device),
                       lambda t: masking_backward(grad_visible, ids_restore, L, grad_x_dtype, grad_pos_dtype, t))
    BLOCK_R, BLOCK_D, warps = tiles
    row_blocks, d_blocks = cdiv(L, BLOCK_R), cdiv(D, BLOCK_D)
    pos_grad = grad_pos_dtype is not None
    n_per, chunks = _chunking(N, row_blocks * d_blocks, device) if pos_grad else (1, N)
    gx = torch.empty((N, L, D), dtype=grad_x_dtype, device=device) if grad_x_dtype is not None else None
    partials = torch.empty((chunks, L * D), dtype=torch.float32, device=device) if pos_grad else None
    dummy = grad_visible
    _masking_bwd_kernel[(chunks, row_blocks, d_blocks)](
        grad_visible, ids_restore, gx if gx is not None else dummy, partials if pos_grad else dummy,
        N, L, D, K, n_per,
        *grad_visible.stride(), *ids_restore.stride(),
        WRITE_GX=gx is not None, POS_GRAD=pos_grad, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=warps,
    )
    gpos = None
    if pos_grad:
        gpos = sum_partials(partials, torch.empty((L, D), dtype=grad_pos_dtype, device=device))
    return gx, gpos


def unshuffle_forward(
    x: torch.Tensor,
    mask_token: torch.Tensor,
    ids_restore: torch.Tensor,
    pos: torch.Tensor | None,
    out_dtype: torch.dtype | None = None,
    tiles: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Decoder input (N, 1 + L, D) from x (N, 1 + K, D), mask_token (D,), ids_restore (N, L)
    and an optional (1 + L, D) positional embedding. ``tiles``: (BLOCK_R, BLOCK_D, num_warps),
    default the tuner's choice on a GPU (:func:`_tile_candidates`)."""
    _check_tokens("x", x, 3)
    N, K1, D = x.shape
    device = x.device
    if K1 < 2:
        raise ValueError(f"x must hold the cls row and at least one visible row, got {K1} rows")
    if not isinstance(ids_restore, torch.Tensor) or ids_restore.dim() != 2:
        raise ValueError(f"ids_restore must be (N, L), got {getattr(ids_restore, 'shape', ids_restore)}")
    L = ids_restore.shape[1]
    _check_ids(ids_restore, N, L, device)
    K = K1 - 1
    if K > L:
        raise ValueError(f"x has {K} visible rows but ids_restore only L={L} positions")
    _check_tokens("mask_token", mask_token, 1)
    if mask_token.shape[0] != D or mask_token.device != device:
        raise ValueError(f"mask_token must be ({D},) on {device}, got {tuple(mask_token.shape)} on {mask_token.device}")
    if pos is not None:
        _check_tokens("pos", pos, 2)
        if pos.shape != (L + 1, D) or pos.device != device:
            raise ValueError(f"pos must be (1 + L, D) = ({L + 1}, {D}) on {device}, got {tuple(pos.shape)}")
    out_dtype = out_dtype or x.dtype
    if out_dtype not in TOKEN_DTYPES:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    if tiles is None:
        tiles = _tiles(device, L + 1, D, ("unshuffle_fwd", N, L, D, K, x.dtype, x.stride(), mask_token.dtype,
                                          None if pos is None else pos.dtype, out_dtype, device),
                       lambda t: unshuffle_forward(x, mask_token, ids_restore, pos, out_dtype, t))
    BLOCK_R, BLOCK_D, warps = tiles
    out = torch.empty((N, L + 1, D), dtype=out_dtype, device=device)
    _unshuffle_fwd_kernel[(N, cdiv(L + 1, BLOCK_R), cdiv(D, BLOCK_D))](
        x, mask_token, ids_restore, pos if pos is not None else x, out,
        L, D, K,
        *x.stride(), mask_token.stride(0), *ids_restore.stride(),
        *(pos.stride() if pos is not None else (0, 0)),
        HAS_POS=pos is not None, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=warps,
    )
    return out


def unshuffle_backward(
    grad_out: torch.Tensor,
    ids_restore: torch.Tensor,
    K: int,
    grad_x_dtype: torch.dtype,
    grad_mt_dtype: torch.dtype,
    grad_pos_dtype: torch.dtype | None,
    tiles: tuple[int, ...] | None = None,
):
    """Gradients of :func:`unshuffle_forward`: grad_x (N, 1 + K, D), grad_mask_token (D,) and,
    when ``grad_pos_dtype`` is given, grad_pos (1 + L, D); sums are deterministic. ``tiles``:
    as for :func:`unshuffle_forward`, optionally with a fourth value, the factor on the number of
    programs (:func:`_unshuffle_bwd_candidates`)."""
    _check_tokens("grad_out", grad_out, 3)
    N, L1, D = grad_out.shape
    L = L1 - 1
    device = grad_out.device
    _check_ids(ids_restore, N, L, device)
    if not 1 <= K <= L:
        raise ValueError(f"K must be in [1, L={L}], got {K}")
    if tiles is None:
        tiles = _tiles(device, L1, D, ("unshuffle_bwd", N, L, D, K, grad_out.dtype, grad_out.stride(), grad_x_dtype,
                                       grad_mt_dtype, grad_pos_dtype, device),
                       lambda t: unshuffle_backward(grad_out, ids_restore, K, grad_x_dtype, grad_mt_dtype,
                                                    grad_pos_dtype, t), _unshuffle_bwd_candidates(L1, D))
    BLOCK_R, BLOCK_D, warps, *factor = tiles
    row_blocks, d_blocks = cdiv(L1, BLOCK_R), cdiv(D, BLOCK_D)
    n_per, chunks = _chunking(N, row_blocks * d_blocks, device, factor[0] if factor else 1)
    pos_grad = grad_pos_dtype is not None
    gx = torch.empty((N, K + 1, D), dtype=grad_x_dtype, device=device)
    mt_partials = torch.empty((chunks * row_blocks, D), dtype=torch.float32, device=device)
    pos_partials = torch.empty((chunks, L1 * D), dtype=torch.float32, device=device) if pos_grad else mt_partials
    _unshuffle_bwd_kernel[(chunks, row_blocks, d_blocks)](
        grad_out, ids_restore, gx, mt_partials, pos_partials,
        N, L, D, K, n_per,
        *grad_out.stride(), *ids_restore.stride(),
        POS_GRAD=pos_grad, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=warps,
    )
    gmt = sum_partials(mt_partials, torch.empty((D,), dtype=grad_mt_dtype, device=device))
    gpos = None
    if pos_grad:
        gpos = sum_partials(pos_partials, torch.empty((L1, D), dtype=grad_pos_dtype, device=device))
    return gx, gmt, gpos
