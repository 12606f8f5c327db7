"""Masked patch embedding: embed only the patches MAE keeps.

The reference embeds every patch, then throws three quarters away::

    x = conv2d(imgs, weight, bias, stride=p)          # N*L*D*P*2 FLOPs, writes N*L*D
    x = x.flatten(2).transpose(1, 2) + pos_embed      # reads N*L*D, writes N*L*D (fp32 under autocast)
    x = gather(x, 1, ids_keep)                        # reads N*K*D, writes N*K*D

The patch projection is per patch (kernel = stride = p, no padding), so only the K kept
patches need it. Three steps, with the matmul on cuBLAS:

1. :func:`gather_patches` reads the kept patches' pixels straight from ``imgs`` (any strides,
   any float dtype) and writes them as rows of an (N*K, C*p*p) matrix in the compute dtype,
   columns in (c, i, j) order = ``weight.reshape(D, -1)``'s: reads and writes N*K*P.
2. ``y = patches @ weight.reshape(D, -1).T`` (cuBLAS): N*K*D*P*2 FLOPs, a quarter of the
   reference's at mask ratio 0.75.
3. :func:`embed_epilogue`: ``out[m] = y[m] + bias + pos[ids_keep[m]]`` in fp32, stored once in
   the output dtype: reads N*K*D, writes N*K*D.

No (N, L, D) tensor exists at any point. :func:`scatter_patches` is the adjoint of step 1 (for
the gradient of ``imgs``, which MAE does not need): it writes the kept patches' pixels back and
leaves the rest to the caller's zero fill; patches never overlap, so there are no atomics.

Supports: float32 / float16 / bfloat16 images, patch matrices and outputs; any image strides;
int64 offsets. Does not support: overlapping patches (stride != kernel size), padding.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from mimfast.kernels import cdiv, next_power_of_2
from mimfast.kernels.masking import cast, gpu_tiles

__all__ = ["gather_patches", "scatter_patches", "embed_epilogue", "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _patches_kernel(
    img_ptr,  # (N, C, H, W) images, any strides
    ids_keep_ptr,  # (N, K) int32 kept patch index l (row-major over the patch grid), contiguous
    pat_ptr,  # (N * K, C * P * P) patch rows in (c, i, j) order, contiguous
    M, K, C, GRID_W,
    stride_in, stride_ic, stride_ih, stride_iw,
    P: tl.constexpr,
    SCATTER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # patch rows
    offs_k = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)  # pixel within a patch
    m_ok = offs_m < M
    PP = C * P * P
    k_ok = offs_k < PP
    l = tl.load(ids_keep_ptr + offs_m, mask=m_ok, other=0)
    n = (offs_m // K).to(tl.int64)
    ph = l // GRID_W
    pw = l - ph * GRID_W
    c = offs_k // (P * P)
    ij = offs_k - c * (P * P)
    i = ij // P
    j = ij - i * P
    img_off = (
        n[:, None] * stride_in
        + c[None, :].to(tl.int64) * stride_ic
        + (ph[:, None] * P + i[None, :]).to(tl.int64) * stride_ih
        + (pw[:, None] * P + j[None, :]).to(tl.int64) * stride_iw
    )
    pat_off = offs_m[:, None].to(tl.int64) * PP + offs_k[None, :]
    m = m_ok[:, None] & k_ok[None, :]
    if SCATTER:
        v = tl.load(pat_ptr + pat_off, mask=m, other=0.0)
        tl.store(img_ptr + img_off, cast(v, img_ptr.dtype.element_ty), mask=m)
    else:
        v = tl.load(img_ptr + img_off, mask=m, other=0.0)
        tl.store(pat_ptr + pat_off, cast(v, pat_ptr.dtype.element_ty), mask=m)


@triton.jit
def _embed_epilogue_kernel(
    y_ptr,  # (N * K, D) patch projections, contiguous
    bias_ptr,  # (D,) projection bias (read when HAS_BIAS)
    pos_ptr,  # (L, D) positional embedding, any strides (read when HAS_POS)
    ids_keep_ptr,  # (N * K,) int32 kept patch index l of each row
    out_ptr,  # (N * K, D) contiguous, output dtype
    M, D,
    stride_pl, stride_pd,
    HAS_BIAS: tl.constexpr,
    HAS_POS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_ok = offs_m < M
    d_ok = offs_d < D
    m = m_ok[:, None] & d_ok[None, :]
    off = offs_m[:, None].to(tl.int64) * D + offs_d[None, :]
    val = tl.load(y_ptr + off, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        val += tl.load(bias_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_POS:
        l = tl.load(ids_keep_ptr + offs_m, mask=m_ok, other=0)
        # int64 products: pos may have any strides
        p_off = l.to(tl.int64)[:, None] * stride_pl + offs_d.to(tl.int64)[None, :] * stride_pd
        val += tl.load(pos_ptr + p_off, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + off, cast(val, out_ptr.dtype.element_ty), mask=m)


def _tiles(device: torch.device, rows: int, cols: int) -> tuple[int, int]:
    """(BLOCK rows, BLOCK cols): small tiles on a GPU, big ones for the interpreter."""
    return _tiles_of(gpu_tiles(device), rows, cols)


@functools.lru_cache(maxsize=256)  # every launch asks, with one of a few shapes
def _tiles_of(gpu: bool, rows: int, cols: int) -> tuple[int, int]:
    if gpu:
        block_c = min(next_power_of_2(cols), 256)
        return max(1, min(32, 4096 // block_c)), block_c
    block_c = min(next_power_of_2(cols), 4096)
    return max(1, min(next_power_of_2(rows), 65536 // block_c)), block_c


def _check_patch_args(imgs_shape, ids_keep, patch_size):
    if len(imgs_shape) != 4:
        raise ValueError(f"imgs must be (N, C, H, W), got shape {tuple(imgs_shape)}")
    N, C, H, W = imgs_shape
    if not isinstance(patch_size, int) or patch_size <= 0 or H % patch_size or W % patch_size:
        raise ValueError(f"patch_size must be a positive int dividing H={H} and W={W}, got {patch_size!r}")
    if not isinstance(ids_keep, torch.Tensor) or ids_keep.dtype != torch.int32 or ids_keep.dim() != 2:
        raise TypeError(f"ids_keep must be an (N, K) int32 tensor, got {getattr(ids_keep, 'dtype', ids_keep)}")
    if ids_keep.shape[0] != N or not ids_keep.is_contiguous():
        raise ValueError(f"ids_keep must be a contiguous (N={N}, K) tensor, got {tuple(ids_keep.shape)}")
    return N, C, H, W, ids_keep.shape[1]


def _launch_patches(imgs, ids_keep, patches, patch_size, scatter):
    N, C, H, W = imgs.shape
    K = ids_keep.shape[1]
    M, PP = N * K, C * patch_size * patch_size
    BLOCK_M, BLOCK_P = _tiles(imgs.device, M, PP)
    grid = (cdiv(M, BLOCK_M), cdiv(PP, BLOCK_P))
    _patches_kernel[grid](
        imgs, ids_keep, patches, M, K, C, W // patch_size, *imgs.stride(),
        P=patch_size, SCATTER=scatter, BLOCK_M=BLOCK_M, BLOCK_P=BLOCK_P, num_warps=4,
    )


def gather_patches(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Kept patches of ``imgs`` (N, C, H, W) as an (N*K, C*p*p) matrix in ``dtype``."""
    if not isinstance(imgs, torch.Tensor) or imgs.dtype not in FLOAT_DTYPES:
        raise TypeError(f"imgs must be a float32/float16/bfloat16 tensor, got {getattr(imgs, 'dtype', imgs)}")
    N, C, H, W, K = _check_patch_args(imgs.shape, ids_keep, patch_size)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if ids_keep.device != imgs.device:
        raise ValueError(f"ids_keep is on {ids_keep.device}, imgs on {imgs.device}")
    patches = torch.empty((N * K, C * patch_size * patch_size), dtype=dtype, device=imgs.device)
    _launch_patches(imgs, ids_keep, patches, patch_size, scatter=False)
    return patches


def scatter_patches(patches: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, imgs: torch.Tensor) -> torch.Tensor:
    """Write the rows of ``patches`` (N*K, C*p*p) into their patches of ``imgs`` (N, C, H, W),
    in place; the other pixels are left as they are. Returns ``imgs``."""
    N, C, H, W, K = _check_patch_args(imgs.shape, ids_keep, patch_size)
    if patches.shape != (N * K, C * patch_size * patch_size) or not patches.is_contiguous():
        raise ValueError(
            f"patches must be a contiguous (N*K, C*p*p) = ({N * K}, {C * patch_size ** 2}) tensor, "
            f"got {tuple(patches.shape)}"
        )
    if imgs.dtype not in FLOAT_DTYPES or patches.dtype not in FLOAT_DTYPES:
        raise TypeError(f"imgs and patches must be float32/float16/bfloat16, got {imgs.dtype}, {patches.dtype}")
    _launch_patches(imgs, ids_keep, patches, patch_size, scatter=True)
    return imgs


def embed_epilogue(
    y: torch.Tensor,
    bias: torch.Tensor | None,
    pos: torch.Tensor | None,
    ids_keep: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """out (N*K, D) = y + bias + pos[ids_keep] in fp32, stored in ``out_dtype``.

    Args:
        y: (N*K, D) contiguous patch projections.
        bias: optional (D,).
        pos: optional (L, D) positional embedding.
        ids_keep: (N, K) int32 kept positions, contiguous.
        out_dtype: float32, float16 or bfloat16.
    """
    if not isinstance(y, torch.Tensor) or y.dim() != 2 or not y.is_contiguous() or y.dtype not in FLOAT_DTYPES:
        raise ValueError(f"y must be a contiguous float (M, D) tensor, got {getattr(y, 'shape', y)}")
    M, D = y.shape
    if ids_keep.dtype != torch.int32 or ids_keep.numel() != M or not ids_keep.is_contiguous():
        raise ValueError(f"ids_keep must be a contiguous int32 tensor of M={M} elements, got {tuple(ids_keep.shape)}")
    if bias is not None and (bias.shape != (D,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous ({D},) tensor, got {tuple(bias.shape)}")
    if pos is not None and (pos.dim() != 2 or pos.shape[1] != D):
        raise ValueError(f"pos must be (L, {D}), got {tuple(pos.shape)}")
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    out = torch.empty((M, D), dtype=out_dtype, device=y.device)
    BLOCK_M, BLOCK_D = _tiles(y.device, M, D)
    grid = (cdiv(M, BLOCK_M), cdiv(D, BLOCK_D))
    _embed_epilogue_kernel[grid](
        y, bias if bias is not None else y, pos if pos is not None else y, ids_keep, out,
        M, D, *(pos.stride() if pos is not None else (0, 0)),
        HAS_BIAS=bias is not None, HAS_POS=pos is not None, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=4,
    )
    return out
