"""Backend dispatch: which implementation of an op runs for given tensors.

- CUDA tensors -> the Triton kernel.
- CPU tensors -> the eager reference, unless Triton's interpreter is on
  (``TRITON_INTERPRET=1`` set before kernels are defined), in which case the Triton kernel
  runs on the CPU. The test suite uses this to prove kernels on machines without a GPU.
- ``backend="eager" | "triton" | "auto"`` on each op, or the :func:`use_backend` context
  manager for everything inside it, forces a choice. Forcing ``"triton"`` where it cannot run
  raises :class:`BackendUnavailableError`; there is never a silent fallback.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading

import torch

BACKENDS = ("auto", "eager", "triton")

_state = threading.local()


class BackendUnavailableError(RuntimeError):
    """The Triton backend was forced where it cannot run."""


def triton_interpreter_on() -> bool:
    """True when ``TRITON_INTERPRET`` asks Triton to interpret kernels on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@functools.cache  # every op call asks: the import statement alone cost microseconds each time
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a hard dependency
        return False
    return True


def check_backend_name(backend: str, name: str = "backend") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{name} must be one of {BACKENDS}, got {backend!r}")
    return backend


@contextlib.contextmanager
def use_backend(backend: str):
    """Force the backend of every op called with ``backend="auto"`` inside the block."""
    check_backend_name(backend)
    previous = getattr(_state, "forced", "auto")
    _state.forced = backend
    try:
        yield
    finally:
        _state.forced = previous


_CPU = torch.device("cpu")


def triton_can_run(device: torch.device) -> bool:
    if not _triton_importable():
        return False
    kind = device.type
    return kind == "cuda" or (kind == "cpu" and triton_interpreter_on())


def resolve(backend: str, *tensors: torch.Tensor, op: str = "op") -> str:
    """Return ``"eager"`` or ``"triton"`` for an op called on ``tensors``."""
    # every op call asks: the common cases first
    if backend == "auto":
        backend = getattr(_state, "forced", "auto")  # checked by use_backend
    elif backend not in BACKENDS:
        check_backend_name(backend)
    if backend == "eager":
        return "eager"
    device = _CPU
    for t in tensors:  # the first tensor's device (a loop: a generator costs a microsecond more)
        if isinstance(t, torch.Tensor):
            device = t.device
            break
    can_run = triton_can_run(device)
    if backend == "triton":
        if not can_run:
            raise BackendUnavailableError(
                f"{op}: backend='triton' cannot run on {device.type} tensors; Triton needs CUDA "
                "tensors, or CPU tensors with TRITON_INTERPRET=1 set before mimfast is imported"
            )
        return "triton"
    return "triton" if can_run else "eager"


def lazy_import(name: str):
    """A function that returns module ``name``, imported at its first call and kept: the ops'
    Triton branches import triton only when first taken, and cost one call after that. The
    module is kept, not one of its functions, so a function replaced on the module (a test's
    spy) is the one called."""
    module = None

    def get():
        nonlocal module
        if module is None:
            module = importlib.import_module(name)
        return module

    return get
