"""The MLP's matmuls with GELU in their epilogue: the GELU passes ride on the GEMMs.

A ViT MLP ``fc2(gelu(fc1(x)))`` (exact GELU, :func:`mimfast.ops.mlp`) runs, per step:

    forward:   h = x @ w1^T + b1           # cuBLAS: write h (M, N)
               a = gelu(h)                 # read h, write a
    backward:  da = g @ w2                 # cuBLAS: write da (M, N)
               a, dh = gelu(h), da * gelu'(h); db1 = dh.sum(0)   # read h, da; write a, dh

with N the hidden width (4x the model's). Here each is one Triton GEMM whose epilogue does the
elementwise work on the tile in registers:

    forward:   h, a = x @ w1^T + b1, gelu(...)            # write h and a: no read of h
    backward:  a, dh = gelu(h), (g @ w2) * gelu'(h)       # read h; write a, dh: da never stored

saving one read of h in the forward and a write and a read of da in the backward (per MAE
ViT-B/16 step at B = 256: about 2 GB of the forward's and 5 GB of the backward's traffic), and
one launch each. The backward's programs also sum their rows of dh (fc1's bias gradient): one
fp32 partial row per row block, summed after in a fixed order (deterministic).

Semantics are eager's (autocast's bf16 / fp16 matmul, then the GELU of the rounded values in
fp32): the product is accumulated in fp32 and rounded once to the output dtype, the bias (in the
matmul's dtype, as autocast casts it) added in fp32 before that rounding, as cuBLAS's ``addmm``
epilogue does; ``a``, ``dh`` are computed in fp32 from the rounded ``h`` / ``da`` and rounded to
h's dtype. Only the order of the matmul's sums differs from cuBLAS's (within the tests' 2x rule).

Whether the fused GEMM beats cuBLAS plus the separate pass depends on the card: the launchers
offer both to :mod:`mimfast.kernels.tuning` (cuBLAS first: the default off a GPU, and wherever a
Triton tile loses). Supports float16 / bfloat16 (fp32 operands keep cuBLAS's path, which honours
TF32 settings), any M, N, K, operands with any strides (int64 offsets). Does not support the
tanh approximation of GELU.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from mimfast.kernels import cdiv, tuning
from mimfast.kernels.gelu import gelu_bwd_recompute, gelu_bwd_recompute_colsum
from mimfast.kernels.masking import sum_partials

__all__ = ["linear_bias_gelu", "matmul_gelu_bwd", "CANDIDATES"]

_LOWP = (torch.float16, torch.bfloat16)
_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _mm_gelu_kernel(
    a_ptr,  # (M, K) left operand: x (forward) or g (backward)
    b_ptr,  # right operand read as (K, N) through its strides: w1^T (forward) or w2 (backward)
    bias_ptr,  # (N,) fc1's bias in the matmul's dtype (HAS_BIAS)
    h_ptr,  # (M, N) fc1's output, read in the backward (row stride s_hm, unit column stride)
    out1_ptr,  # (M, N) contiguous: h (forward) / a (backward)
    out2_ptr,  # (M, N) contiguous: a (forward) / dh (backward)
    part_ptr,  # (cdiv(M, BLOCK_M), N) fp32: per row block column sums of dh (NEED_COLSUM)
    M, N, K,
    s_am, s_ak, s_bk, s_bn, s_hm,
    BWD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NEED_COLSUM: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # programs in groups of GROUP_M row blocks sweeping the column blocks: a group's rows of the
    # left operand and the right operand's column blocks stay in L2 while it runs
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # the loads wrap rows / columns past the edge onto real ones (no masks in the loop but K's);
    # the stores below are masked
    a_rows = (rows % M).to(tl.int64)
    b_cols = (cols % N).to(tl.int64)
    a_ptrs = a_ptr + a_rows[:, None] * s_am + ks[None, :] * s_ak
    b_ptrs = b_ptr + ks[:, None] * s_bk + b_cols[None, :] * s_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * s_ak
        b_ptrs += BLOCK_K * s_bk

    row_ok = rows < M
    col_ok = cols < N
    ok = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    if BWD:
        da = acc.to(OUT_DTYPE).to(tl.float32)  # g @ w2 as the matmul writes it
        h = tl.load(h_ptr + rows.to(tl.int64)[:, None] * s_hm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327  # 1 / sqrt(2 pi)
        dh = (da * (cdf + h * pdf)).to(OUT_DTYPE)
        tl.store(out1_ptr + offs, (h * cdf).to(OUT_DTYPE), mask=ok)
        tl.store(out2_ptr + offs, dh, mask=ok)
        if NEED_COLSUM:  # the values written, rows past M left out
            sums = tl.sum(tl.where(ok, dh.to(tl.float32), 0.0), 0)
            tl.store(part_ptr + pid_m.to(tl.int64) * N + cols, sums, mask=col_ok)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        h = acc.to(OUT_DTYPE)
        tl.store(out1_ptr + offs, h, mask=ok)
        hf = h.to(tl.float32)
        a = hf * (0.5 * (1.0 + tl.math.erf(hf * 0.7071067811865476)))
        tl.store(out2_ptr + offs, a.to(OUT_DTYPE), mask=ok)


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) of the Triton candidates; the
# launchers offer cuBLAS ("cublas": the matmul, then the separate pass) first. Tiles whose sm_90
# compile (triton 3.6, ``benchmarks.compile_check --only gelu_matmul --mem``) has no register
# spills in either epilogue and runs the loop on wgmma with cp.async loads; the epilogue's GELU on
# the fp32 tile costs registers (the backward's 128 x 128 tile: 176 a thread on 8 warps), so
# 128 x 256 and 256 x 128 tiles, and 128 x 128 on 4 warps, spilled 0.2-1.6 KB and are not offered.
CANDIDATES = (
    ("cublas", "cublas"),
    ("triton_128x128x64_w8_s3", (128, 128, 64, 8, 8, 3)),
    ("triton_128x128x64_w8_s4", (128, 128, 64, 8, 8, 4)),
    ("triton_128x128x32_w8_s4", (128, 128, 32, 8, 8, 4)),
    ("triton_64x256x64_w8_s3", (64, 256, 64, 8, 8, 3)),
    ("triton_64x128x64_w4_s3", (64, 128, 64, 8, 4, 3)),
)


def _check_2d(name: str, t, dtype=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype} like the left operand, got {t.dtype}")


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer the kernel writes comes from here (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


@functools.lru_cache(maxsize=64)
def _candidates(dtype: torch.dtype) -> tuple:
    return CANDIDATES if dtype in _LOWP else CANDIDATES[:1]


def _launch(a, b, s_bk, s_bn, bias, h, out1, out2, part, M, N, K, bwd, need_colsum, config):
    block_m, block_n, block_k, group_m, warps, stages = config
    _mm_gelu_kernel[(cdiv(M, block_m) * cdiv(N, block_n),)](
        a, b, bias if bias is not None else a, h if h is not None else a, out1, out2,
        part if part is not None else out1, M, N, K,
        a.stride(0), a.stride(1), s_bk, s_bn, h.stride(0) if h is not None else 0,
        BWD=bwd, HAS_BIAS=bias is not None, NEED_COLSUM=need_colsum, OUT_DTYPE=_TL[out1.dtype],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, num_warps=warps, num_stages=stages,
    )


def linear_bias_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     config=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, a) = (x @ weight^T + bias, gelu(h)) for x (M, K), weight (N, K) (an ``nn.Linear``'s) and
    bias (N,) or None, all in one dtype (the caller casts as autocast would), h and a (M, N) in
    it. ``config``: one of :data:`CANDIDATES`' configs (``"cublas"``: ``F.linear`` and
    ``F.gelu``); None: the tuner's choice on a GPU, the first candidate (cuBLAS) elsewhere."""
    _check_2d("x", x)
    _check_2d("weight", weight, x.dtype)
    M, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"weight must be (N, {K}) for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}")
    if bias is not None and (bias.shape != (N,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be a ({N},) {x.dtype} tensor or None, got {tuple(bias.shape)} {bias.dtype}")
    if config is None:
        config = _candidates(x.dtype)[0][1]
        if tuning.applies(x.device) and M and N:
            config = tuning.choose(("linear_bias_gelu", M, N, K, x.dtype, bias is not None, x.stride(),
                                    weight.stride(), x.device), _candidates(x.dtype),
                                   lambda c: linear_bias_gelu(x, weight, bias, c), x.device)
    if config == "cublas" or x.dtype not in _LOWP or K == 0:
        h = F.linear(x, weight, bias)
        return h, F.gelu(h)
    h, a = _empty((M, N), x.dtype, x.device), _empty((M, N), x.dtype, x.device)
    if M and N:
        _launch(x, weight, weight.stride(1), weight.stride(0), bias, None, h, a, None, M, N, K, False, False, config)
    return h, a


def matmul_gelu_bwd(g: torch.Tensor, weight: torch.Tensor, h: torch.Tensor, need_colsum: bool = True,
                    config=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(a, dh, dh.sum(0) in fp32 or None) with da = g @ weight rounded to h's dtype, a = gelu(h),
    dh = da * gelu'(h): g (M, K) the gradient of ``fc2(a)``'s output, weight (K, N) fc2's weight,
    h (M, N) fc1's output (unit column stride), all in one dtype. ``config``: as for
    :func:`linear_bias_gelu` (``"cublas"``: the matmul, then
    :func:`mimfast.kernels.gelu.gelu_bwd_recompute_colsum`)."""
    _check_2d("g", g)
    _check_2d("weight", weight, g.dtype)
    _check_2d("h", h, g.dtype)
    M, K = g.shape
    N = weight.shape[1]
    if weight.shape[0] != K:
        raise ValueError(f"weight must be ({K}, N) for g of shape {tuple(g.shape)}, got {tuple(weight.shape)}")
    if h.shape != (M, N):
        raise ValueError(f"h must be ({M}, {N}), got {tuple(h.shape)}")
    if N > 1 and h.stride(1) != 1:
        raise ValueError(f"h must have unit stride along its columns, got strides {h.stride()}")
    if config is None:
        config = _candidates(g.dtype)[0][1]
        if tuning.applies(g.device) and M and N:
            config = tuning.choose(("matmul_gelu_bwd", M, N, K, g.dtype, need_colsum, g.stride(), weight.stride(),
                                    h.stride(), g.device), _candidates(g.dtype),
                                   lambda c: matmul_gelu_bwd(g, weight, h, need_colsum, c), g.device)
    if config == "cublas" or g.dtype not in _LOWP or K == 0:
        da = g @ weight
        hc = h if h.is_contiguous() else h.contiguous()
        if need_colsum:
            return gelu_bwd_recompute_colsum(hc, da)
        return (*gelu_bwd_recompute(hc, da), None)
    a, dh = _empty((M, N), g.dtype, g.device), _empty((M, N), g.dtype, g.device)
    block_m = config[0]
    part = _empty((cdiv(M, block_m), N), torch.float32, g.device) if need_colsum and M else None
    if M and N:
        _launch(g, weight, weight.stride(0), weight.stride(1), None, h, a, dh, part, M, N, K, True, need_colsum,
                config)
    if not need_colsum:
        return a, dh, None
    if part is None:
        return a, dh, torch.zeros(N, dtype=torch.float32, device=g.device)
    return a, dh, sum_partials(part, _empty((N,), torch.float32, g.device))
