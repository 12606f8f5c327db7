"""Attention modules on :func:`mimfast.ops.attention`.

:class:`Attention` is a drop-in for timm's ``Attention`` (``timm.layers.Attention``, which is
also ``timm.models.vision_transformer.Attention``): the same constructor arguments, the same
submodule and parameter names (``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``gate``, ``proj``),
so ``Block(..., attn_layer=mimfast.nn.Attention)`` works and checkpoints move unchanged.
:func:`patch_timm` swaps the modules of an existing model in place.

The packed ``qkv`` projection output goes straight into the attention kernel; only with
``qk_norm`` are q and k normalised and re-packed first (one copy).
"""

from __future__ import annotations

import torch
from torch import nn

from mimfast import ops
from mimfast.backend import check_backend_name
from mimfast.nn.blocks import branch_bias, handoff_bias, no_hooks

__all__ = ["Attention", "patch_timm"]


class Attention(nn.Module):
    """Multi-head self-attention reading q, k, v straight from the packed ``qkv`` output.

    Args:
        dim: input token width.
        num_heads: number of heads H.
        attn_head_dim: head width Dh; ``dim // num_heads`` when None.
        dim_out: output width; ``dim`` when None.
        qkv_bias: learnable bias on the qkv projection.
        qk_norm: normalise q and k per head with ``norm_layer(head_dim)``.
        scale_norm: normalise the attention output with ``norm_layer(H * Dh)`` before ``proj``.
        proj_bias: learnable bias on the output projection.
        gated: multiply the attention output by ``sigmoid(gate(x))`` before ``proj``.
        attn_drop: must be 0: attention dropout is not supported (MAE and BEiT pretrain with 0).
        proj_drop: dropout after the output projection.
        norm_layer: normalisation for ``qk_norm`` / ``scale_norm``.
        kernels: ``"auto"``, ``"eager"`` or ``"triton"`` (see :mod:`mimfast.backend`).
        device, dtype: where and how to create the parameters.
        **unused: further keyword arguments timm's ``Block`` may pass (e.g. ``depth``), ignored.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_head_dim: int | None = None,
        dim_out: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        gated: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer=None,
        kernels: str = "auto",
        device=None,
        dtype=None,
        **unused,
    ) -> None:
        super().__init__()
        if attn_drop:
            raise ValueError(f"attn_drop must be 0 (attention dropout is not supported), got {attn_drop}")
        if attn_head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
            attn_head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("norm_layer must be given when qk_norm or scale_norm is set")
        self.kernels = check_backend_name(kernels, "kernels")
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = attn_head_dim
        self.attn_dim = num_heads * attn_head_dim
        self.scale = attn_head_dim ** -0.5
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(attn_head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(attn_head_dim, **dd) if qk_norm else nn.Identity()
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out or dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def _one_op(self) -> bool:
        """Plain Linears (no hooks), no q / k / output norms, no gate: the branch runs as
        :func:`mimfast.ops.self_attention` (the bias gradients summed without a pass of their own)."""
        return (type(self.qkv) is nn.Linear and type(self.proj) is nn.Linear and no_hooks(self.qkv)
                and no_hooks(self.proj) and self.gate is None and type(self.q_norm) is nn.Identity
                and type(self.k_norm) is nn.Identity and type(self.norm) is nn.Identity)

    def handoff_proj_bias(self) -> torch.Tensor | None:
        """``proj``'s bias when ``forward(..., proj_bias_grad=False)`` may leave its gradient to
        whoever consumes the output (the one-op path, a bias that needs a gradient, no output
        dropout at work; :func:`mimfast.nn.forward_blocks` hands it to the fused residual add +
        LayerNorm), else None."""
        return handoff_bias(self.proj, self.proj_drop, self._one_op())

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False,
                proj_bias_grad: bool = True) -> torch.Tensor:
        """``proj_bias_grad=False``: no gradient reaches ``proj.bias`` from here; the caller sums
        it (see :meth:`handoff_proj_bias`, which must have returned the bias)."""
        if attn_mask is not None or is_causal:
            raise ValueError("mimfast.nn.Attention supports neither attn_mask nor is_causal")
        one_op = self._one_op()
        proj_bias = branch_bias(self.proj, self.proj_drop, one_op, proj_bias_grad)
        if one_op:
            x = ops.self_attention(x, self.qkv.weight, self.qkv.bias, self.proj.weight, proj_bias,
                                   self.num_heads, scale=self.scale, backend=self.kernels)
            return self.proj_drop(x)
        B, S, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x)  # (B, S, 3 * H * Dh)
        if not isinstance(self.q_norm, nn.Identity) or not isinstance(self.k_norm, nn.Identity):
            q, k, v = qkv.view(B, S, 3, self.num_heads, self.head_dim).unbind(2)  # (B, S, H, Dh) each
            qkv = torch.stack((self.q_norm(q), self.k_norm(k), v), dim=2).view(B, S, 3 * self.attn_dim)
        x = ops.attention(qkv, self.num_heads, scale=self.scale, backend=self.kernels)  # (B, S, H * Dh)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, kernels={self.kernels!r}"


def _timm_attention_classes() -> tuple[type, ...]:
    from timm.layers import Attention as TimmAttention

    return (TimmAttention,)


def patch_timm(model: nn.Module, kernels: str = "auto") -> int:
    """Swap every timm ``Attention`` inside ``model`` for :class:`Attention`, in place.

    Works on timm ``VisionTransformer`` models and on official-style MAE models built from
    timm's ``Block``. The submodules (``qkv``, ``proj``, norms, gate) are moved over, so
    weights, parameter identity (optimizer state) and ``state_dict`` keys are kept. Only modules
    of exactly timm's ``Attention`` class are swapped (subclasses may change ``forward``).

    Raises:
        ValueError: a module uses attention dropout (``attn_drop.p != 0``); nothing is swapped.

    Returns:
        The number of modules swapped.
    """
    check_backend_name(kernels, "kernels")
    classes = _timm_attention_classes()
    targets = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            if type(child) in classes:
                path = f"{parent_name}.{name}" if parent_name else name
                p = child.attn_drop.p if isinstance(getattr(child, "attn_drop", None), nn.Dropout) else 0.0
                if p:
                    raise ValueError(f"{path}: attn_drop={p} is not supported by mimfast.nn.Attention (use 0)")
                targets.append((parent, name, child))
    for parent, name, child in targets:
        new = Attention.__new__(Attention)
        nn.Module.__init__(new)
        new.kernels = kernels
        new.num_heads = child.num_heads
        new.head_dim = child.head_dim
        new.attn_dim = getattr(child, "attn_dim", child.num_heads * child.head_dim)
        new.scale = child.scale
        new.qkv = child.qkv
        new.q_norm = child.q_norm
        new.k_norm = child.k_norm
        new.norm = getattr(child, "norm", nn.Identity())
        new.gate = getattr(child, "gate", None)
        new.proj = child.proj
        new.proj_drop = child.proj_drop
        new.train(child.training)
        setattr(parent, name, new)
    return len(targets)
