"""The GPU input pipeline: DataLoader workers only read file bytes; the main process decodes
the JPEGs on the GPU (nvjpeg through ``torchvision.io.decode_jpeg(device="cuda")``, CPU decode
as the fallback) and one Triton kernel (``mimfast.kernels.augment``) does the whole
augmentation of the batch: RandomResizedCrop, horizontal flip, [0, 1] scaling, mean/std
normalisation, output in the model's dtype, channels-first; optionally BEiT's second view of
the same crop for the tokenizer.

Semantics, against torchvision's MAE / BEiT pipeline:

- Crop boxes and the uniforms they come from: :mod:`mimfast.data.crop_boxes` (torchvision's
  rule exactly, from a counter-based hash of ``(seed, epoch, index)``).
- Resampling is torch's ``upsample_bicubic2d`` / ``upsample_bilinear2d`` (``align_corners=False``)
  of the crop, i.e. torchvision's ``resized_crop(..., antialias=False)``; values clamped to
  [0, 255]. torchvision's CPU default (``antialias=True``) and PIL (the official MAE / BEiT
  code) low-pass filter when shrinking; this pipeline does not.
- Decoding: nvjpeg (``decode_jpeg(device="cuda")``) upsamples the chroma of 4:2:0 JPEGs
  nearest-neighbour where PIL and libjpeg-turbo interpolate: colours differ by a few levels
  near colour edges.
- BEiT's tokenizer view: the reference resizes it with PIL lanczos; here it is bicubic (or
  bilinear) of the same box and flip, then ``map_pixels`` (``x * (1 - 2 * 0.1) + 0.1``), or
  [0, 1] for BEiT v2's VQ-KD tokenizer (``second_norm="unit"``). ColorJitter (BEiT v1) is not
  done here.

Use from a trainer::

    augment = GpuAugment(224, scale=(0.2, 1.0), seed=cfg.seed, device=device)
    loader = GpuLoader.from_dataset(EncodedImages(cfg.data), augment, batch_size=256,
                                    sampler=sampler, num_workers=8)   # sampler may yield (epoch, i)
    for imgs, labels in loader:          # imgs (256, 3, 224, 224) on the device, normalised
        ...
"""

from __future__ import annotations

import os
import queue
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mimfast import backend as _backend
from mimfast.data.crop_boxes import _as_u64, _check_range, _splitmix64, crop_uniforms, sample_crop_params
from mimfast.data.datasets import IMAGENET_MEAN, IMAGENET_STD, ImageFiles

__all__ = [
    "LOGIT_LAPLACE_EPS",
    "PackedImages",
    "pack_images",
    "resized_crop_batch",
    "reference_resized_crop_batch",
    "gpu_random_resized_crop",
    "decode_images",
    "EncodedImages",
    "DecodeShare",
    "collate_encoded",
    "ItemBatch",
    "GpuAugment",
    "GpuLoader",
]

LOGIT_LAPLACE_EPS = 0.1  # BEiT's map_pixels
SECOND_NORMS = ("map_pixels", "unit", "normalize")
_JPEG_MAGIC = (0xFF, 0xD8, 0xFF)


# --------------------------------------------------------------------------------------------
# packing and the batched augmentation


@dataclass
class PackedImages:
    """Images of different sizes back to back in one uint8 buffer.

    data: (total,) uint8 on the images' device; offsets, heights, widths: (N,) int64 on the
    CPU; channels_last: each image is stored HWC (else CHW).
    """

    data: torch.Tensor
    offsets: torch.Tensor
    heights: torch.Tensor
    widths: torch.Tensor
    channels_last: bool = False

    def __len__(self) -> int:
        return int(self.offsets.shape[0])

    def image(self, i: int) -> torch.Tensor:
        """Image i as a (3, H, W) view or copy."""
        h, w, off = int(self.heights[i]), int(self.widths[i]), int(self.offsets[i])
        flat = self.data[off: off + 3 * h * w]
        return flat.view(h, w, 3).permute(2, 0, 1) if self.channels_last else flat.view(3, h, w)


def pack_images(images, layout: str = "chw") -> PackedImages:
    """Pack a list of uint8 images, (3, H, W) for ``layout="chw"`` or (H, W, 3) for ``"hwc"``,
    all on one device, into a :class:`PackedImages` (one copy)."""
    if layout not in ("chw", "hwc"):
        raise ValueError(f"layout must be 'chw' or 'hwc', got {layout!r}")
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        images = list(images.unbind(0))
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError("images must be a non-empty list of uint8 tensors")
    heights, widths = [], []
    device = images[0].device if isinstance(images[0], torch.Tensor) else None
    for i, im in enumerate(images):
        if not isinstance(im, torch.Tensor):
            raise TypeError(f"images[{i}] must be a torch.Tensor, got {type(im).__name__}")
        if im.dtype != torch.uint8:
            raise TypeError(f"images[{i}] must be uint8, got {im.dtype}")
        c_dim = 0 if layout == "chw" else 2
        if im.dim() != 3 or im.shape[c_dim] != 3:
            want = "(3, H, W)" if layout == "chw" else "(H, W, 3)"
            raise ValueError(f"images[{i}] must be {want} for layout={layout!r}, got {tuple(im.shape)}")
        if im.device != device:
            raise ValueError(f"images[{i}] is on {im.device}, images[0] on {device}")
        h, w = (im.shape[1], im.shape[2]) if layout == "chw" else (im.shape[0], im.shape[1])
        if h < 1 or w < 1:
            raise ValueError(f"images[{i}] is empty: {tuple(im.shape)}")
        heights.append(h)
        widths.append(w)
    heights_t = torch.tensor(heights, dtype=torch.int64)
    widths_t = torch.tensor(widths, dtype=torch.int64)
    sizes = 3 * heights_t * widths_t
    offsets = torch.cumsum(sizes, 0) - sizes
    data = torch.cat([im.reshape(-1) for im in images]) if len(images) > 1 else images[0].reshape(-1).contiguous()
    return PackedImages(data, offsets, heights_t, widths_t, channels_last=layout == "hwc")


def _affines(mean, std, second_norm):
    mean = [float(m) for m in mean]
    std = [float(s) for s in std]
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std must hold 3 values, got {len(mean)} and {len(std)}")
    if not all(s > 0 for s in std):
        raise ValueError(f"std must be positive, got {std}")
    first = ([1.0 / (255.0 * s) for s in std], [-m / s for m, s in zip(mean, std)])
    if second_norm == "map_pixels":
        second = ([(1.0 - 2.0 * LOGIT_LAPLACE_EPS) / 255.0] * 3, [LOGIT_LAPLACE_EPS] * 3)
    elif second_norm == "unit":
        second = ([1.0 / 255.0] * 3, [0.0] * 3)
    elif second_norm == "normalize":
        second = first
    else:
        raise ValueError(f"second_norm must be one of {SECOND_NORMS}, got {second_norm!r}")
    return first, second


def _check_size(name: str, size) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 4096:
        raise ValueError(f"{name} must be an int in [1, 4096], got {size!r}")
    return size


def _meta(packed: PackedImages, boxes, flips) -> torch.Tensor:
    n = len(packed)
    boxes = torch.as_tensor(boxes, dtype=torch.int64).cpu()
    flips = torch.as_tensor(flips).cpu()
    if tuple(boxes.shape) != (n, 4):
        raise ValueError(f"boxes must be (N, 4) (top, left, height, width) with N = {n}, got {tuple(boxes.shape)}")
    if tuple(flips.shape) != (n,):
        raise ValueError(f"flips must be (N,) with N = {n}, got {tuple(flips.shape)}")
    top, left, h, w = boxes.unbind(1)
    bad = (top < 0) | (left < 0) | (h < 1) | (w < 1) | (top + h > packed.heights) | (left + w > packed.widths)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"boxes[{i}] = {boxes[i].tolist()} is not inside image {i} of "
                         f"{int(packed.heights[i])}x{int(packed.widths[i])}")
    return torch.stack([packed.offsets, packed.heights, packed.widths, top, left, h, w,
                        flips.to(torch.int64)], dim=1)


def _as_packed(images, layout) -> PackedImages:
    return images if isinstance(images, PackedImages) else pack_images(images, layout)


def resized_crop_batch(images, boxes, flips, size: int, *, interpolation: str = "bicubic",
                       mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=torch.float32, second_size: int | None = None,
                       second_interpolation: str = "bicubic", second_norm: str = "map_pixels",
                       quantize: bool = False, layout: str = "chw", backend: str = "auto"):
    """Crop each image to its box, resize to ``size`` x ``size``, flip, scale and normalise.

    Args:
        images: a list of uint8 images ((3, H, W) for ``layout="chw"``, (H, W, 3) for "hwc")
            on one device, or a :class:`PackedImages`.
        boxes: (N, 4) int (top, left, height, width), inside each image.
        flips: (N,) bool, flip horizontally after the resize.
        size: output side S.
        interpolation: "bicubic" or "bilinear" (torch's, ``align_corners=False``, no antialias).
        mean, std: per-channel normalisation of the [0, 1] values.
        dtype: output dtype (float32, float16, bfloat16).
        second_size: if set, also return a second view of the same box and flip (BEiT).
        second_interpolation: its interpolation.
        second_norm: "map_pixels" (BEiT / DALL-E tokenizer, ``x * 0.8 + 0.1``), "unit" ([0, 1])
            or "normalize" (mean / std as the first view).
        quantize: round resized values to integers as torchvision's uint8 resize does.
        backend: "auto" (the Triton kernel on CUDA or under TRITON_INTERPRET=1, else eager),
            "triton" or "eager".

    Returns:
        (N, 3, S, S) ``dtype`` tensor on the images' device, or a pair with the second view.
    """
    packed = _as_packed(images, layout)
    size = _check_size("size", size)
    if second_size is not None:
        _check_size("second_size", second_size)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    (mul, add), (mul2, add2) = _affines(mean, std, second_norm)
    meta = _meta(packed, boxes, flips)
    which = _backend.resolve(backend, packed.data, op="resized_crop_batch")
    if which == "eager":
        return _reference(packed, meta, size, interpolation, mean, std, dtype, second_size, second_interpolation,
                          second_norm, quantize)
    from mimfast.kernels.augment import augment_crops

    n, device = len(packed), packed.data.device
    out = torch.empty((n, 3, size, size), dtype=dtype, device=device)
    out2 = None if second_size is None else torch.empty((n, 3, second_size, second_size), dtype=dtype, device=device)
    if device.type == "cuda":
        meta = meta.pin_memory().to(device, non_blocking=True)
    return augment_crops(packed.data, meta, out, mul, add, interpolation, out2=out2, mul2=mul2, add2=add2,
                         interpolation2=second_interpolation, channels_last=packed.channels_last, quantize=quantize)


def _reference(packed, meta, size, interpolation, mean, std, dtype, second_size, second_interpolation, second_norm,
               quantize):
    """torchvision's ops, per image, in the pipeline's order."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    modes = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}
    for name, interp in (("interpolation", interpolation), ("second_interpolation", second_interpolation)):
        if interp not in modes:
            raise ValueError(f"{name} must be one of {tuple(modes)}, got {interp!r}")

    def view(s, interp, norm):
        outs = []
        for i, (_, _, _, top, left, h, w, flip) in enumerate(meta.tolist()):
            x = F.resized_crop(packed.image(i).float(), top, left, h, w, [s, s], interpolation=modes[interp],
                               antialias=False)
            x = x.clamp(0, 255)  # what the uint8 pipeline keeps
            if quantize:
                x = x.round()  # torchvision's uint8 output
            if flip:
                x = F.horizontal_flip(x)
            x = x.mul(1.0 / 255)  # ToDtype(float32, scale=True)
            if norm == "normalize":
                x = F.normalize(x, list(mean), list(std))
            elif norm == "map_pixels":
                x = (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS
            outs.append(x.to(dtype))
        return torch.stack(outs)

    first = view(size, interpolation, "normalize")
    if second_size is None:
        return first
    return first, view(second_size, second_interpolation, second_norm)


def reference_resized_crop_batch(images, boxes, flips, size: int, **kwargs):
    """The eager reference of :func:`resized_crop_batch` (torchvision's ``resized_crop`` with
    ``antialias=False`` on float32 per image); what CPU tensors run without the interpreter."""
    kwargs["backend"] = "eager"
    return resized_crop_batch(images, boxes, flips, size, **kwargs)


def gpu_random_resized_crop(images, size: int, uniforms: torch.Tensor, *, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                            flip_p: float = 0.5, layout: str = "chw", **kwargs):
    """RandomResizedCrop + RandomHorizontalFlip + ToDtype(scale) + Normalize of a batch in one kernel.

    ``uniforms`` (N, UNIFORMS_PER_SAMPLE) in [0, 1), e.g. :func:`crop_uniforms` or
    ``torch.rand(N, UNIFORMS_PER_SAMPLE, dtype=torch.float64, generator=g)``, pick the boxes
    (torchvision's rule, :func:`sample_crop_boxes`) and flips; the other keyword arguments are
    :func:`resized_crop_batch`'s (``second_size`` for BEiT's two views).
    """
    packed = _as_packed(images, layout)
    boxes, flips = sample_crop_params(packed.heights, packed.widths, uniforms, scale, ratio, flip_p)
    return resized_crop_batch(packed, boxes, flips, size, **kwargs)


# --------------------------------------------------------------------------------------------
# decoding


def _is_jpeg(data: torch.Tensor) -> bool:
    return data.numel() >= 3 and tuple(data[:3].tolist()) == _JPEG_MAGIC


def _item_shape(i: int, item) -> tuple[int, int, int]:
    """(C, H, W) of a decoded image item, (0, 0, bytes) of an encoded one; an error for others."""
    if not isinstance(item, torch.Tensor) or item.dtype != torch.uint8:
        raise TypeError(f"items[{i}] must be a uint8 tensor (encoded bytes or a decoded image)")
    dim = item.dim()
    if dim == 3:
        return tuple(item.shape)
    if dim == 1:
        return 0, 0, item.shape[0]
    raise ValueError(f"items[{i}] must be 1-D (encoded bytes) or (3, H, W), got {tuple(item.shape)}")


def _kinds(items: list) -> tuple[list[int], list[int], list[int]]:
    """Positions of (decoded images, encoded JPEGs, other encoded bytes) in a list of items."""
    decoded, jpegs, others = [], [], []
    for i, item in enumerate(items):
        if _item_shape(i, item)[0]:
            decoded.append(i)
        else:
            (jpegs if _is_jpeg(item) else others).append(i)
    return decoded, jpegs, others


def _decode_cpu(data: torch.Tensor) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    return decode_image(data, mode=ImageReadMode.RGB)


def _to_device(image: torch.Tensor, device: torch.device, pin: bool = False) -> torch.Tensor:
    """``image`` on ``device``; on CUDA an asynchronous copy on the current stream, through
    pinned memory when ``pin``."""
    if device.type != "cuda":
        return image.to(device)
    return (image.pin_memory() if pin else image).to(device, non_blocking=True)


def decode_images(items, device) -> tuple[list[torch.Tensor], list[int]]:
    """Decode a batch to (3, H, W) uint8 RGB images on ``device``.

    Items are 1-D uint8 tensors of encoded bytes, or already decoded (3, H, W) uint8 tensors
    (moved to the device as they are). On CUDA, the JPEGs are decoded together by nvjpeg;
    a batch nvjpeg refuses is retried one image at a time, and images it cannot decode (PNG
    and other formats, CMYK JPEGs) are decoded on the CPU. Returns the images and the
    positions of undecodable items, whose places are filled with the next good image of the
    batch (a warning names them; all undecodable raises ``ValueError``).
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    if isinstance(items, ItemBatch):  # checked when packed; classified from its tables
        decoded_at, jpegs, others = items.kinds()
        items = items.items()
    else:
        items = list(items)
        decoded_at, jpegs, others = _kinds(items)
    out: list = [None] * len(items)
    for i in decoded_at:
        out[i] = _to_device(items[i], device)
    on_cpu = sorted(jpegs + others)
    if device.type == "cuda" and jpegs:
        on_cpu = list(others)
        try:
            decoded = decode_jpeg([items[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
            for i, im in zip(jpegs, decoded):
                out[i] = im
        except Exception:  # noqa: BLE001 - nvjpeg refuses the batch: find the image(s) it refuses
            for i in jpegs:
                try:
                    out[i] = decode_jpeg(items[i], mode=ImageReadMode.RGB, device=device)
                except Exception:  # noqa: BLE001 - decoded on the CPU below, or reported
                    on_cpu.append(i)
    failed = []
    for i in sorted(on_cpu):
        try:
            im = _decode_cpu(items[i])
        except Exception as e:  # noqa: BLE001 - corrupt or unsupported file
            failed.append(i)
            warnings.warn(f"skipping undecodable image at batch position {i}: {e}")
            continue
        out[i] = _to_device(im, device, pin=True)
    good = [i for i, im in enumerate(out) if im is not None]
    if not good:
        raise ValueError(f"none of the {len(items)} images of the batch could be decoded")
    for i in failed:
        out[i] = out[next((j for j in good if j > i), good[0])]
    for i, im in enumerate(out):
        if im.dim() != 3 or im.shape[0] != 3:  # a decoded item given in another layout
            raise ValueError(f"image {i} must be (3, H, W) RGB, got {tuple(im.shape)}")
    return out, failed


# --------------------------------------------------------------------------------------------
# datasets and loaders


HISTORY = 512  # DecodeShare.history keeps at least this many of the latest values


class DecodeShare:
    """The share of images the DataLoader workers decode themselves, in shared memory (each
    worker reads it per item, the main process sets it), and the rule that adjusts it.

    The best share depends on the machine: nvjpeg's rate, the cores, the image sizes, and how
    much GPU time the training step leaves to decoding. The loader reports, per batch, how long
    it waited for the workers and how long the batch took in all (:meth:`observe`); every
    ``window`` batches the share moves: down when the waits took more than ``high`` of the time
    (the workers are the bottleneck: give nvjpeg more), by ``step`` times how far past ``high``
    the waits were (up to 4 steps: a share far too high is left in a few windows), up by ``step``
    when they took less than ``low`` (the workers keep up: take decoding off the GPU, which the
    training step needs).
    It settles where the workers just keep up: on a training run, as much CPU decoding as the
    cores sustain; on the pipeline alone, where the workers' and nvjpeg's rates meet. Windows
    of many batches (at least the number of workers: a new share reaches the batches the
    workers start next, behind the ones in flight) keep it from chasing that lag.
    """

    def __init__(self, initial: float = 0.5, window: int = 8, step: float = 0.05, low: float = 0.01,
                 high: float = 0.05):
        if not 0.0 <= float(initial) <= 1.0:
            raise ValueError(f"initial must be in [0, 1], got {initial}")
        if window < 1 or not 0.0 < step <= 1.0 or not 0.0 <= low < high:
            raise ValueError(f"need window >= 1, 0 < step <= 1, 0 <= low < high; got {window}, {step}, {low}, "
                             f"{high}")
        self._value = torch.full((1,), float(initial), dtype=torch.float64).share_memory_()
        self.window, self.step, self.low, self.high = int(window), float(step), float(low), float(high)
        self._waited = self._spent = 0.0
        self._batches = 0
        self.history: list[float] = [float(initial)]  # the share after each adjustment (the last HISTORY+)

    def get(self) -> float:
        return float(self._value[0])

    def set(self, value: float) -> None:
        self._value[0] = min(1.0, max(0.0, float(value)))

    def observe(self, waited_s: float, batch_s: float) -> None:
        """One batch: ``waited_s`` seconds for the workers out of ``batch_s`` in all."""
        self._waited += max(0.0, waited_s)
        self._spent += max(waited_s, batch_s)
        self._batches += 1
        if self._batches < self.window:
            return
        frac = self._waited / self._spent if self._spent > 0 else 0.0
        if frac > self.high:
            self.set(self.get() - self.step * min(4.0, frac / self.high))
        elif frac < self.low:
            self.set(self.get() + self.step)
        self.history.append(self.get())
        if len(self.history) > 2 * HISTORY:  # a long run: keep the recent values
            del self.history[:-HISTORY]
        self._waited = self._spent = 0.0
        self._batches = 0


class EncodedImages(Dataset):
    """Items ``(data, label, epoch, index)`` where ``data`` is the file's bytes as a 1-D uint8
    tensor: the worker does no decoding. Keys are ``index`` or ``(epoch, index)`` (see
    ``ResumableSampler(with_epoch=True)``).

    ``source`` is a folder (an ImageFolder tree or a flat folder), an ``ImageFiles``, or any
    dataset of ``((3, H, W) uint8 image, label)`` items such as the built-in shapes (those
    images pass through decoded).

    ``cpu_decode_fraction``: the workers decode this share of the images themselves (a subset
    chosen by a hash of the index; libjpeg-turbo through ``torchvision.io``) and send them
    decoded, so idle CPU cores add to the GPU decoder's throughput; a :class:`DecodeShare`
    instead lets the loader adjust the share as it runs. The kernel treats
    both alike. nvjpeg (as torchvision calls it) and libjpeg-turbo differ by a few levels: IDCT
    rounding, and the chroma of 4:2:0 JPEGs, which nvjpeg upsamples nearest-neighbour where
    libjpeg-turbo (and PIL) interpolate.
    """

    def __init__(self, source, cpu_decode_fraction: float | DecodeShare = 0.0):
        if isinstance(source, (str, os.PathLike)):
            source = ImageFiles(Path(source))
        self.decode_share = cpu_decode_fraction if isinstance(cpu_decode_fraction, DecodeShare) else None
        if self.decode_share is None and not 0.0 <= float(cpu_decode_fraction) <= 1.0:
            raise ValueError(f"cpu_decode_fraction must be in [0, 1] or a DecodeShare, got {cpu_decode_fraction}")
        self.source = source
        self.files = source.samples if isinstance(source, ImageFiles) else None
        self.cpu_decode_fraction = 0.0 if self.decode_share is not None else float(cpu_decode_fraction)

    def __len__(self) -> int:
        return len(self.source)

    def _decode_here(self, index: int) -> bool:
        share = self.decode_share.get() if self.decode_share is not None else self.cpu_decode_fraction
        if share <= 0.0:
            return False
        h = _splitmix64(_as_u64(index) ^ np.uint64(0x5EED))[0]
        return float(h >> np.uint64(11)) * 2.0**-53 < share

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if self.files is None:
            img, label = self.source[index]
            return img, label, epoch, index
        path, label = self.files[index]
        with open(path, "rb") as f:
            data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        if self._decode_here(index):
            try:
                data = _decode_cpu(data)
            except Exception:  # noqa: BLE001 - the main process retries and reports it
                pass
        return data, label, epoch, index


class ItemBatch:
    """A batch of items (encoded bytes, 1-D uint8, or decoded (3, H, W) uint8 images) packed into
    one uint8 tensor with an offsets and a shapes table; a sequence of the items (views of it).

    A DataLoader worker hands each tensor of a batch to the main process through a shared-memory
    segment of its own, and pinning copies each one separately: for a list of 256 small tensors
    that costs milliseconds a batch (a segment created, sent as a file descriptor, mapped and
    unmapped per tensor), where one packed tensor costs one of each. :func:`collate_encoded`
    makes one in the worker; ``pin_memory()`` pins the three tensors.
    """

    def __init__(self, data: torch.Tensor, offsets: torch.Tensor, shapes: torch.Tensor):
        self.data = data  # (total,) uint8
        self.offsets = offsets  # (N + 1,) int64
        self.shapes = shapes  # (N, 3) int64: (3, H, W) of a decoded image, (0, 0, bytes) of encoded bytes

    @classmethod
    def pack(cls, items) -> "ItemBatch":
        items = list(items)
        shapes = torch.tensor([_item_shape(i, item) for i, item in enumerate(items)], dtype=torch.int64).reshape(-1, 3)
        sizes = torch.tensor([item.numel() for item in items], dtype=torch.int64)
        offsets = torch.zeros(len(items) + 1, dtype=torch.int64)
        torch.cumsum(sizes, 0, out=offsets[1:])
        data = torch.cat([item.reshape(-1) for item in items]) if items else torch.empty(0, dtype=torch.uint8)
        return cls(data, offsets, shapes)

    def __len__(self) -> int:
        return self.shapes.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} of a batch of {len(self)}")
        i %= len(self)
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        c, h, w = (int(v) for v in self.shapes[i])
        item = self.data[start:end]
        return item.view(c, h, w) if c else item

    def __iter__(self):
        return iter(self.items())

    def items(self) -> list[torch.Tensor]:
        """Every item, as views of the packed tensor made in one call (``split``)."""
        sizes = (self.offsets[1:] - self.offsets[:-1]).tolist()
        parts = self.data.split(sizes)
        return [p.view(c, h, w) if c else p for p, (c, h, w) in zip(parts, self.shapes.tolist())]

    def kinds(self) -> tuple[list[int], list[int], list[int]]:
        """Positions of (decoded images, encoded JPEGs, other encoded bytes), from the tables in a
        few tensor operations (a JPEG starts with FF D8 FF)."""
        n = len(self)
        encoded = self.shapes[:, 0] == 0
        if n == 0 or not bool(encoded.any()):
            return list(range(n)), [], []
        starts = self.offsets[:-1]
        long_enough = (self.offsets[1:] - starts) >= 3
        if self.data.numel() >= 3:  # each item's first 3 bytes (clamped reads for shorter ones, masked off)
            heads = self.data[(starts[:, None] + torch.arange(3)).clamp_(max=self.data.numel() - 1)]
            jpeg = encoded & long_enough & (heads == torch.tensor(_JPEG_MAGIC, dtype=torch.uint8)).all(1)
        else:
            jpeg = torch.zeros_like(encoded)
        kind = torch.where(~encoded, 0, torch.where(jpeg, 1, 2)).tolist()
        return ([i for i, k in enumerate(kind) if k == 0], [i for i, k in enumerate(kind) if k == 1],
                [i for i, k in enumerate(kind) if k == 2])

    def pin_memory(self, device=None) -> "ItemBatch":
        pin = (lambda t: t.pin_memory()) if device is None else (lambda t: t.pin_memory(device))
        return ItemBatch(pin(self.data), pin(self.offsets), pin(self.shapes))


def collate_encoded(batch):
    """(items as one :class:`ItemBatch`, labels (N,), epochs (N,), indices (N,))."""
    datas, labels, epochs, indices = zip(*batch)
    return (ItemBatch.pack(datas), torch.tensor(labels, dtype=torch.int64), torch.tensor(epochs, dtype=torch.int64),
            torch.tensor(indices, dtype=torch.int64))


class GpuAugment:
    """Decode + RandomResizedCrop + flip + normalise a batch on ``device``.

    Args:
        size: output side (224).
        scale, ratio, flip_p: RandomResizedCrop and RandomHorizontalFlip's parameters (MAE:
            scale (0.2, 1); BEiT: (0.08, 1)).
        interpolation: "bicubic" (MAE, BEiT) or "bilinear".
        mean, std: normalisation (ImageNet's by default).
        dtype: output dtype.
        second_size, second_interpolation, second_norm: BEiT's tokenizer view (112,
            "bicubic", "map_pixels"), or None for one view.
        quantize: round resized values to integers as torchvision's uint8 resize does.
        seed: the crop and flip of sample ``index`` in ``epoch`` depend on (seed, epoch, index) only.
        device: where to decode and augment (default: CUDA if available; "cuda" means the current
            CUDA device at construction).
    """

    def __init__(self, size: int = 224, *, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip_p: float = 0.5,
                 interpolation: str = "bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=torch.float32,
                 second_size: int | None = None, second_interpolation: str = "bicubic",
                 second_norm: str = "map_pixels", quantize: bool = False, seed: int = 0, device=None):
        self.size = _check_size("size", size)
        self.scale = _check_range("scale", scale, positive=True)
        self.ratio = _check_range("ratio", ratio, positive=True)
        if not 0.0 <= float(flip_p) <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
        self.flip_p = float(flip_p)
        for name, interp in (("interpolation", interpolation), ("second_interpolation", second_interpolation)):
            if interp not in ("bicubic", "bilinear"):
                raise ValueError(f"{name} must be 'bicubic' or 'bilinear', got {interp!r}")
        _affines(mean, std, second_norm)  # validates
        self.kwargs = dict(interpolation=interpolation, mean=tuple(mean), std=tuple(std), dtype=dtype,
                           second_size=None if second_size is None else _check_size("second_size", second_size),
                           second_interpolation=second_interpolation, second_norm=second_norm, quantize=quantize)
        self.seed = int(seed)
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and self.device.index is None:
            # pinned now: GpuLoader's prefetch thread starts on device 0, not on this thread's device
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.skipped = 0

    def __call__(self, items, epochs, indices):
        """Items (encoded bytes or decoded images) of samples (epochs[i], indices[i]) -> the
        view tensor, or (view, second view), on ``self.device``."""
        images, failed = decode_images(items, self.device)
        self.skipped += len(failed)
        uniforms = crop_uniforms(self.seed, epochs, indices)
        return gpu_random_resized_crop(images, self.size, uniforms, scale=self.scale, ratio=self.ratio,
                                       flip_p=self.flip_p, **self.kwargs)


class GpuLoader:
    """Iterate ``(views, labels)`` on the device: a DataLoader of :class:`EncodedImages`
    (workers read bytes) feeding a :class:`GpuAugment` in the main process.

    With ``prefetch > 0`` on CUDA, a background thread decodes and augments the next batches on
    a side stream while the model runs (nvjpeg and the kernel release the GIL); each batch is
    handed over with a stream wait, no host synchronisation. ``with_keys=True`` yields
    ``(views, labels, epochs, indices)``, e.g. to draw per-sample mask noise.
    """

    def __init__(self, loader: DataLoader, augment: GpuAugment, prefetch: int = 2, with_keys: bool = False):
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.loader = loader
        self.augment = augment
        self.prefetch = prefetch
        self.with_keys = with_keys

    @classmethod
    def from_dataset(cls, dataset: Dataset, augment: GpuAugment, batch_size: int, *, sampler=None,
                     num_workers: int = 4, drop_last: bool = True, shuffle: bool = False, generator=None,
                     prefetch: int = 2, persistent_workers: bool | None = None,
                     with_keys: bool = False) -> "GpuLoader":
        """A DataLoader with :func:`collate_encoded` over ``dataset`` (an :class:`EncodedImages`)."""
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                            shuffle=shuffle if sampler is None else False, num_workers=num_workers,
                            collate_fn=collate_encoded, drop_last=drop_last,
                            pin_memory=augment.device.type == "cuda", generator=generator,
                            persistent_workers=num_workers > 0 if persistent_workers is None else persistent_workers)
        return cls(loader, augment, prefetch, with_keys)

    def __len__(self) -> int:
        return len(self.loader)

    def _batch(self, batch):
        items, labels, epochs, indices = batch
        views = self.augment(items, epochs, indices)
        return (views, labels, epochs, indices) if self.with_keys else (views, labels)

    def _batches(self):
        """The loader's batches; with a :class:`DecodeShare` on the dataset, each batch's wait for
        the workers and its whole time (to the request of the next) are reported to it."""
        share = getattr(getattr(self.loader, "dataset", None), "decode_share", None)
        if share is None:
            yield from self.loader
            return
        it = iter(self.loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            waited = time.perf_counter() - t0
            yield batch
            share.observe(waited, time.perf_counter() - t0)

    def __iter__(self):
        if self.prefetch == 0 or self.augment.device.type != "cuda":
            for batch in self._batches():
                yield self._batch(batch)
            return
        yield from self._threaded()

    def _threaded(self):
        device = self.augment.device
        side = torch.cuda.Stream(device)
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def put(x) -> bool:
            while not stop.is_set():
                try:
                    q.put(x, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                with torch.cuda.device(device), torch.cuda.stream(side):
                    for batch in self._batches():
                        out = self._batch(batch)
                        event = torch.cuda.Event()
                        event.record(side)
                        if not put((out, event)):
                            return
                put(done)
            except BaseException as e:  # hand the error to the consumer
                put(e)

        thread = threading.Thread(target=produce, name="mimfast-gpu-loader", daemon=True)
        thread.start()
        try:
            while True:
                got = q.get()
                if got is done:
                    return
                if isinstance(got, BaseException):
                    raise got
                out, event = got
                stream = torch.cuda.current_stream(device)
                stream.wait_event(event)
                views = out[0]
                for t in (views if isinstance(views, tuple) else (views,)):
                    t.record_stream(stream)  # the memory was allocated on the side stream
                yield out
        finally:
            stop.set()
            thread.join()
