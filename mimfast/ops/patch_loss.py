"""MAE's reconstruction loss: patchify + per-patch normalisation + masked MSE (or L1, the
SimMIM variant). shared/DESIGN.md section 3.

The eager reference follows facebookresearch/mae ``models_mae.py`` ``patchify`` and
``forward_loss`` line by line. One documented difference: where every weight is zero (e.g.
``mask_ratio=0``) the reference divides 0 by 0 and returns NaN; here the loss is 0 with a
zero gradient.
"""

from __future__ import annotations

import torch

from mimfast import backend as _backend

__all__ = [
    "patchify",
    "unpatchify",
    "masked_patch_loss",
    "masked_patch_loss_reference",
]

# imported at the first Triton call (mimfast.backend.lazy_import)
_triton = _backend.lazy_import("mimfast.ops._patch_loss_triton")

LOSSES = ("mse", "l1")


def _check_imgs(imgs, patch_size, name="imgs"):
    if not isinstance(imgs, torch.Tensor) or imgs.dim() != 4:
        raise ValueError(f"{name} must be (N, C, H, W), got {getattr(imgs, 'shape', type(imgs).__name__)}")
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size <= 0:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    H, W = imgs.shape[-2:]
    if H % patch_size or W % patch_size:
        raise ValueError(f"{name} size {H}x{W} is not a multiple of patch_size={patch_size}")


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), each row a patch in (p, q, c) order ('nchpwq->nhwpqc')."""
    _check_imgs(imgs, patch_size)
    N, C, H, W = imgs.shape
    p = patch_size
    h, w = H // p, W // p
    x = imgs.reshape(N, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(N, h * w, p * p * C)


def unpatchify(x: torch.Tensor, patch_size: int, in_chans: int = 3, grid_size=None) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, H, W); ``grid_size`` (h, w) defaults to a square grid."""
    if x.dim() != 3:
        raise ValueError(f"x must be (N, L, p*p*C), got shape {tuple(x.shape)}")
    N, L, P = x.shape
    p = patch_size
    if P != p * p * in_chans:
        raise ValueError(f"x rows hold {P} values, expected p*p*C = {p}*{p}*{in_chans} = {p * p * in_chans}")
    if grid_size is None:
        h = w = int(round(L ** 0.5))
        if h * w != L:
            raise ValueError(f"L={L} is not a square grid; pass grid_size=(h, w)")
    else:
        h, w = grid_size
        if h * w != L:
            raise ValueError(f"grid_size {h}x{w} does not hold L={L} patches")
    x = x.reshape(N, h, w, p, p, in_chans)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(N, in_chans, h * p, w * p)


def _check_loss_args(pred, imgs, mask, patch_size, loss, eps):
    _check_imgs(imgs, patch_size)
    if not imgs.is_floating_point():
        raise TypeError(f"imgs must be a floating-point tensor, got {imgs.dtype}")
    N, C, H, W = imgs.shape
    if N == 0:
        raise ValueError("imgs has an empty batch (N == 0)")
    L = (H // patch_size) * (W // patch_size)
    P = patch_size * patch_size * C
    if not isinstance(pred, torch.Tensor) or pred.dim() != 3:
        raise ValueError(f"pred must be (N, L, p*p*C), got {getattr(pred, 'shape', type(pred).__name__)}")
    if not pred.is_floating_point():
        raise TypeError(f"pred must be a floating-point tensor, got {pred.dtype}")
    if pred.shape != (N, L, P):
        raise ValueError(
            f"pred must be (N, L, p*p*C) = ({N}, {L}, {P}) for imgs {tuple(imgs.shape)} and "
            f"patch_size={patch_size}, got {tuple(pred.shape)}"
        )
    if not isinstance(mask, torch.Tensor) or mask.shape != (N, L):
        raise ValueError(f"mask must be (N, L) = ({N}, {L}), got {getattr(mask, 'shape', type(mask).__name__)}")
    if not (mask.is_floating_point() or mask.dtype == torch.bool):
        raise TypeError(f"mask must hold float weights (or bool), got {mask.dtype}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    for name, t in (("imgs", imgs), ("mask", mask)):
        if t.device != pred.device:
            raise ValueError(f"{name} is on {t.device}, pred on {pred.device}")


def masked_patch_loss_reference(pred, imgs, mask, patch_size, norm_pix=True, loss="mse", eps=1e-6):
    """Eager MAE ``forward_loss``: pred (N, L, P), imgs (N, C, H, W), mask (N, L) -> scalar."""
    target = patchify(imgs, patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps) ** 0.5
    if loss == "mse":
        per_value = (pred - target) ** 2
    else:
        per_value = (pred - target).abs()
    per_patch = per_value.mean(dim=-1)  # [N, L], mean loss per patch
    mask = mask.to(per_patch.dtype)
    denom = mask.sum()
    # the reference divides 0 by 0 when no weight is set; we return 0 with a zero gradient
    return (per_patch * mask).sum() / torch.where(denom == 0, torch.ones_like(denom), denom)


def masked_patch_loss(pred, imgs, mask, patch_size, norm_pix=True, loss="mse", eps=1e-6, backend="auto"):
    """Mean over masked patches of the per-patch MSE (or L1) against the (normalised) pixels.

    Args:
        pred: (N, L, p*p*C) predictions; may be a strided view (decoder output minus cls row).
        imgs: (N, C, H, W) images; H and W multiples of ``patch_size``.
        mask: (N, L) non-negative weights (1 = masked patch, counted in the loss).
        patch_size: p.
        norm_pix: normalise each target patch by its mean and unbiased variance.
        loss: ``"mse"`` or ``"l1"``.
        eps: added to the variance.
        backend: ``"auto"``, ``"eager"`` or ``"triton"``.

    Returns:
        0-dim loss tensor, float32 for low-precision inputs under the Triton backend.
    """
    _check_loss_args(pred, imgs, mask, patch_size, loss, eps)
    which = _backend.resolve(backend, pred, op="masked_patch_loss")
    if which == "eager":
        return masked_patch_loss_reference(pred, imgs, mask, patch_size, norm_pix, loss, eps)
    return _triton().masked_patch_loss_triton(pred, imgs, mask, patch_size, norm_pix, loss, eps)
