"""GELU backward that recomputes the activation: one pass gives both the GELU output ``a``
(for the next Linear's weight gradient) and the gradient of its input.

A transformer MLP saves two hidden-width tensors per token for its backward: ``h = fc1(x)``
(for GELU's backward) and ``a = gelu(h)`` (for fc2's weight gradient), 8*D values per token at
mlp_ratio 4, the largest activations a ViT block keeps. Keeping only ``h`` and recomputing
``a`` in the backward drops one of them. Eager recomputation would add a full pass (read h,
write a); here it rides along with GELU's own backward, which reads h anyway:

    eager:   dh = gelu_backward(da, h)                    # read da, h; write dh
    here:    a, dh = gelu(h), da * gelu'(h)               # read da, h; write a, dh

so the saving costs one extra write of the hidden tensor per MLP backward.

``gelu_bwd_recompute_colsum`` does the same on (M, N) rows and also sums ``dh`` over the rows:
the first Linear's bias gradient, which autograd would otherwise compute with one more read of
the whole hidden gradient (``dh.sum(0)``). ``column_sum`` is the same reduction alone, for the
bias gradients of other Linears (fc2's, the LM head's): one read of the (M, N) gradient, where
``torch.sum(g, 0)``'s column reduction reached about 40% of the copy bandwidth in the H200
profile of the eager MAE step (aten::sum: 3.8 ms for about 5.9 GB of bias gradients). Each
program owns a run of rows and a block of columns, keeps the column sums in fp32 registers and
writes one partial row; the partials are summed in a fixed order afterwards (deterministic, no
atomics). The sums add the rounded ``dh`` (the values written), so they are the sums of what
eager's ``dh.sum(0)`` would read, in fp32.

Exact (erf) GELU, ``torch.nn.functional.gelu(approximate="none")``: a = h * Phi(h),
gelu'(h) = Phi(h) + h * phi(h), computed in fp32 and rounded to h's dtype as PyTorch's kernels
do. Supports float32 / float16 / bfloat16, contiguous tensors of any shape (flattened);
int64 offsets. Does not support the tanh approximation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mimfast.kernels import cdiv, next_power_of_2, sm_count, tuning

__all__ = ["gelu_bwd_recompute", "gelu_bwd_recompute_colsum", "column_sum"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK = 2048


@triton.jit
def _gelu_bwd_recompute_kernel(
    h_ptr,  # (numel,) GELU input
    da_ptr,  # (numel,) gradient of the GELU output
    a_ptr,  # (numel,) out: GELU output, h's dtype
    dh_ptr,  # (numel,) out: gradient of h, h's dtype
    numel,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    h = tl.load(h_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    da = tl.load(da_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
    pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327  # 1 / sqrt(2 pi)
    tl.store(a_ptr + offs, (h * cdf).to(a_ptr.dtype.element_ty), mask=ok)
    tl.store(dh_ptr + offs, (da * (cdf + h * pdf)).to(dh_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _colsum_kernel(
    x_ptr,  # (M, N) contiguous: the GELU input h (GELU), else the tensor to sum
    da_ptr,  # (M, N) gradient of the GELU output, contiguous (GELU only)
    a_ptr,  # (M, N) out: GELU output, h's dtype (GELU only)
    dh_ptr,  # (M, N) out: gradient of h, h's dtype (GELU only)
    part_ptr,  # (programs_m, N) fp32 out: per-program column sums of dh (GELU), else of x
    M, N, rows_per_program,
    GELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    row0 = pid_m * rows_per_program
    row_end = tl.minimum(row0 + rows_per_program, M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for r in range(row0, row_end, BLOCK_M):
        rows = r + tl.arange(0, BLOCK_M)
        ok = (rows < row_end)[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if GELU:
            da = tl.load(da_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
            pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
            dh = (da * (cdf + x * pdf)).to(dh_ptr.dtype.element_ty)
            tl.store(a_ptr + offs, (x * cdf).to(a_ptr.dtype.element_ty), mask=ok)
            tl.store(dh_ptr + offs, dh, mask=ok)
            acc += dh.to(tl.float32)  # masked elements: da = 0, so dh = 0
        else:
            acc += x
    tl.store(part_ptr + pid_m * N + cols, tl.sum(acc, 0), mask=col_ok)


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    """Every output buffer comes from here (tests poison it to catch unwritten elements)."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def gelu_bwd_recompute(h: torch.Tensor, da: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gelu(h), da * gelu'(h)) in h's dtype; h and da of one shape, contiguous."""
    _check_pair(h, da)
    a, dh = _empty_like(h), _empty_like(h)
    n = h.numel()
    if n:
        _gelu_bwd_recompute_kernel[(cdiv(n, _BLOCK),)](h, da, a, dh, n, BLOCK=_BLOCK, num_warps=8)
    return a, dh


def _check_pair(h, da) -> None:
    if not (isinstance(h, torch.Tensor) and isinstance(da, torch.Tensor) and h.dtype in _FLOAT_DTYPES
            and da.dtype in _FLOAT_DTYPES and h.is_contiguous() and da.is_contiguous()):
        for name, t in (("h", h), ("da", da)):  # which check failed, with its message
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
            if t.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
            if not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous")
    if da.shape != h.shape:
        raise ValueError(f"da must have h's shape {tuple(h.shape)}, got {tuple(da.shape)}")
    if da.device != h.device:
        raise ValueError(f"da is on {da.device}, h on {h.device}")


def _colsum_tiles(M: int, N: int, gpu: bool, sms: int, config=None) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, rows a program, programs along M, num_warps). ``config``: (BLOCK_M,
    BLOCK_N, programs per SM, num_warps), one of :func:`_colsum_candidates`; default on a GPU
    tiles of 4 x 512 values and about 8 programs per SM in all. The interpreter gets few, large
    programs."""
    if gpu:
        block_m, block_n, per_sm, warps = config or (4, 512, 8, 4)
        block_n = min(block_n, max(16, next_power_of_2(N)))
        target = per_sm * sms
    else:
        block_m, block_n, warps = 16, max(16, next_power_of_2(N)), 4
        target = 4
    programs = max(1, min(cdiv(M, block_m), target // cdiv(N, block_n)))
    rows = cdiv(cdiv(M, programs), block_m) * block_m
    return block_m, block_n, rows, cdiv(M, rows), warps


# (BLOCK_M, BLOCK_N, programs per SM, num_warps) a GPU launch may choose among (kernels.tuning)
_COLSUM_CANDIDATES = (("default", (4, 512, 8, 4)), ("rows_8", (8, 512, 8, 8)), ("narrow", (8, 256, 8, 4)),
                      ("fewer_programs", (4, 512, 4, 4)), ("more_programs", (4, 512, 16, 4)))


def gelu_bwd_recompute_colsum(h: torch.Tensor, da: torch.Tensor,
                              config: tuple[int, int, int, int] | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gelu(h), dh = da * gelu'(h), dh.sum(0) in fp32) for (M, N) contiguous h and da; a and dh
    in h's dtype. ``config``: one of ``_COLSUM_CANDIDATES`` (default: the tuner's choice on a
    GPU)."""
    _check_pair(h, da)
    if h.dim() != 2:
        raise ValueError(f"h must be (M, N), got {tuple(h.shape)}")
    M, N = h.shape
    a, dh = _empty_like(h), _empty_like(h)
    if M == 0 or N == 0:
        return a, dh, torch.zeros(N, device=h.device, dtype=torch.float32)
    gpu = h.device.type == "cuda"
    if config is None and tuning.applies(h.device):
        config = tuning.choose(("gelu_bwd_colsum", M, N, h.dtype, da.dtype, h.device), _COLSUM_CANDIDATES,
                               lambda c: gelu_bwd_recompute_colsum(h, da, c), h.device)
    block_m, block_n, rows, programs, warps = _colsum_tiles(M, N, gpu, sm_count(h.device) if gpu else 0, config)
    part = _empty((programs, N), h.device)
    _colsum_kernel[(programs, cdiv(N, block_n))](
        h, da, a, dh, part, M, N, rows, GELU=True, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    return a, dh, (part[0] if programs == 1 else part.sum(0))


def column_sum(x: torch.Tensor, config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """``x.sum(0)`` in fp32 for an (M, N) float tensor (made contiguous), summed in fp32 in a
    fixed order (deterministic). ``config``: as for :func:`gelu_bwd_recompute_colsum`."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be an (M, N) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if not x.is_contiguous():
        x = x.contiguous()
    M, N = x.shape
    if M == 0 or N == 0:
        return torch.zeros(N, device=x.device, dtype=torch.float32)
    gpu = x.device.type == "cuda"
    if config is None and tuning.applies(x.device):
        config = tuning.choose(("column_sum", M, N, x.dtype, x.device), _COLSUM_CANDIDATES,
                               lambda c: column_sum(x, c), x.device)
    block_m, block_n, rows, programs, warps = _colsum_tiles(M, N, gpu, sm_count(x.device) if gpu else 0, config)
    part = _empty((programs, N), x.device)
    _colsum_kernel[(programs, cdiv(N, block_n))](x, x, x, x, part, M, N, rows, GELU=False, BLOCK_M=block_m,
                                                 BLOCK_N=block_n, num_warps=warps)
    return part[0] if programs == 1 else part.sum(0)


def _empty(shape, device) -> torch.Tensor:
    """The fp32 partial sums (every element written by the kernel; tests poison it)."""
    return torch.empty(shape, device=device, dtype=torch.float32)
