"""MAE's token shuffles: random masking + gather (encoder input) and un-shuffle with mask
tokens (decoder input). shared/DESIGN.md sections 1 and 2.

The eager references follow facebookresearch/mae ``models_mae.py`` line by line
(``random_masking`` and the first half of ``forward_decoder``); they are the ground truth and
the CPU path.
"""

from __future__ import annotations

import math

import torch

from mimfast import backend as _backend

__all__ = [
    "num_kept",
    "random_masking",
    "random_masking_reference",
    "unshuffle_with_mask_token",
    "unshuffle_with_mask_token_reference",
]

# imported at the first Triton call (mimfast.backend.lazy_import)
_triton = _backend.lazy_import("mimfast.ops._masking_triton")


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """K = int(L * (1 - mask_ratio)), exactly as the reference computes ``len_keep``."""
    return int(num_patches * (1 - mask_ratio))


def _check_masking_args(x, mask_ratio, pos_embed, noise) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must be (N, L, D), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    return _check_masking_rest(x.shape, x.device, mask_ratio, pos_embed, noise)


def _check_masking_rest(x_shape, x_device, mask_ratio, pos_embed, noise) -> int:
    """:func:`_check_masking_args` past x's own checks, for an x of ``x_shape`` (N, L, D) on
    ``x_device`` (None: the caller checks pos_embed's and noise's devices)."""
    N, L, D = x_shape
    if N == 0:
        raise ValueError("x has an empty batch (N == 0)")
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)):
        raise TypeError(f"mask_ratio must be a float, got {type(mask_ratio).__name__}")
    if not math.isfinite(mask_ratio) or not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    K = num_kept(L, mask_ratio)
    if K == 0:
        raise ValueError(f"mask_ratio={mask_ratio} keeps no patch of L={L} (K == 0)")
    if pos_embed is not None:
        if pos_embed.shape != (1, L, D):
            raise ValueError(
                f"pos_embed must be (1, L, D) = (1, {L}, {D}) (the model's pos_embed[:, 1:]), "
                f"got {tuple(pos_embed.shape)}"
            )
        if x_device is not None and pos_embed.device != x_device:
            raise ValueError(f"pos_embed is on {pos_embed.device}, x on {x_device}")
    if noise is not None:
        if noise.shape != (N, L):
            raise ValueError(f"noise must be (N, L) = ({N}, {L}), got {tuple(noise.shape)}")
        if not noise.is_floating_point():
            raise TypeError(f"noise must be a floating-point tensor, got {noise.dtype}")
        if x_device is not None and noise.device != x_device:
            raise ValueError(f"noise is on {noise.device}, x on {x_device}")
    return K


def random_masking_reference(x, mask_ratio, pos_embed=None, noise=None):
    """Eager MAE random masking. x (N, L, D) -> (x_visible (N, K, D), mask (N, L), ids_restore)."""
    N, L, D = x.shape
    len_keep = num_kept(L, mask_ratio)
    if pos_embed is not None:
        x = x + pos_embed
    if noise is None:
        noise = torch.rand(N, L, device=x.device)  # noise in [0, 1]
    # sort noise for each sample: ascending, small is keep, large is remove
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    # read N*L*D + write N*K*D elements, plus an (N, K, D) int64 index tensor
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


def random_masking(x, mask_ratio, pos_embed=None, noise=None, backend="auto"):
    """Keep K = int(L * (1 - mask_ratio)) patches of each sample, chosen by ``noise``.

    Args:
        x: (N, L, D) patch tokens without the cls token.
        mask_ratio: fraction of patches removed, in [0, 1).
        pos_embed: optional (1, L, D) positional embedding (the model's ``pos_embed[:, 1:]``),
            added before the gather.
        noise: optional (N, L) noise; small values are kept. Drawn with ``torch.rand(N, L)``
            on x's device when omitted, exactly as the reference draws it.
        backend: ``"auto"``, ``"eager"`` or ``"triton"``.

    Returns:
        x_visible (N, K, D), mask (N, L) float32 (1 = removed), ids_restore (N, L) int64.
    """
    _check_masking_args(x, mask_ratio, pos_embed, noise)
    which = _backend.resolve(backend, x, op="random_masking")
    if which == "eager":
        return random_masking_reference(x, mask_ratio, pos_embed, noise)
    if noise is None:
        noise = torch.rand(x.shape[0], x.shape[1], device=x.device)
    return _triton().random_masking_triton(x, mask_ratio, pos_embed, noise)


def _check_unshuffle_args(x, mask_token, ids_restore, pos_embed):
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be (N, 1 + K, D), got {getattr(x, 'shape', type(x).__name__)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    N, K1, D = x.shape
    if N == 0:
        raise ValueError("x has an empty batch (N == 0)")
    if K1 < 2:
        raise ValueError(f"x must hold the cls row and at least one visible row, got {K1} rows")
    if not isinstance(ids_restore, torch.Tensor) or ids_restore.dtype != torch.int64:
        raise TypeError(
            f"ids_restore must be an int64 tensor, got "
            f"{getattr(ids_restore, 'dtype', type(ids_restore).__name__)}"
        )
    if ids_restore.dim() != 2 or ids_restore.shape[0] != N:
        raise ValueError(f"ids_restore must be (N, L) with N={N}, got {tuple(ids_restore.shape)}")
    L = ids_restore.shape[1]
    if K1 - 1 > L:
        raise ValueError(f"x has {K1 - 1} visible rows but ids_restore only L={L} positions")
    if mask_token.shape != (1, 1, D):
        raise ValueError(f"mask_token must be (1, 1, {D}), got {tuple(mask_token.shape)}")
    if pos_embed is not None and pos_embed.shape != (1, 1 + L, D):
        raise ValueError(
            f"pos_embed must be (1, 1 + L, D) = (1, {1 + L}, {D}) with the cls row, "
            f"got {tuple(pos_embed.shape)}"
        )
    for name, t in (("mask_token", mask_token), ("ids_restore", ids_restore), ("pos_embed", pos_embed)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")


def unshuffle_with_mask_token_reference(x, mask_token, ids_restore, pos_embed=None):
    """Eager MAE decoder input: x (N, 1 + K, D) -> (N, 1 + L, D), cls row first."""
    # append mask tokens to sequence
    mask_tokens = mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # no cls token
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))  # unshuffle
    x = torch.cat([x[:, :1, :], x_], dim=1)  # append cls token
    if pos_embed is not None:
        x = x + pos_embed
    return x


def unshuffle_with_mask_token(x, mask_token, ids_restore, pos_embed=None, backend="auto"):
    """Put the K visible rows back at their places among mask tokens, plus the positional add.

    Args:
        x: (N, 1 + K, D) decoder tokens (after ``decoder_embed``), cls row first.
        mask_token: (1, 1, D) learned mask token.
        ids_restore: (N, L) int64 from :func:`random_masking`.
        pos_embed: optional (1, 1 + L, D) decoder positional embedding with the cls row.
        backend: ``"auto"``, ``"eager"`` or ``"triton"``.

    Returns:
        (N, 1 + L, D).
    """
    _check_unshuffle_args(x, mask_token, ids_restore, pos_embed)
    which = _backend.resolve(backend, x, op="unshuffle_with_mask_token")
    if which == "eager":
        return unshuffle_with_mask_token_reference(x, mask_token, ids_restore, pos_embed)
    return _triton().unshuffle_with_mask_token_triton(x, mask_token, ids_restore, pos_embed)
