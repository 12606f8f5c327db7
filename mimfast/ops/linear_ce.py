"""BEiT's LM head and loss: linear projection to the visual-token vocabulary + mean
cross-entropy, on the masked positions only. shared/DESIGN.md section 5.

The fused version never materialises all (M, V) logits at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mimfast import backend as _backend

__all__ = ["linear_cross_entropy", "linear_cross_entropy_reference"]

# imported at the first Triton call (mimfast.backend.lazy_import)
_triton = _backend.lazy_import("mimfast.ops._linear_ce_triton")


def same_row_count(a, b) -> bool:
    """a == b for row counts; under torch.compile the count of masked rows is data-dependent,
    so the check becomes a runtime assertion instead of a guard."""
    if torch.compiler.is_compiling():
        torch._check(a == b)
        return True
    return a == b


def _check_linear_ce_args(hidden, weight, bias, labels):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden must be (M, D), got {getattr(hidden, 'shape', type(hidden).__name__)}")
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating-point tensor, got {hidden.dtype}")
    M, D = hidden.shape
    if not torch.compiler.is_compiling() and M == 0:
        raise ValueError("hidden has no rows (M == 0)")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != D:
        raise ValueError(f"weight must be (V, D) with D={D}, got {getattr(weight, 'shape', None)}")
    V = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"bias must be (V,) = ({V},), got {tuple(bias.shape)}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or not same_row_count(labels.shape[0], M):
        raise ValueError(f"labels must be (M,) = ({M},), got {getattr(labels, 'shape', None)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 (or int32), got {labels.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("labels", labels)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device}, hidden on {hidden.device}")


def linear_cross_entropy_reference(hidden, weight, bias, labels, ignore_index=-100):
    """Eager: F.cross_entropy(hidden @ W^T + b, labels); materialises (M, V) logits."""
    logits = F.linear(hidden, weight, bias)  # (M, V)
    return F.cross_entropy(logits.float(), labels.long(), ignore_index=ignore_index)


def linear_cross_entropy(hidden, weight, bias, labels, ignore_index=-100, backend="auto"):
    """Mean cross-entropy of ``hidden @ weight.T + bias`` against ``labels``.

    Args:
        hidden: (M, D) features at masked positions.
        weight: (V, D) LM-head weight.
        bias: (V,) or None.
        labels: (M,) int64 token ids; ``ignore_index`` rows do not count.
        backend: ``"auto"``, ``"eager"`` or ``"triton"``.
    """
    _check_linear_ce_args(hidden, weight, bias, labels)
    which = _backend.resolve(backend, hidden, op="linear_cross_entropy")
    if which == "eager":
        return linear_cross_entropy_reference(hidden, weight, bias, labels, ignore_index)
    return _triton().linear_cross_entropy_triton(hidden, weight, bias, labels, ignore_index)
