"""Random-resized-crop + horizontal flip + [0, 1] scaling + normalisation of a whole batch of
decoded images in one kernel launch, with an optional second view of the same crop (BEiT).

Replaces, per image n of a batch (torchvision, MAE / BEiT recipes)::

    x = F.resized_crop(img, top, left, h, w, [S, S], BICUBIC, antialias=False)  # read crop, write 3*S*S
    x = F.horizontal_flip(x) if flip else x                                        # read + write 3*S*S
    x = F.to_dtype(x, torch.float32, scale=True)                                   # read, write 4x
    x = F.normalize(x, mean, std)                                                  # read + write
    x = x.to(model_dtype)                                                          # read + write
    torch.stack(batch)                                                             # read + write
    # BEiT: the same crop box resized to S2 for the tokenizer, then map_pixels

with one pass that, for each output pixel, gathers its 4x4 (bicubic) or 2x2 (bilinear) source
taps straight from a packed uint8 buffer holding every image of the batch back to back (each
image at its own offset, own height and width, CHW or HWC), and writes the finished value in
the model's dtype into a contiguous (N, 3, S, S) tensor. The resampling follows torch's
``upsample_bicubic2d`` / ``upsample_bilinear2d`` with ``align_corners=False`` exactly:
``scale = crop_size / S`` (fp32), ``src = scale * (dst + 0.5) - 0.5``, the cubic convolution
with A = -0.75 and tap indices clamped to the crop's border (bilinear: ``src`` clamped at 0,
the second tap at the last row / column). The value is clamped to [0, 255] (what torchvision
does for uint8 images), optionally rounded half-to-even to an integer (``quantize``: exactly
torchvision's uint8 intermediate), then ``out = v * mul[c] + add[c]``, which holds both
``(v / 255 - mean) / std`` and BEiT's ``map_pixels(v / 255) = v / 255 * (1 - 2 eps) + eps``.

Bytes moved per image: at most 16 (bicubic) or 4 (bilinear) byte-gathers per output value,
served mostly from L1/L2 since neighbouring outputs share taps (about crop_h * crop_w * 3
bytes from DRAM), plus 3 * S * S * sizeof(dtype) written (3 * S2 * S2 more for a second view).
FLOPs: about 40 per output value, negligible.

Supports: 3-channel uint8 images of any size (int64 offsets: buffers beyond 2^31 bytes), CHW or
HWC packing, any crop box inside its image (the host validates boxes), output float32 /
float16 / bfloat16, output sizes up to 4096, bicubic or bilinear per view, a second view of
another size and interpolation from the same box and flip.
Does not support: antialiasing (torchvision's default ``antialias=True`` and PIL filter with a
support that grows with the downscale factor; this kernel matches ``antialias=False``), lanczos
(BEiT's reference resizes its tokenizer view with PIL lanczos; use bicubic or bilinear),
grayscale or 4-channel buffers (decode with ``ImageReadMode.RGB``), non-square outputs, crop
boxes that leave the image (torchvision pads those with zeros).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mimfast.kernels import cdiv, next_power_of_2

__all__ = ["augment_crops", "META_FIELDS", "INTERPOLATIONS", "OUT_DTYPES"]

# One int64 row per image in ``meta``; the host builds it (mimfast.data.gpu_pipeline).
META_FIELDS = ("offset", "height", "width", "top", "left", "crop_h", "crop_w", "flip")
INTERPOLATIONS = ("bicubic", "bilinear")
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_SIZE = 4096
_BLOCK_H = 16
_BLOCK_W = 32


@triton.jit
def _cubic_weights(t):
    # torch's get_cubic_upsample_coefficients with A = -0.75, same operation order
    A: tl.constexpr = -0.75
    x0 = t + 1.0
    w0 = ((A * x0 - 5.0 * A) * x0 + 8.0 * A) * x0 - 4.0 * A
    w1 = ((A + 2.0) * t - (A + 3.0)) * t * t + 1.0
    x2 = 1.0 - t
    w2 = ((A + 2.0) * x2 - (A + 3.0)) * x2 * x2 + 1.0
    x3 = x2 + 1.0
    w3 = ((A * x3 - 5.0 * A) * x3 + 8.0 * A) * x3 - 4.0 * A
    return w0, w1, w2, w3


@triton.jit
def _taps2(src_ptr, row, c0, c1, w0, w1, ok):
    # row [BH] int64 address of a source row (image offset + channel + row); cK [BW] int64
    # column offsets; wK [BW] fp32 weights -> [BH, BW] fp32
    r = src_ptr + row[:, None]
    v = tl.load(r + c0[None, :], mask=ok, other=0).to(tl.float32) * w0[None, :]
    v += tl.load(r + c1[None, :], mask=ok, other=0).to(tl.float32) * w1[None, :]
    return v


@triton.jit
def _taps4(src_ptr, row, c0, c1, c2, c3, w0, w1, w2, w3, ok):
    r = src_ptr + row[:, None]
    v = tl.load(r + c0[None, :], mask=ok, other=0).to(tl.float32) * w0[None, :]
    v += tl.load(r + c1[None, :], mask=ok, other=0).to(tl.float32) * w1[None, :]
    v += tl.load(r + c2[None, :], mask=ok, other=0).to(tl.float32) * w2[None, :]
    v += tl.load(r + c3[None, :], mask=ok, other=0).to(tl.float32) * w3[None, :]
    return v


@triton.jit
def _finish(v, mul, add, QUANTIZE: tl.constexpr):
    v = tl.minimum(tl.maximum(v, 0.0), 255.0)  # torchvision clamps uint8 bicubic results
    if QUANTIZE:  # round half to even, as torch's round_() before the uint8 cast
        f = tl.floor(v)
        d = v - f
        odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
        v = tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)
    return v * mul + add


@triton.jit
def _resample_view(
    src_ptr,  # (total,) uint8
    out_ptr,  # (N, 3, S, S) contiguous
    n, tile,  # image, tile of this program
    off, H, W, top, left, ch, cw, flip,  # int64 scalars from the meta row
    mul0, mul1, mul2, add0, add1, add2,  # fp32 per-channel affine
    S: tl.constexpr,
    CUBIC: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    QUANTIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    TILES_W: tl.constexpr = (S + BLOCK_W - 1) // BLOCK_W
    oy = (tile // TILES_W) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH] output rows
    ox = (tile % TILES_W) * BLOCK_W + tl.arange(0, BLOCK_W)  # [BW] output columns
    ok = (oy < S)[:, None] & (ox < S)[None, :]
    # the flip comes after the resize in torchvision: output column ox shows resized column S-1-ox
    sx = tl.where(flip != 0, S - 1 - ox, ox)

    # address = off + c * cstride + y * ystride + x * xstride
    if CHANNELS_LAST:
        cstride = 1
        ystride = W * 3
        xstride = 3
    else:
        cstride = H * W
        ystride = W
        xstride = 1

    # torch: (float)input_size / output_size, IEEE-rounded (Triton's ``/`` is div.full.f32 on CUDA,
    # off by up to 2 ulp: a 1x crop's scale would not be exactly 1)
    scale_y = tl.div_rn(ch.to(tl.float32), S * 1.0)
    scale_x = tl.div_rn(cw.to(tl.float32), S * 1.0)
    real_y = scale_y * (oy.to(tl.float32) + 0.5) - 0.5
    real_x = scale_x * (sx.to(tl.float32) + 0.5) - 0.5
    out_base = out_ptr + n * (3 * S * S) + (oy[:, None] * S + ox[None, :])

    if CUBIC:
        fy = tl.floor(real_y)
        fx = tl.floor(real_x)
        wy0, wy1, wy2, wy3 = _cubic_weights(real_y - fy)
        wx0, wx1, wx2, wx3 = _cubic_weights(real_x - fx)
        iy = fy.to(tl.int64)
        ix = fx.to(tl.int64)
        # tap indices clamped to the crop (torch's upsample_get_value_bounded on the crop)
        r0 = off + (top + tl.minimum(tl.maximum(iy - 1, 0), ch - 1)) * ystride
        r1 = off + (top + tl.minimum(tl.maximum(iy, 0), ch - 1)) * ystride
        r2 = off + (top + tl.minimum(tl.maximum(iy + 1, 0), ch - 1)) * ystride
        r3 = off + (top + tl.minimum(tl.maximum(iy + 2, 0), ch - 1)) * ystride
        c0 = (left + tl.minimum(tl.maximum(ix - 1, 0), cw - 1)) * xstride
        c1 = (left + tl.minimum(tl.maximum(ix, 0), cw - 1)) * xstride
        c2 = (left + tl.minimum(tl.maximum(ix + 1, 0), cw - 1)) * xstride
        c3 = (left + tl.minimum(tl.maximum(ix + 2, 0), cw - 1)) * xstride
        for c in tl.static_range(3):
            cof = c * cstride
            v = _taps4(src_ptr, r0 + cof, c0, c1, c2, c3, wx0, wx1, wx2, wx3, ok) * wy0[:, None]
            v += _taps4(src_ptr, r1 + cof, c0, c1, c2, c3, wx0, wx1, wx2, wx3, ok) * wy1[:, None]
            v += _taps4(src_ptr, r2 + cof, c0, c1, c2, c3, wx0, wx1, wx2, wx3, ok) * wy2[:, None]
            v += _taps4(src_ptr, r3 + cof, c0, c1, c2, c3, wx0, wx1, wx2, wx3, ok) * wy3[:, None]
            if c == 0:
                v = _finish(v, mul0, add0, QUANTIZE)
            elif c == 1:
                v = _finish(v, mul1, add1, QUANTIZE)
            else:
                v = _finish(v, mul2, add2, QUANTIZE)
            tl.store(out_base + c * (S * S), v.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        # torch's bilinear: source clamped at 0, second tap stays on the last row / column
        real_y = tl.maximum(real_y, 0.0)
        real_x = tl.maximum(real_x, 0.0)
        iy = tl.minimum(tl.floor(real_y).to(tl.int64), ch - 1)
        ix = tl.minimum(tl.floor(real_x).to(tl.int64), cw - 1)
        ly1 = tl.minimum(tl.maximum(real_y - iy.to(tl.float32), 0.0), 1.0)
        lx1 = tl.minimum(tl.maximum(real_x - ix.to(tl.float32), 0.0), 1.0)
        ly0 = 1.0 - ly1
        lx0 = 1.0 - lx1
        r0 = off + (top + iy) * ystride
        r1 = off + (top + iy + (iy < ch - 1).to(tl.int64)) * ystride
        c0 = (left + ix) * xstride
        c1 = (left + ix + (ix < cw - 1).to(tl.int64)) * xstride
        for c in tl.static_range(3):
            cof = c * cstride
            v = _taps2(src_ptr, r0 + cof, c0, c1, lx0, lx1, ok) * ly0[:, None]
            v += _taps2(src_ptr, r1 + cof, c0, c1, lx0, lx1, ok) * ly1[:, None]
            if c == 0:
                v = _finish(v, mul0, add0, QUANTIZE)
            elif c == 1:
                v = _finish(v, mul1, add1, QUANTIZE)
            else:
                v = _finish(v, mul2, add2, QUANTIZE)
            tl.store(out_base + c * (S * S), v.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _augment_kernel(
    src_ptr,  # (total,) uint8: every image of the batch back to back, CHW or HWC
    meta_ptr,  # (N, 8) int64: offset, height, width, top, left, crop_h, crop_w, flip
    out_ptr,  # (N, 3, S, S) contiguous, fp32 / fp16 / bf16
    out2_ptr,  # (N, 3, S2, S2) contiguous (the first view's tensor when there is no second view)
    mul0, mul1, mul2, add0, add1, add2,  # first view: out = v * mul[c] + add[c]
    mul20, mul21, mul22, add20, add21, add22,  # second view
    S: tl.constexpr,
    S2: tl.constexpr,
    CUBIC: tl.constexpr,
    CUBIC2: tl.constexpr,
    TWO_VIEWS: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    QUANTIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    TILES: tl.constexpr = ((S + BLOCK_H - 1) // BLOCK_H) * ((S + BLOCK_W - 1) // BLOCK_W)
    tile = tl.program_id(0)  # tiles of view 1, then tiles of view 2
    n = tl.program_id(1).to(tl.int64)
    row = meta_ptr + n * 8
    off = tl.load(row + 0)
    H = tl.load(row + 1)
    W = tl.load(row + 2)
    top = tl.load(row + 3)
    left = tl.load(row + 4)
    ch = tl.load(row + 5)
    cw = tl.load(row + 6)
    flip = tl.load(row + 7)
    if tile < TILES:
        _resample_view(src_ptr, out_ptr, n, tile, off, H, W, top, left, ch, cw, flip,
                       mul0, mul1, mul2, add0, add1, add2,
                       S, CUBIC, CHANNELS_LAST, QUANTIZE, BLOCK_H, BLOCK_W)
    else:
        if TWO_VIEWS:
            _resample_view(src_ptr, out2_ptr, n, tile - TILES, off, H, W, top, left, ch, cw, flip,
                           mul20, mul21, mul22, add20, add21, add22,
                           S2, CUBIC2, CHANNELS_LAST, QUANTIZE, BLOCK_H, BLOCK_W)


def _blocks(size: int, size2: int, device: torch.device) -> tuple[int, int]:
    if device.type == "cuda":
        return _BLOCK_H, _BLOCK_W
    # Triton's interpreter pays per program, not per element: one tile per small view
    b = min(next_power_of_2(max(size, size2)), 64)
    return b, b


def _tiles(size: int, block_h: int, block_w: int) -> int:
    return cdiv(size, block_h) * cdiv(size, block_w)


def _check_out(name: str, out, n: int, device) -> int:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(out).__name__}")
    if out.dim() != 4 or out.shape[0] != n or out.shape[1] != 3 or out.shape[2] != out.shape[3]:
        raise ValueError(f"{name} must be (N, 3, S, S) with N = {n}, got {tuple(out.shape)}")
    if out.dtype not in OUT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {out.dtype}")
    if not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if out.device != device:
        raise ValueError(f"{name} is on {out.device}, src on {device}")
    size = out.shape[2]
    if not 1 <= size <= _MAX_SIZE:
        raise ValueError(f"{name} size must be in [1, {_MAX_SIZE}], got {size}")
    return size


def _affine(name: str, values) -> list[float]:
    vals = [float(v) for v in values]
    if len(vals) != 3:
        raise ValueError(f"{name} must hold 3 values (one per channel), got {len(vals)}")
    return vals


def augment_crops(src, meta, out, mul, add, interpolation="bicubic", *, out2=None, mul2=None, add2=None,
                  interpolation2="bicubic", channels_last=False, quantize=False):
    """Resize each image's crop box to ``out`` (and ``out2``), flip, scale and shift, in one launch.

    Args:
        src: (total,) uint8 buffer: the images back to back (3 channels, CHW or HWC).
        meta: (N, 8) int64, one row per image: offset into ``src`` (elements), height, width,
            crop top, crop left, crop height, crop width, flip (0/1). Boxes must lie inside their
            image; they are checked here when ``meta`` is on the CPU (a CUDA ``meta`` is
            trusted: build it with ``mimfast.data.gpu_pipeline``, which checks on the host).
        out: (N, 3, S, S) contiguous float32/float16/bfloat16, written in full.
        mul, add: 3 floats each: ``out[n, c] = clamp(resized, 0, 255) * mul[c] + add[c]``.
        interpolation: "bicubic" or "bilinear" (torch's, ``align_corners=False``).
        out2, mul2, add2, interpolation2: an optional second view of the same box and flip.
        channels_last: ``src`` images are HWC (default CHW).
        quantize: round the resized value to an integer (half to even) before scaling, as
            torchvision's uint8 resize does.
    """
    if not isinstance(src, torch.Tensor):
        raise TypeError(f"src must be a torch.Tensor, got {type(src).__name__}")
    if src.dtype != torch.uint8 or src.dim() != 1 or not src.is_contiguous():
        raise ValueError(f"src must be a contiguous 1-D uint8 tensor, got {src.dtype} {tuple(src.shape)}")
    if not isinstance(meta, torch.Tensor):
        raise TypeError(f"meta must be a torch.Tensor, got {type(meta).__name__}")
    if meta.dtype != torch.int64 or meta.dim() != 2 or meta.shape[1] != len(META_FIELDS):
        raise ValueError(f"meta must be an (N, {len(META_FIELDS)}) int64 tensor ({', '.join(META_FIELDS)}), "
                         f"got {meta.dtype} {tuple(meta.shape)}")
    n = meta.shape[0]
    if n == 0:
        raise ValueError("meta has an empty batch (N == 0)")
    if n > 65535:  # the batch is the grid's second axis
        raise ValueError(f"at most 65535 images per launch, got N = {n}")
    for name, interp in (("interpolation", interpolation), ("interpolation2", interpolation2)):
        if interp not in INTERPOLATIONS:
            raise ValueError(f"{name} must be one of {INTERPOLATIONS}, got {interp!r}")
    size = _check_out("out", out, n, src.device)
    mul, add = _affine("mul", mul), _affine("add", add)
    two = out2 is not None
    if two:
        size2 = _check_out("out2", out2, n, src.device)
        if mul2 is None or add2 is None:
            raise ValueError("out2 needs mul2 and add2")
        mul2, add2 = _affine("mul2", mul2), _affine("add2", add2)
    else:
        size2, mul2, add2, out2 = 1, [0.0] * 3, [0.0] * 3, out
    if meta.device.type == "cpu":
        _check_meta(meta, src.numel())
        meta = meta.to(src.device)
    elif meta.device != src.device:
        raise ValueError(f"meta is on {meta.device}, src on {src.device}")
    meta = meta.contiguous()
    block_h, block_w = _blocks(size, size2, src.device)
    grid = (_tiles(size, block_h, block_w) + (_tiles(size2, block_h, block_w) if two else 0), n)
    _augment_kernel[grid](
        src, meta, out, out2, *mul, *add, *mul2, *add2,
        S=size, S2=size2, CUBIC=interpolation == "bicubic", CUBIC2=interpolation2 == "bicubic",
        TWO_VIEWS=two, CHANNELS_LAST=bool(channels_last), QUANTIZE=bool(quantize),
        BLOCK_H=block_h, BLOCK_W=block_w, num_warps=4,
    )
    return (out, out2) if two else out


def _check_meta(meta: torch.Tensor, total: int) -> None:
    off, h, w, top, left, ch, cw, flip = meta.unbind(1)
    bad = ((off < 0) | (h < 1) | (w < 1) | (off + 3 * h * w > total) | (top < 0) | (left < 0) | (ch < 1)
           | (cw < 1) | (top + ch > h) | (left + cw > w) | ((flip != 0) & (flip != 1)))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        row = dict(zip(META_FIELDS, meta[i].tolist()))
        raise ValueError(f"meta row {i} is not a crop box inside its image within src of {total} bytes: {row}")
