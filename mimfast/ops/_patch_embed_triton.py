"""Autograd Function over :mod:`mimfast.kernels.patch_embed` and the masking kernels: the
Triton branch of :func:`mimfast.ops.masked_patch_embed`.

Forward: rank the noise (mask, ids_restore, ids_keep), gather the kept patches' pixels into an
(N*K, C*p*p) matrix in the compute dtype, one cuBLAS matmul with the projection, then bias +
positional add in fp32 on the way to the output dtype (the reference's type promotion of the
convolution's output with ``pos_embed``).

Backward: grad_weight = g^T @ patches (cuBLAS), grad_bias and grad_pos_embed as fp32 sums in a
fixed order (deterministic), grad_imgs (only if asked) = g @ weight scattered into the kept
patches of a zero image.
"""

from __future__ import annotations

import contextlib

import torch

from mimfast.kernels import masking as _km
from mimfast.kernels import patch_embed as _kp
from mimfast.ops._custom_op import as_dtype, kernel_op
from mimfast.ops._linear_triton import column_sum_op, linear_grads
from mimfast.ops._masking_triton import _masking_bwd, _promote_dtypes
from mimfast.ops.masking import num_kept

__all__ = ["masked_patch_embed_triton", "patch_embed_triton"]

# Kernel launches as torch.library custom ops (fake implementations give shapes only), so
# torch.compile(fullgraph=True) traces the Function without entering Triton's launcher
# (eager calls skip the dispatcher: mimfast.ops._custom_op).


@kernel_op("mimfast::mask_ids")
def _mask_ids(noise: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, mask, ids_restore, ids_keep = _km.masking_forward(None, None, noise, K, write_ids_keep=True)
    return mask, ids_restore, ids_keep


@_mask_ids.register_fake
def _(noise, K):
    N, L = noise.shape
    return (noise.new_empty((N, L), dtype=torch.float32), noise.new_empty((N, L), dtype=torch.int64),
            noise.new_empty((N, K), dtype=torch.int32))


@kernel_op("mimfast::gather_patches")
def _gather_patches(imgs: torch.Tensor, ids_keep: torch.Tensor, p: int, dtype: torch.dtype) -> torch.Tensor:
    return _kp.gather_patches(imgs, ids_keep, p, dtype)


@_gather_patches.register_fake
def _(imgs, ids_keep, p, dtype):
    N, K = ids_keep.shape
    return imgs.new_empty((N * K, imgs.shape[1] * p * p), dtype=dtype)


@kernel_op("mimfast::scatter_patches")
def _scatter_patches(patches: torch.Tensor, ids_keep: torch.Tensor, p: int, imgs_shape: list[int],
                     dtype: torch.dtype) -> torch.Tensor:
    imgs = torch.zeros(imgs_shape, dtype=dtype, device=patches.device)
    return _kp.scatter_patches(patches, ids_keep, p, imgs)


@_scatter_patches.register_fake
def _(patches, ids_keep, p, imgs_shape, dtype):
    return patches.new_empty(imgs_shape, dtype=dtype)


@kernel_op("mimfast::embed_epilogue")
def _embed_epilogue(y: torch.Tensor, bias: torch.Tensor | None, pos: torch.Tensor | None, ids_keep: torch.Tensor,
                    out_dtype: torch.dtype) -> torch.Tensor:
    return _kp.embed_epilogue(y, bias, pos, ids_keep, out_dtype)


@_embed_epilogue.register_fake
def _(y, bias, pos, ids_keep, out_dtype):
    return y.new_empty(y.shape, dtype=out_dtype)


def _no_autocast(device_type: str):
    """A block with autocast off: ``torch.autocast(enabled=False)`` only where autocast is on
    (entering one costs microseconds; with autocast off the block runs the same without it)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class MaskedPatchEmbedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, imgs, weight, bias, pos_embed, noise, K, compute_dtype):
        N, C, H, W = imgs.shape
        D, _, p, _ = weight.shape
        L = (H // p) * (W // p)
        mask, ids_restore, ids_keep = _mask_ids(noise, K)
        patches = _gather_patches(imgs, ids_keep, p, compute_dtype)  # (N*K, C*p*p)
        w2 = as_dtype(weight.reshape(D, -1), compute_dtype)  # (D, C*p*p), (c, i, j) order
        with _no_autocast(imgs.device.type):
            y = torch.mm(patches, w2.t())  # (N*K, D)
        out_dtype = compute_dtype if pos_embed is None else _promote_dtypes(compute_dtype, pos_embed.dtype)
        out = _embed_epilogue(y, bias, pos_embed[0] if pos_embed is not None else None, ids_keep, out_dtype)
        ctx.mark_non_differentiable(mask, ids_restore)
        ctx.save_for_backward(patches, w2, ids_keep, ids_restore)
        ctx.meta = (imgs.shape, imgs.dtype, weight.dtype, p, L, compute_dtype,
                    bias.dtype if bias is not None else None, pos_embed.dtype if pos_embed is not None else None)
        return out.view(N, K, D), mask, ids_restore

    @staticmethod
    def backward(ctx, grad_out, grad_mask, grad_ids):
        patches, w2, ids_keep, ids_restore = ctx.saved_tensors
        imgs_shape, imgs_dtype, w_dtype, p, L, compute_dtype, bias_dtype, pos_dtype = ctx.meta
        need_imgs, need_w, need_b, need_pos = ctx.needs_input_grad[:4]
        g_imgs, g_w, g_b = _projection_grads(grad_out, patches, w2, ids_keep, imgs_shape, imgs_dtype, w_dtype, p,
                                             bias_dtype, (need_imgs, need_w, need_b))
        g_pos = None
        if need_pos:
            _, g_pos = _masking_bwd(grad_out, ids_restore, L, None, pos_dtype)
            g_pos = g_pos.unsqueeze(0)
        return g_imgs, g_w, g_b, g_pos, None, None, None


class PatchEmbedFn(torch.autograd.Function):
    """Every patch: the gathered pixels (N*L, C*p*p) times the projection, the bias in cuBLAS's
    epilogue; backward: grad_weight = g^T @ patches, grad_bias an fp32 column sum, grad_imgs
    (only if asked) = g @ weight scattered back into the patches."""

    @staticmethod
    def forward(ctx, imgs, weight, bias, compute_dtype):
        N, C, H, W = imgs.shape
        D, _, p, _ = weight.shape
        L = (H // p) * (W // p)
        ids = _all_patches(N, L, imgs.device)
        patches = _gather_patches(imgs, ids, p, compute_dtype)  # (N*L, C*p*p), (c, i, j) order
        w2 = as_dtype(weight.reshape(D, -1), compute_dtype)
        with _no_autocast(imgs.device.type):
            if bias is None:
                y = torch.mm(patches, w2.t())
            else:  # the bias in fp32 inside the product's epilogue, one rounding to the output dtype
                y = torch.addmm(as_dtype(bias, compute_dtype), patches, w2.t())
        ctx.save_for_backward(patches, w2, ids)
        ctx.meta = (imgs.shape, imgs.dtype, weight.dtype, p, bias.dtype if bias is not None else None)
        return y.view(N, L, D)

    @staticmethod
    def backward(ctx, grad_out):
        patches, w2, ids = ctx.saved_tensors
        imgs_shape, imgs_dtype, w_dtype, p, bias_dtype = ctx.meta
        return (*_projection_grads(grad_out, patches, w2, ids, imgs_shape, imgs_dtype, w_dtype, p, bias_dtype,
                                   ctx.needs_input_grad[:3]), None)


def _projection_grads(grad_out, patches, w2, ids, imgs_shape, imgs_dtype, w_dtype, p, bias_dtype, needs):
    """(grad_imgs, grad_weight, grad_bias) of the patch projection for ``grad_out`` (N, K, D), the
    rows of patches ``ids`` (N, K) gathered into ``patches`` (in the compute dtype, as is ``w2``);
    each in its input's dtype, None where ``needs`` says it is not needed."""
    need_imgs, need_w, need_b = needs
    N, K, D = grad_out.shape
    g_imgs = g_w = g_b = None
    if need_w or need_imgs:
        gc = as_dtype(grad_out.reshape(N * K, D), patches.dtype)  # the conv output's grad dtype
        if not gc.is_contiguous():
            gc = gc.contiguous()
        with _no_autocast(grad_out.device.type):
            g_patches, g_w, _ = linear_grads(gc, patches, w2, (patches.dtype, w_dtype, None),
                                             (need_imgs, need_w, False))
        if need_w:
            g_w = g_w.view(D, imgs_shape[1], p, p)
        if need_imgs:  # (N*K, C*p*p) scattered back into the patches of a zero image
            g_imgs = _scatter_patches(g_patches, ids, p, list(imgs_shape), imgs_dtype)
    if need_b:  # from the incoming gradient itself (fp32 where the output was), one pass
        g_b = as_dtype(column_sum_op(grad_out.reshape(N * K, D)), bias_dtype)
    return g_imgs, g_w, g_b


def _all_patches(N: int, L: int, device: torch.device) -> torch.Tensor:
    """(N, L) int32 patch ids 0..L-1 in every row: the gather's index of every patch."""
    return torch.arange(L, device=device, dtype=torch.int32).expand(N, L).contiguous()


def _compute_dtype(imgs, weight):
    """The projection's dtype and the weight to use: autocast's, or the images' outside it."""
    device_type = imgs.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
        weight = weight.to(compute_dtype)  # as autocast casts conv2d's weight (gradient flows back)
    else:
        if weight.dtype != imgs.dtype:
            raise TypeError(f"weight dtype {weight.dtype} differs from imgs dtype {imgs.dtype} (outside autocast)")
        compute_dtype = imgs.dtype
    if compute_dtype not in _kp.FLOAT_DTYPES:
        raise TypeError(f"imgs must be float32, float16 or bfloat16 on the Triton path, got {compute_dtype}")
    return compute_dtype, weight


def masked_patch_embed_triton(imgs, weight, bias, mask_ratio, pos_embed, noise):
    """Triton masked patch embedding; arguments validated by :func:`mimfast.ops.masked_patch_embed`."""
    compute_dtype, weight = _compute_dtype(imgs, weight)
    L = noise.shape[1]
    return MaskedPatchEmbedFn.apply(imgs, weight, bias, pos_embed, noise, num_kept(L, mask_ratio), compute_dtype)


def patch_embed_triton(imgs, weight, bias):
    """Triton patch embedding of every patch; arguments validated by :func:`mimfast.ops.patch_embed`."""
    compute_dtype, weight = _compute_dtype(imgs, weight)
    return PatchEmbedFn.apply(imgs, weight, bias, compute_dtype)
