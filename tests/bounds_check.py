"""Out-of-bounds check for kernels run by Triton's interpreter.

On a GPU a load or store outside every tensor is an illegal memory access that kills the CUDA
context (every later test in the process fails) or, worse, silently reads or overwrites a
neighbouring allocation. The interpreter dereferences raw addresses without looking. This
module makes it look: while a kernel runs, every unmasked address a load or store touches
must lie inside the memory of one tensor argument of that launch (the span of the view
itself, not just its storage), or the launch fails naming the kernel and the access.

``install()`` patches the interpreter in place; the test suite calls it when it runs kernels
interpreted (tests/conftest.py).
"""

from __future__ import annotations

import numpy as np
import torch

_spans: list[list[tuple[int, int]]] = []  # per active launch: [lo, hi) byte ranges of its tensors
_names: list[str] = []


def _span(t: torch.Tensor) -> tuple[int, int] | None:
    if t.numel() == 0:
        return None
    size = t.element_size()
    low = sum(min(0, (n - 1) * s) for n, s in zip(t.shape, t.stride()))
    high = sum(max(0, (n - 1) * s) for n, s in zip(t.shape, t.stride()))
    return t.data_ptr() + low * size, t.data_ptr() + (high + 1) * size


def _check(kind: str, ptrs, mask) -> None:
    if not _spans:
        return
    addr = ptrs.data
    if mask is not None:
        # as bool: a mask combined with a scalar condition can hold 0 / 1 integers, which would index
        addr = addr[np.broadcast_to(mask.data, addr.shape).astype(bool)]
    if addr.size == 0:
        return
    width = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
    addr = addr.astype(np.uint64).ravel()
    inside = np.zeros(addr.shape, dtype=bool)
    for lo, hi in _spans[-1]:
        inside |= (addr >= np.uint64(lo)) & (addr + np.uint64(width) <= np.uint64(hi))
    if not inside.all():
        bad = int(addr[~inside][0])
        spans = ", ".join(f"[{lo:#x}, {hi:#x})" for lo, hi in _spans[-1])
        raise AssertionError(f"{_names[-1]}: {kind} of {width} bytes at {bad:#x} is outside every tensor "
                             f"argument ({int((~inside).sum())} such addresses); arguments span {spans}")


def install() -> None:
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_mimfast_bounds_checked", False):
        return
    masked_load, masked_store = builder.create_masked_load, builder.create_masked_store

    def create_masked_load(self, ptrs, mask, other, *args):
        _check("load", ptrs, mask)
        return masked_load(self, ptrs, mask, other, *args)

    def create_masked_store(self, ptrs, value, mask, *args):
        _check("store", ptrs, mask)
        return masked_store(self, ptrs, value, mask, *args)

    builder.create_masked_load, builder.create_masked_store = create_masked_load, create_masked_store
    builder._mimfast_bounds_checked = True

    launch = interpreter.GridExecutor.__call__

    def call(self, *args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        _spans.append([s for s in map(_span, tensors) if s is not None])
        _names.append(getattr(self.fn, "__name__", str(self.fn)))
        try:
            return launch(self, *args, **kwargs)
        finally:
            _spans.pop()
            _names.pop()

    interpreter.GridExecutor.__call__ = call
