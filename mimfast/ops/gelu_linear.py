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


def _check(h, weight, bias):
    if not isinstance(h, torch.Tensor) or h.dim() < 1:
        raise ValueError(f"h must be a (..., hidden) tensor, got {getattr(h, 'shape', type(h).__name__)}")
    if h.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"h must be a floating-point tensor, got {h.dtype}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != h.shape[-1]:
        raise ValueError(f"weight must be (out, {h.shape[-1]}), got {getattr(weight, 'shape', type(weight).__name__)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],)):
        raise ValueError(f"bias must be ({weight.shape[0]},) or None, "
                         f"got {getattr(bias, 'shape', type(bias).__name__)}")
    device = h.device
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device}, h on {device}")
    if bias is not None and bias.device != device:
        raise ValueError(f"bias is on {bias.device}, h on {device}")


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
    which eager autograd computes with one more read of the whole hidden gradient. Forward
    values are eager's exactly (the same ``linear`` / ``gelu`` calls, autocast included);
    gradients match eager's up to rounding (fc1's bias gradient is summed in fp32).

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
    if not isinstance(fc1_weight, torch.Tensor) or fc1_weight.dim() != 2 or fc1_weight.shape[1] != x.shape[-1]:
        raise ValueError(f"fc1_weight must be (hidden, {x.shape[-1]}), "
                         f"got {getattr(fc1_weight, 'shape', type(fc1_weight).__name__)}")
    if fc1_bias is not None and (not isinstance(fc1_bias, torch.Tensor) or fc1_bias.shape != (fc1_weight.shape[0],)):
        raise ValueError(f"fc1_bias must be ({fc1_weight.shape[0]},) or None, "
                         f"got {getattr(fc1_bias, 'shape', type(fc1_bias).__name__)}")
    for name, t in (("fc1_weight", fc1_weight), ("fc1_bias", fc1_bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    # fc2's checks are gelu_linear's, on a stand-in of the hidden width
    _check(x.new_empty((0, fc1_weight.shape[0])), fc2_weight, fc2_bias)
    if x.dtype == torch.float64 and backend == "triton":
        raise TypeError("mlp: the Triton kernel has no float64 path; use backend='eager'")
    which = "eager" if x.dtype == torch.float64 else _backend.resolve(backend, x, op="mlp")
    if which == "eager":
        return mlp_reference(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    return _triton().mlp_triton(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
