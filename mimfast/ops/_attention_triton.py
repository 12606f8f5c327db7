"""The Triton branch of :func:`mimfast.ops.attention`: an autograd Function over
:mod:`mimfast.kernels.attention` (forward with saved logsumexp, FlashAttention-2 backward)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from mimfast.kernels.attention import AttentionConfig, attention_backward, attention_forward
from mimfast.ops._custom_op import as_dtype, autocast_operands, cast_param, kernel_op
from mimfast.ops._linear_triton import linear_grads, param_dtypes

__all__ = ["attention_triton", "self_attention_triton", "allow_tf32"]


def allow_tf32() -> bool:
    """Whether fp32 matmuls may use TF32, read from ``torch.backends.cuda.matmul`` (legacy
    ``allow_tf32`` or the newer ``fp32_precision``, whichever the user set)."""
    matmul = torch.backends.cuda.matmul
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # torch refuses the legacy getter once the new API was used
        return getattr(matmul, "fp32_precision", "ieee") == "tf32"


# The kernel launches as torch.library custom ops (fakes give shapes only), so
# torch.compile(fullgraph=True) traces the Function without entering Triton's launcher
# (eager calls skip the dispatcher: mimfast.ops._custom_op). A ``config`` override
# (benchmarks comparing tilings) calls the launchers directly.
@kernel_op("mimfast::attention_fwd")
def _attention_fwd(qkv: torch.Tensor, bias: torch.Tensor | None, num_heads: int, scale: float | None,
                   tf32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(qkv, num_heads, bias, scale, allow_tf32=tf32)


@_attention_fwd.register_fake
def _(qkv, bias, num_heads, scale, tf32):
    B, S, three_hd = qkv.shape
    return (qkv.new_empty((B, S, three_hd // 3)), qkv.new_empty((B, num_heads, S), dtype=torch.float32))


@kernel_op("mimfast::attention_bwd")
def _attention_bwd(qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor,
                   bias: torch.Tensor | None, num_heads: int, scale: float | None, need_bias_grad: bool,
                   tf32: bool, need_qkv_sum: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dqkv, dbias or an empty (0,), dqkv summed over batch and tokens in fp32 or an empty (0,))."""
    dqkv, dbias, qkv_sum = attention_backward(qkv, out, lse, grad_out, num_heads, bias, scale,
                                              need_bias_grad=need_bias_grad, allow_tf32=tf32,
                                              need_qkv_sum=need_qkv_sum)
    # (two distinct empties: a custom op's returns may not alias each other)
    return (dqkv, dbias if dbias is not None else qkv.new_empty((0,)),
            qkv_sum if qkv_sum is not None else qkv.new_empty((0,)))


@_attention_bwd.register_fake
def _(qkv, out, lse, grad_out, bias, num_heads, scale, need_bias_grad, tf32, need_qkv_sum):
    dbias = torch.empty_like(bias) if (bias is not None and need_bias_grad) else qkv.new_empty((0,))
    qkv_sum = qkv.new_empty((qkv.shape[-1],), dtype=torch.float32) if need_qkv_sum else qkv.new_empty((0,))
    return torch.empty_like(qkv), dbias, qkv_sum


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, bias, num_heads, scale, config):
        tf32 = qkv.dtype == torch.float32 and allow_tf32()  # only fp32 dots have a TF32 mode
        if config is None:
            out, lse = _attention_fwd(qkv, bias, num_heads, scale, tf32)
        else:
            out, lse = attention_forward(qkv, num_heads, bias, scale, allow_tf32=tf32, config=config)
        ctx.save_for_backward(qkv, bias, out, lse)
        ctx.num_heads, ctx.scale, ctx.config, ctx.tf32 = num_heads, scale, config, tf32
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        qkv, bias, out, lse = ctx.saved_tensors
        need_bias_grad = bias is not None and ctx.needs_input_grad[1]
        if ctx.config is None:
            dqkv, dbias, _ = _attention_bwd(qkv, out, lse, grad_out, bias, ctx.num_heads, ctx.scale, need_bias_grad,
                                            ctx.tf32, False)
            dbias = dbias if need_bias_grad else None
        else:
            dqkv, dbias, _ = attention_backward(
                qkv, out, lse, grad_out, ctx.num_heads, bias, ctx.scale,
                need_bias_grad=need_bias_grad, allow_tf32=ctx.tf32, config=ctx.config,
            )
        return dqkv, dbias, None, None, None


def attention_triton(qkv: torch.Tensor, num_heads: int, bias: torch.Tensor | None = None,
                     scale: float | None = None, config: AttentionConfig | None = None) -> torch.Tensor:
    """Triton attention on packed qkv (B, S, 3*H*Dh) -> (B, S, H*Dh); see :func:`mimfast.ops.attention`.

    ``config`` overrides the block sizes that :func:`mimfast.kernels.attention.default_config`
    picks (benchmarks use it to compare tilings).
    """
    return _Attention.apply(qkv, bias, num_heads, scale, config)


class _SelfAttention(torch.autograd.Function):
    """qkv Linear -> attention -> proj Linear; see :func:`mimfast.ops.self_attention`."""

    @staticmethod
    def forward(ctx, x, wq, bq, wp, bp, bias, num_heads, scale):
        # under autocast, the casts F.linear would make, made here and kept for the backward (as
        # eager's autograd keeps autocast's copies): no weight is cast again there
        xc, wqc, wpc = autocast_operands(x, wq, wp)
        cd = xc.dtype
        autocast = torch.is_autocast_enabled(x.device.type)  # the biases then cast as F.linear casts them
        qkv = F.linear(xc, wqc, cast_param(bq, cd) if autocast else bq)
        tf32 = qkv.dtype == torch.float32 and allow_tf32()
        out, lse = _attention_fwd(qkv, bias, num_heads, scale, tf32)
        y = F.linear(out, wpc, cast_param(bp, cd) if autocast else bp)
        ctx.save_for_backward(xc, wqc, wpc, bias, qkv, out, lse)
        ctx.cd, ctx.x_dtype, ctx.tf32, ctx.num_heads, ctx.scale = cd, x.dtype, tf32, num_heads, scale
        ctx.qkv_dtypes, ctx.proj_dtypes = param_dtypes(wq, bq), param_dtypes(wp, bp)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        xc, wq, wp, bias, qkv, out, lse = ctx.saved_tensors
        cd = ctx.cd
        need_x, need_wq, need_bq, need_wp, need_bp, need_bias = ctx.needs_input_grad[:6]
        g = as_dtype(grad_y.reshape(-1, grad_y.shape[-1]), cd)
        # proj: the attention output's gradient in cd, the dtype the attention ran in
        d_out, dwp, dbp = linear_grads(g, out.view(-1, out.shape[-1]), wp, (cd, *ctx.proj_dtypes),
                                       (True, need_wp, need_bp))
        need_bias_grad = bias is not None and need_bias
        bq_dtype = ctx.qkv_dtypes[1]
        need_bq = need_bq and bq_dtype is not None
        # the qkv bias gradient summed by the attention backward, in the passes that write dqkv
        dqkv, dbias, qkv_sum = _attention_bwd(qkv, out, lse, d_out.view(out.shape), bias, ctx.num_heads, ctx.scale,
                                              need_bias_grad, ctx.tf32, need_bq)
        del d_out
        dx, dwq, _ = linear_grads(dqkv.view(-1, dqkv.shape[-1]), xc.reshape(-1, xc.shape[-1]), wq,
                                  (ctx.x_dtype, *ctx.qkv_dtypes), (need_x, need_wq, False))
        dbq = as_dtype(qkv_sum, bq_dtype) if need_bq else None
        return ((dx.view(xc.shape) if dx is not None else None), dwq, dbq, dwp, dbp,
                (dbias if need_bias_grad else None), None, None)


def self_attention_triton(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads, bias=None, scale=None):
    """The Triton backend of :func:`mimfast.ops.self_attention`."""
    return _SelfAttention.apply(x, qkv_weight, qkv_bias, proj_weight, proj_bias, bias, num_heads, scale)
