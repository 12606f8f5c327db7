"""Cross-entropy loss and its gradient over one chunk of logits, in one pass per row, written in
place over the logits (shared/DESIGN.md section 5; the loss half of BEiT's
``nn.CrossEntropyLoss()(lm_head(x[bool_masked_pos]), labels)``).

For a chunk of C rows of logits (C, V) (the caller computes them with a matmul, chunk by chunk,
so the full (M, V) logits never exist), each program takes one row and replaces

    lse   = logits.float().logsumexp(-1)            # read CV, (eager: write a CV fp32 copy)
    loss  = (lse - logits[label]) * scale           # eager: log_softmax writes CV, nll reads it
    dlog  = (softmax(logits) - onehot(label)) * scale   # eager backward: read CV, write CV twice

with: read the row (V values), fp32 max / sum of exponentials (online, per lane), write the
row's loss * scale to ``loss`` and the gradient row over the logits. ``scale`` is read from the
device (1 / number of rows whose label is not ``ignore_index``, over the whole batch, not the
chunk), so there is no host sync. Rows whose label is ``ignore_index`` get loss 0 and a zero
gradient row.

Bytes moved per chunk: C * V * (read + write) in the logits' dtype, plus 2 reads of the row when
V > BLOCK_V (the second from L2 in practice). FLOPs: about 5 * C * V, negligible.

Supports: logits float32 / float16 / bfloat16 with unit column stride and any row stride; labels
int32 / int64; any V (V <= 16384 keeps the row in registers, larger V loops in 4096-wide blocks).
Out-of-range labels (not ``ignore_index``, not in [0, V)) give a NaN loss for that row (no
device-side assert). Does not support: label smoothing, class weights, reductions other than a
mean over the non-ignored rows (the caller's ``scale``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mimfast.kernels import next_power_of_2

__all__ = ["cross_entropy_fwd_grad_", "MAX_SINGLE_BLOCK_V"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_SINGLE_BLOCK_V = 16384  # V up to this keeps the whole row in registers (one read, one write)
_LOOP_BLOCK_V = 4096


@triton.jit
def _ce_fwd_grad_kernel(
    logits_ptr,  # (C, V), row stride stride_row, unit column stride; overwritten with d(loss)/d(logits)
    labels_ptr,  # (C,) int32 / int64
    loss_ptr,  # (C,) fp32 out: per-row loss * scale (0 for ignored rows)
    scale_ptr,  # (1,) fp32: 1 / number of non-ignored rows of the whole batch
    stride_row,
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,  # power of two; >= V when SINGLE_BLOCK
    SINGLE_BLOCK: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    scale = tl.load(scale_ptr)
    valid = label != ignore_index
    in_range = (label >= 0) & (label < V)
    g_scale = tl.where(valid, scale, 0.0)
    offs = tl.arange(0, BLOCK_V)

    if SINGLE_BLOCK:
        col_ok = offs < V
        x = tl.load(base + offs, mask=col_ok, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=0)
        e = tl.exp2((x - m) * LOG2E)  # masked lanes: exp2(-inf) = 0
        s = tl.sum(e, axis=0)
        lse = m + tl.log2(s) * LN2
        x_label = tl.sum(tl.where(offs == label, x, 0.0), axis=0)
        g = (e / s - tl.where(offs == label, 1.0, 0.0)) * g_scale
        tl.store(base + offs, g.to(logits_ptr.dtype.element_ty), mask=col_ok)
    else:
        # pass 1: per-lane running max and sum of exponentials, combined at the end
        m_vec = tl.full([BLOCK_V], float("-inf"), tl.float32)
        s_vec = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m_vec, x)
            # lanes still at -inf stay at 0 (avoid -inf - -inf = nan)
            alpha = tl.where(m_new == float("-inf"), 0.0, tl.exp2((m_vec - m_new) * LOG2E))
            p = tl.where(m_new == float("-inf"), 0.0, tl.exp2((x - m_new) * LOG2E))
            s_vec = s_vec * alpha + p
            m_vec = m_new
        m = tl.max(m_vec, axis=0)
        s = tl.sum(s_vec * tl.exp2((m_vec - m) * LOG2E), axis=0)
        lse = m + tl.log2(s) * LN2
        safe_label = tl.where(in_range, label, 0)
        x_label = tl.load(base + safe_label).to(tl.float32)
        # pass 2: gradient, in place
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            col_ok = cols < V
            x = tl.load(base + cols, mask=col_ok, other=float("-inf")).to(tl.float32)
            g = (tl.exp2((x - lse) * LOG2E) - tl.where(cols == label, 1.0, 0.0)) * g_scale
            tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=col_ok)

    loss = tl.where(valid, (lse - x_label) * scale, 0.0)
    loss = tl.where(valid & (~in_range), float("nan"), loss)
    tl.store(loss_ptr + row, loss)


def cross_entropy_fwd_grad_(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
                            ignore_index: int, loss_out: torch.Tensor, block_v: int | None = None) -> None:
    """Per-row ``scale * CE(logits[i], labels[i])`` into ``loss_out`` and, in place over
    ``logits``, ``scale * (softmax(logits[i]) - onehot(labels[i]))``; ignored rows get 0.

    Args:
        logits: (C, V) float32 / float16 / bfloat16, unit column stride; overwritten.
        labels: (C,) int32 / int64.
        scale: (1,) float32 on the logits' device.
        ignore_index: label value whose rows do not count.
        loss_out: (C,) float32, written.
        block_v: force the looped path with this block width (a power of two); for tests.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be (C, V), got {getattr(logits, 'shape', type(logits).__name__)}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    C, V = logits.shape
    if C == 0 or V == 0:
        raise ValueError(f"logits must be non-empty, got {tuple(logits.shape)}")
    if logits.stride(1) != 1:
        raise ValueError(f"logits must have unit column stride, got strides {logits.stride()}")
    if tuple(labels.shape) != (C,) or labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"labels must be int32/int64 of shape ({C},), got {labels.dtype} {tuple(labels.shape)}")
    if tuple(loss_out.shape) != (C,) or loss_out.dtype != torch.float32 or not loss_out.is_contiguous():
        raise ValueError(f"loss_out must be contiguous float32 ({C},), got {loss_out.dtype} {tuple(loss_out.shape)}")
    if scale.numel() != 1 or scale.dtype != torch.float32:
        raise ValueError(f"scale must be a float32 tensor with one element, got {scale.dtype} {tuple(scale.shape)}")
    for name, t in (("labels", labels), ("scale", scale), ("loss_out", loss_out)):
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device}, logits on {logits.device}")
    if labels.stride(0) != 1:
        labels = labels.contiguous()
    if block_v is None and V <= MAX_SINGLE_BLOCK_V:
        block, single = next_power_of_2(V), True
    else:
        block, single = (block_v or _LOOP_BLOCK_V), False
        if block & (block - 1):
            raise ValueError(f"block_v must be a power of two, got {block}")
    num_warps = 16 if block >= 16384 else 8 if block >= 4096 else 4
    _ce_fwd_grad_kernel[(C,)](
        logits, labels, loss_out, scale, logits.stride(0), V, int(ignore_index),
        BLOCK_V=block, SINGLE_BLOCK=single, num_warps=num_warps,
    )
