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

Exact (erf) GELU, ``torch.nn.functional.gelu(approximate="none")``: a = h * Phi(h),
gelu'(h) = Phi(h) + h * phi(h), computed in fp32 and rounded to h's dtype as PyTorch's kernels
do. Supports float32 / float16 / bfloat16, contiguous tensors of any shape (flattened);
int64 offsets. Does not support the tanh approximation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mimfast.kernels import cdiv

__all__ = ["gelu_bwd_recompute"]

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


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    """Every output buffer comes from here (tests poison it to catch unwritten elements)."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def gelu_bwd_recompute(h: torch.Tensor, da: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gelu(h), da * gelu'(h)) in h's dtype; h and da of one shape, contiguous."""
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
    a, dh = _empty_like(h), _empty_like(h)
    n = h.numel()
    if n:
        _gelu_bwd_recompute_kernel[(cdiv(n, _BLOCK),)](h, da, a, dh, n, BLOCK=_BLOCK, num_warps=8)
    return a, dh
