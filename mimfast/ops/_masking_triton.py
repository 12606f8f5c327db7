"""Autograd Functions over :mod:`mimfast.kernels.masking`: the Triton branch of
:func:`mimfast.ops.random_masking` and :func:`mimfast.ops.unshuffle_with_mask_token`.

The public ops in :mod:`mimfast.ops.masking` validate the arguments, then call the two
functions here. Dtypes follow the reference's type promotion: ``x + pos_embed`` and
``cat([x, mask_token]) + pos_embed`` come out in the promoted dtype, gradients in each input's
own dtype.
"""

from __future__ import annotations

import functools

import torch

from mimfast.kernels import masking as _k
from mimfast.ops._custom_op import kernel_op
from mimfast.ops.masking import num_kept

__all__ = ["MASKING_METHOD", "random_masking_triton", "unshuffle_with_mask_token_triton"]

# How the Triton random masking ranks the noise (mimfast.kernels.masking.masking_forward's
# ``method``): "count" (default) or "sort"; a GPU benchmark (bench_masking) decides. Read at each
# call; "sort" falls back to "count" for float64 noise, which its packed keys cannot hold.
MASKING_METHOD = "count"

# The kernel launches are registered as torch.library custom ops with fake (shape-only)
# implementations, so torch.compile(fullgraph=True) traces the autograd Functions below
# without entering Triton's launcher (eager calls skip the dispatcher: mimfast.ops._custom_op).
# A gradient that is not needed comes back as an empty tensor (custom ops cannot return None).
_EMPTY = (0,)


@kernel_op("mimfast::masking_fwd")
def _masking_fwd(x: torch.Tensor, pos: torch.Tensor | None, noise: torch.Tensor, K: int,
                 out_dtype: torch.dtype, method: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, mask, ids_restore, _ = _k.masking_forward(x, pos, noise, K, out_dtype=out_dtype, method=method)
    return out, mask, ids_restore


@_masking_fwd.register_fake
def _(x, pos, noise, K, out_dtype, method):
    N, L, D = x.shape
    return (x.new_empty((N, K, D), dtype=out_dtype), noise.new_empty((N, L), dtype=torch.float32),
            noise.new_empty((N, L), dtype=torch.int64))


@kernel_op("mimfast::masking_bwd")
def _masking_bwd(grad_out: torch.Tensor, ids_restore: torch.Tensor, L: int, x_dtype: torch.dtype | None,
                 pos_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    gx, gpos = _k.masking_backward(grad_out.contiguous(), ids_restore, L, x_dtype, pos_dtype)
    # an empty tensor only for a gradient not computed (each its own: outputs must not alias)
    if gx is None:
        gx = grad_out.new_empty(_EMPTY)
    if gpos is None:
        gpos = grad_out.new_empty(_EMPTY)
    return gx, gpos


@_masking_bwd.register_fake
def _(grad_out, ids_restore, L, x_dtype, pos_dtype):
    N, K, D = grad_out.shape
    gx = grad_out.new_empty((N, L, D), dtype=x_dtype) if x_dtype is not None else grad_out.new_empty(_EMPTY)
    gpos = grad_out.new_empty((L, D), dtype=pos_dtype) if pos_dtype is not None else grad_out.new_empty(_EMPTY)
    return gx, gpos


@kernel_op("mimfast::unshuffle_fwd")
def _unshuffle_fwd(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos: torch.Tensor | None,
                   out_dtype: torch.dtype) -> torch.Tensor:
    return _k.unshuffle_forward(x, mask_token, ids_restore, pos, out_dtype=out_dtype)


@_unshuffle_fwd.register_fake
def _(x, mask_token, ids_restore, pos, out_dtype):
    return x.new_empty((x.shape[0], ids_restore.shape[1] + 1, x.shape[2]), dtype=out_dtype)


@kernel_op("mimfast::unshuffle_bwd")
def _unshuffle_bwd(grad_out: torch.Tensor, ids_restore: torch.Tensor, K: int, x_dtype: torch.dtype,
                   mt_dtype: torch.dtype, pos_dtype: torch.dtype | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gx, gmt, gpos = _k.unshuffle_backward(grad_out.contiguous(), ids_restore, K, x_dtype, mt_dtype, pos_dtype)
    return gx, gmt, (gpos if gpos is not None else grad_out.new_empty(_EMPTY))


@_unshuffle_bwd.register_fake
def _(grad_out, ids_restore, K, x_dtype, mt_dtype, pos_dtype):
    N, L1, D = grad_out.shape
    gpos = grad_out.new_empty((L1, D), dtype=pos_dtype) if pos_dtype is not None else grad_out.new_empty(_EMPTY)
    return grad_out.new_empty((N, K + 1, D), dtype=x_dtype), grad_out.new_empty((D,), dtype=mt_dtype), gpos


def _promote(*tensors) -> torch.dtype:
    return _promote_dtypes(*[t.dtype for t in tensors if t is not None])


@functools.lru_cache(maxsize=64)  # a few dtype combinations, asked on every call
def _promote_dtypes(*dtypes: torch.dtype) -> torch.dtype:
    dtype = dtypes[0]
    for other in dtypes[1:]:
        dtype = torch.promote_types(dtype, other)
    return dtype


class RandomMaskingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pos_embed, noise, K, method):
        pos = pos_embed[0] if pos_embed is not None else None
        out, mask, ids_restore = _masking_fwd(x, pos, noise, K, _promote(x, pos_embed), method)
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
        gx, gpos = _masking_bwd(
            grad_out, ids_restore, ctx.shape[1],
            ctx.x_dtype if want_x else None, ctx.pos_dtype if want_pos else None,
        )
        return (gx if want_x else None), (gpos.unsqueeze(0) if want_pos else None), None, None, None


class UnshuffleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask_token, ids_restore, pos_embed):
        out = _unshuffle_fwd(
            x, mask_token.reshape(-1), ids_restore, pos_embed[0] if pos_embed is not None else None,
            _promote(x, mask_token, pos_embed),
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
        gx, gmt, gpos = _unshuffle_bwd(grad_out, ids_restore, ctx.K, x_dtype, mt_dtype, pos_dtype if want_pos else None)
        return (
            gx if ctx.needs_input_grad[0] else None,
            gmt.view(1, 1, -1) if ctx.needs_input_grad[1] else None,
            None,
            gpos.unsqueeze(0) if want_pos else None,
        )


def random_masking_triton(x, mask_ratio, pos_embed, noise, method=None):
    """Triton random masking; arguments validated by :func:`mimfast.ops.random_masking`.
    ``method``: "count" or "sort" (see :data:`MASKING_METHOD`, the default)."""
    method = MASKING_METHOD if method is None else method
    if method not in ("count", "sort"):
        raise ValueError(f"method must be 'count' or 'sort', got {method!r}")
    if noise.dtype == torch.float64:
        method = "count"
    return RandomMaskingFn.apply(x, pos_embed, noise, num_kept(x.shape[1], mask_ratio), method)


def unshuffle_with_mask_token_triton(x, mask_token, ids_restore, pos_embed):
    """Triton decoder input; arguments validated by :func:`mimfast.ops.unshuffle_with_mask_token`."""
    return UnshuffleFn.apply(x, mask_token, ids_restore, pos_embed)
