"""Kernel launches as ``torch.library`` custom ops that cost nothing extra in eager mode.

The Triton paths' autograd Functions launch their kernels through custom ops (with fake,
shape-only implementations) so that ``torch.compile(fullgraph=True)`` traces them without
entering Triton's launcher. A custom op called in eager mode goes through the dispatcher
(``OpOverload.__call__``, the autograd fallback's ``redispatch_no_grad``), tens of
microseconds per launch, which at MAE shapes is as long as the kernel itself.

:func:`kernel_op` registers the op and returns a callable that runs the Python implementation
directly when nothing needs the dispatcher, and the registered op otherwise:

- under ``torch.compile`` / ``torch.export`` tracing (``torch.compiler.is_compiling()``; the
  traced graph holds the op and its fake),
- inside a ``TorchDispatchMode`` (fake tensors, ``make_fx``, FLOP counters, a recording mode),
- inside a functorch transform (``vmap``, ``grad``), which needs the op's registrations.

The implementation runs with gradient recording off, as the dispatcher runs it.
"""

from __future__ import annotations

import torch

from mimfast.ops._param_casts import cast_param  # the batched copies of a fused stack, where made

__all__ = ["kernel_op", "ALWAYS_DISPATCH", "as_dtype", "autocast_operands", "compute_dtype"]

# True: every call goes through the registered op, as before this module existed
# (benchmarks.host_overhead's "triton_dispatch" rows measure what skipping it saves).
ALWAYS_DISPATCH = False

_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_active = torch._C._are_functorch_transforms_active
_grad_enabled = torch.is_grad_enabled
_no_grad = torch.no_grad


def kernel_op(name: str, *, mutates_args=()):
    """Decorator: ``torch.library.custom_op(name, mutates_args=...)`` of the decorated function,
    returned as a callable that skips the dispatcher in plain eager mode (module docstring).

    The callable has ``register_fake`` (as the custom op's), ``op`` (the registered op) and
    ``impl`` (the undecorated function).
    """

    def register(impl):
        op = torch.library.custom_op(name, impl, mutates_args=mutates_args)

        def call(*args, **kwargs):
            if ALWAYS_DISPATCH or _is_compiling() or _dispatch_modes() or _functorch_active():
                return op(*args, **kwargs)
            if _grad_enabled():  # e.g. a backward with create_graph=True
                with _no_grad():
                    return impl(*args, **kwargs)
            return impl(*args, **kwargs)

        call.__name__ = impl.__name__
        call.__qualname__ = impl.__qualname__
        call.__doc__ = impl.__doc__
        call.op = op
        call.impl = impl
        call.register_fake = op.register_fake
        return call

    return register


def compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype ``F.linear`` computes in for an input of ``dtype``: the autocast dtype when
    autocast is on (the Functions' backwards run without autocast and cast as it did)."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def autocast_operands(x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``x`` and ``weights`` in the autocast dtype where autocast is on for ``x``'s device (the
    casts ``F.linear`` makes), else as they are (mixed dtypes then fail in ``F.linear`` as in
    eager). The weights' copies carry no gradient: for the autograd Functions' forwards."""
    kind = x.device.type
    if not torch.is_autocast_enabled(kind):
        return (x, *weights)
    cd = torch.get_autocast_dtype(kind)
    return (as_dtype(x, cd), *(cast_param(w, cd) for w in weights))


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, skipped where ``t`` has that dtype already: a same-dtype ``.to()`` still
    costs about 2 µs of argument parsing, on the Functions' per-call paths."""
    return t if t.dtype == dtype else t.to(dtype)
