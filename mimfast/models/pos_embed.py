"""Fixed 2D sin-cos positional embeddings, as facebookresearch/mae ``util/pos_embed.py``.

Note the reference's naming: the half it calls ``emb_h`` is built from ``grid[0]``, which
``np.meshgrid(grid_w, grid_h)`` fills with the *width* coordinate. We match the reference,
not the name, so official checkpoints and ours agree.
"""

from __future__ import annotations

import numpy as np

__all__ = ["get_2d_sincos_pos_embed", "get_1d_sincos_pos_embed_from_grid"]


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """pos (M,) -> (M, embed_dim): [sin(pos * omega), cos(pos * omega)], omega = 1/10000^(2i/D)."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega  # (D/2,)
    pos = pos.reshape(-1)  # (M,)
    out = np.einsum("m,d->md", pos, omega)  # (M, D/2), outer product
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size, cls_token: bool = False) -> np.ndarray:
    """(grid_h * grid_w [+ 1], embed_dim) float64; the cls row, if asked for, is zeros."""
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for 2D sin-cos, got {embed_dim}")
    grid_h, grid_w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    grid = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))
    grid = np.stack(grid, axis=0).reshape(2, 1, grid_h, grid_w)  # grid[0]: width coordinate
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    pos_embed = np.concatenate([emb_h, emb_w], axis=1)  # (H*W, D)
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed
