"""The Triton branches of :func:`mimfast.ops.gelu_linear` and :func:`mimfast.ops.mlp`: eager
forward, a backward whose GELU pass also recomputes the activation (and, for ``mlp``, sums
fc1's bias gradient) (:mod:`mimfast.kernels.gelu`). ``mlp`` runs fc1 + GELU and fc2's input
gradient + GELU's backward through :mod:`mimfast.kernels.gelu_matmul`, which on a GPU picks
per shape between cuBLAS with the separate pass and a Triton GEMM with the pass in its epilogue."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from mimfast.kernels.gelu import gelu_bwd_recompute
from mimfast.kernels.gelu_matmul import linear_bias_gelu, matmul_gelu_bwd
from mimfast.ops._custom_op import as_dtype, autocast_operands, cast_param, compute_dtype, kernel_op
from mimfast.ops._linear_triton import linear_grads, param_dtypes

__all__ = ["gelu_linear_triton", "mlp_triton"]


# The kernel launch as a torch.library custom op (the fake gives shapes only), so
# torch.compile(fullgraph=True) traces the Function without entering Triton's launcher
# (eager calls skip the dispatcher: mimfast.ops._custom_op).
@kernel_op("mimfast::gelu_bwd_recompute")
def _gelu_bwd(h: torch.Tensor, da: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return gelu_bwd_recompute(h, da)


@_gelu_bwd.register_fake
def _(h, da):
    return torch.empty_like(h), torch.empty_like(h)


@kernel_op("mimfast::linear_bias_gelu")
def _fc1_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return linear_bias_gelu(x, weight, bias)


@_fc1_gelu.register_fake
def _(x, weight, bias):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


@kernel_op("mimfast::matmul_gelu_bwd")
def _fc2_gelu_bwd(g: torch.Tensor, weight: torch.Tensor, h: torch.Tensor,
                  need_colsum: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, dh, dh.sum(0) in fp32, or an empty (0,) tensor without ``need_colsum``)."""
    a, dh, colsum = matmul_gelu_bwd(g, weight, h, need_colsum)
    return a, dh, colsum if colsum is not None else h.new_empty((0,), dtype=torch.float32)


@_fc2_gelu_bwd.register_fake
def _(g, weight, h, need_colsum):
    return (h.new_empty(h.shape), h.new_empty(h.shape),
            h.new_empty((h.shape[1],) if need_colsum else (0,), dtype=torch.float32))


class _GeluLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias):
        # the same calls as eager (autocast, when on, casts inside F.linear as it would there)
        out = F.linear(F.gelu(h), weight, bias)
        ctx.save_for_backward(h, weight)
        ctx.cdtype = compute_dtype(h.device.type, h.dtype)
        ctx.dtypes = param_dtypes(weight, bias)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        h, weight = ctx.saved_tensors
        cd = ctx.cdtype
        g = as_dtype(grad_out.reshape(-1, grad_out.shape[-1]), cd)
        h2 = h.reshape(-1, h.shape[-1])
        if not h2.is_contiguous():
            h2 = h2.contiguous()
        need_h, need_w, need_b = ctx.needs_input_grad
        w = as_dtype(weight, cd)
        da = as_dtype(g @ w, h.dtype)  # gradient of gelu(h), as linear's backward gives it
        a, dh = _gelu_bwd(h2, da)
        _, dw, db = linear_grads(g, as_dtype(a, cd), w, (None, *ctx.dtypes),
                                 (False, need_w, need_b))
        return (dh.view(h.shape) if need_h else None), dw, db


def gelu_linear_triton(h, weight, bias):
    """The Triton backend of ``gelu_linear``."""
    return _GeluLinear.apply(h, weight, bias)


class _Mlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        # under autocast, the casts F.linear would make, made here and kept for the backward (as
        # eager's autograd keeps autocast's copies): no weight is cast again there
        xc, w1c, w2c = autocast_operands(x, w1, w2)
        # eager's h = F.linear(x, w1, b1) and F.gelu(h) (the bias in the matmul's dtype, as autocast
        # casts it), as cuBLAS and a pass or one Triton GEMM with GELU in its epilogue
        autocast = torch.is_autocast_enabled(x.device.type)
        b1c = cast_param(b1, xc.dtype) if autocast else b1
        h, a = _fc1_gelu(xc.reshape(-1, xc.shape[-1]), w1c, b1c)
        h = h.view(*xc.shape[:-1], h.shape[-1])
        out = F.linear(a.view(h.shape), w2c, cast_param(b2, xc.dtype) if autocast else b2)
        del a
        ctx.save_for_backward(xc, h, w1c, w2c)
        ctx.cdtype, ctx.x_dtype = xc.dtype, x.dtype
        ctx.fc1_dtypes, ctx.fc2_dtypes = param_dtypes(w1, b1), param_dtypes(w2, b2)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        xc, h, w1, w2 = ctx.saved_tensors
        cd = ctx.cdtype
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        g = as_dtype(grad_out.reshape(-1, grad_out.shape[-1]), cd)
        h2 = h.reshape(-1, h.shape[-1])
        b1_dtype = ctx.fc1_dtypes[1]
        need_b1 = need_b1 and b1_dtype is not None
        # da = g @ w2 (fc2's input gradient, h's dtype), a = gelu(h) and dh = da * gelu'(h), with
        # fc1's bias gradient summed in the same pass (cuBLAS and a pass, or one fused GEMM)
        a, dh, db1 = _fc2_gelu_bwd(g, w2, h2, need_b1)
        _, dw2, db2 = linear_grads(g, as_dtype(a, cd), w2, (None, *ctx.fc2_dtypes),
                                   (False, need_w2, need_b2))
        del a
        dh = as_dtype(dh, cd)  # fc1's output gradient, in the dtype fc1 computed in
        dx, dw1, _ = linear_grads(dh, xc.reshape(-1, xc.shape[-1]), w1, (ctx.x_dtype, ctx.fc1_dtypes[0], None),
                                  (need_x, need_w1, False))
        db1 = as_dtype(db1, b1_dtype) if need_b1 else None
        return (dx.view(xc.shape) if dx is not None else None), dw1, db1, dw2, db2


def mlp_triton(x, w1, b1, w2, b2):
    """The Triton backend of ``mlp``."""
    return _Mlp.apply(x, w1, b1, w2, b2)
