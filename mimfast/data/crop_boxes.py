"""Per-sample randomness keyed by (seed, epoch, index) and torchvision's RandomResizedCrop
boxes drawn from it, on any device: the crops of the GPU input pipeline
(:mod:`mimfast.data.gpu_pipeline`) and the masks BEiT draws on the GPU.

- Crop boxes follow ``RandomResizedCrop``'s rule exactly (:func:`sample_crop_boxes`): scale and
  log-ratio draws in float32 as ``torch.empty(1).uniform_`` makes them, ``round`` half to even,
  10 tries, centre-crop fallback. The randomness is 41 uniforms per sample (10 tries x (scale,
  log-ratio, top, left) + flip); ``top = floor(u * (H - h + 1))`` where torchvision draws
  ``torch.randint``. Given the same uniforms, the boxes are torchvision's (proven by running
  torchvision's own ``get_params`` on them in tests/test_gpu_augment.py).
- Uniforms come from a counter-based hash of ``(seed, epoch, index)`` (:func:`crop_uniforms`),
  so an image's crop does not depend on the worker count, the batch it lands in or a resume.
  :func:`keyed_uniforms` is that hash in torch integer ops on any device, with a salt for other
  per-sample streams (BEiT's blockwise masks, made on the GPU from it).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["NUM_TRIES", "UNIFORMS_PER_SAMPLE", "keyed_uniforms", "crop_uniforms", "sample_crop_boxes",
           "sample_crop_params"]

NUM_TRIES = 10  # torchvision's RandomResizedCrop
UNIFORMS_PER_SAMPLE = 4 * NUM_TRIES + 1  # (scale, log-ratio, top, left) per try, then flip


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _as_u64(v) -> np.ndarray:
    return (np.asarray(v, dtype=np.int64).reshape(-1).astype(np.uint64))


def _i64(v: int) -> int:
    """A 64-bit pattern as the signed int torch's int64 holds."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _splitmix64_torch(x: torch.Tensor) -> torch.Tensor:
    """:func:`_splitmix64` on int64 tensors: two's-complement adds and multiplies wrap as
    uint64 arithmetic does, so the bits are the same on any device."""
    x = x + _i64(0x9E3779B97F4A7C15)
    x = (x ^ _srl(x, 30)) * _i64(0xBF58476D1CE4E5B9)
    x = (x ^ _srl(x, 27)) * _i64(0x94D049BB133111EB)
    return x ^ _srl(x, 31)


def keyed_uniforms(seed: int, epochs, indices, count: int, *, salt: int | None = None, device=None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, count) uniforms in [0, 1) of samples ``(epochs[i], indices[i])``, computed on ``device``.

    A counter-based hash, splitmix64 in int64 torch ops (no Python loop over samples):

        key  = sm(sm(sm(seed) + epoch) + index)          # per sample
        key  = sm(key ^ salt)                            # if salt is not None: another stream
        u[k] = (sm(key + k) >> 40) * 2**-24              # k = 0 .. count - 1, logical shift

    so the values are a pure function of ``(seed, salt, epoch, index, k)``: the same on every
    device, in every batch, worker and rank, and after a resume. Each is a multiple of 2**-24
    (exact in float32, like torch's float32 draws). ``salt=None`` is the crop stream
    (:func:`crop_uniforms`); users of other streams pick their own salt.

    Args:
        seed: the run's seed (an int64).
        epochs: one epoch or N of them (ints, array or tensor).
        indices: the N dataset indices.
        count: uniforms per sample.
        salt: None, or a 64-bit int naming the stream.
        device: where to compute (default: the CPU).
        dtype: float32 or float64.
    """
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).to(device, non_blocking=True)
    epochs = torch.as_tensor(epochs, dtype=torch.int64).reshape(-1).to(device, non_blocking=True)
    if epochs.numel() not in (1, indices.numel()):
        raise ValueError(f"epochs must be one value or one per index ({indices.numel()}), got {epochs.numel()}")
    base = _i64(int(_splitmix64(_as_u64(seed))[0]))  # on the host: no copy to the device
    key = _splitmix64_torch(_splitmix64_torch(epochs.expand_as(indices) + base) + indices)  # (N,)
    if salt is not None:
        key = _splitmix64_torch(key ^ _i64(int(salt)))
    words = _splitmix64_torch(key[:, None] + torch.arange(int(count), dtype=torch.int64, device=device))
    return _srl(words, 40).to(dtype) * 2.0**-24


def crop_uniforms(seed: int, epochs, indices) -> torch.Tensor:
    """The (N, UNIFORMS_PER_SAMPLE) float64 uniforms in [0, 1) of samples ``(epoch, index)``
    on the CPU: :func:`keyed_uniforms`' crop stream (no salt).

    A pure function of its arguments, so the same image in the same epoch always gets the same
    crop and flip. Each value is a multiple of 2**-24, like torch's float32 draws.
    """
    return keyed_uniforms(seed, epochs, indices, UNIFORMS_PER_SAMPLE, dtype=torch.float64)


def _check_range(name: str, pair, positive: bool) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in pair)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of numbers (low, high), got {pair!r}") from None
    if not (lo <= hi) or (positive and not lo > 0):
        raise ValueError(f"{name} must be (low, high) with {'0 < ' if positive else ''}low <= high, got {pair!r}")
    return lo, hi


def _uniform_f32(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``torch.empty(1).uniform_(lo, hi)`` given its raw draw u: float32 ``u * (hi - lo) + lo``
    rounded once (CPU torch fuses the multiply-add)."""
    lo32 = torch.tensor(lo, dtype=torch.float32)
    span = torch.tensor(hi, dtype=torch.float32) - lo32
    return (u.double() * span.double() + lo32.double()).float()


def sample_crop_boxes(heights, widths, uniforms: torch.Tensor, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """RandomResizedCrop boxes from given uniforms, torchvision's rule exactly.

    Args:
        heights, widths: the N image sizes (sequences or 1-D tensors).
        uniforms: (N, >= 4 * NUM_TRIES) floats in [0, 1); try t uses columns 4t .. 4t + 3 for
            the scale, the log-ratio, the top and the left offset.
        scale, ratio: as torchvision's ``RandomResizedCrop``.

    Returns:
        (N, 4) int64 (top, left, height, width) on the CPU.
    """
    H = torch.as_tensor(heights, dtype=torch.float64).reshape(-1)
    W = torch.as_tensor(widths, dtype=torch.float64).reshape(-1)
    n = H.shape[0]
    if W.shape[0] != n:
        raise ValueError(f"heights and widths must have the same length, got {n} and {W.shape[0]}")
    if n and not (bool((H >= 1).all()) and bool((W >= 1).all())):
        raise ValueError("heights and widths must be >= 1")
    if not isinstance(uniforms, torch.Tensor):
        raise TypeError(f"uniforms must be a torch.Tensor, got {type(uniforms).__name__}")
    if uniforms.dim() != 2 or uniforms.shape[0] != n or uniforms.shape[1] < 4 * NUM_TRIES:
        raise ValueError(f"uniforms must be (N, >= {4 * NUM_TRIES}) with N = {n}, got {tuple(uniforms.shape)}")
    s_lo, s_hi = _check_range("scale", scale, positive=True)
    r_lo, r_hi = _check_range("ratio", ratio, positive=True)
    u = uniforms[:, : 4 * NUM_TRIES].detach().to("cpu", torch.float64).reshape(n, NUM_TRIES, 4)
    if n and not (bool((u >= 0).all()) and bool((u < 1).all())):
        raise ValueError("uniforms must lie in [0, 1)")

    area = (H * W)[:, None]  # (N, 1), exact in float64
    log_ratio = torch.log(torch.tensor((r_lo, r_hi)))  # float32, as torchvision
    target_area = area * _uniform_f32(u[..., 0], s_lo, s_hi).double()  # (N, T)
    aspect = torch.exp(_uniform_f32(u[..., 1], float(log_ratio[0]), float(log_ratio[1]))).double()
    w = torch.round(torch.sqrt(target_area * aspect))  # round half to even, as Python's round
    h = torch.round(torch.sqrt(target_area / aspect))
    Hc, Wc = H[:, None], W[:, None]
    ok = (w > 0) & (w <= Wc) & (h > 0) & (h <= Hc)  # (N, T)
    top = torch.floor(u[..., 2] * (Hc - h + 1))
    left = torch.floor(u[..., 3] * (Wc - w + 1))
    first = torch.argmax(ok.to(torch.int8), dim=1, keepdim=True)  # first successful try
    found = ok.any(dim=1)

    def pick(t):
        return t.gather(1, first)[:, 0]

    # centre-crop fallback after NUM_TRIES misses
    in_ratio = W / H
    fw = torch.where(in_ratio < r_lo, W, torch.where(in_ratio > r_hi, torch.round(H * r_hi), W))
    fh = torch.where(in_ratio < r_lo, torch.round(W / r_lo), H)
    ftop = torch.div(H - fh, 2, rounding_mode="floor")
    fleft = torch.div(W - fw, 2, rounding_mode="floor")
    boxes = torch.stack([
        torch.where(found, pick(top), ftop),
        torch.where(found, pick(left), fleft),
        torch.where(found, pick(h), fh),
        torch.where(found, pick(w), fw),
    ], dim=1)
    return boxes.to(torch.int64)


def sample_crop_params(heights, widths, uniforms: torch.Tensor, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                       flip_p: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes (N, 4) and flips (N,) bool from (N, UNIFORMS_PER_SAMPLE) uniforms; the flip is
    ``u[:, -1] < flip_p`` (torchvision's RandomHorizontalFlip flips when ``rand < p``)."""
    if not 0.0 <= float(flip_p) <= 1.0:
        raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
    if isinstance(uniforms, torch.Tensor) and (uniforms.dim() != 2 or uniforms.shape[1] != UNIFORMS_PER_SAMPLE):
        raise ValueError(f"uniforms must be (N, {UNIFORMS_PER_SAMPLE}), got {tuple(uniforms.shape)}")
    boxes = sample_crop_boxes(heights, widths, uniforms, scale, ratio)
    flips = uniforms[:, -1].detach().cpu() < float(flip_p)
    return boxes, flips
