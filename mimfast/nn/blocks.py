"""Run a stack of pre-norm transformer blocks with every residual add fused into the LayerNorm
that follows it (:func:`mimfast.ops.add_layer_norm`).

A pre-norm block is ``x = x + ls1(attn(norm1(x))); x = x + ls2(mlp(norm2(x)))`` and the stack
ends with a final ``norm``. Each residual add is followed by a LayerNorm of its result (the
block's ``norm2``, the next block's ``norm1``, or the final norm), so the stack runs as

    r, y = x, norm1_0(x)
    for each block:  r, y = add_layer_norm(ls1(attn(y)), r, norm2)
                     r, y = add_layer_norm(ls2(mlp(y)), r, next norm1 or the final norm)

with the layer scale applied inside the fused op and ``y`` written in the autocast dtype the
next Linear casts to. With ``fused_mlp`` the MLP runs as :func:`mimfast.ops.mlp`, which keeps
only ``h = fc1(y)`` for the backward (the largest activation a block saves drops out; GELU's
backward recomputes it) and sums fc1's bias gradient inside GELU's backward pass (one read of
the hidden gradient fewer). The bias gradients of the branches' last Linears (attention's
``proj``, the MLP's ``fc2``) are summed by the fused add's backward (``x_bias``) in the pass
that writes the branch output's gradient, not by the Linears (one more read of it each). The
blocks' own modules and parameters are used: weights, names and checkpoints are unchanged.
Stochastic depth (a training-mode drop path) is applied to the branch before the fused add.
With ``grad_checkpointing`` each block is a ``torch.utils.checkpoint`` region (non-reentrant):
it keeps (r, y) for the backward and runs again there, its random draws repeated (the device's
random state saved for the recompute only where a block draws any: :func:`draws_random`; without
it the checkpointed step can be captured in a CUDA graph).
Blocks that something else drives (a forward hook or pre-hook, e.g. an FSDP unit or a user's
hook; a subclass with its own forward) make the stack run the plain loop, so the result is
always that of ``for blk in blocks: x = blk(x); norm(x)``.

Supported blocks: timm's ``Block`` (``ls1``/``ls2`` identity or ``LayerScale``) and
:class:`mimfast.models.beit.BEiTBlock` (``gamma_1``/``gamma_2``), with ``nn.LayerNorm`` norms.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mimfast import ops
from mimfast.backend import resolve
from mimfast.ops._param_casts import batched_casts

__all__ = ["forward_blocks", "can_fuse_blocks", "mlp_fusable", "FusedBlocksMixin"]


def _is_layer_norm(m) -> bool:
    return type(m) is nn.LayerNorm and len(m.normalized_shape) == 1


def no_hooks(m: nn.Module) -> bool:
    """Nothing hooks into the module (FSDP units and user hooks need the module's own call), so
    its forward may be bypassed for its parameters."""
    return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None) or getattr(m, "_forward_hooks_with_kwargs", None))


def _block_kind(blk) -> str | None:
    from timm.models.vision_transformer import Block, LayerScale

    from mimfast.models.beit import BEiTBlock

    if not (no_hooks(blk) and _is_layer_norm(blk.norm1) and _is_layer_norm(blk.norm2)):
        return None
    if type(blk) is Block:
        if all(type(ls) is nn.Identity or (type(ls) is LayerScale and not ls.inplace) for ls in (blk.ls1, blk.ls2)):
            return "timm"
        return None
    if type(blk) is BEiTBlock:
        return "beit"
    return None


def dropout_off(m) -> bool:
    """None, an identity, or a dropout that drops nothing (p = 0, or eval mode)."""
    return m is None or type(m) is nn.Identity or (type(m) is nn.Dropout and (m.p == 0 or not m.training))


def handoff_bias(linear: nn.Linear, dropout, one_op: bool) -> torch.Tensor | None:
    """A branch's last Linear's bias, when the module may leave its gradient to whoever consumes
    the branch's output: the Linear runs inside the module's one op (``one_op``), the bias needs a
    gradient and no dropout follows. Else None."""
    b = linear.bias
    if b is None or not b.requires_grad or not one_op or not dropout_off(dropout):
        return None
    return b


def branch_bias(linear: nn.Linear, dropout, one_op: bool, bias_grad: bool) -> torch.Tensor | None:
    """The bias a branch's last Linear runs with: its own, or (``bias_grad`` False) the same
    values detached, its gradient left to the caller, which :func:`handoff_bias` must allow."""
    if bias_grad:
        return linear.bias
    if handoff_bias(linear, dropout, one_op) is None:
        raise ValueError("proj_bias_grad=False needs a proj bias with a gradient, the one-op path and no "
                         "output dropout at work (handoff_proj_bias() is None)")
    return linear.bias.detach()


@functools.cache
def _mlp_classes() -> tuple[type, ...]:
    from timm.layers import Mlp

    from mimfast.nn.mlp import Mlp as MimfastMlp

    return (Mlp, MimfastMlp)


def mlp_fusable(mlp) -> bool:
    """A timm ``Mlp`` (or :class:`mimfast.nn.Mlp`) with exact GELU, no dropout at work, no
    hidden norm and no hooks."""
    return (type(mlp) in _mlp_classes() and type(mlp.act) is nn.GELU and mlp.act.approximate == "none"
            and type(mlp.fc1) is nn.Linear and type(mlp.fc2) is nn.Linear and type(mlp.norm) is nn.Identity
            and dropout_off(mlp.drop1) and dropout_off(mlp.drop2)
            and all(no_hooks(m) for m in (mlp, mlp.fc1, mlp.act, mlp.fc2)))


class FusedBlocksMixin:
    """For models that run their block stacks through :func:`forward_blocks`: the
    ``fused_norm`` / ``fused_mlp`` switches and the choice between the fused stack (when the
    model's ``kernels`` resolve to Triton) and the blocks' own forward."""

    kernels: str = "auto"
    fused_norm: bool = True
    fused_mlp: bool = True
    grad_checkpointing: bool = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every block (timm's switch): each block keeps only its
        inputs for the backward and runs its forward again there (about a block's compute more
        a step for a fraction of the activations' memory; :func:`forward_blocks`)."""
        self.grad_checkpointing = bool(enable)

    def _set_fusions(self, fused_norm: bool | None, fused_mlp: bool | None) -> None:
        """Each switch unchanged when None; the model's :class:`mimfast.nn.Mlp` modules follow
        ``fused_mlp`` and the model's ``kernels``."""
        if fused_norm is not None:
            self.fused_norm = bool(fused_norm)
        if fused_mlp is not None:
            self.fused_mlp = bool(fused_mlp)
        mlp_class = _mlp_classes()[1]
        for m in self.modules():
            if type(m) is mlp_class:
                m.fused, m.kernels = self.fused_mlp, self.kernels

    def run_blocks(self, x: torch.Tensor, blocks, norm: nn.Module, **attn_kwargs) -> torch.Tensor:
        """``norm(blocks(x))``, fused where kernels resolve to Triton and ``fused_norm`` is on."""
        if self.fused_norm and resolve(self.kernels, x, op="add_layer_norm") == "triton":
            return forward_blocks(x, blocks, norm, kernels=self.kernels, fused_mlp=self.fused_mlp,
                                  grad_checkpointing=self.grad_checkpointing, **attn_kwargs)
        return norm(_run_plain(x, blocks, self.grad_checkpointing and torch.is_grad_enabled(), attn_kwargs))


def _attn_handoff(attn) -> torch.Tensor | None:
    """The attention module's proj bias when it can leave its gradient to the caller
    (``handoff_proj_bias`` of mimfast's attention modules), else None."""
    handoff = getattr(type(attn), "handoff_proj_bias", None)
    return handoff(attn) if handoff is not None else None


def can_fuse_blocks(blocks, norm) -> bool:
    """Whether :func:`forward_blocks` fuses this stack (else it runs the plain loop)."""
    return len(blocks) > 0 and _is_layer_norm(norm) and no_hooks(norm) and all(_block_kind(b) for b in blocks)


def _parts(blk, kind):
    """(scale1, drop1, scale2, drop2) of a block: layer-scale vectors (or None) and the drop-path
    modules (or None when they are identities or not active)."""
    if kind == "timm":
        s1 = blk.ls1.gamma if type(blk.ls1) is not nn.Identity else None
        s2 = blk.ls2.gamma if type(blk.ls2) is not nn.Identity else None
        d1, d2 = blk.drop_path1, blk.drop_path2
    else:
        s1, s2 = blk.gamma_1, blk.gamma_2
        d1 = d2 = blk.drop_path
    active = [d if (type(d) is not nn.Identity and d.training and getattr(d, "drop_prob", 1.0) > 0) else None
              for d in (d1, d2)]
    return s1, active[0], s2, active[1]


def _out_dtype(x: torch.Tensor):
    """The dtype the next Linear casts its input to: the autocast dtype, or None (no cast)."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def forward_blocks(x: torch.Tensor, blocks, norm: nn.Module, kernels: str = "auto", fused_mlp: bool = True,
                   grad_checkpointing: bool = False, **attn_kwargs) -> torch.Tensor:
    """``norm(blocks[-1](...blocks[0](x)))`` with fused residual add + LayerNorm.

    Args:
        x: (B, S, D) input of the first block.
        blocks: sequence of timm ``Block`` or ``BEiTBlock`` modules.
        norm: the final ``nn.LayerNorm``.
        kernels: backend of the fused ops (``"auto"``, ``"eager"``, ``"triton"``).
        fused_mlp: run each block's MLP as :func:`mimfast.ops.mlp` where the MLP allows it
            (:func:`mlp_fusable`).
        grad_checkpointing: keep only each block's inputs for the backward and run the block's
            forward again there (``torch.utils.checkpoint``, non-reentrant; random draws such as
            drop path's repeat as they were). Applies while gradients are recorded.
        attn_kwargs: passed to each block's attention (``rel_pos_bias`` for BEiT blocks).
    """
    kinds = [_block_kind(b) for b in blocks]  # once: the checks walk every block's modules
    checkpointing = grad_checkpointing and torch.is_grad_enabled()
    if not (kinds and all(kinds) and _is_layer_norm(norm) and no_hooks(norm)):  # can_fuse_blocks
        return norm(_run_plain(x, blocks, checkpointing, attn_kwargs))
    fusable = [fused_mlp and mlp_fusable(b.mlp) for b in blocks]
    # under autocast, the fused ops' parameter casts in a few launches, not one a tensor (not when
    # checkpointing: the copies would all live through the forward, which autograd then keeps none of)
    fused_ops = not checkpointing and _out_dtype(x) is not None and resolve(kernels, x, op="mlp") == "triton"
    with batched_casts(_cast_params(blocks, fusable) if fused_ops else (), x.device.type):
        return _fused_stack(x, blocks, kinds, fusable, norm, kernels, checkpointing, attn_kwargs)


def draws_random(module: nn.Module) -> bool:
    """Whether ``module`` draws random numbers in its forward as it is now: a dropout or a drop
    path (timm's ``DropPath``) in training mode with a non-zero probability. A checkpoint of blocks
    that do saves the device's random state for the recompute; one of blocks that do not need
    not (which a CUDA-graph capture needs: it cannot read that state, pytorch/pytorch#162504)."""
    for m in module.modules():
        if not m.training:
            continue
        p = m.p if isinstance(m, nn.modules.dropout._DropoutNd) else getattr(m, "drop_prob", None)
        if isinstance(p, (int, float)) and p > 0:
            return True
    return False


def _stack_draws_random(blocks) -> bool:
    return any(draws_random(blk) for blk in blocks)


def _run_plain(x: torch.Tensor, blocks, checkpointing: bool, attn_kwargs: dict) -> torch.Tensor:
    """``blocks(x)`` by the blocks' own forwards, each checkpointed when asked."""
    if not checkpointing:
        for blk in blocks:
            x = blk(x, **attn_kwargs)
        return x
    rng = _stack_draws_random(blocks)
    for blk in blocks:
        x = checkpoint(blk, x, use_reentrant=False, preserve_rng_state=rng, **attn_kwargs)
    return x


def _cast_params(blocks, fusable) -> list:
    """The parameters the blocks' fused ops cast to the autocast dtype: the one-op attention's
    Linears (:func:`mimfast.ops.self_attention`) and the fused MLP's (:func:`mimfast.ops.mlp`)."""
    params = []
    for blk, fused in zip(blocks, fusable):
        attn = blk.attn
        one_op = getattr(type(attn), "_one_op", None)
        if one_op is not None and one_op(attn):
            params += [attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias]
        if fused:
            params += [blk.mlp.fc1.weight, blk.mlp.fc1.bias, blk.mlp.fc2.weight, blk.mlp.fc2.bias]
    return params


def _fused_stack(x, blocks, kinds, fusable, norm, kernels, checkpointing, attn_kwargs) -> torch.Tensor:
    out_dtype = _out_dtype(x)
    first = blocks[0].norm1
    rng = checkpointing and _stack_draws_random(blocks)
    r, y = ops.add_layer_norm(x, None, first.weight, first.bias, first.eps, out_dtype=out_dtype, backend=kernels)
    for i, (blk, kind) in enumerate(zip(blocks, kinds)):
        nxt = blocks[i + 1].norm1 if i + 1 < len(blocks) else norm
        nxt_dtype = out_dtype if i + 1 < len(blocks) else None  # the final norm's output as eager gives it
        step = (blk, kind, fusable[i], nxt, out_dtype, nxt_dtype, kernels)
        if checkpointing:  # (r, y) kept for the backward, the block run again there
            r, y = checkpoint(_fused_block, r, y, *step, use_reentrant=False, preserve_rng_state=rng, **attn_kwargs)
        else:
            r, y = _fused_block(r, y, *step, **attn_kwargs)
    return y


def _fused_block(r, y, blk, kind, fused_mlp, nxt, out_dtype, nxt_dtype, kernels, **attn_kwargs):
    """One block of the fused stack: (residual stream, its LayerNorm) in, the same out (the
    LayerNorm the next block's norm1, or the stack's final norm)."""
    s1, d1, s2, d2 = _parts(blk, kind)
    # the bias gradients of proj and fc2 are summed by the add + LayerNorm after them, in the pass
    # that writes their output's gradient (no drop path in between: then they are the only
    # consumer, and x's gradient is the output's)
    pb = _attn_handoff(blk.attn) if d1 is None else None
    a = blk.attn(y, **attn_kwargs) if pb is None else blk.attn(y, proj_bias_grad=False, **attn_kwargs)
    if d1 is not None:  # stochastic depth: scale and drop the branch first
        a, s1 = d1(a * s1 if s1 is not None else a), None
    r, y = ops.add_layer_norm(a, r, blk.norm2.weight, blk.norm2.bias, blk.norm2.eps, scale=s1,
                              out_dtype=out_dtype, backend=kernels, x_bias=pb)
    mlp = blk.mlp
    fb = None
    if fused_mlp:
        fb = handoff_bias(mlp.fc2, None, True) if d2 is None else None
        m = ops.mlp(y, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight,
                    mlp.fc2.bias if fb is None else fb.detach(), backend=kernels)
    else:
        m = mlp(y)
    if d2 is not None:
        m, s2 = d2(m * s2 if s2 is not None else m), None
    return ops.add_layer_norm(m, r, nxt.weight, nxt.bias, nxt.eps, scale=s2, out_dtype=nxt_dtype,
                              backend=kernels, x_bias=fb)
