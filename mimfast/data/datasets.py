"""Image datasets for pretraining: torchvision-style ImageFolder trees, flat folders of images,
and the built-in shapes. Unreadable images are skipped with a warning and counted.

Augmentation randomness is seeded per sample from ``(seed, epoch, index)``, so the images a
step sees do not depend on the number of workers, and a resumed run sees what an
uninterrupted one would have.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mimfast.data.builtin import ShapesDataset

__all__ = ["IMG_EXTENSIONS", "ImageFiles", "SeededTransform", "build_dataset", "sample_seed", "IMAGENET_MEAN",
           "IMAGENET_STD"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFiles(Dataset):
    """Images under ``root``: an ImageFolder tree (``root/<class>/<image>``, labels from the
    folder names) or a flat folder (label -1). Items are ((3, H, W) uint8 tensor, label).

    The tree is read as torchvision's ``ImageFolder`` reads it: classes are the sorted
    sub-folders (symlinks followed), each walked with ``os.walk(followlinks=True)`` in sorted
    order, files kept by a case-insensitive :data:`IMG_EXTENSIONS` suffix, files directly under
    the root ignored; images are decoded as its ``pil_loader`` does (``convert("RGB")``, no
    EXIF rotation, no ``draft``), so the pixels are the same. Deliberate differences: hidden
    top-level folders (``.ipynb_checkpoints``, ``.Trash-1000``) are not classes, a class folder
    without images keeps its label instead of stopping the run, and an unreadable file is
    skipped with a warning (see :meth:`__getitem__`) where ``ImageFolder`` raises. The list is
    made once, sorted: files added later are seen by a new ``ImageFiles`` only, at their place
    in the sorted order (which moves the indices of the files after them)."""

    def __init__(self, root: str | os.PathLike, transform=None, max_skips: int = 50):
        root = Path(root)
        if not root.is_dir():
            what = "is not a folder" if root.exists() else "does not exist"
            raise FileNotFoundError(f"data folder {str(root)!r} {what}")
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        samples = []
        if classes:
            for label, name in enumerate(classes):
                for dirpath, _, files in sorted(os.walk(root / name, followlinks=True)):
                    samples += [(os.path.join(dirpath, f), label) for f in sorted(files)
                                if f.lower().endswith(IMG_EXTENSIONS)]
        else:
            samples = [(str(p), -1) for p in sorted(root.iterdir()) if p.suffix.lower() in IMG_EXTENSIONS]
        if not samples:
            message = f"no images ({', '.join(IMG_EXTENSIONS)}) under {str(root)!r}"
            if classes and any(p.suffix.lower() in IMG_EXTENSIONS for p in root.iterdir() if p.is_file()):
                shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
                message = (f"no images in the class folders of {str(root)!r} ({shown}); the images directly "
                           f"under it are not read when it has sub-folders (the ImageFolder layout): move them "
                           f"into a sub-folder or remove the sub-folders")
            raise FileNotFoundError(message)
        self.root = root
        self.classes = classes
        self.samples = samples
        self.transform = transform
        self.max_skips = max_skips
        self.skipped = 0  # per process (each worker counts its own)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> torch.Tensor:
        from PIL import Image
        import numpy as np

        path, _ = self.samples[index]
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
        # (3, H, W) over the decoder's (H, W, 3) memory, not a contiguous copy: torchvision's uint8
        # antialiased resize takes channels-last input as it is (the same pixels, about half the
        # time of MAE's whole transform on one core)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    def __getitem__(self, index: int):
        """Item ``index``; an unreadable file (truncated, corrupt, not an image, gone) is skipped
        with a warning naming it and the next file taken, up to ``max_skips`` in a row, then a
        ``RuntimeError``."""
        for attempt in range(self.max_skips):
            i = (index + attempt) % len(self.samples)
            try:
                img = self.load(i)
            except Exception as e:  # corrupt, truncated or unreadable file
                self.skipped += 1
                warnings.warn(f"skipping unreadable image {self.samples[i][0]}: {type(e).__name__}: {e}")
                continue
            if self.transform is not None:
                img = self.transform(img)
                if isinstance(img, torch.Tensor):
                    img = img.contiguous()  # the channels-last load may come out channels-last
            return img, self.samples[i][1]
        raise RuntimeError(f"{self.max_skips} unreadable images in a row from index {index} in {self.root}")


class SeededTransform(Dataset):
    """Wraps a dataset so each item's augmentation draws from torch's RNG seeded by
    ``(seed, epoch, index)`` (torchvision transforms draw from the global RNG). Items are
    asked for as ``index`` or ``(epoch, index)`` (see ``ResumableSampler(with_epoch=True)``),
    which works with persistent workers too."""

    def __init__(self, dataset: Dataset, transform, seed: int = 0):
        self.dataset = dataset
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        img, label = self.dataset[index]
        # the CPU generator only (transforms draw there): torch.manual_seed would also reseed the
        # CUDA generators, not restored after, when items load in the training process
        cpu = torch.default_generator
        state = cpu.get_state()
        cpu.manual_seed(sample_seed(self.seed, epoch, index))
        try:
            img = self.transform(img)
        finally:
            cpu.set_state(state)
        return img, label


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s augmentation in ``epoch``, reduced modulo 2**64 so any
    ``seed`` works (where ``torch.manual_seed`` took the unreduced value, negative ones too, the
    generator state is the same)."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % 2**64


def build_dataset(data: str, img_size: int, transform, seed: int = 0, builtin_size: int = 4096,
                  builtin_resolution: int | None = None) -> SeededTransform:
    """``data`` is ``"builtin"`` or a folder path."""
    if data == "builtin":
        base = ShapesDataset(num_images=builtin_size, img_size=builtin_resolution or img_size, seed=seed)
    else:
        base = ImageFiles(data)
    return SeededTransform(base, transform, seed=seed)
