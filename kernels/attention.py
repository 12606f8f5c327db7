"""Multi-head self-attention for ViT shapes, reading q, k, v straight from the packed qkv.

Replaces (timm 0.3.2 ``Attention.forward``, the official MAE / BEiT code)::

    qkv = qkv.reshape(B, S, 3, H, Dh).permute(2, 0, 3, 1, 4)   # copy: 3 * B*S*H*Dh read + write
    attn = (q * scale) @ k.transpose(-2, -1)                    # writes B*H*S*S
    attn = (attn + bias).softmax(-1)                            # reads / writes B*H*S*S (twice)
    out = (attn @ v).transpose(1, 2).reshape(B, S, H * Dh)      # reads B*H*S*S; copy of the output

with kernels that read q, k and v of one head by strides from ``qkv`` (B, S, 3*H*Dh) and write
``out`` (B, S, H*Dh) ready for ``proj``: no permute, no (S, S) matrix in memory.

Forward (``_attn_fwd``): one program per (batch, head, block of BLOCK_M queries) streams key
blocks of BLOCK_N with an online softmax in fp32 (exp2, scale folded into log2 units) and saves
the natural logsumexp (B, H, S) for the backward. With BLOCK_N >= S one program holds all keys
(a single pass); the benchmark compares that with tiling.
Bytes: reads 3*B*S*H*Dh (q, k, v; k, v once per query block) + bias, writes B*S*H*Dh + B*H*S*4.
FLOPs: 4*B*H*S^2*Dh.

Backward, FlashAttention-2 style (delta = rowsum(o * do), P recomputed from the logsumexp):
  - ``_attn_bwd_fused``: S <= BLOCK (one tile holds every query and key of a head): one program
    per (batch, head) computes delta, dq, dk, dv in one pass and never writes delta.
    Bytes: reads q, k, v, o, do once (5*B*S*H*Dh) + lse, writes dqkv (3*B*S*H*Dh).
  - ``_attn_bwd_dq`` then ``_attn_bwd_dkdv`` (any S): the first owns a block of queries, computes
    delta (saved for the second) and dq over all key blocks; the second owns a block of keys and
    accumulates dk, dv over all query blocks (k, v re-read per query block, q, do per key
    block; mostly L2 hits at these lengths). No atomics.
  - ``_attn_bwd_onepass`` (S <= 256): one program per (batch, head) holds every key and loops
    over query blocks, dq finished per block, dk / dv accumulated (five products a block).
Tile orientation: Hopper's warpgroup MMA needs 64 or more rows on a product's M side, so a
program that owns fewer than 64 queries can work on (keys x queries) tiles instead
(``dq_keys_major``, ``fwd_keys_major``: dq^T += k^T dS^T, out^T += v^T P^T), as the dk / dv
kernel always does. The inner loops may run their partial last block in smaller steps
(``fwd_tail``, ``bwd_tail``: S = 197 in blocks of 64 then does 208 rows of work, not 256).
Gradients land in one (B, S, 3*H*Dh) tensor in the packed layout (and strides) of ``qkv``.
On request the backward kernels also sum the gradient tiles they write over their rows (the
values as written), one fp32 row of partial sums per program's batch and block, summed in a
fixed order after: the gradient of the qkv Linear's bias without a pass over dqkv of its own
(the Linear's column sum read all of it again: 3*B*S*H*Dh elements a layer).
FLOPs: 2.5x the forward (fused); the split path recomputes Q K^T once more.

Bias (H, S, S) shared across the batch (BEiT's relative position bias): its gradient
sum_b dS[b] is reduced deterministically without float atomics: a program owns one
(head, query block) strip for a contiguous group of batches and accumulates over them (in
registers when it holds all keys, else read-modify-write of its own private strip), writing an
fp32 partial (G, H, S, S_B); the G partials are then summed in a fixed order. The loop over a
group of batches costs registers, so without a bias every program handles one batch. The bias
and the partials have rows of S_B = S rounded up to 16 elements (the launchers pad the bias
with zeros), so that their column masks allow 16-byte vector loads and stores.

Supports: any S >= 1 (masked tails), head dims up to 128 (Dh = 80 is padded to 128 with masks),
fp32 (``allow_tf32`` picks the dot's input precision), fp16, bf16; any strides of qkv and bias
(the backward copies a qkv with gaps, and a non-contiguous output gradient, once); a bias in
any of the three float dtypes, whatever qkv's. Does not support: attention dropout, masks other
than the additive bias, causal attention, separate q / k / v tensors, cross-attention,
head dims above 128.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace

import torch
import triton
import triton.language as tl

from mimfast.kernels import cdiv, next_power_of_2, sm_count, tuning
from mimfast.kernels.masking import sum_partials

__all__ = ["AttentionConfig", "default_config", "candidate_configs", "candidate_combinations", "attention_forward",
           "attention_backward"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128  # larger heads need other tilings (shared memory); not built
ONEPASS_MAX_S = 256  # the one-pass backward holds every key of a head in one program


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _qk_index(m, n, KEYS_MAJOR: tl.constexpr):
    """Broadcast a query-side and a key-side vector over a score tile: (queries x keys), or
    (keys x queries) with KEYS_MAJOR."""
    if KEYS_MAJOR:
        return m[None, :], n[:, None]
    else:
        return m[:, None], n[None, :]


@triton.jit
def _fwd_block(q, base, k_cols, v_cols, BIAS, h, offs_m, mask_m, offs_n, mask_d, m_i, l_i, acc,
               stride_qs, stride_bh, stride_bi, stride_bj, S, S_B, qk_scale2,
               HEAD_DIM: tl.constexpr, DH_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, MASK_N: tl.constexpr,
               DOT_PRECISION: tl.constexpr, KEYS_MAJOR: tl.constexpr):
    """One key block of the online softmax: (m_i, l_i, acc) updated. ``MASK_N`` off: every key of
    the block is < S (no key mask on the loads, no -inf fill of the scores). ``KEYS_MAJOR``: the
    scores are a (keys x queries) tile and ``acc`` is the output transposed, (DH_PAD, BLOCK_M),
    so that both products have the key block or the head dimension as their M side (warpgroup
    MMAs on sm_90 with fewer than 64 query rows)."""
    k_ptrs = base + offs_n[:, None] * stride_qs + k_cols[None, :]
    v_ptrs = base + offs_n[:, None] * stride_qs + v_cols[None, :]
    mask_n = offs_n < S
    if MASK_N:
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    elif HEAD_DIM == DH_PAD:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=mask_d[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
    qi, kj = _qk_index(offs_m, offs_n, KEYS_MAJOR)
    qm, kn = _qk_index(mask_m, mask_n, KEYS_MAJOR)
    if KEYS_MAJOR:
        s = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale2  # (BLOCK_N, BLOCK_M)
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale2  # (BLOCK_M, BLOCK_N)
    if HAS_BIAS:
        bias_ptrs = BIAS + h * stride_bh + qi * stride_bi + kj * stride_bj
        if MASK_N:
            bias = tl.load(bias_ptrs, mask=qm & (kj < S_B), other=0.0)
        else:  # keys < S <= S_B
            bias = tl.load(bias_ptrs, mask=qm, other=0.0)
        s += bias.to(tl.float32) * 1.4426950408889634
    if MASK_N:
        s = tl.where(kn, s, float("-inf"))
    if KEYS_MAJOR:
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha[None, :] + tl.dot(tl.trans(v), p.to(v.dtype), input_precision=DOT_PRECISION)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attn_fwd(
    QKV,  # (B, S, 3*H*HEAD_DIM) q | k | v, each head-major: column (part*H + h)*HEAD_DIM + d
    BIAS,  # (H, S, S) additive bias, any float dtype (unused unless HAS_BIAS)
    OUT,  # (B, S, H*HEAD_DIM) contiguous
    LSE,  # (B, H, S) fp32, natural logsumexp of each row of scale * q k^T + bias
    stride_qb, stride_qs, stride_qc,
    stride_bh, stride_bi, stride_bj,
    S, S_B, H, qk_scale2,  # S_B: bias columns to read (S padded to 16); qk_scale2 = scale * log2(e)
    HEAD_DIM: tl.constexpr, DH_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PEEL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TAIL: tl.constexpr, KEYS_MAJOR: tl.constexpr,
):
    # PEEL: the key blocks below S // BLOCK_N * BLOCK_N without key masks, the partial last one after
    # (TAIL < BLOCK_N: in steps of TAIL keys, so S = 197 in blocks of 64 runs 208 keys, not 256)
    num_m = tl.cdiv(S, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m
    start_m = (pid % num_m) * BLOCK_M
    b = bh // H
    h = bh % H

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DH_PAD)
    mask_m = offs_m < S
    mask_d = offs_d < HEAD_DIM
    # rows are recomputed per key block (a loop-invariant (BLOCK, DH_PAD) offset tile would
    # stay live in registers)
    base = QKV + b.to(tl.int64) * stride_qb
    q_cols = (h * HEAD_DIM + offs_d) * stride_qc
    k_cols = ((H + h) * HEAD_DIM + offs_d) * stride_qc
    v_cols = ((2 * H + h) * HEAD_DIM + offs_d) * stride_qc
    q = tl.load(base + offs_m[:, None] * stride_qs + q_cols[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_M, DH_PAD)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2
    if KEYS_MAJOR:  # the output transposed (_fwd_block)
        acc = tl.zeros([DH_PAD, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, DH_PAD], tl.float32)
    if PEEL:
        n_full = S - S % BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            m_i, l_i, acc = _fwd_block(q, base, k_cols, v_cols, BIAS, h, offs_m, mask_m, start_n + offs_n0, mask_d,
                                       m_i, l_i, acc, stride_qs, stride_bh, stride_bi, stride_bj, S, S_B, qk_scale2,
                                       HEAD_DIM, DH_PAD, HAS_BIAS, False, DOT_PRECISION, KEYS_MAJOR)
        if TAIL < BLOCK_N:
            offs_t = tl.arange(0, TAIL)
            for start_n in range(n_full, S, TAIL):
                m_i, l_i, acc = _fwd_block(q, base, k_cols, v_cols, BIAS, h, offs_m, mask_m, start_n + offs_t, mask_d,
                                           m_i, l_i, acc, stride_qs, stride_bh, stride_bi, stride_bj, S, S_B,
                                           qk_scale2, HEAD_DIM, DH_PAD, HAS_BIAS, True, DOT_PRECISION, KEYS_MAJOR)
        elif n_full < S:  # one partial block: an if, not a loop of at most one trip (fewer registers)
            m_i, l_i, acc = _fwd_block(q, base, k_cols, v_cols, BIAS, h, offs_m, mask_m, n_full + offs_n0, mask_d,
                                       m_i, l_i, acc, stride_qs, stride_bh, stride_bi, stride_bj, S, S_B, qk_scale2,
                                       HEAD_DIM, DH_PAD, HAS_BIAS, True, DOT_PRECISION, KEYS_MAJOR)
    else:
        for start_n in range(0, S, BLOCK_N):
            m_i, l_i, acc = _fwd_block(q, base, k_cols, v_cols, BIAS, h, offs_m, mask_m, start_n + offs_n0, mask_d,
                                       m_i, l_i, acc, stride_qs, stride_bh, stride_bi, stride_bj, S, S_B, qk_scale2,
                                       HEAD_DIM, DH_PAD, HAS_BIAS, True, DOT_PRECISION, KEYS_MAJOR)

    if KEYS_MAJOR:
        acc = tl.trans(acc)
    acc = acc / l_i[:, None]
    out_ptrs = OUT + (b.to(tl.int64) * S * H + h) * HEAD_DIM + offs_m[:, None] * (H * HEAD_DIM) + offs_d[None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + bh.to(tl.int64) * S + offs_m, lse, mask=mask_m)


@triton.jit
def _colsum_store(QSUM, row64, part, h, H, offs_d, mask_d, tile, tile_mask, HEAD_DIM: tl.constexpr,
                  PARTS: tl.constexpr = 3):
    """Column sums of a (rows, DH_PAD) gradient tile as written (its dtype), rows and columns
    outside ``tile_mask`` left out, into row ``row64`` of QSUM (P, PARTS*H*HEAD_DIM) fp32 at the
    columns of part ``part`` (q / k / v: 0 / 1 / 2 of 3) of head h: partial sums of the qkv bias
    gradient."""
    sums = tl.sum(tl.where(tile_mask, tile.to(tl.float32), 0.0), 0)
    tl.store(QSUM + (row64 * PARTS + part) * H * HEAD_DIM + h * HEAD_DIM + offs_d, sums, mask=mask_d)


@triton.jit
def _bwd_fused_batch(
    b64, h, QKV, OUT, DOUT, LSE, DQKV, QSUM, biasT, offs, offs_d, mask_s, mask_d, tile_mask, qkv_tile, od_tile,
    stride_qb, stride_qc, S, H, scale, qk_scale2,
    HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, NEED_QSUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dq, dk, dv of one (batch, head) held in one tile (and, with NEED_QSUM, their column sums
    in row b64 of QSUM); returns dS^T (keys x queries), fp32."""
    # transposed tiles (keys x queries), as in _attn_bwd_dkdv: dv and dk need no register
    # transpose, only dq does; ordered so that few (BLOCK, BLOCK) fp32 tiles are live at once
    od_base = (b64 * S * H + h) * HEAD_DIM
    o = tl.load(OUT + od_base + od_tile, mask=tile_mask, other=0.0)
    do = tl.load(DOUT + od_base + od_tile, mask=tile_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK,) rowsum(o * do)
    lse2 = tl.load(LSE + (b64 * H + h) * S + offs, mask=mask_s, other=0.0) * 1.4426950408889634
    q_base = b64 * stride_qb + h * HEAD_DIM * stride_qc
    k_base = q_base + H * HEAD_DIM * stride_qc
    v_base = k_base + H * HEAD_DIM * stride_qc
    q = tl.load(QKV + q_base + qkv_tile, mask=tile_mask, other=0.0)  # (BLOCK, DH_PAD)
    k = tl.load(QKV + k_base + qkv_tile, mask=tile_mask, other=0.0)
    sT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale2  # (BLOCK keys, BLOCK queries)
    if HAS_BIAS:
        sT += biasT
    pT = tl.exp2(sT - lse2[None, :])
    pT = tl.where(mask_s[:, None], pT, 0.0)
    dv = tl.dot(pT.to(do.dtype), do, input_precision=DOT_PRECISION).to(DQKV.dtype.element_ty)  # (BLOCK, DH_PAD)
    tl.store(DQKV + v_base + qkv_tile, dv, mask=tile_mask)
    if NEED_QSUM:
        _colsum_store(QSUM, b64, 2, h, H, offs_d, mask_d, dv, tile_mask, HEAD_DIM)
    v = tl.load(QKV + v_base + qkv_tile, mask=tile_mask, other=0.0)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    dsT = pT * (dpT - delta[None, :])  # d loss / d (scale * q k^T + bias), transposed
    ds16 = dsT.to(q.dtype)
    dk = (tl.dot(ds16, q, input_precision=DOT_PRECISION) * scale).to(DQKV.dtype.element_ty)
    tl.store(DQKV + k_base + qkv_tile, dk, mask=tile_mask)
    if NEED_QSUM:
        _colsum_store(QSUM, b64, 1, h, H, offs_d, mask_d, dk, tile_mask, HEAD_DIM)
    dq = (tl.dot(tl.trans(ds16), k, input_precision=DOT_PRECISION) * scale).to(DQKV.dtype.element_ty)
    tl.store(DQKV + q_base + qkv_tile, dq, mask=tile_mask)
    if NEED_QSUM:
        _colsum_store(QSUM, b64, 0, h, H, offs_d, mask_d, dq, tile_mask, HEAD_DIM)
    return dsT


@triton.jit
def _attn_bwd_fused(
    QKV,  # (B, S, 3*H*HEAD_DIM)
    BIAS,  # (H, S, S)
    OUT,  # (B, S, H*HEAD_DIM) contiguous, the forward output
    DOUT,  # (B, S, H*HEAD_DIM) contiguous, gradient of the output
    LSE,  # (B, H, S) fp32
    DQKV,  # (B, S, 3*H*HEAD_DIM) with the strides of QKV, written in full
    DBIAS,  # (G, H, S, S_B) fp32 partial bias gradients, one per batch group (unused unless NEED_DBIAS)
    QSUM,  # (B, 3*H*HEAD_DIM) fp32: each batch's column sums of dq, dk, dv (unused unless NEED_QSUM)
    stride_qb, stride_qs, stride_qc,
    stride_bh, stride_bi, stride_bj,
    B, S, S_B, H, batches_per_program, scale, qk_scale2,
    HEAD_DIM: tl.constexpr, DH_PAD: tl.constexpr, BLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr, NEED_DBIAS: tl.constexpr, NEED_QSUM: tl.constexpr, BATCH_LOOP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One tile holds all S queries and keys of a head (S <= BLOCK). program -> (group g, head h).
    # BATCH_LOOP: the program loops over a group of batches and sums the bias gradient in
    # registers; otherwise it handles batch g alone (a runtime loop costs registers: spills).
    pid = tl.program_id(0)
    g = pid // H
    h = pid % H
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, DH_PAD)
    mask_s = offs < S
    mask_d = offs_d < HEAD_DIM
    tile_mask = mask_s[:, None] & mask_d[None, :]
    # one offset tile for q, k, v and their gradients, one for out and its gradient
    qkv_tile = offs[:, None] * stride_qs + offs_d[None, :] * stride_qc
    od_tile = offs[:, None] * (H * HEAD_DIM) + offs_d[None, :]
    cols_b = offs < S_B  # bias columns (keys), padded: 16-byte vector loads and stores
    biasT = 0.0
    if HAS_BIAS:  # transposed: (keys, queries)
        biasT = tl.load(BIAS + h * stride_bh + offs[None, :] * stride_bi + offs[:, None] * stride_bj,
                        mask=cols_b[:, None] & mask_s[None, :], other=0.0).to(tl.float32) * 1.4426950408889634
    if BATCH_LOOP:
        dbiasT = tl.zeros([BLOCK, BLOCK], tl.float32)
        b_start = g.to(tl.int64) * batches_per_program  # int64: batch offsets may pass 2^31
        b_end = tl.minimum(b_start + batches_per_program, B)
        for b64 in range(b_start, b_end):
            dbiasT += _bwd_fused_batch(b64, h, QKV, OUT, DOUT, LSE, DQKV, QSUM, biasT, offs, offs_d, mask_s, mask_d,
                                       tile_mask, qkv_tile, od_tile, stride_qb, stride_qc, S, H, scale, qk_scale2,
                                       HEAD_DIM, HAS_BIAS, NEED_QSUM, DOT_PRECISION)
    else:
        dbiasT = _bwd_fused_batch(g.to(tl.int64), h, QKV, OUT, DOUT, LSE, DQKV, QSUM, biasT, offs, offs_d, mask_s,
                                  mask_d, tile_mask, qkv_tile, od_tile, stride_qb, stride_qc, S, H, scale, qk_scale2,
                                  HEAD_DIM, HAS_BIAS, NEED_QSUM, DOT_PRECISION)
    if NEED_DBIAS:
        dptr = DBIAS + (g.to(tl.int64) * H + h) * S * S_B + offs[None, :] * S_B + offs[:, None]
        tl.store(dptr, dbiasT, mask=cols_b[:, None] & mask_s[None, :])  # padded keys: dS = 0


@triton.jit
def _dq_block(dq, dbias, q, do, lse_t, delta_t, base, BIAS, dbias_strip, bias, h, offs_m, mask_m, offs_n, mask_d,
              k_cols, v_cols, stride_qs, stride_bh, stride_bi, stride_bj, S, S_B, qk_scale2,
              HAS_BIAS: tl.constexpr, NEED_DBIAS: tl.constexpr, ONE_N_BLOCK: tl.constexpr,
              DOT_PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr, KEYS_MAJOR: tl.constexpr):
    """One key block of :func:`_bwd_dq_batch`'s loop (any number of keys): (dq, dbias) updated."""
    mask_n = offs_n < S
    qi, kj = _qk_index(offs_m, offs_n, KEYS_MAJOR)
    qm, kn = _qk_index(mask_m, mask_n, KEYS_MAJOR)
    bias_mask = qm & (kj < S_B)  # padded bias columns: vector access
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(base + offs_n[:, None] * stride_qs + k_cols[None, :], mask=kv_mask, other=0.0)
    if KEYS_MAJOR:
        s = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale2
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale2
    if HAS_BIAS:
        if ONE_N_BLOCK:
            s += bias
        else:
            s += tl.load(BIAS + h * stride_bh + qi * stride_bi + kj * stride_bj,
                         mask=bias_mask, other=0.0).to(tl.float32) * 1.4426950408889634
    p = tl.exp2(s - lse_t)
    p = tl.where(kn, p, 0.0)
    v = tl.load(base + offs_n[:, None] * stride_qs + v_cols[None, :], mask=kv_mask, other=0.0)
    if KEYS_MAJOR:
        dp = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    else:
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta_t)
    if NEED_DBIAS:
        if ONE_N_BLOCK:
            dbias += ds
        else:  # this program is the only one touching these addresses (padded keys: ds = 0)
            dptr = dbias_strip + qi * S_B + kj
            if ACCUMULATE:
                tl.store(dptr, tl.load(dptr, mask=bias_mask, other=0.0) + ds, mask=bias_mask)
                tl.debug_barrier()  # the next batch re-reads these from other threads
            else:  # one batch per strip: written once, nothing read (no zero fill either)
                tl.store(dptr, ds, mask=bias_mask)
    if KEYS_MAJOR:
        dq += tl.dot(tl.trans(k), ds.to(k.dtype), input_precision=DOT_PRECISION)
    else:
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq, dbias


@triton.jit
def _bwd_dq_batch(
    b64, h, QKV, BIAS, OUT, DOUT, LSE, DELTA, DQKV, QSUM, qsum_row, dbias_strip, bias, dbias,
    offs_m, offs_n0, offs_d, mask_m, mask_d, q_cols, k_cols, v_cols, od_cols,
    stride_qb, stride_qs, stride_bh, stride_bi, stride_bj, S, S_B, H, scale, qk_scale2,
    HEAD_DIM: tl.constexpr, DH_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, NEED_DBIAS: tl.constexpr, NEED_QSUM: tl.constexpr, ONE_N_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr, KEYS_MAJOR: tl.constexpr, TAIL: tl.constexpr,
):
    """delta and dq of one query block of one (batch, head) (with NEED_QSUM, dq's column sums in
    row ``qsum_row`` of QSUM); returns the updated register bias gradient (ONE_N_BLOCK) or writes
    it to the in-memory strip ``dbias_strip`` (the (S, S_B) fp32 strip of this program's batch
    group and head): added to it where the program sums several batches (``ACCUMULATE``), stored
    where the strip is this batch's alone.

    KEYS_MAJOR: the score tiles are (keys x queries) and dq is accumulated transposed, dq^T +=
    k^T dS^T, so every product has the key block (or the head dimension) as its M side: on sm_90
    they run as warpgroup MMAs with k and v read from shared memory, where (queries x keys)
    products of fewer than 64 query rows run as mma.sync with k and v held in registers."""
    q_mask = mask_m[:, None] & mask_d[None, :]
    # row offsets depend on the batch, so no (BLOCK, DH_PAD) offset tile is loop-invariant
    od_rows = (b64 * S + offs_m[:, None]) * (H * HEAD_DIM)
    o = tl.load(OUT + od_rows + od_cols[None, :], mask=q_mask, other=0.0)
    do = tl.load(DOUT + od_rows + od_cols[None, :], mask=q_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,)
    row = (b64 * H + h) * S + offs_m
    tl.store(DELTA + row, delta, mask=mask_m)
    lse2 = tl.load(LSE + row, mask=mask_m, other=0.0) * 1.4426950408889634
    q_rows = b64 * stride_qb + offs_m[:, None] * stride_qs
    q = tl.load(QKV + q_rows + q_cols[None, :], mask=q_mask, other=0.0)
    base = QKV + b64 * stride_qb
    if KEYS_MAJOR:
        lse_t = lse2[None, :]
        delta_t = delta[None, :]
        dq = tl.zeros([DH_PAD, BLOCK_M], tl.float32)
    else:
        lse_t = lse2[:, None]
        delta_t = delta[:, None]
        dq = tl.zeros([BLOCK_M, DH_PAD], tl.float32)
    n_full = S - S % BLOCK_N if TAIL < BLOCK_N else S  # TAIL: the partial last key block in TAIL-key steps
    for start_n in range(0, n_full, BLOCK_N):
        dq, dbias = _dq_block(dq, dbias, q, do, lse_t, delta_t, base, BIAS, dbias_strip, bias, h, offs_m, mask_m,
                              start_n + offs_n0, mask_d, k_cols, v_cols, stride_qs, stride_bh, stride_bi, stride_bj,
                              S, S_B, qk_scale2, HAS_BIAS, NEED_DBIAS, ONE_N_BLOCK, DOT_PRECISION, ACCUMULATE,
                              KEYS_MAJOR)
    if TAIL < BLOCK_N:
        offs_t = tl.arange(0, TAIL)
        for start_n in range(n_full, S, TAIL):
            dq, dbias = _dq_block(dq, dbias, q, do, lse_t, delta_t, base, BIAS, dbias_strip, bias, h, offs_m, mask_m,
                                  start_n + offs_t, mask_d, k_cols, v_cols, stride_qs, stride_bh, stride_bi, stride_bj,
                                  S, S_B, qk_scale2, HAS_BIAS, NEED_DBIAS, False, DOT_PRECISION, ACCUMULATE,
                                  KEYS_MAJOR)

    if KEYS_MAJOR:
        dq = tl.trans(dq)
    dq = (dq * scale).to(DQKV.dtype.element_ty)
    tl.store(DQKV + q_rows + q_cols[None, :], dq, mask=q_mask)
    if NEED_QSUM:
        _colsum_store(QSUM, qsum_row, 0, h, H, offs_d, mask_d, dq, q_mask, HEAD_DIM, 1)
    return dbias


@triton.jit
def _attn_bwd_dq(
    QKV,  # (B, S, 3*H*HEAD_DIM)
    BIAS,  # (H, S, S)
    OUT,  # (B, S, H*HEAD_DIM) contiguous
    DOUT,  # (B, S, H*HEAD_DIM) contiguous
    LSE,  # (B, H, S) fp32
    DELTA,  # (B, H, S) fp32, written here: rowsum(out * dout), read by _attn_bwd_dkdv
    DQKV,  # (B, S, 3*H*HEAD_DIM) with the strides of QKV; the q part is written here
    DBIAS,  # (G, H, S, S_B) fp32 partials; zero-filled by the caller unless ONE_N_BLOCK
    QSUM,  # (B * num_m, H*HEAD_DIM) fp32: row b * num_m + query block gets dq's column sums (NEED_QSUM)
    stride_qb, stride_qs, stride_qc,
    stride_bh, stride_bi, stride_bj,
    B, S, S_B, H, batches_per_program, scale, qk_scale2,
    HEAD_DIM: tl.constexpr, DH_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, NEED_DBIAS: tl.constexpr, NEED_QSUM: tl.constexpr, ONE_N_BLOCK: tl.constexpr,
    BATCH_LOOP: tl.constexpr, DOT_PRECISION: tl.constexpr, KEYS_MAJOR: tl.constexpr, TAIL: tl.constexpr,
):
    # program -> (batch group g, head h, query block); the query block is the fastest index.
    # BATCH_LOOP: loop over the batches of group g (bias gradient summed over them); otherwise
    # the program handles batch g alone. KEYS_MAJOR: (keys x queries) tiles (_bwd_dq_batch).
    num_m = tl.cdiv(S, BLOCK_M)
    pid = tl.program_id(0)
    m_blk = pid % num_m
    start_m = m_blk * BLOCK_M
    gh = pid // num_m
    g = gh // H
    h = gh % H

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DH_PAD)
    mask_m = offs_m < S
    mask_d = offs_d < HEAD_DIM
    q_cols = (h * HEAD_DIM + offs_d) * stride_qc
    k_cols = ((H + h) * HEAD_DIM + offs_d) * stride_qc
    v_cols = ((2 * H + h) * HEAD_DIM + offs_d) * stride_qc
    od_cols = h * HEAD_DIM + offs_d
    dbias_strip = DBIAS + (g.to(tl.int64) * H + h) * S * S_B
    bias = 0.0
    dbias = 0.0
    qi, kj = _qk_index(offs_m, offs_n0, KEYS_MAJOR)  # the all-keys tile's bias and its gradient
    qm, _ = _qk_index(mask_m, offs_n0, KEYS_MAJOR)
    if ONE_N_BLOCK:  # all keys in one block: the bias tile is loaded once, its gradient kept in registers
        if HAS_BIAS:
            bias = tl.load(BIAS + h * stride_bh + qi * stride_bi + kj * stride_bj, mask=qm & (kj < S_B), other=0.0)
            bias = bias.to(tl.float32) * 1.4426950408889634
        if NEED_DBIAS:
            if KEYS_MAJOR:
                dbias = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            else:
                dbias = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)

    if BATCH_LOOP:
        b_start = g.to(tl.int64) * batches_per_program  # int64: batch offsets may pass 2^31
        b_end = tl.minimum(b_start + batches_per_program, B)
        for b64 in range(b_start, b_end):
            dbias = _bwd_dq_batch(b64, h, QKV, BIAS, OUT, DOUT, LSE, DELTA, DQKV, QSUM, b64 * num_m + m_blk,
                                  dbias_strip, bias, dbias, offs_m, offs_n0, offs_d, mask_m, mask_d, q_cols, k_cols,
                                  v_cols, od_cols, stride_qb, stride_qs, stride_bh, stride_bi, stride_bj, S, S_B, H,
                                  scale, qk_scale2, HEAD_DIM, DH_PAD, BLOCK_M, BLOCK_N, HAS_BIAS, NEED_DBIAS,
                                  NEED_QSUM, ONE_N_BLOCK, DOT_PRECISION, True, KEYS_MAJOR, TAIL)
    else:
        b64 = g.to(tl.int64)
        dbias = _bwd_dq_batch(b64, h, QKV, BIAS, OUT, DOUT, LSE, DELTA, DQKV, QSUM, b64 * num_m + m_blk,
                              dbias_strip, bias, dbias, offs_m, offs_n0, offs_d, mask_m, mask_d, q_cols, k_cols,
                              v_cols, od_cols, stride_qb, stride_qs, stride_bh, stride_bi, stride_bj, S, S_B, H,
                              scale, qk_scale2, HEAD_DIM, DH_PAD, BLOCK_M, BLOCK_N, HAS_BIAS, NEED_DBIAS,
                              NEED_QSUM, ONE_N_BLOCK, DOT_PRECISION, False, KEYS_MAJOR, TAIL)

    if ONE_N_BLOCK:
        if NEED_DBIAS:
            tl.store(dbias_strip + qi * S_B + kj, dbias, mask=qm & (kj < S_B))


@triton.jit
def _kv_block(QKV, b64, h, offs_n, S, H, stride_qb, stride_qs, stride_qc,
              HEAD_DIM: tl.constexpr, DH_PAD: tl.constexpr):
    """A key block's setup in the backward kernels that hold one: the head-dimension offsets and
    mask, the rows' mask and offsets, the q / k / v column offsets of head h, and the block's k
    and v tiles (BLOCK_N, DH_PAD)."""
    offs_d = tl.arange(0, DH_PAD)
    mask_d = offs_d < HEAD_DIM
    kv_mask = (offs_n < S)[:, None] & mask_d[None, :]
    kv_rows = b64 * stride_qb + offs_n[:, None] * stride_qs
    q_cols = (h * HEAD_DIM + offs_d) * stride_qc
    k_cols = ((H + h) * HEAD_DIM + offs_d) * stride_qc
    v_cols = ((2 * H + h) * HEAD_DIM + offs_d) * stride_qc
    k = tl.load(QKV + kv_rows + k_cols[None, :], mask=kv_mask, other=0.0)
    v = tl.load(QKV + kv_rows + v_cols[None, :], mask=kv_mask, other=0.0)
    return offs_d, mask_d, kv_mask, kv_rows, q_cols, k_cols, v_cols, k, v


@triton.jit
def _dkdv_block(dk, dv, k, v, QKV, BIAS, DOUT, LSE, DELTA, b64, bh, h, offs_m, offs_n, mask_d, q_cols, do_cols,
                stride_qb, stride_qs, stride_bh, stride_bi, stride_bj, S, S_B, H, qk_scale2,
                HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One query block of :func:`_attn_bwd_dkdv`'s loop (any number of rows): (dk, dv) updated."""
    # row offsets recomputed per query block: no loop-invariant (BLOCK, DH_PAD) offset tile
    mask_m = offs_m < S
    q_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(QKV + b64 * stride_qb + offs_m[:, None] * stride_qs + q_cols[None, :], mask=q_mask, other=0.0)
    row = bh.to(tl.int64) * S + offs_m
    # +inf logsumexp on padded query rows makes their probabilities exactly 0
    lse2 = tl.load(LSE + row, mask=mask_m, other=float("inf")) * 1.4426950408889634
    sT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale2  # (BLOCK_N keys, BLOCK_M queries)
    if HAS_BIAS:
        biasT = tl.load(BIAS + h * stride_bh + offs_m[None, :] * stride_bi + offs_n[:, None] * stride_bj,
                        mask=(offs_n < S_B)[:, None] & mask_m[None, :], other=0.0)
        sT += biasT.to(tl.float32) * 1.4426950408889634
    pT = tl.exp2(sT - lse2[None, :])
    do = tl.load(DOUT + (b64 * S + offs_m[:, None]) * (H * HEAD_DIM) + do_cols[None, :], mask=q_mask, other=0.0)
    dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PRECISION)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    delta = tl.load(DELTA + row, mask=mask_m, other=0.0)
    dsT = pT * (dpT - delta[None, :])
    dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    QKV,  # (B, S, 3*H*HEAD_DIM)
    BIAS,  # (H, S, S)
    DOUT,  # (B, S, H*HEAD_DIM) contiguous
    LSE,  # (B, H, S) fp32
    DELTA,  # (B, H, S) fp32, from _attn_bwd_dq
    DQKV,  # (B, S, 3*H*HEAD_DIM) with the strides of QKV; the k and v parts are written here
    QSUM,  # (B * num_n, 2*H*HEAD_DIM) fp32: row b * num_n + key block gets dk's, dv's column sums (NEED_QSUM)
    stride_qb, stride_qs, stride_qc,
    stride_bh, stride_bi, stride_bj,
    S, S_B, H, scale, qk_scale2,
    HEAD_DIM: tl.constexpr, DH_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, NEED_QSUM: tl.constexpr, DOT_PRECISION: tl.constexpr, TAIL: tl.constexpr,
):
    # program -> (batch, head, key block); works on transposed tiles (keys x queries).
    num_n = tl.cdiv(S, BLOCK_N)
    pid = tl.program_id(0)
    bh = pid // num_n
    n_blk = pid % num_n
    start_n = n_blk * BLOCK_N
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d, mask_d, kv_mask, kv_rows, q_cols, k_cols, v_cols, k, v = _kv_block(
        QKV, b64, h, offs_n, S, H, stride_qb, stride_qs, stride_qc, HEAD_DIM, DH_PAD)
    do_cols = h * HEAD_DIM + offs_d

    dk = tl.zeros([BLOCK_N, DH_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, DH_PAD], tl.float32)
    m_full = S - S % BLOCK_M if TAIL < BLOCK_M else S  # TAIL: the partial last query block in TAIL-row steps
    for start_m in range(0, m_full, BLOCK_M):
        dk, dv = _dkdv_block(dk, dv, k, v, QKV, BIAS, DOUT, LSE, DELTA, b64, bh, h, start_m + offs_m0, offs_n, mask_d,
                             q_cols, do_cols, stride_qb, stride_qs, stride_bh, stride_bi, stride_bj, S, S_B, H,
                             qk_scale2, HEAD_DIM, HAS_BIAS, DOT_PRECISION)
    if TAIL < BLOCK_M:
        offs_t = tl.arange(0, TAIL)
        for start_m in range(m_full, S, TAIL):
            dk, dv = _dkdv_block(dk, dv, k, v, QKV, BIAS, DOUT, LSE, DELTA, b64, bh, h, start_m + offs_t, offs_n,
                                 mask_d, q_cols, do_cols, stride_qb, stride_qs, stride_bh, stride_bi, stride_bj, S, S_B,
                                 H, qk_scale2, HEAD_DIM, HAS_BIAS, DOT_PRECISION)

    dk = (dk * scale).to(DQKV.dtype.element_ty)
    dv = dv.to(DQKV.dtype.element_ty)
    tl.store(DQKV + kv_rows + k_cols[None, :], dk, mask=kv_mask)
    tl.store(DQKV + kv_rows + v_cols[None, :], dv, mask=kv_mask)
    if NEED_QSUM:  # padded key rows hold sums over real queries: masked out
        row64 = b64 * num_n + n_blk
        _colsum_store(QSUM, row64, 0, h, H, offs_d, mask_d, dk, kv_mask, HEAD_DIM, 2)
        _colsum_store(QSUM, row64, 1, h, H, offs_d, mask_d, dv, kv_mask, HEAD_DIM, 2)


@triton.jit
def _onepass_batch(
    QKV, BIAS, OUT, DOUT, LSE, DQKV, DBIAS, QSUM, b64, h, g64, accumulate,
    stride_qb, stride_qs, stride_qc,
    stride_bh, stride_bi, stride_bj,
    S, S_B, H, scale, qk_scale2,
    HEAD_DIM: tl.constexpr, DH_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, NEED_DBIAS: tl.constexpr, NEED_QSUM: tl.constexpr, MAY_ACCUMULATE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, KEYS_MAJOR: tl.constexpr,
):
    """The backward of batch ``b64``, head ``h``; its bias gradient goes to strip ``g64`` of
    DBIAS, stored (``accumulate`` False, or ``MAY_ACCUMULATE`` off) or added to what is there;
    with NEED_QSUM, the column sums of dq, dk, dv to row ``b64`` of QSUM. KEYS_MAJOR: dq as
    (k^T dS^T)^T, a product whose M side is the head dimension, not the BLOCK_M query rows (a
    warpgroup MMA on sm_90 for Dh >= 64, where fewer than 64 query rows take mma.sync)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    mask_n = offs_n < S
    offs_d, mask_d, kv_mask, kv_rows, q_cols, k_cols, v_cols, k, v = _kv_block(
        QKV, b64, h, offs_n, S, H, stride_qb, stride_qs, stride_qc, HEAD_DIM, DH_PAD)
    od_cols = h * HEAD_DIM + offs_d

    dk = tl.zeros([BLOCK_N, DH_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, DH_PAD], tl.float32)
    dq_rows = tl.zeros([BLOCK_M, DH_PAD], tl.float32)  # dq as written, summed over the query blocks (NEED_QSUM)
    for start_m in range(0, S, BLOCK_M):
        offs_m = start_m + offs_m0
        mask_m = offs_m < S
        q_mask = mask_m[:, None] & mask_d[None, :]
        q_rows = b64 * stride_qb + offs_m[:, None] * stride_qs
        od_rows = (b64 * S + offs_m[:, None]) * (H * HEAD_DIM)
        q = tl.load(QKV + q_rows + q_cols[None, :], mask=q_mask, other=0.0)
        do = tl.load(DOUT + od_rows + od_cols[None, :], mask=q_mask, other=0.0)
        o = tl.load(OUT + od_rows + od_cols[None, :], mask=q_mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,) rowsum(o * do)
        # +inf logsumexp on padded query rows makes their probabilities exactly 0
        lse2 = tl.load(LSE + (b64 * H + h) * S + offs_m, mask=mask_m, other=float("inf")) * 1.4426950408889634
        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale2  # (BLOCK_N keys, BLOCK_M queries)
        bias_mask = (offs_n < S_B)[:, None] & mask_m[None, :]  # padded bias columns: vector access
        if HAS_BIAS:
            biasT = tl.load(BIAS + h * stride_bh + offs_m[None, :] * stride_bi + offs_n[:, None] * stride_bj,
                            mask=bias_mask, other=0.0)
            sT += biasT.to(tl.float32) * 1.4426950408889634
        pT = tl.exp2(sT - lse2[None, :])
        pT = tl.where(mask_n[:, None], pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])  # d loss / d (scale * q k^T + bias), transposed
        if NEED_DBIAS:  # the program's own strip (padded keys: dS = 0); the same thread reads what it wrote
            dbias_ptr = DBIAS + ((g64 * H + h) * S + offs_m[None, :]) * S_B + offs_n[:, None]
            if MAY_ACCUMULATE:
                dsT_sum = dsT + tl.load(dbias_ptr, mask=bias_mask & accumulate, other=0.0)
                tl.store(dbias_ptr, dsT_sum, mask=bias_mask)
            else:  # stored once: no load (fewer registers than a load masked off at run time)
                tl.store(dbias_ptr, dsT, mask=bias_mask)
        ds16 = dsT.to(q.dtype)
        dk += tl.dot(ds16, q, input_precision=DOT_PRECISION)
        if KEYS_MAJOR:
            dq = tl.trans(tl.dot(tl.trans(k), ds16, input_precision=DOT_PRECISION))
        else:
            dq = tl.dot(tl.trans(ds16), k, input_precision=DOT_PRECISION)
        dq = (dq * scale).to(DQKV.dtype.element_ty)
        tl.store(DQKV + q_rows + q_cols[None, :], dq, mask=q_mask)
        if NEED_QSUM:
            dq_rows += tl.where(q_mask, dq.to(tl.float32), 0.0)

    dk = (dk * scale).to(DQKV.dtype.element_ty)
    dv = dv.to(DQKV.dtype.element_ty)
    tl.store(DQKV + kv_rows + k_cols[None, :], dk, mask=kv_mask)
    tl.store(DQKV + kv_rows + v_cols[None, :], dv, mask=kv_mask)
    if NEED_QSUM:
        _colsum_store(QSUM, b64, 0, h, H, offs_d, mask_d, dq_rows, mask_d[None, :], HEAD_DIM)
        _colsum_store(QSUM, b64, 1, h, H, offs_d, mask_d, dk, kv_mask, HEAD_DIM)
        _colsum_store(QSUM, b64, 2, h, H, offs_d, mask_d, dv, kv_mask, HEAD_DIM)


@triton.jit
def _attn_bwd_onepass(
    QKV,  # (B, S, 3*H*HEAD_DIM)
    BIAS,  # (H, S, S) (unused unless HAS_BIAS)
    OUT,  # (B, S, H*HEAD_DIM) contiguous, the forward output
    DOUT,  # (B, S, H*HEAD_DIM) contiguous, gradient of the output
    LSE,  # (B, H, S) fp32
    DQKV,  # (B, S, 3*H*HEAD_DIM) with the strides of QKV; q, k and v parts written here
    DBIAS,  # (G, H, S, S_B) fp32: each batch group's bias gradient (unused unless NEED_DBIAS)
    QSUM,  # (B, 3*H*HEAD_DIM) fp32: each batch's column sums of dq, dk, dv (unused unless NEED_QSUM)
    stride_qb, stride_qs, stride_qc,
    stride_bh, stride_bi, stride_bj,
    B, PER, S, S_B, H, scale, qk_scale2,
    HEAD_DIM: tl.constexpr, DH_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, NEED_DBIAS: tl.constexpr, NEED_QSUM: tl.constexpr, BATCH_LOOP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, KEYS_MAJOR: tl.constexpr,
):
    """The whole backward of one head of one batch (``BATCH_LOOP`` off) or of ``PER`` batches
    in turn (on), every key in one tile (BLOCK_N >= S): the query blocks in a loop, each one's dq
    finished in it (all keys are here, so nothing is summed across programs), dk and dv
    accumulated over the loop. Five products a query block against the split kernels' seven
    (they recompute q k^T and dO v^T each). The bias gradient: one fp32 strip per (batch group,
    head), stored by the group's first batch and added to by the others (the batch loop: PER
    times fewer partials to write and sum), summed over the groups after."""
    pid = tl.program_id(0)
    g = pid // H
    h = pid % H
    g64 = g.to(tl.int64)
    if BATCH_LOOP:
        b_start = g64 * PER
        for i in range(0, tl.minimum(PER, B - g * PER)):
            b64 = b_start + i  # int64 (a tensor under the interpreter too)
            _onepass_batch(QKV, BIAS, OUT, DOUT, LSE, DQKV, DBIAS, QSUM, b64, h, g64, b64 > b_start,
                           stride_qb, stride_qs, stride_qc, stride_bh, stride_bi, stride_bj,
                           S, S_B, H, scale, qk_scale2, HEAD_DIM, DH_PAD, BLOCK_M, BLOCK_N,
                           HAS_BIAS, NEED_DBIAS, NEED_QSUM, True, DOT_PRECISION, KEYS_MAJOR)
    else:  # one batch a program, its strip its own, stored once (no loop: a one-trip loop spills more)
        _onepass_batch(QKV, BIAS, OUT, DOUT, LSE, DQKV, DBIAS, QSUM, g64, h, g64, g64 < 0,
                       stride_qb, stride_qs, stride_qc, stride_bh, stride_bi, stride_bj,
                       S, S_B, H, scale, qk_scale2, HEAD_DIM, DH_PAD, BLOCK_M, BLOCK_N,
                       HAS_BIAS, NEED_DBIAS, NEED_QSUM, False, DOT_PRECISION, KEYS_MAJOR)


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionConfig:
    """Block sizes and launch choices; :func:`default_config` picks them from the shape.

    ``fwd_block_n >= S`` gives the one-program-holds-all-keys forward. ``bwd="fused"`` needs
    S <= ``fused_block`` (one tile per head); ``"split"`` runs the dq kernel then the dk/dv kernel;
    ``"onepass"`` one program per (batch, head) holding every key, its query blocks
    (``dq_block_m`` rows, ``dq_warps`` warps) in a loop (with a bias gradient, ``bias_batches``
    batches a program in turn, one fp32 partial per group, summed after).
    ``dq_block_n >= S`` keeps the bias gradient in registers; smaller tiles update a private
    fp32 strip in memory. ``bias_batches``: batches one program sums the bias gradient over
    (1: no batch loop, one fp32 partial per batch; 0: chosen from the device's SM count).
    ``fwd_peel``: the forward runs its whole key blocks without key masks and the partial last
    one after (``fwd_tail`` set implies it), in blocks of ``fwd_tail`` keys where set (0: one
    block of ``fwd_block_n``).
    ``fwd_keys_major``: the forward's tiles are (keys x queries) and its output accumulated
    transposed, so that fewer than 64 query rows still run as warpgroup MMAs on sm_90.
    ``bwd_tail``: the split backward kernels' inner loops (keys for dq, queries for dk / dv) run
    their partial last block in steps of this many rows (0: one block of the loop's size), so that
    S = 197 in blocks of 64 runs 208 rows of work, not 256. ``dq_keys_major``: the dq kernel
    (split) or the one-pass kernel's dq product works on (keys x queries) tiles, dq^T += k^T dS^T,
    so that no product has the query block as its M side (sm_90's warpgroup MMA needs M >= 64;
    fewer query rows fall back to mma.sync with k and v in registers).
    """

    fwd_block_m: int = 64
    fwd_block_n: int = 64
    fwd_warps: int = 4
    fwd_stages: int = 2
    fwd_peel: bool = False
    fwd_tail: int = 0
    fwd_keys_major: bool = False
    bwd: str = "split"
    fused_block: int = 64
    fused_warps: int = 4
    dq_block_m: int = 32
    dq_block_n: int = 64
    dq_warps: int = 4
    dq_keys_major: bool = False
    dkdv_block_m: int = 32
    dkdv_block_n: int = 64
    dkdv_warps: int = 4
    bwd_stages: int = 2
    bwd_tail: int = 0
    bias_batches: int = 0


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, next_power_of_2(n))


@functools.lru_cache(maxsize=256)  # asked on every launch; the config is frozen, so sharing it is safe
def default_config(seq_len: int, head_dim: int, has_bias: bool = False,
                   dtype: torch.dtype = torch.bfloat16) -> AttentionConfig:
    """Block sizes for S = ``seq_len``, Dh = ``head_dim`` and qkv's ``dtype`` (powers of two >= 16).

    Chosen without a GPU from ``ptxas -v`` for sm_90 (``python -m benchmarks.compile_check``,
    rechecked with 32-lane warps under triton 3.6 and 3.8): for bf16 / fp16 every default kernel
    without a bias compiles with no register spills; with a bias (rows padded to 16 elements,
    which vectorises its loads and halved the spilling variants), BEiT-B's forward (Dh 64) is
    clean and its all-keys dq kernel spills 24-44 B; ``benchmarks/bench_attention.py``
    times the alternatives (fused vs split backward, all-keys forward, bias gradient in registers
    vs in memory) so a GPU run can revise these. fp32 tiles take twice the registers and shared
    memory (and non-TF32 dots run without tensor cores), so fp32 gets half-size tiles.
    """
    s_pad = _pow2(seq_len)
    dh_pad = _pow2(head_dim)
    if dtype == torch.float32:
        if dh_pad <= 32:
            tiles = dict(fwd_block_m=32, fwd_block_n=32, dq_block_m=32, dq_block_n=32, dkdv_block_m=32, dkdv_block_n=32)
        elif dh_pad <= 64:
            tiles = dict(fwd_block_m=32, fwd_block_n=32, dq_block_m=16, dq_block_n=32, dkdv_block_m=16, dkdv_block_n=32)
        else:
            tiles = dict(fwd_block_m=16, fwd_block_n=32, dq_block_m=16, dq_block_n=16, dkdv_block_m=16, dkdv_block_n=32)
        fused_max, bias_regs_max = (32 if dh_pad <= 64 else 16), (128 if dh_pad <= 64 else 64)
    else:
        if dh_pad <= 32:
            tiles = dict(fwd_block_m=64, fwd_block_n=64, dq_block_m=64, dq_block_n=64, dkdv_block_m=64, dkdv_block_n=64)
        elif dh_pad <= 64:
            tiles = dict(fwd_block_m=64, fwd_block_n=64, dq_block_m=32, dq_block_n=64, dkdv_block_m=32, dkdv_block_n=64)
        else:  # Dh = 80 / 128 pad to 128: smaller tiles keep registers in check
            tiles = dict(fwd_block_m=64, fwd_block_n=32, dq_block_m=32, dq_block_n=32, dkdv_block_m=32,
                         dkdv_block_n=64, dkdv_warps=8)
        fused_max, bias_regs_max = 64, (256 if dh_pad <= 64 else 128)
    if s_pad <= fused_max:  # a head fits in one tile: one program per (batch, head) does the whole backward
        return AttentionConfig(**dict(tiles, fwd_block_m=s_pad, fwd_block_n=s_pad), bwd="fused", fused_block=s_pad,
                               fused_warps=4 if dh_pad <= 64 else 8, bias_batches=1)
    cfg = AttentionConfig(**tiles)
    if has_bias and s_pad <= bias_regs_max:  # all keys per dq program: the bias gradient stays in registers
        # 32 query rows per program at BEiT's 197 tokens: on an H200 (bf16, B 256, H 12, Dh 64) the
        # forward + backward took 1.62 ms against 1.93 ms with 16 rows (benchmarks/results/h200-2026-11-27)
        rows = 32 if s_pad > 128 and dh_pad <= 64 else 16
        cfg = replace(cfg, dq_block_m=rows, dq_block_n=s_pad, dq_warps=4 if s_pad <= 128 and dh_pad <= 64 else 8)
    return cfg


@functools.lru_cache(maxsize=256)
def candidate_configs(seq_len: int, head_dim: int, has_bias: bool = False,
                      dtype: torch.dtype = torch.bfloat16) -> dict[str, AttentionConfig]:
    """The default and the alternatives worth timing at this shape, by name ("default" first).

    The launchers time them on the GPU at the first call of a shape and keep the fastest
    (:mod:`mimfast.kernels.tuning`); ``benchmarks/bench_attention.py`` reports each. fp32 has
    the default only (its tiles are sized for correctness, not speed).
    """
    base = default_config(seq_len, head_dim, has_bias, dtype)
    alts = {"default": base}
    if dtype == torch.float32:
        return alts
    s_pad, wide = _pow2(seq_len), _pow2(head_dim) > 64
    if seq_len <= 64:  # default: one tile per head; the split backward and smaller forward tiles instead
        alts["split_bwd"] = replace(base, bwd="split", fwd_block_m=64, fwd_block_n=64)
        alts["fused_bwd_8warps"] = replace(base, fused_warps=8)
        alts["fwd_half_rows"] = replace(base, fwd_block_m=max(16, s_pad // 2))
        alts["fwd_half_rows_2warps"] = replace(base, fwd_block_m=max(16, s_pad // 2), fwd_warps=2)
    elif seq_len <= 128:  # one program holds the whole head in the backward too
        alts["fused_bwd"] = replace(base, bwd="fused", fused_block=s_pad, fused_warps=8, bias_batches=1)
        if wide:
            # ViT-H/14's encoder (S 65, Dh 80 padded to 128; 1.26x cuDNN's SDPA on the first run,
            # target 1.3x): tiles of 32 rows pad S to 96, not 128 (the forward's 64-row tiles and the
            # dk/dv kernel's 64-key tiles leave a third of their rows and keys useful). The one-tile
            # backward, the first run's fastest there, spills 180 B on sm_90 since it sums the qkv
            # bias gradient (none before; 16 warps spill more)
            alts["fwd_32x32"] = replace(base, fwd_block_m=32, fwd_block_n=32)
            # the same 32 query rows keys-major (sm_90: the 32-row tiles' products run as mma.sync;
            # (keys x queries) tiles make them warpgroup MMAs) over key blocks of 64 and a tail of
            # 16: 96 x 80 padded rows and keys a head against the default's 128 x 96
            alts["fwd_km_32x64_tail16"] = replace(base, fwd_block_m=32, fwd_block_n=64, fwd_keys_major=True,
                                                  fwd_tail=16)
            alts["dkdv_32"] = replace(base, dkdv_block_n=32, dkdv_warps=4)
    if 64 < seq_len <= 256:
        alts["allkeys_fwd"] = replace(base, fwd_block_m=32 if wide else 64, fwd_block_n=s_pad, fwd_warps=8)
        alts["fwd_128x64"] = replace(base, fwd_block_m=128, fwd_block_n=32 if wide else 64, fwd_warps=8)
        if base.fwd_block_n > 32:  # the key loop in steps of 32: S = 197 pads to 224 keys, not 256
            alts["fwd_inner_32"] = replace(base, fwd_block_n=32)
        # the whole key blocks without key masks (no masked loads, no -inf fill of the scores:
        # about one select of the softmax's few operations an element), the partial one after
        alts["fwd_peeled"] = replace(base, fwd_peel=True)
        if base.fwd_block_n > 32:
            alts["fwd_inner_32_peeled"] = replace(base, fwd_block_n=32, fwd_peel=True)
        if seq_len > 128 and _pow2(head_dim) >= 64:
            # BEiT-B (S 197): query tiles of 32 pad S to 224, not 256; keys-major so that they still
            # run as warpgroup MMAs (the output's product has the head dimension as its M side:
            # Dh >= 64 only), key blocks of 64 and a tail of 16 (208 keys)
            alts["fwd_km_32x64_tail16"] = replace(base, fwd_block_m=32, fwd_block_n=64, fwd_keys_major=True,
                                                  fwd_tail=16)
    if has_bias and seq_len > 64:
        alts["bias_grad_tiled"] = replace(base, dq_block_m=32, dq_block_n=64, dq_warps=4)
        alts["bias_grad_regs_m32"] = replace(base, dq_block_m=32, dq_block_n=s_pad, dq_warps=8)
        alts["bias_grad_regs_m16"] = replace(base, dq_block_m=16, dq_block_n=s_pad, dq_warps=8)
        alts["bias_one_batch"] = replace(base, bias_batches=1)
        # the no-bias tiling (key tiles of 64: no all-keys register tiles), each batch's bias
        # gradient stored to its own fp32 strip (no read-modify-write, no barrier) and summed over the
        # batch after: a transient B x H x S x S fp32 buffer (BEiT-B, B = 256: about 0.5 GB)
        alts["bias_grad_per_batch"] = replace(base, dq_block_m=32, dq_block_n=64, dq_warps=4, bias_batches=1)
    if has_bias and 64 < seq_len <= ONEPASS_MAX_S and _pow2(head_dim) <= 64:
        # every key in one program, the query blocks in a loop: five products a block, not seven,
        # and each batch's bias gradient stored once. 16 query rows on 16 warps compile for sm_90
        # without spills at Dh 64 (128 registers). The third H200 run: BEiT-B's backward 1.42 ms
        # against the default's 1.60 (chosen); without a bias it lost everywhere (MAE's decoder,
        # Dh 32: 0.72 ms with 32 rows, 1.19 with 16, against the split kernels' 0.61), so it is
        # offered with a bias only
        alts["bwd_onepass_m16"] = replace(base, bwd="onepass", dq_block_m=16, dq_warps=16, bias_batches=1)
        # the same with a batch loop (batches per program from the SM count): each group's bias
        # gradient summed in place, so a few partials to write and sum instead of B (BEiT-B,
        # B = 256: 0.5 GB written and read again)
        alts["bwd_onepass_m16_batch_loop"] = replace(base, bwd="onepass", dq_block_m=16, dq_warps=16, bias_batches=0)
        # two batches a program: the second adds to the strip the first stored moments before,
        # likely still in L2 (one program an SM: about 21 MB of strips at BEiT-B's shape), so
        # half the partials reach memory and the sum after reads half as many
        alts["bwd_onepass_m16_two_batches"] = replace(base, bwd="onepass", dq_block_m=16, dq_warps=16, bias_batches=2)
        # dq as (k^T dS^T)^T: the one product of the loop whose M side was the 16 query rows
        # (mma.sync) becomes a warpgroup MMA over the head dimension (sm_90: 120-184 B spilled
        # against 72-88 B, the transposed tiles passing through shared memory)
        alts["bwd_onepass_m16_km"] = replace(base, bwd="onepass", dq_block_m=16, dq_warps=16, bias_batches=1,
                                             dq_keys_major=True)
    if not has_bias and 128 < seq_len <= ONEPASS_MAX_S and _pow2(head_dim) <= 32:
        # MAE's decoder (S 197, Dh 32): the one-pass backward lost to the split kernels with query
        # blocks of 16 (1.19 ms) and 32 (0.72 ms, against 0.61) on the third H200 run, the time
        # falling fast with the block: blocks of 64, four a program, the products twice as wide.
        # sm_90: 96-112 B of spills on 16 or 8 warps (the 32-row one compiled clean)
        alts["bwd_onepass_m64"] = replace(base, bwd="onepass", dq_block_m=64, dq_warps=16, bias_batches=1)
        alts["bwd_onepass_m64_w8"] = replace(base, bwd="onepass", dq_block_m=64, dq_warps=8, bias_batches=1)
    if not has_bias and seq_len > 128:
        # the split backward's tiles doubled (fewer programs, each loaded key / query block reused
        # twice as long): MAE's decoder (S 197, Dh 32) took 0.60 ms a layer in the backward against
        # 0.20 ms in the forward on the H200. (Halved tiles, and the forward's 32-row tiles, lost by
        # 1.2-2.2x at every shape of the third run and are no longer offered.)
        alts["bwd_tiles_128"] = replace(base, dq_block_m=128, dq_block_n=64, dq_warps=8, dkdv_block_m=64,
                                        dkdv_block_n=128, dkdv_warps=8)
        # each program's rows as they are, its inner loop over the other side in steps of 32: the
        # last step of S = 197 then carries 5 of 32 rows, not 5 of 64 (224 padded rows, not 256)
        alts["bwd_inner_32"] = replace(base, dq_block_n=32, dkdv_block_m=32)
        # the Triton fused-attention tutorial's backward tiles: each program owns 128 rows (keys for
        # dk / dv, queries for dq) on 4 warps and steps through the other side 32 at a time (two
        # programs a head at S = 197, each loading its 128 rows once)
        if _pow2(head_dim) <= 32:
            alts["bwd_owned_128"] = replace(base, dq_block_m=128, dq_block_n=32, dq_warps=4, dkdv_block_m=32,
                                            dkdv_block_n=128, dkdv_warps=4)
    if seq_len > 64 and seq_len % 16:
        # the partial last block of each inner loop in steps of 16 rows: MAE's decoder and BEiT-B
        # (S 197, blocks of 64) run 208 keys or queries a program instead of 256 (about a fifth of
        # their products and exponentials), ViT-H/14's encoder (S 65, blocks of 32) 80 instead of 96
        if seq_len % base.fwd_block_n and base.fwd_block_n > 16:
            alts["fwd_tail_16"] = replace(base, fwd_tail=16)
        if base.bwd == "split" and (seq_len % base.dkdv_block_m and base.dkdv_block_m > 16
                                    or seq_len % base.dq_block_n and 16 < base.dq_block_n < seq_len):
            alts["bwd_tail_16"] = replace(base, bwd_tail=16)
    if seq_len > 64 and base.bwd == "split" and base.dq_block_m < 64 and _pow2(head_dim) >= 64:
        # the dq kernel on (keys x queries) tiles: with fewer than 64 query rows its products ran as
        # sm_90's mma.sync with k and v in registers (BEiT-B's all-keys dq kernel: 255 registers,
        # 16-40 B spilled); keys-major, each product has 64 or more keys (or head dims) as its M side
        # and runs as a warpgroup MMA reading k and v from shared memory (BEiT-B: 255 registers,
        # 4 B spilled; 16 warps spill 52-128 B; ViT-H/14: 131-182 registers, none spilled)
        alts["dq_keys_major"] = replace(base, dq_keys_major=True, dq_block_n=max(64, base.dq_block_n))
        if base.dq_block_n < s_pad:  # ViT-H/14's encoder (S 65): every key in one tile as well
            alts["dq_keys_major_allkeys"] = replace(base, dq_keys_major=True, dq_block_n=s_pad)
    if seq_len > 64:
        # one pipeline stage: fewer registers in both backward kernels (BEiT-B's all-keys dq
        # kernel compiles spill-free, 234 registers from 255 with 32 B spilled)
        alts["bwd_stages1"] = replace(base, bwd_stages=1)
    if seq_len > 128:
        # three pipeline stages: the next blocks' loads further ahead of the inner loops' products
        # (S = 197: three or four trips a program, each waiting on its k / v or q / dO loads)
        alts["fwd_stages3"] = replace(base, fwd_stages=3)
        if base.bwd == "split":
            alts["bwd_stages3"] = replace(base, bwd_stages=3)
    return {k: v for k, v in alts.items() if k == "default" or v != base}


_FWD_FIELDS = ("fwd_block_m", "fwd_block_n", "fwd_warps", "fwd_stages", "fwd_peel", "fwd_tail", "fwd_keys_major")


@functools.lru_cache(maxsize=256)
def _tuning_candidates(S: int, head_dim: int, has_bias: bool, dtype: torch.dtype,
                       part: str) -> tuple[tuple[str, AttentionConfig], ...]:
    """The distinct candidates for the forward (``part="fwd"``: the forward fields of each
    candidate on the default) or the backward (every other field), default first."""
    cands = candidate_configs(S, head_dim, has_bias, dtype)
    base = cands["default"]

    def own_part(cfg):
        if part == "fwd":
            return replace(base, **{f: getattr(cfg, f) for f in _FWD_FIELDS})
        return replace(cfg, **{f: getattr(base, f) for f in _FWD_FIELDS})

    return tuning.distinct((name, own_part(cfg)) for name, cfg in cands.items())


def _fwd_launch(cfg: AttentionConfig, *, S, head_dim, has_bias, dtype, precision):
    """What the forward launches with ``cfg`` (its compile-time arguments and tiles)."""
    return _fwd_plan(cfg, S, head_dim, has_bias, dtype, precision)[1]


def _bwd_launch(cfg: AttentionConfig, *, S, head_dim, has_bias, dtype, precision, need_dbias, need_qsum):
    """What the backward launches with ``cfg``: its kernels' compile-time arguments and tiles,
    and the bias gradient's batch groups."""
    return (cfg.bwd, cfg.bias_batches if need_dbias else 0,
            _bwd_plan(cfg, S, head_dim, has_bias, dtype, precision, need_dbias, need_qsum)[1:])


def candidate_combinations(seq_len: int, head_dim: int, has_bias: bool = False, dtype: torch.dtype = torch.bfloat16,
                           part: str = "bwd", need_dbias: bool | None = None,
                           need_qsum: bool = False) -> list[AttentionConfig]:
    """Every configuration the tuner may time as the combination of two winning candidates of
    the forward (``part="fwd"``) or the backward at this shape (its inputs' precision: not TF32)."""
    import itertools

    cands = _tuning_candidates(seq_len, head_dim, has_bias, dtype, part)
    combine = _shape_combiner(part, seq_len, head_dim, has_bias, dtype, _dot_precision(dtype, False),
                              has_bias if need_dbias is None else need_dbias, need_qsum)
    return [c for (_, a), (_, b) in itertools.combinations(cands[1:], 2) if (c := combine(a, b)) is not None]


@functools.lru_cache(maxsize=256)
def _shape_combiner(part: str, S: int, head_dim: int, has_bias: bool, dtype: torch.dtype, precision: str,
                    need_dbias: bool = False, need_qsum: bool = False):
    """The tuner's ``combine`` for the forward (``part="fwd"``) or backward candidates of a shape."""
    base = _tuning_candidates(S, head_dim, has_bias, dtype, part)[0][1]
    shape = dict(S=S, head_dim=head_dim, has_bias=has_bias, dtype=dtype, precision=precision)
    if part == "fwd":
        return _combiner(base, functools.partial(_fwd_launch, **shape))
    return _combiner(base, functools.partial(_bwd_launch, **shape, need_dbias=need_dbias, need_qsum=need_qsum))


def _combiner(base: AttentionConfig, plan):
    """``combine(a, b)`` for :func:`tuning.choose`: ``base`` with the changes of both ``a`` and
    ``b``; None where they set a field differently, where a kernel's tile (times its pipeline
    stages) would be larger than in either, or where ``plan`` (what the launches are) of the
    result is that of ``a`` or of ``b`` (a change that does not apply under the other's)."""

    def combine(a: AttentionConfig, b: AttentionConfig) -> AttentionConfig | None:
        merged = {}
        for f in fields(AttentionConfig):
            v0, va, vb = getattr(base, f.name), getattr(a, f.name), getattr(b, f.name)
            if va != v0 and vb != v0 and va != vb:
                return None
            merged[f.name] = va if va != v0 else vb
        cfg = replace(base, **merged)
        if any(t > max(ta, tb) for t, ta, tb in zip(_tile_sizes(cfg), _tile_sizes(a), _tile_sizes(b))):
            return None  # more shared memory than either (128 rows of one, 256 keys of the other; or 3 stages)
        return None if plan(cfg) in (plan(a), plan(b)) else cfg

    return combine


def _tile_sizes(c: AttentionConfig) -> tuple[int, ...]:
    """Each kernel's tile times its pipeline stages: about what its shared memory scales with."""
    return (c.fwd_block_m * c.fwd_block_n * c.fwd_stages, c.dq_block_m * c.dq_block_n * c.bwd_stages,
            c.dkdv_block_m * c.dkdv_block_n * c.bwd_stages, c.fused_block * c.bwd_stages)


def _bias_batches(cfg: AttentionConfig, B: int, programs_per_group: int, device: torch.device) -> int:
    """Batches per program for the bias gradient: enough programs to fill the GPU, few partials."""
    if cfg.bias_batches:
        return max(1, min(B, cfg.bias_batches))
    if device.type != "cuda":
        return min(B, 2)  # the interpreter: still loop over more than one batch per program
    target = 4 * sm_count(device)
    return cdiv(B, max(1, min(B, cdiv(target, programs_per_group))))


# ----------------------------------------------------------------------------------------------
# launch functions
# ----------------------------------------------------------------------------------------------


def _empty(*shape, device, dtype) -> torch.Tensor:
    """Every buffer a kernel writes comes from here (tests swap it for a NaN-filled one)."""
    return torch.empty(*shape, device=device, dtype=dtype)


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t)


def _qkv_dims(shape, dtype, num_heads, what=None) -> tuple[int, int, int]:
    """(B, S, head_dim) of a qkv of ``shape`` and ``dtype``, or the error for it (``shape`` None:
    not a tensor, ``what`` says what it was)."""
    if shape is None or len(shape) != 3:
        raise ValueError(f"qkv must be (B, S, 3 * H * Dh), got {what if shape is None else shape}")
    if dtype not in _DTYPES:
        raise TypeError(f"qkv must be float16, bfloat16 or float32 for the Triton kernel, got {dtype}")
    B, S, width = shape
    if B == 0 or S == 0:
        raise ValueError(f"qkv must have a non-empty batch and sequence, got {tuple(shape)}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if width % (3 * num_heads):
        raise ValueError(f"qkv width {width} is not 3 * num_heads * head_dim with num_heads={num_heads}")
    head_dim = width // (3 * num_heads)
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be <= {MAX_HEAD_DIM}, got {head_dim}")
    return B, S, head_dim


# every launch asks with one of a few (shape, dtype, heads): answered from here (a failing check
# raises on every call, exceptions are not cached)
_qkv_dims_cached = functools.lru_cache(maxsize=256)(_qkv_dims)


def _check_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[int, int, int]:
    if not isinstance(qkv, torch.Tensor):
        return _qkv_dims(None, None, num_heads, getattr(qkv, "shape", type(qkv).__name__))
    if type(num_heads) is int:  # hashable, and not a bool (True == 1 would share 1's entry)
        return _qkv_dims_cached(qkv.shape, qkv.dtype, num_heads)
    return _qkv_dims(qkv.shape, qkv.dtype, num_heads)


def _check_bias(bias, num_heads: int, S: int, qkv: torch.Tensor) -> None:
    if bias is None:
        return
    if bias.shape != (num_heads, S, S):
        raise ValueError(f"bias must be (H, S, S) = ({num_heads}, {S}, {S}), got {tuple(bias.shape)}")
    if bias.dtype not in _DTYPES:
        raise TypeError(f"bias must be float16, bfloat16 or float32, got {bias.dtype}")
    if bias.device != qkv.device:
        raise ValueError(f"bias is on {bias.device}, qkv on {qkv.device}")


_INT32_MAX = 2**31 - 1


def _span(t: torch.Tensor, first_dim: int = 0) -> int:
    """The largest element offset the kernels form over dims ``first_dim``... of ``t``."""
    return sum((n - 1) * abs(s) for n, s in zip(t.shape[first_dim:], t.stride()[first_dim:]))


def _int32_indexable(qkv: torch.Tensor, bias: torch.Tensor | None):
    """The kernels offset samples in int64 and index within one sample (rows, columns and heads
    of qkv; all of bias) in int32, which keeps their address arithmetic and registers small at
    ViT shapes. A layout whose span within a sample passes 2^31 elements (strides no Linear
    output has) is read from a dense copy; one that does not fit even dense is refused."""
    # contiguous with at most 2^31 elements (every call at ViT shapes): each span is below numel
    if (qkv.is_contiguous() and qkv.numel() <= _INT32_MAX
            and (bias is None or (bias.is_contiguous() and bias.numel() <= _INT32_MAX))):
        return qkv, bias
    if _span(qkv, 1) > _INT32_MAX:
        qkv = qkv.contiguous()
    if bias is not None and _span(bias) > _INT32_MAX:
        bias = bias.contiguous()
    if _span(qkv, 1) > _INT32_MAX or (bias is not None and _span(bias) > _INT32_MAX):
        raise ValueError(f"one sample of qkv {tuple(qkv.shape)} or the bias passes 2^31 elements: too long a sequence")
    return qkv, bias


def _padded_bias(bias: torch.Tensor | None, S: int) -> tuple[torch.Tensor | None, int]:
    """The bias with its rows padded with zeros to S_B, the next multiple of 16 elements, and S_B.

    The kernels mask bias columns (and the bias-gradient partials' columns) with ``j < S_B``
    instead of ``j < S``: a runtime bound Triton knows to be a multiple of 16 lets it load and
    store 16-byte vectors. With ``j < S`` at S = 197 every bias element is its own 2-byte (or
    4-byte) access; the padded copy of BEiT-B's bias (12 x 197 x 208) costs about 1 MB once per
    call, against about 240 MB of bias reads per forward at B = 256 (once per batch and query block).
    """
    S_B = cdiv(S, 16) * 16
    if bias is None or S_B == S:
        return bias, S
    return torch.nn.functional.pad(bias, (0, S_B - S)), S_B


def _dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if dtype == torch.float32 and allow_tf32 else "ieee"


def _tail(tail: int, block: int, S: int) -> int:
    """The kernels' TAIL: the block of a loop's partial last steps, ``block`` (no separate tail)
    unless ``tail`` is set, smaller, and S leaves a partial block bigger than nothing (a loop
    whose one block holds every row, e.g. the all-keys dq kernel's, keeps it)."""
    if not tail or tail >= block or S <= block or S % block == 0:
        return block
    return tail


# Per launch key: the config (``config`` or the default for the shape) and the launches'
# compile-time arguments, built once and passed as **kwargs (read only). Keyed by ``config`` as
# given (None for the default: hashing the 16-field dataclass itself would cost a microsecond).
@functools.lru_cache(maxsize=256)
def _fwd_plan(config: AttentionConfig | None, S: int, head_dim: int, has_bias: bool, dtype: torch.dtype,
              precision: str) -> tuple[AttentionConfig, dict]:
    cfg = config or default_config(S, head_dim, has_bias, dtype)
    return cfg, dict(HEAD_DIM=head_dim, DH_PAD=_pow2(head_dim), HAS_BIAS=has_bias, BLOCK_M=cfg.fwd_block_m,
                     BLOCK_N=cfg.fwd_block_n, PEEL=(cfg.fwd_peel or cfg.fwd_tail > 0) and cfg.fwd_block_n < S,
                     DOT_PRECISION=precision, TAIL=_tail(cfg.fwd_tail, cfg.fwd_block_n, S),
                     KEYS_MAJOR=cfg.fwd_keys_major,
                     num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages)


@functools.lru_cache(maxsize=256)
def _bwd_plan(config: AttentionConfig | None, S: int, head_dim: int, has_bias: bool, dtype: torch.dtype,
              precision: str, need_dbias: bool, need_qsum: bool) -> tuple[AttentionConfig, tuple[dict, dict], dict]:
    """(config, the fused or dq kernel's kwargs (without, with the batch loop), the dk/dv kernel's)."""
    cfg = config or default_config(S, head_dim, has_bias, dtype)
    dh_pad = _pow2(head_dim)
    if cfg.bwd == "fused":
        first = dict(HEAD_DIM=head_dim, DH_PAD=dh_pad, BLOCK=cfg.fused_block, HAS_BIAS=has_bias,
                     NEED_DBIAS=need_dbias, NEED_QSUM=need_qsum, DOT_PRECISION=precision, num_warps=cfg.fused_warps,
                     num_stages=cfg.bwd_stages)
        dkdv = {}
    elif cfg.bwd == "onepass":
        first = dict(HEAD_DIM=head_dim, DH_PAD=dh_pad, BLOCK_M=cfg.dq_block_m, BLOCK_N=_pow2(S), HAS_BIAS=has_bias,
                     NEED_DBIAS=need_dbias, NEED_QSUM=need_qsum, DOT_PRECISION=precision,
                     KEYS_MAJOR=cfg.dq_keys_major, num_warps=cfg.dq_warps, num_stages=cfg.bwd_stages)
        dkdv = {}
    else:
        first = dict(HEAD_DIM=head_dim, DH_PAD=dh_pad, BLOCK_M=cfg.dq_block_m, BLOCK_N=cfg.dq_block_n,
                     HAS_BIAS=has_bias, NEED_DBIAS=need_dbias, NEED_QSUM=need_qsum, ONE_N_BLOCK=cfg.dq_block_n >= S,
                     DOT_PRECISION=precision, KEYS_MAJOR=cfg.dq_keys_major, TAIL=_tail(cfg.bwd_tail, cfg.dq_block_n, S),
                     num_warps=cfg.dq_warps, num_stages=cfg.bwd_stages)
        dkdv = dict(HEAD_DIM=head_dim, DH_PAD=dh_pad, BLOCK_M=cfg.dkdv_block_m, BLOCK_N=cfg.dkdv_block_n,
                    HAS_BIAS=has_bias, NEED_QSUM=need_qsum, DOT_PRECISION=precision,
                    TAIL=_tail(cfg.bwd_tail, cfg.dkdv_block_m, S), num_warps=cfg.dkdv_warps,
                    num_stages=cfg.bwd_stages)
    return cfg, (dict(first, BATCH_LOOP=False), dict(first, BATCH_LOOP=True)), dkdv


_NO_BIAS_STRIDES = (0, 0, 0)


def attention_forward(qkv: torch.Tensor, num_heads: int, bias: torch.Tensor | None = None,
                      scale: float | None = None, allow_tf32: bool = False,
                      config: AttentionConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale * q k^T + bias) v per head.

    Returns ``out`` (B, S, H*Dh) in qkv's dtype and ``lse`` (B, H, S) fp32, the natural
    logsumexp of each row, which :func:`attention_backward` needs.
    """
    B, S, head_dim = _check_qkv(qkv, num_heads)
    S_B = S
    if bias is not None:
        _check_bias(bias, num_heads, S, qkv)
    if config is None and tuning.applies(qkv.device):
        cands = _tuning_candidates(S, head_dim, bias is not None, qkv.dtype, "fwd")
        if len(cands) > 1:
            # (combine is asked only while tuning: nothing built for it on the calls after)
            config = tuning.choose(
                ("attention_fwd", B, S, num_heads, head_dim, bias is not None, qkv.dtype, allow_tf32, qkv.device),
                cands, lambda c: attention_forward(qkv, num_heads, bias, scale, allow_tf32, config=c), qkv.device,
                combine=lambda a, b: _shape_combiner("fwd", S, head_dim, bias is not None, qkv.dtype,
                                                     _dot_precision(qkv.dtype, allow_tf32))(a, b))
    if bias is not None:
        bias, S_B = _padded_bias(bias, S)
    qkv, bias = _int32_indexable(qkv, bias)
    H = num_heads
    scale = head_dim ** -0.5 if scale is None else float(scale)
    dtype, device, has_bias = qkv.dtype, qkv.device, bias is not None
    cfg, meta = _fwd_plan(config, S, head_dim, has_bias, dtype, _dot_precision(dtype, allow_tf32))
    out = _empty(B, S, H * head_dim, device=device, dtype=dtype)
    lse = _empty(B, H, S, device=device, dtype=torch.float32)
    _attn_fwd[(B * H * cdiv(S, cfg.fwd_block_m),)](
        qkv, bias if has_bias else out, out, lse,
        *qkv.stride(), *(bias.stride() if has_bias else _NO_BIAS_STRIDES),
        S, S_B, H, scale * LOG2E, **meta,
    )
    return out, lse


def attention_backward(qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor,
                       num_heads: int, bias: torch.Tensor | None = None, scale: float | None = None,
                       need_bias_grad: bool = True, allow_tf32: bool = False,
                       config: AttentionConfig | None = None, need_qkv_sum: bool = False,
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`attention_forward`: ``dqkv`` (B, S, 3*H*Dh) in qkv's packed layout and
    dtype, ``dbias`` (H, S, S) in bias's dtype (None without a bias or ``need_bias_grad``), and
    with ``need_qkv_sum`` ``dqkv`` summed over the batch and the tokens, (3*H*Dh,) fp32 (the
    gradient of a bias of the Linear that made qkv: the sums of the values written, summed in the
    passes that write them, each program's partial row then added in a fixed order), else None."""
    B, S, head_dim = _check_qkv(qkv, num_heads)
    if bias is not None:
        _check_bias(bias, num_heads, S, qkv)
    H = num_heads
    HD = H * head_dim
    if out.shape != (B, S, HD) or not out.is_contiguous() or out.dtype != qkv.dtype:
        raise ValueError(f"out must be the contiguous ({B}, {S}, {HD}) {qkv.dtype} forward output, "
                         f"got {tuple(out.shape)} {out.dtype}")
    if grad_out.shape != (B, S, HD):
        raise ValueError(f"grad_out must be ({B}, {S}, {HD}), got {tuple(grad_out.shape)}")
    if lse.shape != (B, H, S) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"lse must be the contiguous ({B}, {H}, {S}) float32 forward logsumexp, "
                         f"got {tuple(lse.shape)}")
    # the kernels index out and grad_out alike, and write dqkv with the strides of qkv
    if grad_out.dtype != qkv.dtype:
        grad_out = grad_out.to(qkv.dtype)
    if not grad_out.is_contiguous():
        grad_out = grad_out.contiguous()
    if config is None and tuning.applies(qkv.device):
        cands = _tuning_candidates(S, head_dim, bias is not None, qkv.dtype, "bwd")
        if len(cands) > 1:
            dbias_on = bias is not None and bool(need_bias_grad)
            config = tuning.choose(
                ("attention_bwd", B, S, num_heads, head_dim, bias is not None, qkv.dtype, allow_tf32,
                 dbias_on, bool(need_qkv_sum), qkv.device),
                cands, lambda c: attention_backward(qkv, out, lse, grad_out, num_heads, bias, scale,
                                                    need_bias_grad, allow_tf32, config=c,
                                                    need_qkv_sum=need_qkv_sum), qkv.device,
                combine=lambda a, b: _shape_combiner("bwd", S, head_dim, bias is not None, qkv.dtype,
                                                     _dot_precision(qkv.dtype, allow_tf32), dbias_on,
                                                     bool(need_qkv_sum))(a, b))
    bias, S_B = _padded_bias(bias, S)
    qkv, bias = _int32_indexable(qkv, bias)
    dqkv = _empty_like(qkv)
    if dqkv.stride() != qkv.stride():  # qkv overlaps or has gaps (e.g. a slice): read a dense copy
        qkv = qkv.contiguous()
        dqkv = _empty_like(qkv)
    scale = head_dim ** -0.5 if scale is None else float(scale)
    dtype, device = qkv.dtype, qkv.device
    has_bias = bias is not None
    need_dbias = has_bias and bool(need_bias_grad)
    need_qsum = bool(need_qkv_sum)
    cfg, first_meta, dkdv_meta = _bwd_plan(config, S, head_dim, has_bias, dtype, _dot_precision(dtype, allow_tf32),
                                           need_dbias, need_qsum)
    bias_arg = bias if has_bias else out
    common = (*qkv.stride(), *(bias.stride() if has_bias else _NO_BIAS_STRIDES))
    # the fused and one-pass kernels: one row of partial qkv sums a batch (the split ones: below)
    qsum_part = _empty(B, 3 * HD, device=device, dtype=torch.float32) if need_qsum and cfg.bwd != "split" else out

    if cfg.bwd == "fused":
        if S > cfg.fused_block:
            raise ValueError(f"config.bwd='fused' needs S <= fused_block={cfg.fused_block}, got S={S}")
        per = _bias_batches(cfg, B, H, device) if need_dbias else 1
        groups = cdiv(B, per)
        dbias_part = _empty(groups, H, S, S_B, device=device, dtype=torch.float32) if need_dbias else out
        _attn_bwd_fused[(groups * H,)](
            qkv, bias_arg, out, grad_out, lse, dqkv, dbias_part, qsum_part, *common,
            B, S, S_B, H, per, scale, scale * LOG2E, **first_meta[per > 1],
        )
    elif cfg.bwd == "split":
        num_m = cdiv(S, cfg.dq_block_m)
        one_n_block = cfg.dq_block_n >= S
        per = _bias_batches(cfg, B, H * num_m, device) if need_dbias else 1
        groups = cdiv(B, per)
        if need_dbias:
            # tiles summing several batches update their strip in place; one batch's tiles write it
            alloc = torch.zeros if not one_n_block and per > 1 else _empty
            dbias_part = alloc(groups, H, S, S_B, device=device, dtype=torch.float32)
        else:
            dbias_part = out
        delta = _empty(B, H, S, device=device, dtype=torch.float32)
        num_n = cdiv(S, cfg.dkdv_block_n)
        q_part = kv_part = out
        if need_qsum:  # a row per batch and query block (dq's sums), per batch and key block (dk's, dv's)
            q_part = _empty(B * num_m, HD, device=device, dtype=torch.float32)
            kv_part = _empty(B * num_n, 2 * HD, device=device, dtype=torch.float32)
        _attn_bwd_dq[(groups * H * num_m,)](
            qkv, bias_arg, out, grad_out, lse, delta, dqkv, dbias_part, q_part, *common,
            B, S, S_B, H, per, scale, scale * LOG2E, **first_meta[per > 1],
        )
        _attn_bwd_dkdv[(B * H * num_n,)](
            qkv, bias_arg, grad_out, lse, delta, dqkv, kv_part, *common,
            S, S_B, H, scale, scale * LOG2E, **dkdv_meta,
        )
    elif cfg.bwd == "onepass":
        if S > ONEPASS_MAX_S:
            raise ValueError(f"config.bwd='onepass' holds every key in one program: S <= {ONEPASS_MAX_S}, got S={S}")
        # each batch group's bias gradient stored by its first batch, summed below (every element
        # written: rows < S, columns < S_B <= the key tile)
        per = _bias_batches(cfg, B, H, device) if need_dbias else 1
        groups = cdiv(B, per)
        dbias_part = _empty(groups, H, S, S_B, device=device, dtype=torch.float32) if need_dbias else out
        _attn_bwd_onepass[(groups * H,)](
            qkv, bias_arg, out, grad_out, lse, dqkv, dbias_part, qsum_part, *common,
            B, per, S, S_B, H, scale, scale * LOG2E, **first_meta[per > 1],
        )
    else:
        raise ValueError(f"config.bwd must be 'fused', 'split' or 'onepass', got {cfg.bwd!r}")

    dbias = None
    if need_dbias:
        # fixed-order sum over the batch groups: deterministic; the padded columns dropped
        dbias = (dbias_part[0] if dbias_part.shape[0] == 1 else dbias_part.sum(0))[..., :S]
        dbias = dbias.to(bias.dtype).contiguous()
    qkv_sum = None
    if need_qsum:  # fixed-order sums of the partial rows
        qkv_sum = _empty(3 * HD, device=device, dtype=torch.float32)
        if cfg.bwd == "split":
            sum_partials(q_part, qkv_sum[:HD])
            sum_partials(kv_part, qkv_sum[HD:])
        else:
            sum_partials(qsum_part, qkv_sum)
    return dqkv, dbias, qkv_sum
