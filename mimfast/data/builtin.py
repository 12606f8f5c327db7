"""The built-in dataset: procedurally drawn images of labelled shapes, no download needed.

Each image shows one shape of one of :data:`CLASSES` in a random colour, size, position and
rotation, over a random two-colour gradient background with some texture and pixel noise.
Image ``i`` is a pure function of ``(seed, i)``, so the dataset needs no storage and every
run and every worker sees the same images. The labels make a linear probe on it meaningful.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["CLASSES", "ShapesDataset", "render_shape_image"]

CLASSES = ("circle", "square", "triangle", "ring", "cross", "star", "stripes", "checker")


def _polygon_inside(u, v, n_vertices, radius, inner=None):
    """Inside test for a regular polygon (or star when ``inner`` is set) centred at 0."""
    theta = np.arctan2(v, u)
    r = np.hypot(u, v)
    if inner is None:
        sector = 2 * np.pi / n_vertices
        local = np.mod(theta, sector) - sector / 2
        return r * np.cos(local) <= radius * np.cos(sector / 2)
    # star: radius interpolates between the outer and inner radii over each half-sector
    sector = 2 * np.pi / n_vertices
    local = np.abs(np.mod(theta, sector) - sector / 2) / (sector / 2)  # 0 at a tip's middle... 1 at tips
    edge = inner + (radius - inner) * local
    return r <= edge


def render_shape_image(index: int, img_size: int = 64, seed: int = 0) -> tuple[np.ndarray, int]:
    """Draw image ``index``: returns (H, W, 3) uint8 and its class id. A negative ``seed`` is
    read as torch reads it, modulo 2**64 (numpy's seeds are non-negative)."""
    rng = np.random.default_rng([seed % 2**64 if seed < 0 else seed, index])
    label = int(rng.integers(len(CLASSES)))
    s = img_size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s  # (S, S) in [0, 1)

    # background: gradient between two colours along a random direction, plus soft texture
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    ang = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + (np.cos(ang) * (xx - 0.5) + np.sin(ang) * (yy - 0.5)), 0, 1)[..., None]
    img = (1 - t) * c0 + t * c1
    freq = rng.uniform(2, 6)
    img += 0.06 * np.sin(2 * np.pi * freq * (xx + rng.uniform()))[..., None] * rng.uniform(-1, 1, 3)

    # the shape: centre, size, rotation, colour far enough from the background
    cx, cy = rng.uniform(0.3, 0.7, 2)
    size = rng.uniform(0.18, 0.32)
    rot = rng.uniform(0, 2 * np.pi)
    u, v = xx - cx, yy - cy
    u, v = np.cos(rot) * u + np.sin(rot) * v, -np.sin(rot) * u + np.cos(rot) * v
    color = rng.uniform(0, 1, 3)
    if np.abs(color - img[int(cy * s), int(cx * s)]).sum() < 0.6:
        color = 1.0 - color
    name = CLASSES[label]
    if name == "circle":
        inside = np.hypot(u, v) <= size
    elif name == "square":
        inside = (np.abs(u) <= size * 0.85) & (np.abs(v) <= size * 0.85)
    elif name == "triangle":
        inside = _polygon_inside(u, v, 3, size)
    elif name == "ring":
        r = np.hypot(u, v)
        inside = (r <= size) & (r >= size * 0.55)
    elif name == "cross":
        arm = size * 0.3
        inside = ((np.abs(u) <= arm) & (np.abs(v) <= size)) | ((np.abs(v) <= arm) & (np.abs(u) <= size))
    elif name == "star":
        inside = _polygon_inside(u, v, 5, size * 1.1, inner=size * 0.45)
    elif name == "stripes":
        inside = (np.hypot(u, v) <= size * 1.2) & (np.mod(u / (size * 0.5), 1.0) < 0.5)
    else:  # checker
        inside = (np.abs(u) <= size) & (np.abs(v) <= size) & (
            (np.floor(u / (size * 0.5)) + np.floor(v / (size * 0.5))) % 2 == 0
        )
    img = np.where(inside[..., None], color, img)
    img += rng.normal(0, 0.02, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), label


class ShapesDataset(Dataset):
    """``num_images`` labelled shape images of ``img_size`` pixels, drawn on the fly.

    Items are ``(image, label)``: image a (3, H, W) uint8 tensor passed through ``transform``
    when one is given.
    """

    classes = CLASSES

    def __init__(self, num_images: int = 4096, img_size: int = 64, seed: int = 0, transform=None):
        if num_images <= 0:
            raise ValueError(f"num_images must be positive, got {num_images}")
        if img_size < 8:
            raise ValueError(f"img_size must be at least 8, got {img_size}")
        self.num_images = num_images
        self.img_size = img_size
        self.seed = seed
        self.transform = transform

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int):
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        arr, label = render_shape_image(index, self.img_size, self.seed)
        img = torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
        if self.transform is not None:
            img = self.transform(img)
        return img, label
