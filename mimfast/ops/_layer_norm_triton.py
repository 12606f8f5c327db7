"""The Triton branch of :func:`mimfast.ops.add_layer_norm`: an autograd Function over
:mod:`mimfast.kernels.layer_norm` (one forward pass, one backward pass)."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from mimfast.kernels.layer_norm import add_layer_norm_bwd, add_layer_norm_fwd, result_dtypes
from mimfast.ops._custom_op import as_dtype, kernel_op

__all__ = ["add_layer_norm_triton"]


def _dtypes(x, residual, scale):
    return result_dtypes(x.dtype, residual.dtype if residual is not None else None,
                         scale.dtype if scale is not None else None)


# The kernel launches as torch.library custom ops (fakes give shapes only), so
# torch.compile(fullgraph=True) traces the Function without entering Triton's launcher
# (eager calls skip the dispatcher: mimfast.ops._custom_op).
@kernel_op("mimfast::add_layer_norm_fwd")
def _fwd(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
         scale: torch.Tensor | None, eps: float, out_dtype: torch.dtype
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return add_layer_norm_fwd(x, residual, weight, bias, scale, eps, out_dtype)


@_fwd.register_fake
def _(x, residual, weight, bias, scale, eps, out_dtype):
    M, D = x.shape
    _, r_dtype = _dtypes(x, residual, scale)
    write_r = residual is not None or scale is not None
    return (x.new_empty((M, D) if write_r else (0,), dtype=r_dtype), x.new_empty((M, D), dtype=out_dtype),
            x.new_empty((M,), dtype=torch.float32), x.new_empty((M,), dtype=torch.float32))


@kernel_op("mimfast::add_layer_norm_bwd")
def _bwd(dy: torch.Tensor, dr_in: torch.Tensor | None, r: torch.Tensor, x: torch.Tensor | None,
         weight: torch.Tensor | None, scale: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
         x_dtype: torch.dtype, res_dtype: torch.dtype, need_dx: bool, need_dres: bool, need_dw: bool,
         need_db: bool, need_dscale: bool, need_dxsum: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return add_layer_norm_bwd(dy, dr_in, r, x, weight, scale, mean, rstd, x_dtype, res_dtype,
                              need_dx, need_dres, need_dw, need_db, need_dscale, need_dxsum)


@_bwd.register_fake
def _(dy, dr_in, r, x, weight, scale, mean, rstd, x_dtype, res_dtype, need_dx, need_dres, need_dw, need_db,
      need_dscale, need_dxsum):
    M, D = r.shape
    need_part = need_dw or need_db or need_dscale or need_dxsum
    return (r.new_empty((M, D) if need_dx else (0,), dtype=x_dtype),
            r.new_empty((M, D) if need_dres else (0,), dtype=res_dtype),
            r.new_empty((4 if need_dxsum else 3, D) if need_part else (0,), dtype=torch.float32))


def _rows(t: torch.Tensor, D: int) -> torch.Tensor:
    """t as (M, D) rows with unit stride along D (a copy only where the rows are strided)."""
    t2 = t.reshape(-1, D)
    return t2.contiguous() if D > 1 and t2.stride(1) != 1 else t2


class _AddLayerNorm(torch.autograd.Function):
    """(x, residual | None, weight, bias, scale, eps, out_dtype, x_bias | None) -> (r, y), x and
    residual of shape (..., D) (flattened to rows inside, so no reshape or view of the caller's
    tensors is recorded by autograd); r is an empty placeholder when there is no residual and no
    scale (r is x itself). ``x_bias`` is not read: x already holds it; its gradient is the column
    sum of x's."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, scale, eps, out_dtype, x_bias):
        shape = x.shape
        D = shape[-1]
        x2 = _rows(x, D)
        r, y, mean, rstd = _fwd(x2, _rows(residual, D) if residual is not None else None, weight, bias, scale,
                                eps, out_dtype)
        write_r = residual is not None or scale is not None
        need_x = scale is not None and ctx.needs_input_grad[4]
        ctx.save_for_backward(r if write_r else x2, x2 if need_x else None, weight, scale, mean, rstd)
        ctx.write_r = write_r
        ctx.shape = shape
        ctx.x_dtype = x.dtype
        ctx.res_dtype = residual.dtype if residual is not None else x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.x_bias_dtype = x_bias.dtype if x_bias is not None else None
        ctx.set_materialize_grads(False)
        if not write_r:
            ctx.mark_non_differentiable(r)
            return r, y.view(shape)
        return r.view(shape), y.view(shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dr, dy):
        r, x, weight, scale, mean, rstd = ctx.saved_tensors
        need_dx, need_dres, need_dw, need_db, need_dscale = ctx.needs_input_grad[:5]
        need_dxsum = ctx.needs_input_grad[7] and ctx.x_bias_dtype is not None
        D = r.shape[-1]
        if dy is None:  # y unused: r = residual + x * scale is all that has a gradient
            dy = torch.zeros(r.shape, dtype=torch.float32, device=r.device)
        else:
            dy = dy.reshape(-1, D)
        dr = dr.reshape(-1, D) if ctx.write_r and dr is not None else None
        dx, dres, sums = _bwd(dy, dr, r, x, weight, scale, mean, rstd, ctx.x_dtype,
                              ctx.res_dtype, need_dx, need_dres, need_dw and weight is not None,
                              need_db and ctx.bias_dtype is not None, need_dscale and scale is not None,
                              need_dxsum)
        return (dx.view(ctx.shape) if need_dx else None, dres.view(ctx.shape) if need_dres else None,
                as_dtype(sums[0], weight.dtype) if need_dw else None,
                as_dtype(sums[1], ctx.bias_dtype) if need_db else None,
                as_dtype(sums[2], scale.dtype) if need_dscale else None, None, None,
                as_dtype(sums[3], ctx.x_bias_dtype) if need_dxsum else None)


def _vec(t):
    return t if t is None or t.is_contiguous() else t.contiguous()


def add_layer_norm_triton(x, residual, weight, bias, eps, scale, out_dtype, x_bias=None):
    """The Triton backend of ``add_layer_norm``: (r, y) with the shapes of x."""
    if out_dtype is None:  # what eager's layer_norm gives: fp32 under CUDA autocast, else r's dtype
        if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
            out_dtype = torch.float32
        else:
            out_dtype = _dtypes(x, residual, scale)[1]
    r, y = _AddLayerNorm.apply(x, residual, _vec(weight), _vec(bias), _vec(scale), float(eps), out_dtype, x_bias)
    return (r if (residual is not None or scale is not None) else x), y
