"""Multi-head self-attention for ViT shapes, straight from the packed qkv projection.
shared/DESIGN.md section 4.

qkv (B, S, 3 * H * Dh) is the output of the ``qkv`` Linear; the result (B, S, H * Dh) goes
straight into ``proj``. An optional additive bias (H, S, S) shared across the batch carries
BEiT's relative position bias. Attention dropout is not supported (MAE and BEiT pretrain
without it).
"""

from __future__ import annotations

import torch

from mimfast import backend as _backend

__all__ = ["attention", "attention_reference"]

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
