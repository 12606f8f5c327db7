"""BEiT's two-view augmentation (microsoft/unilm ``beit/datasets.py`` ``DataAugmentationForBEiT``
with ``RandomResizedCropAndInterpolationWithTwoPic``): one crop of the image, seen twice.

    ColorJitter(0.4, 0.4, 0.4) -> RandomHorizontalFlip -> one RandomResizedCrop box
    (scale 0.08-1, ratio 3/4-4/3), resized to
        img_size (224, bicubic)            -> ToTensor -> Normalize(mean, std)   (patches)
        tokenizer_size (112, lanczos)      -> ToTensor -> map_pixels             (tokenizer)

Both views come from the same jittered, flipped image and the same box, so the token at grid
cell (i, j) describes the pixels of patch (i, j). Resizing runs on PIL images, as the
reference (PIL has the Lanczos filter; tensor resizing does not), on the box cut out first as
torchvision's ``resized_crop`` does, so the filters never read pixels outside the box. Every
random draw comes from torch's global RNG, so :class:`mimfast.data.datasets.SeededTransform`
makes it repeatable per (seed, epoch, index) (the reference draws the box with Python's
``random``).
"""

from __future__ import annotations

import math

import torch
from PIL import Image

from mimfast.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from mimfast.models.dalle import map_pixels

__all__ = ["TwoViewTransform", "random_resized_crop_box"]

_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS,
            "nearest": Image.NEAREST}


def random_resized_crop_box(height: int, width: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's ``RandomResizedCrop.get_params`` (same draws from torch's RNG): up to 10 tries of an area in
    ``scale`` and a log-uniform aspect in ``ratio``, then a centre crop clamped to ``ratio``.
    Returns (top, left, h, w)."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):  # torchvision's draws, one for one
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,)).item())
            left = int(torch.randint(0, width - w + 1, (1,)).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TwoViewTransform:
    """(3, H, W) uint8 tensor (or a PIL image) -> (patch view (3, img_size, img_size) float32
    normalised, tokenizer view (3, tokenizer_size, tokenizer_size) float32 in [0.1, 0.9]).

    Args:
        img_size: side of the patch view (224 in BEiT).
        tokenizer_size: side of the tokenizer view (112 in BEiT: the token grid times the
            tokenizer's downsampling, 14 x 8).
        scale, ratio: the crop box's area share and aspect ranges.
        color_jitter: brightness, contrast and saturation strength (0.4); 0 turns it off.
        hflip: probability of a horizontal flip.
        interpolation, tokenizer_interpolation: PIL filters of the two resizes.
        mean, std: normalisation of the patch view.
    """

    def __init__(self, img_size: int = 224, tokenizer_size: int = 112, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 color_jitter: float = 0.4, hflip: float = 0.5, interpolation: str = "bicubic",
                 tokenizer_interpolation: str = "lanczos", mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        from torchvision.transforms import v2

        for name, value in (("img_size", img_size), ("tokenizer_size", tokenizer_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale!r}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio!r}")
        for name, value in (("interpolation", interpolation), ("tokenizer_interpolation", tokenizer_interpolation)):
            if value not in _FILTERS:
                raise ValueError(f"{name} must be one of {tuple(_FILTERS)}, got {value!r}")
        self.img_size, self.tokenizer_size = img_size, tokenizer_size
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.hflip = hflip
        self.interpolation, self.tokenizer_interpolation = interpolation, tokenizer_interpolation
        self.jitter = v2.ColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter > 0 else None
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.last_box = None  # (top, left, h, w) of the last call, after the flip

    def __repr__(self) -> str:
        return (f"TwoViewTransform({self.img_size} {self.interpolation} + {self.tokenizer_size} "
                f"{self.tokenizer_interpolation}, scale {self.scale}, jitter {self.jitter is not None}, "
                f"flip {self.hflip})")

    def __call__(self, img):
        from torchvision.transforms.v2 import functional as F

        if isinstance(img, torch.Tensor):
            if img.dtype != torch.uint8 or img.dim() != 3:
                raise TypeError(f"img must be a (C, H, W) uint8 tensor or a PIL image, got "
                                f"{img.dtype} {tuple(img.shape)}")
            img = F.to_pil_image(img)
        img = img.convert("RGB")
        if self.jitter is not None:
            img = self.jitter(img)
        if torch.rand(1).item() < self.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        top, left, h, w = random_resized_crop_box(img.height, img.width, self.scale, self.ratio)
        self.last_box = (top, left, h, w)
        # cut the box out, then resize it, as torchvision's resized_crop (the reference): resizing
        # the whole image with box= would let the filters read pixels around the box
        crop = img.crop((left, top, left + w, top + h))
        patches = crop.resize((self.img_size, self.img_size), _FILTERS[self.interpolation])
        tokens = crop.resize((self.tokenizer_size, self.tokenizer_size), _FILTERS[self.tokenizer_interpolation])
        # pil_to_tensor is a (C, H, W) view of (H, W, C) memory: hand out contiguous views
        patches = (F.pil_to_tensor(patches).float().div_(255) - self.mean) / self.std
        tokens = map_pixels(F.pil_to_tensor(tokens).float().div_(255))
        return patches.contiguous(), tokens.contiguous()
