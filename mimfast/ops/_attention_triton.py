"""The Triton branch of :func:`mimfast.ops.attention`: an autograd Function over
:mod:`mimfast.kernels.attention` (forward with saved logsumexp, FlashAttention-2 backward)."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from mimfast.kernels.attention import AttentionConfig, attention_backward, attention_forward

__all__ = ["attention_triton", "allow_tf32"]


def allow_tf32() -> bool:
    """Whether fp32 matmuls may use TF32, read from ``torch.backends.cuda.matmul`` (legacy
    ``allow_tf32`` or the newer ``fp32_precision``, whichever the user set)."""
    matmul = torch.backends.cuda.matmul
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # torch refuses the legacy getter once the new API was used
        return getattr(matmul, "fp32_precision", "ieee") == "tf32"


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, bias, num_heads, scale, config):
        tf32 = allow_tf32()
        out, lse = attention_forward(qkv, num_heads, bias, scale, allow_tf32=tf32, config=config)
        ctx.save_for_backward(qkv, bias, out, lse)
        ctx.num_heads, ctx.scale, ctx.config, ctx.tf32 = num_heads, scale, config, tf32
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        qkv, bias, out, lse = ctx.saved_tensors
        dqkv, dbias = attention_backward(
            qkv, out, lse, grad_out, ctx.num_heads, bias, ctx.scale,
            need_bias_grad=bias is not None and ctx.needs_input_grad[1],
            allow_tf32=ctx.tf32, config=ctx.config,
        )
        return dqkv, dbias, None, None, None


def attention_triton(qkv: torch.Tensor, num_heads: int, bias: torch.Tensor | None = None,
                     scale: float | None = None, config: AttentionConfig | None = None) -> torch.Tensor:
    """Triton attention on packed qkv (B, S, 3*H*Dh) -> (B, S, H*Dh); see :func:`mimfast.ops.attention`.

    ``config`` overrides the block sizes that :func:`mimfast.kernels.attention.default_config`
    picks (benchmarks use it to compare tilings).
    """
    return _Attention.apply(qkv, bias, num_heads, scale, config)
