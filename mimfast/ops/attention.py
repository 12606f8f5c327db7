"""Multi-head self-attention for ViT shapes, straight from the packed qkv projection.
shared/DESIGN.md section 4.

qkv (B, S, 3 * H * Dh) is the output of the ``qkv`` Linear; the result (B, S, H * Dh) goes
straight into ``proj``. An optional additive bias (H, S, S) shared across the batch carries
BEiT's relative position bias. Attention dropout is not supported (MAE and BEiT pretrain
without it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mimfast import backend as _backend
from mimfast.ops.gelu_linear import check_linear

__all__ = ["attention", "attention_reference", "self_attention", "self_attention_reference"]

# imported at the first Triton call (mimfast.backend.lazy_import)
_triton = _backend.lazy_import("mimfast.ops._attention_triton")


def _check_attention_args(qkv, num_heads, bias, scale):
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 3:
        raise ValueError(f"qkv must be (B, S, 3 * H * Dh), got {getattr(qkv, 'shape', type(qkv).__name__)}")
    if not qkv.is_floating_point():
        raise TypeError(f"qkv must be a floating-point tensor, got {qkv.dtype}")
    B, S, three_hd = qkv.shape
    if B == 0 or S == 0:
        raise ValueError(f"qkv must have a non-empty batch and sequence, got {tuple(qkv.shape)}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if three_hd % (3 * num_heads):
        raise ValueError(f"qkv width {three_hd} is not 3 * num_heads * head_dim with num_heads={num_heads}")
    if bias is not None:
        if tuple(bias.shape) != (num_heads, S, S):
            raise ValueError(f"bias must be (H, S, S) = ({num_heads}, {S}, {S}), got {tuple(bias.shape)}")
        if bias.device != qkv.device:
            raise ValueError(f"bias is on {bias.device}, qkv on {qkv.device}")
        if not bias.is_floating_point():
            raise TypeError(f"bias must be a floating-point tensor, got {bias.dtype}")
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")


def attention_reference(qkv, num_heads, bias=None, scale=None):
    """Eager attention as timm 0.3.2's ``Attention.forward`` (the official MAE/BEiT code)."""
    B, S, three_hd = qkv.shape
    head_dim = three_hd // (3 * num_heads)
    scale = head_dim ** -0.5 if scale is None else scale
    qkv = qkv.reshape(B, S, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, S, Dh) each
    attn = (q * scale) @ k.transpose(-2, -1)  # (B, H, S, S)
    if bias is not None:
        attn = attn + bias.unsqueeze(0)
    attn = attn.softmax(dim=-1)
    out = attn @ v  # (B, H, S, Dh)
    return out.transpose(1, 2).reshape(B, S, num_heads * head_dim)


def attention(qkv, num_heads, bias=None, scale=None, backend="auto"):
    """softmax(q k^T * scale + bias) v for packed qkv.

    Args:
        qkv: (B, S, 3 * H * Dh), the output of the ``qkv`` Linear (q, k, v blocks in order).
        num_heads: H.
        bias: optional (H, S, S) additive bias shared across the batch, with gradient.
        scale: softmax scale, ``Dh ** -0.5`` when omitted.
        backend: ``"auto"``, ``"eager"`` or ``"triton"``.

    Returns:
        (B, S, H * Dh), heads concatenated, ready for ``proj``.
    """
    _check_attention_args(qkv, num_heads, bias, scale)
    which = _backend.resolve(backend, qkv, op="attention")
    if which == "eager":
        return attention_reference(qkv, num_heads, bias, scale)
    return _triton().attention_triton(qkv, num_heads, bias, scale)


def self_attention_reference(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads, bias=None, scale=None):
    """Eager: ``proj(attention(qkv(x)))`` with ``F.linear`` and :func:`attention_reference`."""
    qkv = F.linear(x, qkv_weight, qkv_bias)
    return F.linear(attention_reference(qkv, num_heads, bias, scale), proj_weight, proj_bias)


def self_attention(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads, bias=None, scale=None,
                   backend="auto"):
    """A ViT block's attention branch, ``proj(attention(qkv(x)))``, as one autograd function.

    Forward values are those of the three calls (the same ``F.linear`` calls, autocast included,
    and :func:`attention`). In the backward, the qkv Linear's bias gradient is summed by the
    attention backward's kernels in the passes that write the qkv gradient (no pass over it of
    its own), proj's by the one-pass column sum (:func:`mimfast.kernels.gelu.column_sum`) instead
    of autograd's ``sum`` over the (B*S, width) gradient (or by the residual add after the branch:
    ``proj_bias.detach()`` here, see :func:`mimfast.ops.add_layer_norm`'s ``x_bias``); the qkv
    Linear's input is saved in the dtype it computed in.

    Args:
        x: (B, S, C) tokens.
        qkv_weight: (3 * H * Dh, C); qkv_bias: (3 * H * Dh,) or None.
        proj_weight: (C_out, H * Dh); proj_bias: (C_out,) or None.
        num_heads: H. bias, scale: as for :func:`attention`.
        backend: ``"auto"``, ``"eager"`` or ``"triton"``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be (B, S, C), got {getattr(x, 'shape', type(x).__name__)}")
    check_linear(qkv_weight, qkv_bias, x.shape[-1], x, prefix="qkv_")
    check_linear(proj_weight, proj_bias, None, x, prefix="proj_")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0 \
            or qkv_weight.shape[0] % (3 * num_heads):
        raise ValueError(f"qkv_weight has {qkv_weight.shape[0]} rows: not 3 * num_heads * head_dim with "
                         f"num_heads={num_heads!r}")
    if proj_weight.shape[1] != qkv_weight.shape[0] // 3:
        raise ValueError(f"proj_weight must take the {qkv_weight.shape[0] // 3} attention outputs, "
                         f"got {tuple(proj_weight.shape)}")
    which = _backend.resolve(backend, x, op="self_attention")
    if which == "eager":
        return self_attention_reference(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads, bias, scale)
    return _triton().self_attention_triton(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads, bias, scale)
