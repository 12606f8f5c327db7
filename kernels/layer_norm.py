"""Residual add (with optional layer scale) fused with the LayerNorm that follows it, forward
and backward (the pre-norm transformer block's ``x = x + ls(branch); y = norm(x)``).

Replaces, for a branch output x (M, D), the residual stream r (M, D), an optional layer-scale
vector s (D,) and LayerNorm weight w, bias b (D,):

    h = x * s                          # read x, write h        (only with layer scale)
    r = r + h                          # read r, h, write r
    y = layer_norm(r, w, b, eps)       # read r, write y (fp32 under autocast)
    y = y.to(bfloat16)                 # read y, write y        (autocast's cast before the next Linear)
    # backward: layer_norm_backward, the add's and the cast's gradients, about as many passes again

with one pass that reads x and r and writes r and y (y directly in the dtype the next matmul
wants), keeping the row's mean and 1/std (fp32) for the backward; and one backward pass that
reads r, dy and the residual stream's incoming gradient and writes the gradients of x and r,
with the weight / bias / layer-scale gradients reduced per program (fp32, a fixed split of the
rows) and summed over programs afterwards in a fixed order (bit-identical run to run).

The backward can also sum the gradient of x over the rows: the gradient of the bias that the
branch's last Linear (attention's ``proj``, the MLP's ``fc2``) added to x. The Linear's own
backward would read the whole (M, D) gradient once more for it (a column-sum kernel and its
partials' sum per block branch); here it is one more register accumulator of a pass that
writes that gradient anyway.

Bytes moved, M rows of D values: forward M*D*(x + r in + r out + y bytes); backward
M*D*(r + dy + dr in + dr out + dx bytes) (+ x with layer scale). Eager moves about twice that.

Semantics are those of the eager code in each dtype: h and r are rounded to the dtypes eager
arithmetic would give (``torch.result_type``) before the statistics are taken; statistics are
fp32 (biased variance, ``eps`` added, as ``torch.nn.functional.layer_norm``). Both kernels are
compiled with floating-point contraction off (``enable_fp_fusion=False``): every product is
rounded before it is added, as in eager arithmetic, so r is eager's bit for bit and a difference
that is exactly zero in eager (``r - mean`` and ``w * dy - mean(w * dy)`` of a one-element row,
then multiplied by 1/sqrt(eps)) is exactly zero here too, not a fused multiply-add's leftover
product rounding error amplified a thousandfold (the H200 run's D = 1 failures). These passes are
memory-bound: the extra roundings cost no measurable time. 1/std uses the GPU's approximate
square root and division (a few ulps).

Supports: x, residual in float32 / float16 / bfloat16 with unit stride along D and any row
stride; no residual (plain LayerNorm of x, optionally scaled); weight / bias / scale absent or
(D,) contiguous; D up to 16384 (a row tile is held in registers). Does not support float64.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from mimfast.kernels import cdiv, next_power_of_2, sm_count, tuning

__all__ = ["add_layer_norm_fwd", "add_layer_norm_bwd", "result_dtypes", "MAX_D"]

MAX_D = 16384
# launch option of both kernels: no multiply-add contraction (eager's rounding; see the docstring).
# The interpreter ignores it; benchmarks.compile_check captures it with the launches.
_LAUNCH_OPTS = dict(enable_fp_fusion=False)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _add_ln_fwd_kernel(
    x_ptr,  # (M, D) branch output, unit stride along D
    res_ptr,  # (M, D) residual stream, unit stride along D (HAS_RES)
    scale_ptr,  # (D,) layer scale (HAS_SCALE)
    w_ptr, b_ptr,  # (D,) LayerNorm weight and bias (HAS_W, HAS_B)
    r_out_ptr,  # (M, D) contiguous: the new residual stream (WRITE_R)
    y_ptr,  # (M, D) contiguous: the normalised rows, out dtype
    mean_ptr, rstd_ptr,  # (M,) fp32
    M, D,
    s_xm, s_rm,  # row strides of x and residual
    eps,
    H_DTYPE: tl.constexpr,  # dtype of x * scale in eager arithmetic
    R_DTYPE: tl.constexpr,  # dtype of residual + h in eager arithmetic
    HAS_RES: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    WRITE_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < M
    col_ok = cols < D
    ok = row_ok[:, None] & col_ok[None, :]

    h = tl.load(x_ptr + rows[:, None] * s_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_SCALE:
        s = tl.load(scale_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        h = (h * s[None, :]).to(H_DTYPE).to(tl.float32)
    if HAS_RES:
        res = tl.load(res_ptr + rows[:, None] * s_rm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        r = (res + h).to(R_DTYPE).to(tl.float32)
    else:
        r = h
    if WRITE_R:
        tl.store(r_out_ptr + rows[:, None] * D + cols[None, :], r.to(r_out_ptr.dtype.element_ty), mask=ok)

    mean = tl.sum(r, axis=1) / D
    diff = tl.where(ok, r - mean[:, None], 0.0)
    var = tl.sum(diff * diff, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    y = diff * rstd[:, None]
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_B:
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(y_ptr + rows[:, None] * D + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _add_ln_bwd_kernel(
    dy_ptr,  # (M, D) contiguous, gradient of y
    dr_in_ptr,  # (M, D) contiguous, gradient of the new residual stream from later uses (HAS_DR)
    r_ptr,  # (M, D) the new residual stream (or x when there is no add), unit stride along D
    x_ptr,  # (M, D) the branch output, unit stride along D (HAS_SCALE and NEED_DSCALE)
    scale_ptr,  # (D,) (HAS_SCALE)
    w_ptr,  # (D,) (HAS_W)
    mean_ptr, rstd_ptr,  # (M,) fp32
    dx_ptr,  # (M, D) contiguous, x's dtype (NEED_DX)
    dres_ptr,  # (M, D) contiguous, residual's dtype (NEED_DRES)
    part_ptr,  # (programs, 3 or 4, D) fp32: per-program sums for dw, db, dscale (and dx: NEED_DXSUM)
    M, D,
    s_rm, s_xm,
    TILES,  # row tiles per program (a fixed split of the rows: deterministic partials)
    HAS_DR: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_W: tl.constexpr,
    NEED_DX: tl.constexpr,
    NEED_DRES: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    NEED_DSCALE: tl.constexpr,
    NEED_DXSUM: tl.constexpr,  # column sums of dx (as rounded to x's dtype): the branch's bias gradient
    DX_DTYPE: tl.constexpr,  # x's dtype
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_SCALE:
        s = tl.load(scale_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    # the weight / bias / scale sums are kept per tile row and reduced over the rows once, at the
    # end: a reduction across the tile's rows inside the loop would cost a shared-memory round
    # trip (and barriers) per tile when the rows sit in different warps
    acc_dw = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc_db = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc_ds = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc_dx = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for t in range(TILES):
        tile = pid.to(tl.int64) * TILES + t
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < M
        ok = row_ok[:, None] & col_ok[None, :]
        # every load of the tile is issued before the row reductions, so they are in flight together
        r = tl.load(r_ptr + rows[:, None] * s_rm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_DR:
            dr_in = tl.load(dr_in_ptr + rows[:, None] * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_SCALE and NEED_DSCALE:
            x = tl.load(x_ptr + rows[:, None] * s_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xhat = tl.where(ok, (r - mean[:, None]) * rstd[:, None], 0.0)
        if NEED_DW:
            acc_dw += dy * xhat
        if NEED_DB:
            acc_db += dy
        if HAS_W:
            g = dy * w[None, :]
        else:
            g = dy
        c1 = tl.sum(g * xhat, axis=1) / D
        c2 = tl.sum(g, axis=1) / D
        dr = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DR:
            dr += dr_in
        if NEED_DRES:
            tl.store(dres_ptr + rows[:, None] * D + cols[None, :], dr.to(dres_ptr.dtype.element_ty), mask=ok)
        if HAS_SCALE:
            if NEED_DSCALE:
                acc_ds += tl.where(ok, dr * x, 0.0)
            dx = dr * s[None, :]
        else:
            dx = dr
        dx = dx.to(DX_DTYPE)
        if NEED_DX:
            tl.store(dx_ptr + rows[:, None] * D + cols[None, :], dx, mask=ok)
        if NEED_DXSUM:  # the values the branch's Linear would sum for its bias (rows past M: dr = 0)
            acc_dx += dx.to(tl.float32)
    if NEED_DW or NEED_DB or NEED_DSCALE or NEED_DXSUM:
        # every row is written (zeros for a sum not asked for): the buffer needs no zero fill
        base = part_ptr + pid.to(tl.int64) * (4 if NEED_DXSUM else 3) * D + cols
        tl.store(base, tl.sum(acc_dw, axis=0), mask=col_ok)
        tl.store(base + D, tl.sum(acc_db, axis=0), mask=col_ok)
        tl.store(base + 2 * D, tl.sum(acc_ds, axis=0), mask=col_ok)
        if NEED_DXSUM:
            tl.store(base + 3 * D, tl.sum(acc_dx, axis=0), mask=col_ok)


def result_dtypes(x_dtype: torch.dtype, residual_dtype: torch.dtype | None,
                  scale_dtype: torch.dtype | None) -> tuple[torch.dtype, torch.dtype]:
    """(h, r) dtypes eager arithmetic gives: h = x * scale, r = residual + h."""
    h = x_dtype if scale_dtype is None else torch.promote_types(x_dtype, scale_dtype)
    return h, (h if residual_dtype is None else torch.promote_types(residual_dtype, h))


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every output buffer comes from here (tests poison it to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _blocks(D: int, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps) of a row tile.

    Forward: a tile of about 4096 values, one per program. Backward: a tile of at least 512
    values (one row from D = 512 on) spread 4 per thread, one tile per loop step of a program
    that owns a run of tiles: every tensor of the step then has the same register layout (4
    values a thread: one 16-byte fp32 vector; a layout made for 8-value bf16 vectors instead
    sent each fp32 tile through shared memory to store it), few registers (several programs
    resident per SM keep loads in flight across the loop's row reductions)."""
    block_d = next_power_of_2(D)
    if backward:
        block_m = max(1, min(16, 512 // block_d))
        return block_m, block_d, max(1, min(16, block_m * block_d // 128))
    block_m = max(1, min(16, 4096 // block_d))
    return block_m, block_d, 4 if block_m * block_d <= 2048 else 8


@functools.lru_cache(maxsize=None)
def _candidates(D: int, backward: bool) -> tuple[tuple[str, tuple[int, int, int, int]], ...]:
    """(name, (BLOCK_M, BLOCK_D, num_warps, waves)) the launchers may choose among on a GPU
    (:mod:`mimfast.kernels.tuning`), the default of :func:`_blocks` first. ``waves``: the
    backward's programs fill the GPU that many times over (the forward ignores it)."""
    block_m, block_d, warps = _blocks(D, backward)
    cands = {"default": (block_m, block_d, warps, 1)}
    if backward:
        # twice the values a thread (8: fewer warps), two rows a step, two waves of programs
        cands["8_per_thread"] = (block_m, block_d, max(1, warps // 2), 1)
        if block_m * 2 * block_d // 128 <= 16:
            cands["two_rows"] = (block_m * 2, block_d, max(1, min(16, block_m * 2 * block_d // 128)), 1)
        cands["two_waves"] = (block_m, block_d, warps, 2)
    else:
        if block_m > 1:  # half the rows a program: twice the programs
            cands["half_rows"] = (block_m // 2, block_d, max(1, warps // 2), 1)
        cands["other_warps"] = (block_m, block_d, 4 if warps == 8 else 8, 1)
    return tuning.distinct(cands.items())


def _check_rows(name: str, t: torch.Tensor, D: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() != 2 or t.shape[1] != D:
        raise ValueError(f"{name} must be (M, D) with D = {D}, got {tuple(t.shape)}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have unit stride along D, got strides {t.stride()}")


def _check_vec(name: str, t, D: int, device) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != D:
        raise ValueError(f"{name} must be a (D,) = ({D},) tensor or None, got {getattr(t, 'shape', t)!r}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, x on {device}")


def add_layer_norm_fwd(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                       bias: torch.Tensor | None, scale: torch.Tensor | None, eps: float,
                       out_dtype: torch.dtype, config: tuple[int, int, int, int] | None = None):
    """(r, y, mean, rstd) for x, residual (M, D): r = residual + x * scale (rounded as eager
    rounds it), y = layer_norm(r) in ``out_dtype``. Without a residual and a scale, r is not
    written and is returned as an empty (0,) tensor (r is x itself). ``config``: one of
    :func:`_candidates` (default: the tuner's choice on a GPU, :func:`_blocks` elsewhere)."""
    if x.dim() != 2:
        raise ValueError(f"x must be (M, D), got {tuple(x.shape)}")
    M, D = x.shape
    _check_rows("x", x, D)
    if residual is not None:
        _check_rows("residual", residual, D)
        if residual.shape[0] != M:
            raise ValueError(f"residual must be ({M}, {D}) like x, got {tuple(residual.shape)}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device}, x on {x.device}")
    for name, t in (("weight", weight), ("bias", bias), ("scale", scale)):
        _check_vec(name, t, D, x.device)
    if D > MAX_D or D == 0:
        raise ValueError(f"D must be in [1, {MAX_D}], got {D}")
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    h_dtype, r_dtype = result_dtypes(x.dtype, residual.dtype if residual is not None else None,
                                     scale.dtype if scale is not None else None)
    write_r = residual is not None or scale is not None
    r = _empty((M, D) if write_r else (0,), r_dtype, x.device)
    y = _empty((M, D), out_dtype, x.device)
    mean = _empty((M,), torch.float32, x.device)
    rstd = _empty((M,), torch.float32, x.device)
    if M == 0:
        return r, y, mean, rstd
    if config is None and tuning.applies(x.device):
        config = tuning.choose(
            ("add_ln_fwd", M, D, x.dtype, None if residual is None else residual.dtype,
             None if weight is None else weight.dtype, bias is not None, None if scale is None else scale.dtype,
             out_dtype, x.device), _candidates(D, False),
            lambda c: add_layer_norm_fwd(x, residual, weight, bias, scale, eps, out_dtype, c), x.device)
    block_m, block_d, num_warps = config[:3] if config is not None else _blocks(D, backward=False)
    dummy = x
    _add_ln_fwd_kernel[(cdiv(M, block_m),)](
        x, residual if residual is not None else dummy, scale if scale is not None else dummy,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        r if write_r else dummy, y, mean, rstd,
        M, D, x.stride(0), residual.stride(0) if residual is not None else 0, float(eps),
        H_DTYPE=_TL_DTYPES[h_dtype], R_DTYPE=_TL_DTYPES[r_dtype],
        HAS_RES=residual is not None, HAS_SCALE=scale is not None, HAS_W=weight is not None,
        HAS_B=bias is not None, WRITE_R=write_r, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
        **_LAUNCH_OPTS,
    )
    return r, y, mean, rstd


def _programs(n_tiles: int, num_warps: int, device: torch.device, waves: int = 1) -> int:
    """Programs of the backward: a fixed number per device, each owning a run of row tiles."""
    if device.type == "cuda":
        # 32 warps per SM: every backward variant fits that many at once (48-60 registers a thread
        # in the sm_90 compile check), so the programs run in one wave, no tail of a second one
        target = sm_count(device) * max(1, 32 // num_warps) * waves
    else:  # the interpreter runs programs one after another: few, long ones
        target = 4
    return max(1, min(n_tiles, target))


def add_layer_norm_bwd(dy: torch.Tensor, dr_in: torch.Tensor | None, r: torch.Tensor, x: torch.Tensor | None,
                       weight: torch.Tensor | None, scale: torch.Tensor | None, mean: torch.Tensor,
                       rstd: torch.Tensor, x_dtype: torch.dtype, res_dtype: torch.dtype | None,
                       need_dx: bool, need_dres: bool, need_dw: bool, need_db: bool, need_dscale: bool,
                       need_dxsum: bool = False, config: tuple[int, int, int, int] | None = None):
    """Gradients (dx, dres, sums) of :func:`add_layer_norm_fwd`: sums (3, D) fp32 holds the
    weight, bias and layer-scale gradients (rows not asked for are zero), and with ``need_dxsum``
    a fourth row, the column sums of dx (as rounded to ``x_dtype``: the gradient of a bias the
    branch's Linear added to x); what is not needed is an empty (0,) tensor. ``r`` is the
    forward's residual output (x itself when there was no add and no scale), ``x`` the branch
    output (needed for ``dscale`` only). ``config``: as for :func:`add_layer_norm_fwd`."""
    M, D = r.shape
    _check_rows("r", r, D)
    dy = dy.contiguous()
    _check_rows("dy", dy, D)
    if dr_in is not None:
        dr_in = dr_in.contiguous()
        _check_rows("dr_in", dr_in, D)
    if need_dscale and (x is None or scale is None):
        raise ValueError("the layer-scale gradient needs x and scale")
    dx = _empty((M, D) if need_dx else (0,), x_dtype, r.device)
    dres = _empty((M, D) if need_dres else (0,), res_dtype, r.device)
    if config is None and tuning.applies(r.device) and M > 0:
        config = tuning.choose(
            ("add_ln_bwd", M, D, r.dtype, dy.dtype, dr_in is not None, x is not None, None if weight is None
             else weight.dtype, None if scale is None else scale.dtype, x_dtype, res_dtype, need_dx, need_dres,
             need_dw, need_db, need_dscale, need_dxsum, r.device), _candidates(D, True),
            lambda c: add_layer_norm_bwd(dy, dr_in, r, x, weight, scale, mean, rstd, x_dtype, res_dtype, need_dx,
                                         need_dres, need_dw, need_db, need_dscale, need_dxsum, c), r.device)
    block_m, block_d, num_warps, waves = config if config is not None else _blocks(D, backward=True) + (1,)
    n_tiles = cdiv(M, block_m)
    programs = _programs(n_tiles, num_warps, r.device, waves)
    tiles = cdiv(n_tiles, programs)
    programs = cdiv(n_tiles, tiles)
    need_part = need_dw or need_db or need_dscale or need_dxsum
    part = _empty((programs, 4 if need_dxsum else 3, D) if need_part else (0,), torch.float32, r.device)
    if M > 0:
        dummy = r
        _add_ln_bwd_kernel[(programs,)](
            dy, dr_in if dr_in is not None else dummy, r, x if x is not None else dummy,
            scale if scale is not None else dummy, weight if weight is not None else dummy,
            mean, rstd, dx if need_dx else dummy, dres if need_dres else dummy, part if need_part else dummy,
            M, D, r.stride(0), x.stride(0) if x is not None else 0, tiles,
            HAS_DR=dr_in is not None, HAS_SCALE=scale is not None, HAS_W=weight is not None,
            NEED_DX=need_dx, NEED_DRES=need_dres, NEED_DW=need_dw, NEED_DB=need_db, NEED_DSCALE=need_dscale,
            NEED_DXSUM=need_dxsum, DX_DTYPE=_TL_DTYPES[x_dtype], BLOCK_M=block_m, BLOCK_D=block_d,
            num_warps=num_warps, **_LAUNCH_OPTS,
        )
    # (3 or 4, D) fp32: a fixed-order reduction over programs
    sums = part.sum(0) if need_part else _empty((0,), torch.float32, r.device)
    return dx, dres, sums
