"""A drop-in for timm's ``Mlp`` on :func:`mimfast.ops.mlp`.

Eager autograd keeps three tensors of a ViT block's MLP for the backward: fc1's input, fc1's
output ``h`` (for GELU's backward) and ``gelu(h)`` (for fc2's weight gradient). The last two are
each four times the block's width, so ``gelu(h)`` alone is about a fifth of what a block keeps.
:func:`mimfast.ops.mlp` keeps only ``h`` and recomputes ``gelu(h)`` in GELU's backward pass
(which reads ``h`` anyway), and sums fc1's bias gradient in the same pass; forward values are
eager's. :class:`Mlp` runs it wherever the module allows (exact GELU, no hidden norm, no dropout
at work, no hooks: :func:`mimfast.nn.mlp_fusable`), and timm's own forward otherwise.

It is timm's class with the same constructor, submodules and parameter names (``fc1``, ``act``,
``drop1``, ``norm``, ``fc2``, ``drop2``), so ``Block(..., mlp_layer=mimfast.nn.Mlp)`` works and
checkpoints move unchanged; :func:`patch_timm_mlp` switches the ``Mlp`` modules of an existing
model in place.
"""

from __future__ import annotations

import torch
from torch import nn
from timm.layers import Mlp as _TimmMlp

from mimfast import ops
from mimfast.backend import check_backend_name
from mimfast.nn.blocks import mlp_fusable

__all__ = ["Mlp", "patch_timm_mlp"]


class Mlp(_TimmMlp):
    """timm's ``Mlp`` running as :func:`mimfast.ops.mlp` where it can.

    Args:
        *args, **kwargs: timm ``Mlp``'s arguments (``in_features``, ``hidden_features``,
            ``out_features``, ``act_layer``, ``norm_layer``, ``bias``, ``drop``, ...).
        kernels: ``"auto"``, ``"eager"`` or ``"triton"`` (see :mod:`mimfast.backend`).
        fused: run as :func:`mimfast.ops.mlp` where the module allows it; False runs timm's
            forward (the models' ``fused_mlp`` switch sets it).
    """

    def __init__(self, *args, kernels: str = "auto", fused: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kernels = check_backend_name(kernels, "kernels")
        self.fused = bool(fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and mlp_fusable(self):
            return ops.mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, backend=self.kernels)
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"kernels={self.kernels!r}, fused={self.fused}"


def patch_timm_mlp(model: nn.Module, kernels: str = "auto") -> int:
    """Turn every timm ``Mlp`` inside ``model`` into :class:`Mlp`, in place.

    Only modules of exactly timm's ``Mlp`` class change (subclasses may change ``forward``); each
    keeps its submodules, parameters (optimizer state included) and ``state_dict`` keys, as only
    its class and two attributes change.

    Returns:
        The number of modules switched.
    """
    check_backend_name(kernels, "kernels")
    targets = [m for m in model.modules() if type(m) is _TimmMlp]
    for m in targets:
        m.__class__ = Mlp
        m.kernels = kernels
        m.fused = True
    return len(targets)
