"""The backward of a Linear inside mimfast's fused autograd Functions (``mlp``,
``self_attention``, ``gelu_linear``, the masked patch embedding, the LM head): the input and
weight gradients from cuBLAS, the bias gradient from the one-pass column sum
(:func:`mimfast.kernels.gelu.column_sum`; ``torch.sum(g, 0)``'s column reduction ran at about
40% of copy bandwidth in the H200 profile of the MAE step)."""

from __future__ import annotations

import torch

from mimfast.kernels.gelu import column_sum
from mimfast.ops._custom_op import as_dtype, kernel_op
from mimfast.ops._param_casts import weight_grad

__all__ = ["column_sum_op", "linear_grads", "param_dtypes"]


# a torch.library custom op (the fake gives the shape only): torch.compile(fullgraph=True)
# traces the Functions' backwards without entering Triton's launcher
@kernel_op("mimfast::column_sum")
def column_sum_op(x: torch.Tensor) -> torch.Tensor:
    return column_sum(x)


@column_sum_op.register_fake
def _(x):
    return x.new_empty((x.shape[-1],), dtype=torch.float32)


def param_dtypes(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """(weight's dtype, bias's dtype or None): what a Linear's parameter gradients are returned in
    (the ``dtypes`` of :func:`linear_grads` after the input's)."""
    return weight.dtype, (bias.dtype if bias is not None else None)


def linear_grads(g: torch.Tensor, inp: torch.Tensor | None, weight: torch.Tensor, dtypes, needs):
    """(d_inp, d_weight, d_bias) of ``y = inp @ weight.T + bias`` for ``g`` (M, out) and ``inp``
    (M, in), both in the dtype the Linear computed in, as is ``weight``; ``dtypes`` are those of
    (inp, weight, bias) to return the gradients in (bias None: no bias), ``needs`` which of the
    three to compute (None where not). ``inp`` may be None when its weight gradient is not needed."""
    inp_dtype, w_dtype, b_dtype = dtypes
    need_inp, need_w, need_b = needs
    d_inp = as_dtype(g @ weight, inp_dtype) if need_inp else None
    d_w = weight_grad(g, inp, w_dtype) if need_w else None  # fp32 from the matmul where it can
    d_b = as_dtype(column_sum_op(g), b_dtype) if need_b and b_dtype is not None else None
    return d_inp, d_w, d_b
