"""Triton branch of :func:`mimfast.ops.masked_patch_loss`: an autograd Function over
``mimfast.kernels.patch_loss``.

The forward writes d(loss)/d(pred) while it computes the loss, so the backward is one in-place
scale by the incoming gradient, which the kernel skips on the device when that gradient is 1
(``loss.backward()``). The gradient buffer is handed to autograd by the first backward; a second
backward through the same graph (``retain_graph=True``) raises instead of returning a wrong
answer.
"""

from __future__ import annotations

import torch

from mimfast.kernels.patch_loss import patch_loss_bwd_scale_, patch_loss_fwd
from mimfast.ops._custom_op import kernel_op

__all__ = ["MaskedPatchLoss", "masked_patch_loss_triton"]


# The kernel launch as a torch.library custom op (the fake gives shapes only), so
# torch.compile(fullgraph=True) traces the Function without entering Triton's launcher
# (eager calls skip the dispatcher: mimfast.ops._custom_op).
@kernel_op("mimfast::patch_loss_fwd")
def _patch_loss_fwd(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool,
                    loss: str, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return patch_loss_fwd(pred, imgs, mask, patch_size, norm_pix, loss, eps)


@_patch_loss_fwd.register_fake
def _(pred, imgs, mask, patch_size, norm_pix, loss, eps):
    return pred.new_empty((), dtype=torch.float32), pred.new_empty(pred.shape, dtype=pred.dtype)


class MaskedPatchLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, imgs, mask, patch_size, norm_pix, loss, eps):
        out, grad = _patch_loss_fwd(pred, imgs, mask, patch_size, norm_pix, loss, eps)
        ctx.compiled = torch.compiler.is_compiling()
        if ctx.compiled:  # a traced graph keeps the buffer as a saved tensor; inductor fuses the scale
            ctx.save_for_backward(grad)
        else:
            ctx.grad = grad if ctx.needs_input_grad[0] else None
            ctx.used = False
        return out

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.compiled:
            (grad,) = ctx.saved_tensors
            return (grad.float() * grad_output).to(grad.dtype), None, None, None, None, None, None
        if ctx.used:
            raise RuntimeError(
                "masked_patch_loss (triton): backward ran twice through the same graph; the "
                "gradient buffer is scaled in place and was given away by the first backward. "
                "Use backend='eager' to backpropagate through the loss more than once."
            )
        ctx.used = True
        grad, ctx.grad = ctx.grad, None  # drop our reference so autograd may take the buffer
        if grad is not None:
            patch_loss_bwd_scale_(grad, grad_output)
        return grad, None, None, None, None, None, None


def masked_patch_loss_triton(pred, imgs, mask, patch_size, norm_pix, loss, eps):
    """The Triton backend of ``masked_patch_loss``: 0-dim float32 loss, gradient to ``pred`` only."""
    if torch.is_grad_enabled():
        for name, t in (("imgs", imgs), ("mask", mask)):
            if t.requires_grad:
                raise ValueError(
                    f"masked_patch_loss (triton) gives a gradient to pred only, but {name} requires "
                    f"grad; detach it or use backend='eager'"
                )
    return MaskedPatchLoss.apply(pred, imgs, mask, patch_size, norm_pix, loss, eps)
