"""Autograd Functions over :mod:`mimfast.kernels.masking`: the Triton branch of
:func:`mimfast.ops.random_masking` and :func:`mimfast.ops.unshuffle_with_mask_token`.

The public ops in :mod:`mimfast.ops.masking` validate the arguments, then call the two
functions here. Dtypes follow the reference's type promotion: ``x + pos_embed`` and
``cat([x, mask_token]) + pos_embed`` come out in the promoted dtype, gradients in each input's
own dtype.
"""

from __future__ import annotations

import torch

from mimfast.kernels import masking as _k
from mimfast.ops.masking import num_kept

__all__ = ["random_masking_triton", "unshuffle_with_mask_token_triton"]


def _promote(*tensors) -> torch.dtype:
    dtype = None
    for t in tensors:
        if t is not None:
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype


class RandomMaskingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pos_embed, noise, K):
        pos = pos_embed[0] if pos_embed is not None else None
        out, mask, ids_restore, _ = _k.masking_forward(x, pos, noise, K, out_dtype=_promote(x, pos_embed))
        ctx.mark_non_differentiable(mask, ids_restore)
        ctx.save_for_backward(ids_restore)
        ctx.shape = x.shape
        ctx.x_dtype = x.dtype
        ctx.pos_dtype = pos_embed.dtype if pos_embed is not None else None
        return out, mask, ids_restore

    @staticmethod
    def backward(ctx, grad_out, grad_mask, grad_ids):
        (ids_restore,) = ctx.saved_tensors
        want_x, want_pos = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx, gpos = _k.masking_backward(
            grad_out, ids_restore, ctx.shape[1],
            ctx.x_dtype if want_x else None, ctx.pos_dtype if want_pos else None,
        )
        return gx, (gpos.unsqueeze(0) if gpos is not None else None), None, None


class UnshuffleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask_token, ids_restore, pos_embed):
        out = _k.unshuffle_forward(
            x, mask_token.reshape(-1), ids_restore, pos_embed[0] if pos_embed is not None else None,
            out_dtype=_promote(x, mask_token, pos_embed),
        )
        ctx.save_for_backward(ids_restore)
        ctx.K = x.shape[1] - 1
        ctx.dtypes = (x.dtype, mask_token.dtype, pos_embed.dtype if pos_embed is not None else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (ids_restore,) = ctx.saved_tensors
        x_dtype, mt_dtype, pos_dtype = ctx.dtypes
        want_pos = ctx.needs_input_grad[3]
        gx, gmt, gpos = _k.unshuffle_backward(
            grad_out, ids_restore, ctx.K, x_dtype, mt_dtype, pos_dtype if want_pos else None
        )
        return (
            gx if ctx.needs_input_grad[0] else None,
            gmt.view(1, 1, -1) if ctx.needs_input_grad[1] else None,
            None,
            gpos.unsqueeze(0) if gpos is not None else None,
        )


def random_masking_triton(x, mask_ratio, pos_embed, noise):
    """Triton random masking; arguments validated by :func:`mimfast.ops.random_masking`."""
    return RandomMaskingFn.apply(x, pos_embed, noise, num_kept(x.shape[1], mask_ratio))


def unshuffle_with_mask_token_triton(x, mask_token, ids_restore, pos_embed):
    """Triton decoder input; arguments validated by :func:`mimfast.ops.unshuffle_with_mask_token`."""
    return UnshuffleFn.apply(x, mask_token, ids_restore, pos_embed)
