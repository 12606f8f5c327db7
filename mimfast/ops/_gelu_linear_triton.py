"""The Triton branch of :func:`mimfast.ops.gelu_linear`: eager forward, a backward whose GELU
pass also recomputes the activation (:mod:`mimfast.kernels.gelu`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from mimfast.kernels.gelu import gelu_bwd_recompute
from mimfast.ops._custom_op import as_dtype, kernel_op

__all__ = ["gelu_linear_triton"]


# The kernel launch as a torch.library custom op (the fake gives shapes only), so
# torch.compile(fullgraph=True) traces the Function without entering Triton's launcher
# (eager calls skip the dispatcher: mimfast.ops._custom_op).
@kernel_op("mimfast::gelu_bwd_recompute")
def _gelu_bwd(h: torch.Tensor, da: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return gelu_bwd_recompute(h, da)


@_gelu_bwd.register_fake
def _(h, da):
    return torch.empty_like(h), torch.empty_like(h)


def _compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype F.linear computes in here: the autocast dtype when autocast is on."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


class _GeluLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias):
        # the same calls as eager (autocast, when on, casts inside F.linear as it would there)
        out = F.linear(F.gelu(h), weight, bias)
        ctx.save_for_backward(h, weight)
        ctx.cdtype = _compute_dtype(h.device.type, h.dtype)
        ctx.bias_dtype = bias.dtype if bias is not None else None
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
        da = as_dtype(g @ as_dtype(weight, cd), h.dtype)  # gradient of gelu(h), as linear's backward gives it
        a, dh = _gelu_bwd(h2, da)
        dw = as_dtype(g.t() @ as_dtype(a, cd), weight.dtype) if need_w else None
        db = as_dtype(g.sum(0), ctx.bias_dtype) if need_b and ctx.bias_dtype is not None else None
        return (dh.view(h.shape) if need_h else None), dw, db


def gelu_linear_triton(h, weight, bias):
    """The Triton backend of ``gelu_linear``."""
    return _GeluLinear.apply(h, weight, bias)
