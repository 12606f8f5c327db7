"""Parameter casts under autocast without a kernel a parameter.

Under bf16 autocast every Linear casts its fp32 weight and bias to bf16 in the forward (one
copy kernel each), and its weight gradient, computed in bf16, is cast back to fp32 in the
backward (another). The third H200 run's MAE ViT-B/16 step ran 258 such copies (1.18 ms, about
4.6 us each: most of them a few MB, far below the copy bandwidth's size). The fused stack
(:func:`mimfast.nn.forward_blocks`) and mimfast's autograd Functions remove both kinds:

- :func:`batched_casts`: at the start of a block stack's forward, every parameter its fused
  ops will cast is copied to the autocast dtype by one ``torch._foreach_copy_`` (a few
  multi-tensor launches instead of one kernel a tensor); inside the block, :func:`cast_param`
  returns those copies. The values are those of ``t.to(dtype)`` (the same round to nearest).
- :func:`weight_grad`: a Linear's weight gradient ``g.T @ inp`` from 16-bit operands written
  in fp32 by the matmul itself (``torch.mm(..., out_dtype=torch.float32)``, CUDA, torch >= 2.8,
  checked to work once per device) where the weight is fp32: no bf16 result written, read and
  cast. It differs from eager's in one rounding fewer (eager rounds the fp32 product to bf16 and
  casts that up).

Neither applies under ``torch.compile`` tracing (inductor fuses the casts itself) nor off
autocast.
"""

from __future__ import annotations

import contextlib
import threading

import torch

__all__ = ["batched_casts", "cast_param", "weight_grad", "fp32_weight_grads"]

_state = threading.local()
_HALF = (torch.float16, torch.bfloat16)


def _alias_key(t: torch.Tensor) -> tuple:
    # the storage a tensor reads: a detached parameter (a bias whose gradient someone else sums)
    # is another tensor object over the same values
    return t.data_ptr(), t.shape


@contextlib.contextmanager
def batched_casts(tensors, device_type: str):
    """Inside the block, :func:`cast_param` returns each of ``tensors`` (None entries skipped) in
    the autocast dtype from one batched copy made on entry.

    Nothing is done off autocast, with gradients off (an evaluation forward frees each copy after
    its layer; here they would all live to the end of the block), or under ``torch.compile``
    tracing. The copies are kept until the block ends (autograd keeps them for the backward
    anyway: the Linears save their operands).
    """
    if (not torch.is_autocast_enabled(device_type) or not torch.is_grad_enabled()
            or torch.compiler.is_compiling()):
        yield
        return
    cd = torch.get_autocast_dtype(device_type)
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    seen = set()
    for t in tensors:
        if t is None or t.dtype == cd or id(t) in seen or not t.is_floating_point() or t.device.type != device_type:
            continue
        seen.add(id(t))
        groups.setdefault(t.dtype, []).append(t)
    by_id, by_alias = {}, {}
    with torch.no_grad():
        for srcs in groups.values():  # one source dtype a call: torch's multi-tensor fast path
            dsts = [torch.empty(s.shape, dtype=cd, device=s.device) for s in srcs]
            torch._foreach_copy_(dsts, srcs)
            for s, d in zip(srcs, dsts):
                by_id[id(s)] = by_alias[_alias_key(s)] = (s, d)
    previous = getattr(_state, "casts", None)
    _state.casts = ({**previous[0], **by_id}, {**previous[1], **by_alias}) if previous else (by_id, by_alias)
    try:
        yield
    finally:
        _state.casts = previous


def cast_param(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t.to(dtype)``: the batched copy where :func:`batched_casts` made one, else a cast now
    (nothing where ``t`` has the dtype). The result carries no gradient to ``t``: for the
    autograd Functions' forwards, whose backwards return the parameters' gradients themselves."""
    if t is None or t.dtype == dtype:
        return t
    casts = getattr(_state, "casts", None)
    if casts is not None:
        hit = casts[0].get(id(t))  # the parameter itself (the sources are kept alive: ids stay theirs)
        if hit is None or hit[0] is not t:
            hit = casts[1].get(_alias_key(t))  # a detached alias of one
            if hit is not None and (hit[0].stride() != t.stride() or hit[0].dtype != t.dtype
                                    or hit[0].device != t.device):
                hit = None
        if hit is not None and hit[1].dtype == dtype:
            return hit[1]
    return t.to(dtype)


# the overload came with its CUDA kernel (16-bit operands, fp32 output; torch 2.8)
MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


_MM_CHECKED: dict[tuple[int, torch.dtype], bool] = {}


def _check_mm_out_dtype(device_index: int, dtype: torch.dtype) -> bool:
    """Whether this device's ``torch.mm(a.T, b, out_dtype=torch.float32)`` runs and gives the
    product (a weight gradient's operands: a transposed view and a row-major matrix)."""
    dev = torch.device("cuda", device_index)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(40, 24, generator=g).to(dev, dtype)
    b = torch.randn(40, 16, generator=g).to(dev, dtype)
    try:
        got = torch.mm(a.t(), b, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    want = a.double().t() @ b.double()
    return got.dtype == torch.float32 and got.shape == (24, 16) and bool((got.double() - want).abs().max() < 1e-3)


def fp32_weight_grads(g: torch.Tensor, w_dtype: torch.dtype) -> bool:
    """Whether :func:`weight_grad` writes the weight gradient in fp32 from the matmul itself: an
    fp32 weight, 16-bit operands, not under ``torch.compile`` tracing, on a CUDA device whose
    ``mm(..., out_dtype=)`` was checked to work (once per device and dtype; not during a CUDA-graph
    capture, which the check's read of the result would break: the eager steps before a capture
    make it)."""
    if not (w_dtype == torch.float32 and g.dtype in _HALF and g.device.type == "cuda" and MM_OUT_DTYPE
            and not torch.compiler.is_compiling()):
        return False
    key = (g.device.index if g.device.index is not None else torch.cuda.current_device(), g.dtype)
    ok = _MM_CHECKED.get(key)
    if ok is None:
        if torch.cuda.is_current_stream_capturing():
            return False
        ok = _MM_CHECKED[key] = _check_mm_out_dtype(*key)
    return ok


def weight_grad(g: torch.Tensor, inp: torch.Tensor, w_dtype: torch.dtype) -> torch.Tensor:
    """``(g.T @ inp)`` in ``w_dtype``: g (M, out) and inp (M, in) in the dtype the Linear
    computed in; fp32 straight from the matmul where :func:`fp32_weight_grads` allows."""
    if fp32_weight_grads(g, w_dtype):
        return torch.mm(g.t(), inp, out_dtype=torch.float32)
    d_w = g.t() @ inp
    return d_w if d_w.dtype == w_dtype else d_w.to(w_dtype)
