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
