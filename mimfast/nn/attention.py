"""Attention modules on :func:`mimfast.ops.attention`.

:class:`Attention` is a drop-in for timm's ``Attention``: the same constructor arguments that
timm's ``Block`` passes and the same parameter names (``qkv``, ``proj``), so
``Block(..., attn_layer=mimfast.nn.Attention)`` works and checkpoints move unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from mimfast import ops
from mimfast.backend import check_backend_name

__all__ = ["Attention", "patch_timm"]


class Attention(nn.Module):
    """Multi-head self-attention reading q, k, v straight from the packed ``qkv`` output.

    Args:
        dim: token width.
        num_heads: number of heads; ``dim`` must divide by it.
        qkv_bias: learnable bias on the qkv projection.
        proj_bias: learnable bias on the output projection.
        attn_drop: must be 0 (attention dropout is not supported).
        proj_drop: dropout after the output projection.
        kernels: ``"auto"``, ``"eager"`` or ``"triton"`` (see :mod:`mimfast.backend`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer=None,
        attn_head_dim=None,
        kernels: str = "auto",
        device=None,
        dtype=None,
        **unused,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if attn_drop:
            raise ValueError(f"attn_drop={attn_drop}: attention dropout is not supported (use 0)")
        if qk_norm or scale_norm:
            raise ValueError("qk_norm and scale_norm are not supported by mimfast.nn.Attention")
        if attn_head_dim is not None and attn_head_dim != dim // num_heads:
            raise ValueError(f"attn_head_dim={attn_head_dim} must equal dim // num_heads")
        self.kernels = check_backend_name(kernels, "kernels")
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("mimfast.nn.Attention supports neither attn_mask nor is_causal")
        qkv = self.qkv(x)  # (B, S, 3 * H * Dh)
        x = ops.attention(qkv, self.num_heads, scale=self.scale, backend=self.kernels)  # (B, S, H * Dh)
        return self.proj_drop(self.proj(x))


def patch_timm(model: nn.Module, kernels: str = "auto") -> int:
    """Swap every timm ``Attention`` inside ``model`` for :class:`Attention`, weights kept.

    Returns the number of modules swapped.
    """
    from timm.layers import Attention as TimmAttention

    check_backend_name(kernels, "kernels")
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not TimmAttention:
                continue
            if not isinstance(child.q_norm, nn.Identity) or not isinstance(child.k_norm, nn.Identity):
                raise ValueError(f"{name}: qk_norm attention cannot be swapped")
            if not isinstance(child.norm, nn.Identity) or getattr(child, "gate", None) is not None:
                raise ValueError(f"{name}: scale_norm or gated attention cannot be swapped")
            if child.attn_drop.p:
                raise ValueError(f"{name}: attn_drop={child.attn_drop.p} is not supported")
            dim = child.qkv.in_features
            new = Attention(
                dim,
                num_heads=child.num_heads,
                qkv_bias=child.qkv.bias is not None,
                proj_bias=child.proj.bias is not None,
                proj_drop=child.proj_drop.p,
                kernels=kernels,
                device=child.qkv.weight.device,
                dtype=child.qkv.weight.dtype,
            )
            new.scale = child.scale
            new.qkv = child.qkv
            new.proj = child.proj
            new.train(child.training)
            setattr(parent, name, new)
            swapped += 1
    return swapped
