"""BEiT's attention and relative position bias on :func:`mimfast.ops.attention`.

Same parameters, buffers and ``state_dict`` keys as microsoft/unilm ``beit/modeling_finetune.py``
``Attention`` and ``RelativePositionBias``: a ``qkv`` Linear without bias plus ``q_bias`` and
``v_bias`` (the key bias is zero), optional per-block ``relative_position_bias_table`` /
``relative_position_index``, and the shared table of (2 Wh - 1)(2 Ww - 1) + 3 rows x heads
(732 for 14 x 14: every relative offset, then cls-to-token, token-to-cls, cls-to-cls), zero
initialised. The (H, S, S) bias goes into the attention op, which adds it before the softmax
and returns its gradient, so no (B, H, S, S) tensor is built outside the op.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from mimfast import ops
from mimfast.backend import check_backend_name
from mimfast.nn.blocks import branch_bias, handoff_bias, no_hooks

__all__ = ["BEiTAttention", "RelativePositionBias", "relative_position_index"]


def relative_position_index(window_size: tuple[int, int]) -> torch.Tensor:
    """(Wh*Ww + 1, Wh*Ww + 1) int64 index into the bias table, cls row/column first."""
    wh, ww = window_size
    num_relative_distance = (2 * wh - 1) * (2 * ww - 1) + 3
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij"))  # (2, Wh, Ww)
    coords_flatten = torch.flatten(coords, 1)  # (2, Wh*Ww)
    relative_coords = coords_flatten[:, :, None] - coords_flatten[:, None, :]  # (2, Wh*Ww, Wh*Ww)
    relative_coords = relative_coords.permute(1, 2, 0).contiguous()  # (Wh*Ww, Wh*Ww, 2)
    relative_coords[:, :, 0] += wh - 1  # shift to start from 0
    relative_coords[:, :, 1] += ww - 1
    relative_coords[:, :, 0] *= 2 * ww - 1
    index = torch.zeros((wh * ww + 1,) * 2, dtype=relative_coords.dtype)
    index[1:, 1:] = relative_coords.sum(-1)
    index[0, 0:] = num_relative_distance - 3  # cls to token
    index[0:, 0] = num_relative_distance - 2  # token to cls
    index[0, 0] = num_relative_distance - 1  # cls to cls
    return index


def table_grid(rows: int) -> int:
    """The side g of the square g x g patch grid whose relative position table has ``rows`` =
    (2g - 1)**2 + 3 rows (the last three for the cls token); ValueError for any other count."""
    side = math.isqrt(max(rows - 3, 0))
    if side * side != rows - 3 or side % 2 == 0:
        raise ValueError(f"a relative position table of {rows} rows is not (2g - 1)^2 + 3 for a square g x g grid")
    return (side + 1) // 2


class RelativePositionBias(nn.Module):
    """The relative position bias shared by all blocks: a learned table gathered to (H, S, S).

    Args:
        window_size: patch grid (Wh, Ww); S = Wh * Ww + 1.
        num_heads: H.
    """

    def __init__(self, window_size, num_heads: int) -> None:
        super().__init__()
        self.window_size = tuple(window_size)
        self.num_relative_distance = (2 * self.window_size[0] - 1) * (2 * self.window_size[1] - 1) + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(self.num_relative_distance, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(self.window_size))

    def forward(self) -> torch.Tensor:
        s = self.window_size[0] * self.window_size[1] + 1
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(s, s, -1)
        return bias.permute(2, 0, 1).contiguous()  # (H, S, S)


class BEiTAttention(nn.Module):
    """BEiT's multi-head self-attention through :func:`mimfast.ops.attention`.

    Args:
        dim: token width.
        num_heads: number of heads.
        qkv_bias: learn ``q_bias`` and ``v_bias`` (the key has no bias).
        qk_scale: softmax scale; ``head_dim ** -0.5`` if None.
        attn_drop: must be 0 (attention dropout is not supported).
        proj_drop: dropout after the output projection.
        window_size: give the block its own relative position bias table (fine-tuning
            configs); pretraining shares one :class:`RelativePositionBias` and leaves this None.
        attn_head_dim: head width if not ``dim // num_heads``.
        kernels: ``"auto"``, ``"eager"`` or ``"triton"`` for the attention op.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale=None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, window_size=None, attn_head_dim=None,
                 kernels: str = "auto") -> None:
        super().__init__()
        if attn_drop:
            raise ValueError(f"attn_drop={attn_drop}: attention dropout is not supported (use 0)")
        self.kernels = check_backend_name(kernels, "kernels")
        self.num_heads = num_heads
        head_dim = attn_head_dim if attn_head_dim is not None else dim // num_heads
        if head_dim * num_heads != dim and attn_head_dim is None:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        all_head_dim = head_dim * num_heads
        self.scale = qk_scale or head_dim ** -0.5

        self.qkv = nn.Linear(dim, all_head_dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(all_head_dim))
            self.v_bias = nn.Parameter(torch.zeros(all_head_dim))
        else:
            self.q_bias = None
            self.v_bias = None

        if window_size:
            self.window_size = tuple(window_size)
            self.num_relative_distance = (2 * window_size[0] - 1) * (2 * window_size[1] - 1) + 3
            self.relative_position_bias_table = nn.Parameter(torch.zeros(self.num_relative_distance, num_heads))
            self.register_buffer("relative_position_index", relative_position_index(self.window_size))
        else:
            self.window_size = None
            self.relative_position_bias_table = None
            self.relative_position_index = None

        self.proj = nn.Linear(all_head_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _one_op(self) -> bool:
        return type(self.proj) is nn.Linear and no_hooks(self.proj) and no_hooks(self.qkv)

    def handoff_proj_bias(self) -> torch.Tensor | None:
        """``proj``'s bias when ``forward(..., proj_bias_grad=False)`` may leave its gradient to
        whoever consumes the output (as :meth:`mimfast.nn.Attention.handoff_proj_bias`), else None."""
        return handoff_bias(self.proj, self.proj_drop, self._one_op())

    def forward(self, x: torch.Tensor, rel_pos_bias: torch.Tensor | None = None,
                proj_bias_grad: bool = True) -> torch.Tensor:
        """x (B, S, dim), rel_pos_bias (H, S, S) or None -> (B, S, dim). ``proj_bias_grad=False``:
        no gradient reaches ``proj.bias`` from here (see :meth:`handoff_proj_bias`)."""
        one_op = self._one_op()
        proj_bias = branch_bias(self.proj, self.proj_drop, one_op, proj_bias_grad)
        qkv_bias = None
        if self.q_bias is not None:
            qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias, requires_grad=False), self.v_bias))
        bias = rel_pos_bias
        if self.relative_position_bias_table is not None:
            s = self.window_size[0] * self.window_size[1] + 1
            own = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(s, s, -1)
            own = own.permute(2, 0, 1).contiguous()  # (H, S, S)
            bias = own if bias is None else own + bias
        if one_op:
            # qkv Linear, attention and proj as one op (the bias gradients summed without passes of their own)
            x = ops.self_attention(x, self.qkv.weight, qkv_bias, self.proj.weight, proj_bias, self.num_heads,
                                   bias=bias, scale=self.scale, backend=self.kernels)
            return self.proj_drop(x)
        qkv = F.linear(x, self.qkv.weight, qkv_bias)  # (B, S, 3 * H * Dh)
        x = ops.attention(qkv, self.num_heads, bias=bias, scale=self.scale, backend=self.kernels)  # (B, S, H * Dh)
        x = self.proj(x)
        return self.proj_drop(x)
