"""Fused patchify + per-patch normalisation + masked MSE / L1 loss, with d(loss)/d(pred)
written during the forward (shared/DESIGN.md section 3; MAE ``models_mae.py`` ``forward_loss``).

Replaces, for pred (N, L, P), imgs (N, C, H, W), weights mask (N, L), P = p*p*C:

    target = patchify(imgs)                       # read NCHW, write NLP      (a full copy)
    mean = target.mean(-1); var = target.var(-1)  # read NLP twice
    target = (target - mean) / (var + eps)**.5    # read NLP, write NLP
    loss = ((pred - target) ** 2).mean(-1)        # read 2 NLP, write NLP, read NLP, write NL
    loss = (loss * mask).sum() / mask.sum()
    # backward: about as many passes again, over every row, masked or not

with one pass that, for each row (n, l) whose weight is non-zero, reads the patch's P pixels
straight from ``imgs`` through its strides and the P predictions through ``pred``'s strides,
computes fp32 statistics, writes the row's gradient and adds ``w * row_loss`` to a per-program
partial; rows with weight 0 are not read and get a zero gradient. A one-program second pass
sums the partials in a fixed order (bit-identical run to run) and divides by ``sum(mask)``.

Bytes moved: M * P * (pred bytes + pixel bytes + grad bytes) + (N*L - M) * P * grad bytes +
N*L mask bytes, M = rows with non-zero weight (75% of rows in MAE). FLOPs are negligible.

How a patch is walked (``IMG_ORDER``; the launcher's tuner picks on a GPU): a patch's pixels lie
in (c, p, q) order in an NCHW image, its predictions in (p, q, c) order, so a walk in one order
strides the other tensor by C (orders 0, 1; 2 is the packed channels-last image, where both
agree); order 3 reads each in its own order and permutes in the kernel. ``PREFETCH_W`` loads
the weights of all a program's rows before its first tile, so that a tile's loads wait on no
other load.

Supports: pred, imgs in float32 / float16 / bfloat16, any strides (a view such as
``decoder_output[:, 1:, :]``, channels-last images); mask in any float dtype or bool, any
strides; C >= 1, any p (8, 14, 16, 32 in practice), H != W; ``norm_pix`` on or off (unbiased
variance, ``eps`` added as in the reference); ``"mse"`` and ``"l1"`` (gradient sign(0) = 0 as
torch's ``abs``). All weights zero: loss 0 and zero gradient (the reference divides 0 by 0).

Does not support: float64 pred or imgs (statistics are fp32), gradients to ``imgs`` or to
``mask``, P > 16384 values per patch (the row is held in registers). Negative weights are not
checked (they compute what the formula says).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from mimfast.kernels import cdiv, next_power_of_2, sm_count, tuning

__all__ = ["patch_loss_fwd", "patch_loss_bwd_scale_", "LOSSES"]

LOSSES = ("mse", "l1")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_P = 16384


@triton.jit
def _patch_loss_fwd_kernel(
    pred_ptr,  # (N, L, P) any strides
    imgs_ptr,  # (N, C, H, W) any strides
    mask_ptr,  # (N, L) any strides, float or uint8 (bool viewed as uint8)
    denom_ptr,  # () fp32: sum of the weights
    grad_ptr,  # (N, L, P) contiguous, pred's dtype: d(loss)/d(pred)
    partial_ptr,  # (num_programs,) fp32: sum over the program's rows of w * row_loss
    n_rows,  # N * L
    L, w_patches,  # patches per image, patches per image row (W // p)
    s_pn, s_pl, s_pp,  # pred strides
    s_in, s_ic, s_ih, s_iw,  # imgs strides
    s_mn, s_ml,  # mask strides
    eps,
    PATCH: tl.constexpr,  # p
    C: tl.constexpr,
    NORM_PIX: tl.constexpr,
    L1: tl.constexpr,
    IMG_ORDER: tl.constexpr,  # 0 (p, q, c) any strides, 1 (c, p, q), 2 (p, q, c) channels-last, 3 permuted
    BLOCK_R: tl.constexpr,  # rows per tile
    BLOCK_P: tl.constexpr,  # power of two >= P; C_PAD * PATCH_PAD**2 in order 3
    C_PAD: tl.constexpr,  # powers of two >= C and p (order 3)
    PATCH_PAD: tl.constexpr,
    TILES: tl.constexpr,  # tiles per program
    TILES_PAD: tl.constexpr,  # power of two >= TILES
    PREFETCH_W: tl.constexpr,  # load the weights of all the program's rows before its first tile
):
    P: tl.constexpr = PATCH * PATCH * C
    pid = tl.program_id(0)

    # column j of a tile -> (c, pp, qq) inside the patch; k is the column of pred / grad.
    # Every per-row operation is a sum or elementwise, so any bijection j -> k works; the order
    # is picked so that the wider of the two loads (fp32 pixels) is the contiguous one. Each
    # index is derived from j directly (not j % a % b) so the compiler sees runs of contiguous
    # addresses and vectorises the loads.
    j = tl.arange(0, BLOCK_P)
    col_ok = j < P
    if IMG_ORDER == 3:
        # Orders 0 and 1 stride one of the two by C: the predictions (and the gradient's stores)
        # or the pixels. Here each is read in its own order: the pixels as a (c, p, q) tile, pred
        # and grad as a (q, p, c) tile; tl.permute moves between the two (through shared memory
        # on a GPU). The row's columns j are the pixel tile's, flattened. Dimensions of equal
        # contiguity get a warp's lanes in their order, so q before p puts a warp on 8 adjacent
        # (q, c) triplets of one patch row (48 contiguous bytes in bf16) rather than on 4 rows.
        c3 = tl.arange(0, C_PAD)[:, None, None]
        p3 = tl.arange(0, PATCH_PAD)[None, :, None]
        q3 = tl.arange(0, PATCH_PAD)[None, None, :]
        pix_col3 = c3.to(tl.int64) * s_ic + p3.to(tl.int64) * s_ih + q3.to(tl.int64) * s_iw
        pix_ok3 = (c3 < C) & (p3 < PATCH) & (q3 < PATCH)
        col_ok = tl.reshape(pix_ok3, (BLOCK_P,))
        qk = tl.arange(0, PATCH_PAD)[:, None, None]
        pk = tl.arange(0, PATCH_PAD)[None, :, None]
        ck = tl.arange(0, C_PAD)[None, None, :]
        k3 = (pk * PATCH + qk) * C + ck  # column of pred / grad, (q, p, c)
        pred_col3 = k3.to(tl.int64) * s_pp
        pred_ok3 = (pk < PATCH) & (qk < PATCH) & (ck < C)
    elif IMG_ORDER == 1:  # (c, p, q): NCHW-like images, q contiguous
        qq = j % PATCH
        pp = (j // PATCH) % PATCH
        c = j // (PATCH * PATCH)
        k = (pp * PATCH + qq) * C + c
        img_col = c.to(tl.int64) * s_ic + pp.to(tl.int64) * s_ih + qq.to(tl.int64) * s_iw
    elif IMG_ORDER == 2:  # (p, q, c) of a packed channels-last image: s_ic == 1, s_iw == C
        k = j
        img_col = (j % (PATCH * C)).to(tl.int64) + (j // (PATCH * C)).to(tl.int64) * s_ih
    else:  # (p, q, c), any strides
        k = j
        c = j % C
        qq = (j // C) % PATCH
        pp = j // (C * PATCH)
        img_col = c.to(tl.int64) * s_ic + pp.to(tl.int64) * s_ih + qq.to(tl.int64) * s_iw
    if IMG_ORDER != 3:
        pred_col = k.to(tl.int64) * s_pp
        k64 = k.to(tl.int64)

    denom = tl.load(denom_ptr)
    inv_denom = tl.div_rn(1.0, tl.where(denom == 0, 1.0, denom))  # as the reference's final division
    if PREFETCH_W:
        # Otherwise each tile's loads wait for its weights' load: two DRAM latencies a tile, one
        # of them with only a few bytes in flight. With one load of the program's weights up
        # front, a tile's pixels and predictions are the only load it waits for.
        tw = tl.arange(0, TILES_PAD)[:, None]
        rows_w = (pid * TILES + tw) * BLOCK_R + tl.arange(0, BLOCK_R)[None, :]
        ok_w = (tw < TILES) & (rows_w < n_rows)
        w_all = tl.load(mask_ptr + (rows_w // L).to(tl.int64) * s_mn + (rows_w % L).to(tl.int64) * s_ml,
                        mask=ok_w, other=0).to(tl.float32)  # [TILES_PAD, BLOCK_R]
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for t in range(TILES):
        rows = (pid * TILES + t) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
        row_ok = rows < n_rows
        n = (rows // L).to(tl.int64)
        l_ = rows % L
        hi = (l_ // w_patches).to(tl.int64)
        wi = (l_ % w_patches).to(tl.int64)
        if PREFETCH_W:
            w = tl.sum(tl.where(tw == t, w_all, 0.0), axis=0)
        else:
            w = tl.load(mask_ptr + n * s_mn + l_.to(tl.int64) * s_ml, mask=row_ok, other=0).to(tl.float32)
        live = row_ok & (w != 0)  # zero-weight rows: no reads at all
        live2 = live[:, None] & col_ok[None, :]

        img_row = n * s_in + hi * PATCH * s_ih + wi * PATCH * s_iw
        pred_row = n * s_pn + l_.to(tl.int64) * s_pl
        if IMG_ORDER == 3:
            t4 = tl.load(imgs_ptr + (img_row[:, None, None, None] + pix_col3[None, :, :, :]),
                         mask=live[:, None, None, None] & pix_ok3[None, :, :, :], other=0.0)
            t_ = tl.reshape(t4, (BLOCK_R, BLOCK_P)).to(tl.float32)
            x4 = tl.load(pred_ptr + (pred_row[None, None, :, None] + pred_col3[:, :, None, :]),
                         mask=live[None, None, :, None] & pred_ok3[:, :, None, :], other=0.0)  # (q, p, r, c)
            x = tl.reshape(tl.permute(x4, (2, 3, 1, 0)), (BLOCK_R, BLOCK_P)).to(tl.float32)
        else:
            t_ = tl.load(imgs_ptr + (img_row[:, None] + img_col[None, :]), mask=live2, other=0.0).to(tl.float32)
            x = tl.load(pred_ptr + (pred_row[:, None] + pred_col[None, :]), mask=live2, other=0.0).to(tl.float32)

        if NORM_PIX:
            mean = tl.sum(t_, axis=1) / P
            d = tl.where(live2, t_ - mean[:, None], 0.0)
            var = tl.sum(d * d, axis=1) / (P - 1)  # unbiased, as torch.var
            rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))  # per row; a multiply per value
            t_ = d * rstd[:, None]
        diff = tl.where(live2, x - t_, 0.0)
        # d(loss)/d(pred) = w / sum(w) * d(row mean)/d(pred)
        scale = tl.where(live, w * inv_denom, 0.0) / P
        if L1:
            row_loss = tl.sum(tl.abs(diff), axis=1) / P
            sgn = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
            g = sgn * scale[:, None]
        else:
            row_loss = tl.sum(diff * diff, axis=1) / P
            g = diff * (2.0 * scale)[:, None]
        acc += tl.where(live, w * row_loss, 0.0)
        g = g.to(grad_ptr.dtype.element_ty)
        if IMG_ORDER == 3:
            g4 = tl.permute(tl.reshape(g, (BLOCK_R, C_PAD, PATCH_PAD, PATCH_PAD)), (3, 2, 0, 1))  # (q, p, r, c)
            grad_offs4 = rows.to(tl.int64)[None, None, :, None] * P + k3[:, :, None, :]
            tl.store(grad_ptr + grad_offs4, g4, mask=row_ok[None, None, :, None] & pred_ok3[:, :, None, :])
        else:
            grad_offs = rows.to(tl.int64)[:, None] * P + k64[None, :]
            tl.store(grad_ptr + grad_offs, g, mask=row_ok[:, None] & col_ok[None, :])
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _patch_loss_finish_kernel(
    partial_ptr,  # (n_partials,) fp32
    denom_ptr,  # () fp32
    loss_ptr,  # () fp32
    n_partials,
    BLOCK: tl.constexpr,
):
    # one program, fixed order: the same partials give the same bits every run
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_partials, BLOCK):
        acc += tl.load(partial_ptr + start + offs, mask=start + offs < n_partials, other=0.0)
    total = tl.sum(acc, axis=0)
    denom = tl.load(denom_ptr)
    denom = tl.where(denom == 0, 1.0, denom)  # as the reference: 0 / 1 when no weight is set
    tl.store(loss_ptr, total / denom)


@triton.jit
def _scale_kernel(
    grad_ptr,  # (numel,) contiguous, scaled in place
    g_ptr,  # () incoming gradient of the loss
    numel,
    BLOCK: tl.constexpr,
):
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:  # decided on the device: no host sync, and no traffic when g == 1
        # a few programs a multiprocessor striding over the buffer: at g == 1 (every plain
        # loss.backward()) each only reads g, and a launch of one program per block would spend
        # its time starting thousands of programs that do nothing
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(tl.program_id(0).to(tl.int64) * BLOCK, numel, step):
            offs = start + tl.arange(0, BLOCK)
            ok = offs < numel
            x = tl.load(grad_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            tl.store(grad_ptr + offs, (x * g).to(grad_ptr.dtype.element_ty), mask=ok)


def _config(block_p: int, interpreted: bool) -> tuple[int, int, int]:
    """(BLOCK_R, TILES, num_warps). On a GPU: about 2048-4096 values per tile and 16 rows per
    program. Triton's interpreter pays per operation, not per value, so it gets large tiles
    (two per program, which keeps the tile loop exercised)."""
    if interpreted:
        return max(1, 16384 // block_p), 2, 4
    block_r = max(1, 2048 // block_p)
    tiles = max(1, 16 // block_r)
    num_warps = 4 if block_r * block_p <= 2048 else 8
    return block_r, tiles, num_warps


@functools.lru_cache(maxsize=None)
def _candidates(block_r: int, tiles: int, num_warps: int, img_order: int,
                channels: int) -> tuple[tuple[str, tuple], ...]:
    """(name, (BLOCK_R, TILES, num_warps, IMG_ORDER, PREFETCH_W)) the launcher may choose among
    on a GPU (:mod:`mimfast.kernels.tuning`), the heuristic's first.

    The third H200 run (ViT-B/16's shape, B 256) put the heuristic's at 41% of copy bandwidth;
    the other walk, one tile a program and half the rows a tile came within 8%; eight warps a
    tile (twice the rows, or half the rows) ran 1.37x slower and are no longer offered."""
    cands = {"default": (block_r, tiles, num_warps, img_order, False)}
    if img_order in (0, 1):  # the other walk over a patch
        cands["other_order"] = (block_r, tiles, num_warps, 1 - img_order, False)
    cands["one_tile"] = (block_r, 1, num_warps, img_order, False)  # more, shorter programs
    if block_r > 1:
        cands["half_rows_4w"] = (block_r // 2, tiles * 2, 4, img_order, False)
    # fewer warps a tile: each row's sums span fewer warps, more values in flight a thread
    if num_warps > 2:
        cands["two_warps"] = (block_r, tiles, 2, img_order, False)
    # the weights of the program's rows loaded once: one DRAM latency a tile instead of two
    if tiles > 1:
        cands["prefetch"] = (block_r, tiles, num_warps, img_order, True)
    if block_r > 1:
        cands["prefetch_half_rows"] = (block_r // 2, tiles * 2, 4, img_order, True)
    if tiles > 1 and num_warps > 2:
        cands["prefetch_two_warps"] = (block_r, tiles, 2, img_order, True)
    # orders 0 and 1 stride the predictions or the pixels by C; order 3 reads both in their own
    # order and permutes between them in the kernel
    if img_order == 1 and channels > 1:
        cands["permuted"] = (block_r, tiles, num_warps, 3, False)
        cands["permuted_one_tile"] = (block_r, 1, num_warps, 3, False)
        if tiles > 1:
            cands["permuted_prefetch"] = (block_r, tiles, num_warps, 3, True)
    return tuning.distinct(cands.items())


def _check(pred, imgs, mask, patch_size, loss, eps, grad):
    for name, t in (("pred", pred), ("imgs", imgs), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if imgs.dim() != 4:
        raise ValueError(f"imgs must be (N, C, H, W), got shape {tuple(imgs.shape)}")
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size <= 0:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    N, C, H, W = imgs.shape
    if N == 0:
        raise ValueError("imgs has an empty batch (N == 0)")
    if H % patch_size or W % patch_size:
        raise ValueError(f"imgs size {H}x{W} is not a multiple of patch_size={patch_size}")
    L = (H // patch_size) * (W // patch_size)
    P = patch_size * patch_size * C
    if pred.dim() != 3 or pred.shape != (N, L, P):
        raise ValueError(
            f"pred must be (N, L, p*p*C) = ({N}, {L}, {P}) for imgs {tuple(imgs.shape)} and "
            f"patch_size={patch_size}, got {tuple(pred.shape)}"
        )
    if P > _MAX_P:
        raise ValueError(f"p*p*C = {P} values per patch exceeds the kernel's limit of {_MAX_P}")
    if P < 2:
        raise ValueError(f"p*p*C must be >= 2 (unbiased variance), got {P}")
    if mask.shape != (N, L):
        raise ValueError(f"mask must be (N, L) = ({N}, {L}), got {tuple(mask.shape)}")
    for name, t in (("pred", pred), ("imgs", imgs)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if not (mask.is_floating_point() or mask.dtype == torch.bool):
        raise TypeError(f"mask must hold float weights (or bool), got {mask.dtype}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    for name, t in (("imgs", imgs), ("mask", mask)):
        if t.device != pred.device:
            raise ValueError(f"{name} is on {t.device}, pred on {pred.device}")
    if grad is not None:
        if grad.shape != (N, L, P) or grad.dtype != pred.dtype or not grad.is_contiguous():
            raise ValueError(
                f"grad must be a contiguous ({N}, {L}, {P}) {pred.dtype} tensor, got "
                f"{tuple(grad.shape)} {grad.dtype} contiguous={grad.is_contiguous()}"
            )
        if grad.device != pred.device:
            raise ValueError(f"grad is on {grad.device}, pred on {pred.device}")
    return N, C, H, W, L, P


def patch_loss_fwd(pred, imgs, mask, patch_size, norm_pix=True, loss="mse", eps=1e-6, grad=None, config=None):
    """Loss and its gradient to ``pred`` in one pass.

    Args:
        pred: (N, L, p*p*C), any strides.
        imgs: (N, C, H, W), any strides.
        mask: (N, L) non-negative weights (float or bool), any strides.
        patch_size: p.
        norm_pix: normalise each target patch by its mean and unbiased variance (+ eps).
        loss: "mse" or "l1".
        eps: added to the variance.
        grad: optional contiguous (N, L, P) buffer of pred's dtype for the gradient.
        config: optional (BLOCK_R, TILES, num_warps[, IMG_ORDER[, PREFETCH_W]]) overriding the heuristic
            (tests, tuning); BLOCK_R a power of two; IMG_ORDER 0 walks each patch in pred's
            (p, q, c) order, 1 in (c, p, q) order, 3 reads the pixels in (c, p, q) order and
            pred in its own, permuting between them in the kernel (all three for any strides);
            PREFETCH_W loads the weights of all a program's rows before its first tile.

    Returns:
        (loss, grad): 0-dim float32 loss and d(loss)/d(pred) (contiguous, pred's dtype).
    """
    N, C, H, W, L, P = _check(pred, imgs, mask, patch_size, loss, eps, grad)
    n_rows = N * L
    block_p = next_power_of_2(P)
    block_r, tiles, num_warps = _config(block_p, interpreted=pred.device.type == "cpu")
    s_in, s_ic, s_ih, s_iw = imgs.stride()
    # walk the patch in (c, p, q) order when the image is NCHW-like (q contiguous), otherwise in
    # pred's own (p, q, c) order (channels-last images are then contiguous along (q, c))
    if s_ic == 1 and s_iw == C:
        img_order = 2
    elif abs(s_iw) <= abs(s_ic):
        img_order = 1
    else:
        img_order = 0
    if config is None and tuning.applies(pred.device):
        config = tuning.choose(
            ("patch_loss", N, C, H, W, patch_size, pred.dtype, pred.stride(), imgs.dtype, imgs.stride(), mask.dtype,
             bool(norm_pix), loss, pred.device), _candidates(block_r, tiles, num_warps, img_order, C),
            lambda c: patch_loss_fwd(pred, imgs, mask, patch_size, norm_pix, loss, eps, grad, c), pred.device)
    prefetch_w = False
    if config is not None:
        ok = isinstance(config, (tuple, list)) and len(config) in (3, 4, 5)
        if ok:
            block_r, tiles, num_warps = config[:3]
            img_order = config[3] if len(config) >= 4 else img_order
            prefetch_w = config[4] if len(config) == 5 else False
            ok = block_r >= 1 and not block_r & (block_r - 1) and tiles >= 1 and img_order in (0, 1, 2, 3)
            ok = ok and (img_order != 2 or (s_ic == 1 and s_iw == C)) and isinstance(prefetch_w, bool)
        if not ok:
            raise ValueError(
                "config must be (BLOCK_R power of two, TILES >= 1, num_warps[, IMG_ORDER in 0, 1, 3 "
                f"(2 only for packed channels-last images)[, PREFETCH_W bool]]), got {config}"
            )
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # same bytes; Triton loads bytes more reliably than i1
    if grad is None:
        grad = torch.empty((N, L, P), dtype=pred.dtype, device=pred.device)
    denom = mask.sum(dtype=torch.float32)  # deterministic; needed by every row's gradient
    c_pad, patch_pad = next_power_of_2(C), next_power_of_2(patch_size)
    if img_order == 3:
        block_p = c_pad * patch_pad * patch_pad
    grid = cdiv(n_rows, block_r * tiles)
    partials = torch.empty(grid, dtype=torch.float32, device=pred.device)
    out = torch.empty((), dtype=torch.float32, device=pred.device)
    _patch_loss_fwd_kernel[(grid,)](
        pred, imgs, mask, denom, grad, partials,
        n_rows, L, W // patch_size,
        *pred.stride(), s_in, s_ic, s_ih, s_iw, *mask.stride(),
        float(eps),
        PATCH=patch_size, C=C, NORM_PIX=bool(norm_pix), L1=(loss == "l1"), IMG_ORDER=img_order,
        BLOCK_R=block_r, BLOCK_P=block_p, C_PAD=c_pad, PATCH_PAD=patch_pad, TILES=tiles,
        TILES_PAD=next_power_of_2(tiles), PREFETCH_W=prefetch_w, num_warps=num_warps,
    )
    _patch_loss_finish_kernel[(1,)](partials, denom, out, grid, BLOCK=1024, num_warps=4)
    return out, grad


def patch_loss_bwd_scale_(grad, grad_output):
    """``grad *= grad_output`` in place; reads ``grad_output`` on the device and leaves ``grad``
    untouched when it is 1 (the usual ``loss.backward()``), so no host sync is needed."""
    if not grad.is_contiguous():
        raise ValueError("grad must be contiguous")
    if grad_output.numel() != 1:
        raise ValueError(f"grad_output must hold one value, got shape {tuple(grad_output.shape)}")
    if grad_output.device != grad.device:
        raise ValueError(f"grad_output is on {grad_output.device}, grad on {grad.device}")
    numel = grad.numel()
    block = 4096
    if grad_output.dim():
        grad_output = grad_output.reshape(())
    # on a GPU four programs a multiprocessor (eight warps each); in the interpreter two, which
    # keeps the stride loop exercised
    programs = 4 * sm_count(grad.device) if grad.device.type == "cuda" else 2
    _scale_kernel[(max(1, min(cdiv(numel, block), programs)),)](grad, grad_output, numel, BLOCK=block, num_warps=8)
    return grad
