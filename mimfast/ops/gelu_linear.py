"""A transformer MLP's second half, ``fc2(gelu(h))``, keeping only ``h`` for the backward.

The MLP of a ViT block is ``fc2(gelu(fc1(x)))``; eager autograd keeps both ``h = fc1(x)`` (for
GELU's backward) and ``gelu(h)`` (for fc2's weight gradient), two hidden-width tensors per
token. :func:`gelu_linear` keeps ``h`` only and recomputes ``gelu(h)`` inside GELU's own
backward pass (:mod:`mimfast.kernels.gelu`), so a block's saved activations shrink by about a
fifth for one extra write per MLP backward. Forward values are eager's exactly (the same
``gelu`` and ``linear`` calls, autocast included); gradients match eager's up to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mimfast import backend as _backend

__all__ = ["gelu_linear", "gelu_linear_reference", "mlp", "mlp_reference"]

# imported at the first Triton call (mimfast.backend.lazy_import)
_triton = _backend.lazy_import("mimfast.ops._gelu_linear_triton")

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def gelu_linear_reference(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Eager ``F.linear(F.gelu(h), weight, bias)``."""
    return F.linear(F.gelu(h), weight, bias)


def check_linear(weight, bias, in_width: int | None, x: torch.Tensor, prefix: str = "", x_name: str = "x") -> None:
    """A Linear's ``weight`` (out, ``in_width``; any width when None) and ``bias`` ((out,) or
    None) on ``x``'s device, or the error naming ``prefix + "weight"`` / ``prefix + "bias"``."""
    if (not isinstance(weight, torch.Tensor) or weight.dim() != 2
            or (in_width is not None and weight.shape[1] != in_width)):
        raise ValueError(f"{prefix}weight must be (out, {'in' if in_width is None else in_width}), "
                         f"got {getattr(weight, 'shape', type(weight).__name__)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],)):
        raise ValueError(f"{prefix}bias must be ({weight.shape[0]},) or None, "
                         f"got {getattr(bias, 'shape', type(bias).__name__)}")
    for name, t in ((f"{prefix}weight", weight), (f"{prefix}bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, {x_name} on {x.device}")


def _check(h, weight, bias):
    if not isinstance(h, torch.Tensor) or h.dim() < 1:
        raise ValueError(f"h must be a (..., hidden) tensor, got {getattr(h, 'shape', type(h).__name__)}")
    if h.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"h must be a floating-point tensor, got {h.dtype}")
    check_linear(weight, bias, h.shape[-1], h, x_name="h")


def gelu_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                backend: str = "auto") -> torch.Tensor:
    """``F.linear(F.gelu(h), weight, bias)`` saving only ``h`` (and the parameters) for backward.

    Args:
        h: (..., hidden) the first Linear's output (GELU's input).
        weight: (out, hidden) the second Linear's weight; bias: (out,) or None.
        backend: ``"auto"``, ``"eager"`` or ``"triton"`` (float64 runs eager under ``"auto"``).
    """
    _check(h, weight, bias)
    if h.dtype == torch.float64 and backend == "triton":
        raise TypeError("gelu_linear: the Triton kernel has no float64 path; use backend='eager'")
    which = "eager" if h.dtype == torch.float64 else _backend.resolve(backend, h, op="gelu_linear")
    if which == "eager":
        return gelu_linear_reference(h, weight, bias)
    return _triton().gelu_linear_triton(h, weight, bias)


def mlp_reference(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None,
                  fc2_weight: torch.Tensor, fc2_bias: torch.Tensor | None) -> torch.Tensor:
    """Eager ``F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)``."""
    return F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)


def mlp(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None, fc2_weight: torch.Tensor,
        fc2_bias: torch.Tensor | None, backend: str = "auto") -> torch.Tensor:
    """A ViT block's MLP ``fc2(gelu(fc1(x)))`` (exact GELU) as :func:`gelu_linear` runs its
    second half, with fc1 inside the same autograd function: GELU's backward pass
    (:func:`mimfast.kernels.gelu.gelu_bwd_recompute_colsum`) also sums fc1's bias gradient,
    which eager autograd computes with one more read of the whole hidden gradient. In low
    precision on a GPU, fc1 + GELU and fc2's input gradient + GELU's backward may each run as one
    Triton GEMM with the GELU pass in its epilogue, where the tuner finds it faster than cuBLAS
    and the pass (:mod:`mimfast.kernels.gelu_matmul`). Forward values are eager's (the same
    ``linear`` / ``gelu`` calls, autocast included; the fused GEMM: up to the order of the
    matmul's sums); gradients match eager's up to rounding (fc1's bias gradient is summed in fp32).

    Args:
        x: (..., in) the block's normalised input.
        fc1_weight: (hidden, in); fc1_bias: (hidden,) or None.
        fc2_weight: (out, hidden); fc2_bias: (out,) or None.
        backend: ``"auto"``, ``"eager"`` or ``"triton"`` (float64 runs eager under ``"auto"``).
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a (..., in) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    check_linear(fc1_weight, fc1_bias, x.shape[-1], x, prefix="fc1_")
    check_linear(fc2_weight, fc2_bias, fc1_weight.shape[0], x, prefix="fc2_")
    if x.dtype == torch.float64 and backend == "triton":
        raise TypeError("mlp: the Triton kernel has no float64 path; use backend='eager'")
    which = "eager" if x.dtype == torch.float64 else _backend.resolve(backend, x, op="mlp")
    if which == "eager":
        return mlp_reference(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    return _triton().mlp_triton(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
