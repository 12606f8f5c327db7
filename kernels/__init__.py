"""Triton kernels of mimfast and their launch functions (installed as ``mimfast.kernels``)."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (the launchers size persistent grids by it)."""
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


# The launchers' grid and block arithmetic in plain ints: triton.cdiv and triton.next_power_of_2
# are constexpr functions costing microseconds a call, and a launch asks for several.
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0 (``triton.cdiv``)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n for n >= 1, 0 for n = 0 (``triton.next_power_of_2``)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
