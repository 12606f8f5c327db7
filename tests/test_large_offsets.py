"""Every kernel's index math past 2**31 elements, with tiny grids.

On a GPU an ``i32 * i32`` offset product silently wraps; under Triton's interpreter the
arithmetic is numpy's and wraps the same way, and tests/bounds_check.py then fails the load or
store that leaves its tensors. The tensors here are views with strides chosen so that one
offset product of a kernel passes 2**31 (a stride below 2**31, passed as int32, times an index
of 2 or more), on storage from ``torch.empty``: only the few elements a view holds are ever
written, so a view spanning gigabytes of address space costs a few pages of memory. Each case
compares against an eager reference computed from a compact copy.

Not reachable this way: ``gelu_bwd_recompute``, ``patch_loss_bwd_scale_``, the patch-loss
finish pass and ``masking.sum_partials`` take contiguous buffers whose offsets grow only with
the program id (already int64), so passing 2**31 needs about 2**31 / BLOCK programs; their
data pointer can move (a storage offset) but their own index math cannot be made large.
``blockwise_masks`` is covered through its per-sample offset ``n * max_tries * 4`` (int64).
Attention indexes within one sample in int32 and reads a qkv or bias whose span within a sample
passes 2**31 from a dense copy (tested below).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mimfast.kernels import attention as ka
from mimfast.kernels import masking as km
from mimfast.kernels.augment import augment_crops
from mimfast.kernels.blockwise_mask import blockwise_masks
from mimfast.kernels.layer_norm import add_layer_norm_bwd, add_layer_norm_fwd
from mimfast.kernels.linear_ce import cross_entropy_fwd_grad_
from mimfast.kernels.patch_embed import embed_epilogue, gather_patches, scatter_patches
from mimfast.kernels.patch_loss import patch_loss_fwd
from tolerance import poison_

BIG = 1_100_000_000  # < 2**31 (an int32 argument); 2 * BIG > 2**31
assert BIG < 2**31 - 1 < 2 * BIG


@pytest.fixture(autouse=True)
def _free_gpu_memory():
    """On a GPU the storage is real memory (up to about 18 GiB for one case), and test processes
    share the card: hand it back after each case."""
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


_POISON_MAX = 2**20  # elements: the launchers' outputs here are tiny; the sparse storages are not touched


@pytest.fixture(autouse=True)
def _poison_new_buffers(monkeypatch):
    """Every small float buffer from torch.empty (the kernels' outputs and partial sums) starts as
    NaN, so an element a kernel forgets to write fails the comparison. The gigabyte storages the
    views live on stay untouched (filling them would commit their memory)."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point() and t.numel() <= _POISON_MAX:
            poison_(t)
        return t

    monkeypatch.setattr(torch, "empty", empty)


def _storage(numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Untouched storage of ``numel`` elements, or a skip where the address space (on a GPU,
    the memory, with room to spare for the other test processes) is refused."""
    size = numel * torch.empty(0, dtype=dtype).element_size()
    if torch.device(device).type == "cuda" and torch.cuda.mem_get_info()[0] < 1.5 * size + 2**30:
        pytest.skip(f"{size / 2**30:.1f} GiB of GPU memory not free")  # pragma: no cover - depends on the load
    try:
        return torch.empty(numel, dtype=dtype, device=device)
    except (RuntimeError, MemoryError) as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"the machine refuses {size / 2**30:.1f} GiB of address space: {e}")


def spread(values: torch.Tensor, strides) -> torch.Tensor:
    """A view with ``strides`` (non-overlapping) holding ``values``; only its elements are written."""
    span = 1 + sum((n - 1) * s for n, s in zip(values.shape, strides))
    view = _storage(span, values.dtype, values.device).as_strided(values.shape, strides)
    view.copy_(values)
    return view


def _close(name, out, ref, tol):
    torch.testing.assert_close(out.double().cpu(), ref.double().cpu(), rtol=tol, atol=tol, msg=name)


def _unique_noise(N, L, device, dtype):
    return torch.stack([torch.randperm(L, device=device) for _ in range(N)]).to(dtype) / L


# --------------------------------------------------------------------------------------------
# masking.py
# --------------------------------------------------------------------------------------------
def _masking_ref(x, pos, noise, K):
    ids_shuffle = torch.argsort(noise.float(), dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    keep = ids_shuffle[:, :K]
    xp = x.float() + pos.float()[None]
    vis = torch.gather(xp, 1, keep[:, :, None].expand(-1, -1, x.shape[2])).to(x.dtype)
    return vis, (ids_restore >= K).float(), ids_restore, keep.int()


@pytest.mark.parametrize("method", ["count", "sort"])
def test_masking_forward(device, method):
    N, L, D, K = 2, 3, 3, 2
    dtype = torch.float16
    x0 = torch.randn(N, L, D, device=device).to(dtype)
    pos0 = torch.randn(L, D, device=device).to(dtype)
    noise0 = _unique_noise(N, L, device, torch.float16)
    # x: d * stride_xd; pos: l * stride_pl; noise: l * stride_nl, each past 2**31 at index 2
    x = spread(x0, (L, 1, BIG))
    pos = spread(pos0, (BIG, 1))
    noise = spread(noise0, (1, BIG))
    vis, mask, ids, keep = km.masking_forward(x, pos, noise, K, write_ids_keep=True, method=method)
    rvis, rmask, rids, rkeep = _masking_ref(x0, pos0, noise0, K)
    assert torch.equal(vis, rvis) and torch.equal(mask, rmask) and torch.equal(ids, rids) and torch.equal(keep, rkeep)
    # the other pos layout: d * stride_pd
    pos_t = spread(pos0, (1, BIG))
    vis, *_ = km.masking_forward(x, pos_t, noise, K, method=method)
    assert torch.equal(vis, rvis)


def test_masking_forward_given_ranks(device):
    N, L, D, K = 2, 3, 4, 2
    x0 = torch.randn(N, L, D, device=device)
    noise0 = _unique_noise(N, L, device, torch.float32)
    ids0 = torch.argsort(torch.argsort(noise0, 1), 1)
    ids = spread(ids0, (1, BIG))  # l * stride_rl
    x = spread(x0, (L * D, D, 1))
    vis, mask, out_ids, _ = km.masking_forward(x, None, noise0, K, ids_restore=ids)
    rvis, rmask, _, _ = _masking_ref(x0, torch.zeros(L, D, device=device), noise0, K)
    assert torch.equal(vis, rvis) and torch.equal(mask, rmask)


def test_masking_backward(device):
    N, L, D, K = 2, 3, 3, 2
    g0 = torch.randn(N, K, D, device=device)
    ids0 = torch.argsort(torch.argsort(_unique_noise(N, L, device, torch.float32), 1), 1)
    g = spread(g0, (K, 1, BIG))  # d * stride_gd
    ids = spread(ids0, (1, BIG))  # l * stride_il
    gx, gpos = km.masking_backward(g, ids, L, torch.float32, torch.float32)
    full = torch.cat([g0, torch.zeros(N, L - K, D, device=device)], 1)
    ref = torch.gather(full, 1, ids0[:, :, None].expand(-1, -1, D))
    assert torch.equal(gx, ref)
    _close("grad_pos", gpos, ref.double().sum(0), 1e-6)


def _unshuffle_ref(x, mt, ids, pos):
    N, K1, D = x.shape
    L = ids.shape[1]
    full = torch.cat([x[:, 1:], mt.view(1, 1, D).expand(N, L - K1 + 1, D)], 1)
    rest = torch.gather(full, 1, ids[:, :, None].expand(-1, -1, D))
    return torch.cat([x[:, :1], rest], 1) + pos[None]


def test_unshuffle_forward_and_backward(device):
    N, L, D, K = 2, 3, 3, 2
    x0 = torch.randn(N, 1 + K, D, device=device, dtype=torch.float64)
    mt0 = torch.randn(D, device=device, dtype=torch.float64)
    pos0 = torch.randn(1 + L, D, device=device, dtype=torch.float64)
    ids0 = torch.argsort(torch.argsort(_unique_noise(N, L, device, torch.float32), 1), 1)
    x = spread(x0.float(), (1 + K, 1, BIG))  # d * stride_xd
    mt = spread(mt0.float(), (BIG,))  # d * stride_mt
    pos = spread(pos0.float(), (BIG, 1))  # t * stride_pt
    ids = spread(ids0, (1, BIG))  # (t - 1) * stride_il
    out = km.unshuffle_forward(x, mt, ids, pos)
    x_r, mt_r, pos_r = (t.clone().requires_grad_() for t in (x0, mt0, pos0))
    ref = _unshuffle_ref(x_r, mt_r, ids0, pos_r)
    _close("out", out, ref, 1e-6)
    out = km.unshuffle_forward(x, mt, ids, spread(pos0.float(), (1, BIG)))  # d * stride_pd
    _close("out, pos (1, BIG)", out, ref, 1e-6)

    g0 = torch.randn(N, 1 + L, D, device=device, dtype=torch.float64)
    g = spread(g0.float(), (1 + L, BIG, 1))  # t * stride_gt
    gx, gmt, gpos = km.unshuffle_backward(g, ids, K, torch.float32, torch.float32, torch.float32)
    rgx, rgmt, rgpos = torch.autograd.grad(ref, (x_r, mt_r, pos_r), g0)
    _close("grad_x", gx, rgx, 1e-6)
    _close("grad_mask_token", gmt, rgmt, 1e-5)
    _close("grad_pos", gpos, rgpos, 1e-5)
    gx2, *_ = km.unshuffle_backward(spread(g0.float(), (1 + L, 1, BIG)), ids, K, torch.float32, torch.float32,
                                    None)  # d * stride_gd
    _close("grad_x, grad (.., 1, BIG)", gx2, rgx, 1e-6)


# --------------------------------------------------------------------------------------------
# patch_embed.py
# --------------------------------------------------------------------------------------------
def test_gather_and_scatter_patches(device):
    N, C, p = 2, 3, 2
    H, W = 4, 6
    L = (H // p) * (W // p)
    imgs0 = torch.randn(N, C, H, W, device=device)
    ids_keep = torch.tensor([[5, 1, 3], [0, 4, 2]], dtype=torch.int32, device=device)
    ref = imgs0.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(N, L, C * p * p)
    ref = torch.gather(ref, 1, ids_keep.long()[:, :, None].expand(-1, -1, C * p * p)).reshape(-1, C * p * p)
    # c * stride_ic, y * stride_ih, x * stride_iw each past 2**31
    for strides in [(C * H * W, BIG, W, 1), (C * H * W, H * W, BIG, 1), (C * H * W, 1, C * W, BIG // 2)]:
        imgs = spread(imgs0, strides)
        assert torch.equal(gather_patches(imgs, ids_keep, p, torch.float32), ref), strides
        target = spread(torch.zeros_like(imgs0), strides)
        scatter_patches(ref.clone(), ids_keep, p, target)
        back = gather_patches(target, ids_keep, p, torch.float32)
        assert torch.equal(back, ref), strides


def test_embed_epilogue(device):
    N, K, L, D = 2, 2, 4, 3
    y = torch.randn(N * K, D, device=device)
    bias = torch.randn(D, device=device)
    pos0 = torch.randn(L, D, device=device)
    ids_keep = torch.tensor([[3, 0], [2, 1]], dtype=torch.int32, device=device)
    ref = y + bias + pos0[ids_keep.long().view(-1)]
    for strides in [(BIG, 1), (1, BIG)]:  # l * stride_pl, d * stride_pd
        out = embed_epilogue(y, bias, spread(pos0, strides), ids_keep, torch.float32)
        _close(f"out {strides}", out, ref, 1e-6)


# --------------------------------------------------------------------------------------------
# patch_loss.py
# --------------------------------------------------------------------------------------------
def _patch_loss_ref(pred, imgs, mask, p, eps=1e-6):
    N, C, H, W = imgs.shape
    t = imgs.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(N, -1, p * p * C)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + eps).sqrt()
    loss = ((pred - t) ** 2).mean(-1)
    return (loss * mask).sum() / mask.sum()


@pytest.mark.parametrize("order,prefetch", [(0, False), (1, False), (2, False), (3, False), (1, True)])
def test_patch_loss(device, order, prefetch):
    N, C, p = 3, 3, 2
    H, W = 4, 4
    L, P = (H // p) * (W // p), p * p * C
    pred0 = torch.randn(N, L, P, device=device, dtype=torch.float64)
    imgs0 = torch.randn(N, C, H, W, device=device, dtype=torch.float64)
    mask0 = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 0, 1]], device=device, dtype=torch.float32)
    pred = spread(pred0.float(), (BIG, P, 1))  # n * s_pn
    mask = spread(mask0, (BIG, 1))  # n * s_mn
    if order == 2:  # channels-last: y * s_ih past 2**31
        imgs = spread(imgs0.float(), (H * W * C, 1, BIG, C))
    else:  # n * s_in, c * s_ic
        imgs = spread(imgs0.float(), (BIG, BIG // 3, W, 1))
    loss, grad = patch_loss_fwd(pred, imgs, mask, p, norm_pix=True, config=(2, 2, 4, order, prefetch))
    pred_r = pred0.clone().requires_grad_()
    ref = _patch_loss_ref(pred_r, imgs0, mask0.double(), p)
    (rgrad,) = torch.autograd.grad(ref, pred_r)
    _close("loss", loss, ref, 1e-5)
    _close("grad", grad, rgrad, 1e-5)
    # l * s_pl and k * s_pp, l * s_ml
    pred = spread(pred0.float(), (L * P, BIG, 1))
    mask = spread(mask0, (L, BIG))
    loss, grad = patch_loss_fwd(pred, imgs, mask, p, norm_pix=True, config=(2, 2, 4, order, prefetch))
    _close("loss (l strides)", loss, ref, 1e-5)
    _close("grad (l strides)", grad, rgrad, 1e-5)
    pred = spread(pred0.float(), (L * P, P, BIG // 5))
    loss, grad = patch_loss_fwd(pred, imgs, mask0, p, norm_pix=True, config=(2, 2, 4, order, prefetch))
    _close("loss (k stride)", loss, ref, 1e-5)
    _close("grad (k stride)", grad, rgrad, 1e-5)


# --------------------------------------------------------------------------------------------
# layer_norm.py, linear_ce.py (row strides)
# --------------------------------------------------------------------------------------------
def test_add_layer_norm(device):
    M, D = 3, 8
    x0 = torch.randn(M, D, device=device, dtype=torch.float64)
    res0 = torch.randn(M, D, device=device, dtype=torch.float64)
    w0, b0, s0 = (torch.randn(D, device=device, dtype=torch.float64) for _ in range(3))
    x, res = spread(x0.float(), (BIG, 1)), spread(res0.float(), (BIG, 1))  # row * s_xm, row * s_rm
    w, b, s = w0.float(), b0.float(), s0.float()
    r, y, mean, rstd = add_layer_norm_fwd(x, res, w, b, s, 1e-6, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x0, res0, w0, b0, s0)]
    xr, resr, wr, br, sr = leaves
    r_ref = resr + xr * sr
    y_ref = F.layer_norm(r_ref, (D,), wr, br, 1e-6)
    _close("r", r, r_ref, 1e-5)
    _close("y", y, y_ref, 1e-5)

    dy0 = torch.randn(M, D, device=device, dtype=torch.float64)
    r_big = spread(r, (BIG, 1))  # the backward's row * s_rm, row * s_xm
    dx, dres, sums = add_layer_norm_bwd(dy0.float(), None, r_big, x, w, s, mean, rstd, torch.float32,
                                        torch.float32, True, True, True, True, True, True)
    grads = torch.autograd.grad(y_ref, leaves, dy0)
    for name, out, ref in [("dx", dx, grads[0]), ("dres", dres, grads[1]), ("dw", sums[0], grads[2]),
                           ("db", sums[1], grads[3]), ("dscale", sums[2], grads[4]),
                           ("dx sum", sums[3], grads[0].sum(0))]:
        _close(name, out, ref, 1e-4)


@pytest.mark.parametrize("block_v", [None, 16])
def test_cross_entropy(device, block_v):
    C, V = 3, 40
    logits0 = torch.randn(C, V, device=device, dtype=torch.float64)
    labels = torch.tensor([5, 39, -100], device=device)
    logits = spread(logits0.float(), (BIG, 1))  # row * stride_row
    scale = torch.tensor([0.5], device=device)
    loss = torch.empty(C, device=device)
    cross_entropy_fwd_grad_(logits, labels, scale, -100, loss, block_v=block_v)
    lr = logits0.clone().requires_grad_()
    ref = F.cross_entropy(lr, labels, ignore_index=-100, reduction="none") * 0.5
    (rgrad,) = torch.autograd.grad(ref.sum(), lr)
    _close("loss", loss, ref, 1e-5)
    _close("grad", logits, rgrad, 1e-5)


# --------------------------------------------------------------------------------------------
# attention.py
# --------------------------------------------------------------------------------------------
def _attention_ref(qkv, H, bias):
    B, S, W = qkv.shape
    Dh = W // (3 * H)
    q, k, v = qkv.reshape(B, S, 3, H, Dh).permute(2, 0, 3, 1, 4)
    a = ((q * Dh ** -0.5) @ k.transpose(-2, -1) + bias).softmax(-1)
    return (a @ v).transpose(1, 2).reshape(B, S, H * Dh)


@pytest.mark.parametrize("bwd", ["fused", "split"])
def test_attention(device, bwd):
    """The attention kernels index within one sample in int32 (sample offsets are int64): the
    launchers read a qkv or bias whose span within a sample passes 2**31 elements from a dense
    copy, so such strides give the same results; a layout that fits stays as it is."""
    B, S, H, Dh = 3, 3, 1, 16  # B = 3: the batch offset 2 * BIG passes 2**31
    W = 3 * H * Dh
    qkv0 = torch.randn(B, S, W, device=device, dtype=torch.float64)
    bias0 = torch.randn(H, S, S, device=device, dtype=torch.float64)
    dout0 = torch.randn(B, S, H * Dh, device=device, dtype=torch.float64)
    qkv = spread(qkv0.float(), (S, BIG, B * S))  # s * stride_qs past 2**31
    bias = spread(bias0.float(), (S * S, BIG, S))  # i * stride_bi past 2**31
    dense_qkv, dense_bias = ka._int32_indexable(qkv, bias)
    assert dense_qkv.is_contiguous() and dense_bias.is_contiguous()
    big_batch = spread(qkv0.float(), (BIG, W, 1))  # only the batch stride is large: int64 in the kernels
    assert ka._int32_indexable(big_batch, None)[0] is big_batch
    cfg = ka.default_config(S, Dh, True, torch.float32)
    if bwd == "split":
        cfg = ka.replace(cfg, bwd="split", dq_block_m=16, dq_block_n=16, dkdv_block_m=16, dkdv_block_n=16)
    qr, br = qkv0.clone().requires_grad_(), bias0.clone().requires_grad_()
    ref = _attention_ref(qr, H, br)
    rdq, rdb = torch.autograd.grad(ref, (qr, br), dout0)
    for name, q, b in (("row stride", qkv, bias), ("column stride", spread(qkv0.float(), (W * S, W, BIG // 20)), bias),
                       ("batch stride", big_batch, bias0.float())):
        out, lse = ka.attention_forward(q, H, b, config=cfg)
        _close(f"out ({name})", out, ref, 1e-4)
        dqkv, dbias, qkv_sum = ka.attention_backward(q, out, lse, dout0.float(), H, b, config=cfg,
                                                     need_qkv_sum=True)
        _close(f"dqkv ({name})", dqkv, rdq, 1e-4)
        _close(f"dbias ({name})", dbias, rdb, 1e-4)
        _close(f"qkv sum ({name})", qkv_sum, rdq.sum((0, 1)), 1e-4)


# --------------------------------------------------------------------------------------------
# augment.py (byte offsets from the meta table) and blockwise_mask.py
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels_last", [False, True])
def test_augment_offsets_and_large_images(device, channels_last):
    S = 8
    total = 2_500_000_000  # bytes
    src = _storage(total, torch.uint8, device)
    g = torch.Generator().manual_seed(0)
    # image 0: small, past 2**31 bytes into the buffer; image 1: 28000 x 28000, its crop in
    # the last rows (channel / row offsets past 2**31 inside the image)
    big = 28_000
    shapes = [(12, 10), (big, big)]
    offsets = [2_360_000_000, 0]  # image 1 fills the first 2.35e9 bytes
    boxes = [(1, 2, 9, 7), (big - 11, big - 13, 10, 12)]
    crops = []
    for (h, w), off, (top, left, ch, cw) in zip(shapes, offsets, boxes):
        img = src[off:off + 3 * h * w]
        img = img.view(h, w, 3).permute(2, 0, 1) if channels_last else img.view(3, h, w)
        crop = torch.randint(0, 256, (3, ch, cw), generator=g, dtype=torch.uint8).to(device)
        img[:, top:top + ch, left:left + cw] = crop
        crops.append(crop)
    meta = torch.tensor([[off, h, w, *box, flip] for (h, w), off, box, flip in zip(shapes, offsets, boxes, (1, 0))],
                        dtype=torch.int64)
    out = torch.full((2, 3, S, S), float("nan"), device=device)
    augment_crops(src, meta, out, [1.0] * 3, [0.0] * 3, "bicubic", channels_last=channels_last)
    for i, crop in enumerate(crops):
        ref = F.interpolate(crop.double()[None], size=(S, S), mode="bicubic", align_corners=False)[0]
        ref = ref.clamp(0, 255)
        if i == 0:
            ref = ref.flip(-1)
        _close(f"image {i}", out[i], ref, 1e-3)


def test_blockwise_masks_sample_offsets(device):
    # n * max_tries * 4 past 2**31 at n = 2: uniforms of 3 masks with T tries each
    h = w = 8
    count, T = 20, 270_000_000
    assert 2 * T * 4 > 2**31
    used = 10 * (count + 1)
    u_small = torch.rand(3, used, 4, device=device)
    keys = torch.rand(3, h * w, device=device)
    storage = _storage(3 * T * 4, torch.float32, device)
    u = storage.view(3, T, 4)
    u[:, :used] = u_small
    args = (h, w, count, 4, 16, (math.log(0.3), math.log(1 / 0.3)))
    masks, counts, first = blockwise_masks(u, keys, *args)
    rmasks, rcounts, rfirst = blockwise_masks(u_small, keys, *args)
    assert torch.equal(masks, rmasks) and torch.equal(counts, rcounts) and torch.equal(first, rfirst)
    assert (masks.sum(1) == count).all()
