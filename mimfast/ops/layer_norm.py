"""The pre-norm transformer block's residual add fused with the LayerNorm that follows it.

A timm / BEiT block computes ``x = x + ls(attn(norm1(x))); x = x + ls(mlp(norm2(x)))`` and the
next block (or the final norm) starts with ``norm1(x)``. Every residual add is followed by a
LayerNorm of its result, so the two are one op here: ``(r, y) = add_layer_norm(branch,
residual, norm.weight, norm.bias, eps, scale=gamma)`` gives the new residual stream ``r`` and
the normalised rows ``y`` (in ``out_dtype``, e.g. the autocast dtype the next Linear casts to).
:func:`mimfast.nn.forward_blocks` runs a stack of blocks this way.

The eager reference is the block's own arithmetic; its results (values and dtypes) are what the
Triton kernel reproduces (:mod:`mimfast.kernels.layer_norm`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mimfast import backend as _backend

__all__ = ["add_layer_norm", "add_layer_norm_reference"]

# imported at the first Triton call (mimfast.backend.lazy_import)
_triton = _backend.lazy_import("mimfast.ops._layer_norm_triton")

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_args(x, residual, weight, bias, scale, eps, out_dtype, x_bias=None):
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a (..., D) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be a float32, float16, bfloat16 or float64 tensor, got {x.dtype}")
    D = x.shape[-1]
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got "
                             f"{getattr(residual, 'shape', type(residual).__name__)}")
        if residual.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"residual must be float32, float16, bfloat16 or float64, got {residual.dtype}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device}, x on {x.device}")
    if x_bias is not None and residual is None and scale is None:
        raise ValueError("x_bias needs a residual or a scale: without them r is x itself, whose gradient "
                         "does not pass through this op")
    for name, t in (("weight", weight), ("bias", bias), ("scale", scale), ("x_bias", x_bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.shape != (D,):
            raise ValueError(f"{name} must be a ({D},) tensor or None, got {getattr(t, 'shape', type(t).__name__)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    if out_dtype is not None and out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be None, float32, float16 or bfloat16, got {out_dtype}")


def add_layer_norm_reference(x, residual, weight, bias, eps=1e-6, scale=None, out_dtype=None, x_bias=None):
    """Eager: ``r = residual + x * scale`` (terms absent when None), ``y = layer_norm(r)``.

    Returns (r, y); y in ``out_dtype`` when given, else in ``layer_norm``'s dtype. Without a
    residual and a scale, r is x itself. ``x_bias``: x plus a zero that carries x's gradient to
    it (summed over the rows, as a Linear's bias gradient is).
    """
    if x_bias is not None:  # x + 0 is x (a -0.0 becomes +0.0); the zero is in x's dtype, as the Linear added it
        x = x + (x_bias - x_bias.detach()).to(x.dtype)
    h = x if scale is None else x * scale
    r = h if residual is None else residual + h
    y = F.layer_norm(r, (r.shape[-1],), weight, bias, eps)
    if out_dtype is not None:
        y = y.to(out_dtype)
    return r, y


def add_layer_norm(x, residual, weight, bias, eps=1e-6, scale=None, out_dtype=None, backend="auto",
                   x_bias=None):
    """Residual add (optionally layer-scaled) + LayerNorm in one pass.

    Args:
        x: (..., D) branch output (attention or MLP), float32 / float16 / bfloat16 (float64
            runs the eager reference under ``backend="auto"``).
        residual: (..., D) residual stream, or None (then r = x * scale, or x itself).
        weight, bias: (D,) LayerNorm affine parameters, or None.
        eps: LayerNorm epsilon.
        scale: (D,) layer scale applied to x before the add (timm ``LayerScale``, BEiT's
            ``gamma``), or None.
        out_dtype: dtype of y. None gives what eager gives: ``layer_norm``'s result dtype, or
            float32 under autocast (LayerNorm runs in fp32 there); pass the autocast dtype to
            get y ready for the next Linear without a cast.
        backend: ``"auto"``, ``"eager"`` or ``"triton"``.
        x_bias: (D,) the bias the branch's last Linear already added to x, or None. Its value is
            not used; this op's backward gives its gradient, the column sum of x's gradient (the
            Triton kernel sums it in the pass that writes x's gradient: no second read of it).
            The Linear must then treat the bias as a constant (pass it ``bias.detach()``), and
            this op must be x's only consumer. Needs a residual or a scale.

    Returns:
        (r, y): the new residual stream (dtype ``torch.result_type`` of the add) and the
        normalised rows.
    """
    _check_args(x, residual, weight, bias, scale, eps, out_dtype, x_bias)
    fp64 = any(t is not None and t.dtype not in _KERNEL_DTYPES for t in (x, residual, weight, bias, scale, x_bias))
    if fp64 and backend == "triton":
        raise TypeError("add_layer_norm: the Triton kernel has no float64 path; use backend='eager'")
    which = "eager" if fp64 else _backend.resolve(backend, x, op="add_layer_norm")
    if which == "eager":
        return add_layer_norm_reference(x, residual, weight, bias, eps, scale, out_dtype, x_bias)
    return _triton().add_layer_norm_triton(x, residual, weight, bias, eps, scale, out_dtype, x_bias)
