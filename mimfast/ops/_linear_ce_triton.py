"""Triton branch of :func:`mimfast.ops.linear_cross_entropy`: BEiT's LM head + mean
cross-entropy without ever holding all (M, V) logits.

Forward, for each chunk of rows (a few thousand rows, about 64 MiB of logits):

    logits = hidden_c @ W^T + b                      # cuBLAS, into one reused chunk buffer
    loss_c, logits <- dlogits                        # mimfast.kernels.linear_ce, in place
    grad_hidden[c] = dlogits @ W                     # cuBLAS
    grad_W += dlogits^T @ hidden_c; grad_b += sum(dlogits)   # fp32 accumulators (the GEMM
                                                             # accumulates grad_W itself on CUDA)

so the gradients exist when the forward returns and the backward only scales them by the
incoming gradient (in place). Peak extra memory: one logits chunk + grad buffers the size of
the inputs, instead of the M x V logits, their fp32 copy and log-softmax that eager keeps.

Precision follows eager under autocast: hidden, W and b are cast to the autocast dtype (or
used as they are without autocast), the logits are rounded to that dtype by the matmul as in
eager, the loss and softmax are fp32, and grad_W / grad_b are accumulated in fp32 across
chunks (on CUDA each chunk's grad_W partial is produced in fp32 by cuBLAS where torch offers
it). The mean is over rows whose label is not ``ignore_index``; with no such row the loss is
NaN and the gradients zero, as ``F.cross_entropy``.

A second backward through the same graph raises (the gradient buffers are given away).
"""

from __future__ import annotations

import torch

from mimfast.kernels.gelu import column_sum
from mimfast.kernels.linear_ce import cross_entropy_fwd_grad_
from mimfast.ops._custom_op import kernel_op

__all__ = ["LinearCrossEntropy", "linear_cross_entropy_triton", "CHUNK_BYTES"]

CHUNK_BYTES = 64 * 2**20  # logits held at once
_mm_f32_ok = True  # torch.mm(..., out_dtype=float32) on CUDA; switched off at the first failure


def _mm_f32(a: torch.Tensor, b: torch.Tensor, fp32_out: bool = True) -> torch.Tensor:
    """a @ b for an fp32 destination: half/bf16 inputs land in fp32 straight from the GEMM's
    accumulator on CUDA with ``fp32_out``; else the product in their dtype, rounded as eager's
    GEMMs round it, which the caller's ``add_`` / ``copy_`` widens as it writes (no widened copy)."""
    global _mm_f32_ok
    if fp32_out and a.dtype != torch.float32 and a.is_cuda and _mm_f32_ok:
        try:
            return torch.ops.aten.mm.dtype(a, b, torch.float32)
        except (RuntimeError, AttributeError, TypeError, NotImplementedError):
            _mm_f32_ok = False
    return torch.mm(a, b)


_addmm_f32_ok = True  # aten::addmm.dtype_out into an fp32 accumulator on CUDA; off at the first failure


def _accumulate_f32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, fp32_out: bool = True) -> None:
    """``acc += a @ b`` for an fp32 ``acc``: half / bf16 operands on CUDA with ``fp32_out`` are
    accumulated by the GEMM itself (beta = 1, fp32 output: no (V, D) partial, no second pass);
    otherwise the product from :func:`_mm_f32` is added."""
    global _addmm_f32_ok
    if fp32_out and a.dtype != torch.float32 and a.is_cuda and _addmm_f32_ok:
        try:
            torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
            return
        except (RuntimeError, AttributeError, TypeError, NotImplementedError):
            _addmm_f32_ok = False
    acc.add_(_mm_f32(a, b, fp32_out))


def _mm_f32_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, fp32_out: bool = True) -> None:
    """``out[:] = a @ b`` for a contiguous fp32 ``out``: written by the GEMM on CUDA (half / bf16
    operands, ``fp32_out``), else the product from :func:`_mm_f32` copied in."""
    global _mm_f32_ok
    if fp32_out and a.dtype != torch.float32 and a.is_cuda and _mm_f32_ok and out.is_contiguous():
        try:
            torch.ops.aten.mm.dtype_out(a, b, torch.float32, out=out)
            return
        except (RuntimeError, AttributeError, TypeError, NotImplementedError):
            _mm_f32_ok = False
    out.copy_(_mm_f32(a, b, fp32_out))


def _compute_dtype(hidden, weight, bias):
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(
                f"linear_cross_entropy: {name} is {t.dtype} but hidden is {hidden.dtype}; use one dtype "
                "or run under torch.autocast"
            )
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"linear_cross_entropy (triton): hidden must be float32/float16/bfloat16, got {hidden.dtype}")
    return hidden.dtype


def _linear_ce_forward(hidden, weight, bias, labels, ignore_index, chunk_rows, need_h, need_w, need_b, cdt,
                       fp32_gemm_out=True):
    """The chunked loop; returns (loss, grad_hidden, grad_W fp32, grad_b fp32), None where not needed.
    ``fp32_gemm_out``: the gradient GEMMs of half / bf16 chunks write fp32 (CUDA); False: they
    write the compute dtype, as eager's, and grad_W's chunk partials are summed in fp32."""
    M, D = hidden.shape
    V = weight.shape[0]
    with torch.autocast(hidden.device.type, enabled=False):
        h = hidden.to(cdt)
        w = weight.to(cdt)
        b = bias.to(cdt) if bias is not None else None
        wt = w.t()  # (D, V) view

        n_valid = (labels != ignore_index).sum()
        scale = (1.0 / n_valid.to(torch.float32)).reshape(1)  # inf when no row counts
        loss_rows = torch.empty(M, device=hidden.device, dtype=torch.float32)
        gh = torch.empty(M, D, device=hidden.device, dtype=hidden.dtype) if need_h else None
        gw = torch.zeros(V, D, device=hidden.device, dtype=torch.float32) if need_w else None
        gb = torch.zeros(V, device=hidden.device, dtype=torch.float32) if need_b else None

        rows = chunk_rows or max(1, CHUNK_BYTES // (V * h.element_size()))
        rows = min(rows, M)
        buf = torch.empty(rows, V, device=hidden.device, dtype=cdt)
        for c0 in range(0, M, rows):
            c1 = min(c0 + rows, M)
            h_c = h[c0:c1]
            logits = buf[: c1 - c0]
            if b is not None:
                torch.addmm(b, h_c, wt, out=logits)
            else:
                torch.mm(h_c, wt, out=logits)
            cross_entropy_fwd_grad_(logits, labels[c0:c1], scale, ignore_index, loss_rows[c0:c1])
            dlogits = logits  # (c, V), overwritten in place by the kernel
            if gh is not None:
                if gh.dtype == cdt:
                    torch.mm(dlogits, w, out=gh[c0:c1])
                else:
                    _mm_f32_into(gh[c0:c1], dlogits, w, fp32_gemm_out)
            if gw is not None:
                _accumulate_f32(gw, dlogits.t(), h_c, fp32_gemm_out)
            if gb is not None:
                gb.add_(column_sum(dlogits))  # fp32 column sums in one pass (kernels.gelu)
        del buf
        loss = loss_rows.sum()
        loss = torch.where(n_valid == 0, torch.full_like(loss, float("nan")), loss)
    return loss, gh, gw, gb


# The whole chunked forward as one torch.library custom op (the fake gives shapes only), so
# torch.compile(fullgraph=True) traces the Function without entering the chunk loop or
# Triton's launcher (registered through mimfast.ops._custom_op). Gradients that are not
# needed come back as empty tensors.
@kernel_op("mimfast::linear_ce_fwd")
def _linear_ce_fwd_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                      ignore_index: int, chunk_rows: int, need_h: bool, need_w: bool, need_b: bool,
                      cdt: torch.dtype, fp32_gemm_out: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, gh, gw, gb = _linear_ce_forward(hidden, weight, bias, labels, ignore_index, chunk_rows or None,
                                          need_h, need_w, need_b, cdt, fp32_gemm_out)
    empty = hidden.new_empty((0,))
    return loss, (gh if gh is not None else empty), (gw if gw is not None else empty.clone()), \
        (gb if gb is not None else empty.clone())


@_linear_ce_fwd_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, chunk_rows, need_h, need_w, need_b, cdt, fp32_gemm_out=True):
    M, D = hidden.shape
    V = weight.shape[0]
    f32 = torch.float32
    return (hidden.new_empty((), dtype=f32),
            hidden.new_empty((M, D)) if need_h else hidden.new_empty((0,)),
            hidden.new_empty((V, D), dtype=f32) if need_w else hidden.new_empty((0,)),
            hidden.new_empty((V,), dtype=f32) if need_b else hidden.new_empty((0,)))


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, chunk_rows, need_h, need_w, need_b,
                fp32_gemm_out=True):
        cdt = _compute_dtype(hidden, weight, bias)
        ctx.compiled = torch.compiler.is_compiling()
        if ctx.compiled:
            loss, gh, gw, gb = _linear_ce_fwd_op(hidden, weight, bias, labels, ignore_index, chunk_rows or 0,
                                                 need_h, need_w, need_b, cdt, fp32_gemm_out)
            gw = gw.to(weight.dtype)
            gb = gb.to(bias.dtype) if bias is not None else gb
            ctx.save_for_backward(gh, gw, gb)
            ctx.needs = (need_h, need_w, need_b)
            return loss
        loss, gh, gw, gb = _linear_ce_forward(hidden, weight, bias, labels, ignore_index, chunk_rows,
                                              need_h, need_w, need_b, cdt, fp32_gemm_out)
        ctx.grads = (
            gh,
            gw.to(weight.dtype) if gw is not None else None,
            gb.to(bias.dtype) if gb is not None else None,
        )
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.compiled:  # a traced graph: out-of-place scale, which inductor fuses
            out = [(g.float() * grad_output).to(g.dtype) if need else None
                   for g, need in zip(ctx.saved_tensors, ctx.needs)]
            return out[0], out[1], out[2], None, None, None, None, None, None, None
        if ctx.used:
            raise RuntimeError(
                "linear_cross_entropy (triton): backward ran twice through the same graph; the "
                "gradients are computed in the forward and were given away by the first backward. "
                "Use backend='eager' to backpropagate through the loss more than once."
            )
        ctx.used = True
        grads, ctx.grads = ctx.grads, None
        out = []
        for g in grads:
            if g is not None:
                g.mul_(grad_output.to(g.device))
            out.append(g)
        return out[0], out[1], out[2], None, None, None, None, None, None, None


def linear_cross_entropy_triton(hidden, weight, bias, labels, ignore_index=-100, chunk_rows=None,
                                fp32_gemm_out=True):
    """The Triton backend of ``linear_cross_entropy``: 0-dim float32 mean cross-entropy.

    ``chunk_rows`` fixes the rows per chunk (default: about 64 MiB of logits per chunk).
    ``fp32_gemm_out=False``: on CUDA the gradient GEMMs of half / bf16 chunks write their own
    dtype, as eager's do, instead of fp32 (``benchmarks/bench_beit.py`` times both; the CPU
    always does so). Gradients flow to ``hidden``, ``weight`` and ``bias``; ``labels`` get none.
    """
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                   or chunk_rows <= 0):
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and hidden.requires_grad
    need_w = grad_on and weight.requires_grad
    need_b = grad_on and bias is not None and bias.requires_grad
    return LinearCrossEntropy.apply(hidden, weight, bias, labels, int(ignore_index), chunk_rows,
                                    need_h, need_w, need_b, bool(fp32_gemm_out))
