"""The fused stack's parameter casts under autocast (mimfast/ops/_param_casts.py): one batched
copy of every parameter its fused ops cast, results bit-identical to a cast per op; weight
gradients in fp32 from the matmul on CUDA."""

import contextlib
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mimfast.nn.blocks as blocks_module
from mimfast.ops._param_casts import batched_casts, cast_param, fp32_weight_grads, weight_grad
from test_add_layer_norm import _stack_grads, _timm_stack

DEVICE = os.environ.get("MIMFAST_TEST_DEVICE", "cpu")
# the interpreter's bf16 dot products are wrong (triton-lang/triton#11584): fp16 autocast there
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16


class _Ops(TorchDispatchMode):
    """Records every aten op with its first argument."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args[0] if args else None))
        return func(*args, **(kwargs or {}))


def _autocast_grads(blocks, norm, x):
    with torch.autocast(DEVICE, dtype=HALF):
        return _stack_grads(blocks, norm, x, fused=True, kernels="triton")


def test_batched_casts_give_the_per_op_casts_results(monkeypatch):
    """The fused stack under autocast with its parameters cast in one batch and with a cast per
    op: the same output and gradients, bit for bit (the same rounding of the same values)."""
    blocks, norm = _timm_stack(depth=2)
    x = torch.randn(2, 11, 48, device=DEVICE)
    y0, g0 = _autocast_grads(blocks, norm, x)
    monkeypatch.setattr(blocks_module, "batched_casts", lambda *a, **k: contextlib.nullcontext())
    y1, g1 = _autocast_grads(blocks, norm, x)
    assert y0.dtype == y1.dtype and torch.equal(y0, y1)
    params = [x] + list(blocks.parameters()) + list(norm.parameters())
    for p, a, b in zip(params, g0, g1):
        assert a.dtype == b.dtype == p.dtype and torch.equal(a, b), tuple(p.shape)


def test_fused_stack_casts_its_parameters_in_one_batch():
    """Under autocast the stack's forward casts no Linear parameter one at a time: one
    ``_foreach_copy_`` of every weight and bias of the one-op attentions and fused MLPs."""
    blocks, norm = _timm_stack(depth=2)
    linear_params = [p for n, p in blocks.named_parameters() if any(k in n for k in ("qkv", "proj", "fc1", "fc2"))]
    assert len(linear_params) == 16
    ptrs = {p.data_ptr() for p in linear_params}
    x = torch.randn(2, 11, 48, device=DEVICE, requires_grad=True)
    with _Ops() as rec, torch.autocast(DEVICE, dtype=HALF):
        blocks_module.forward_blocks(x, blocks, norm, kernels="triton")
    one_at_a_time = [f for f, a in rec.calls if f is torch.ops.aten._to_copy.default and a.data_ptr() in ptrs]
    assert one_at_a_time == []
    batched = [a for f, a in rec.calls if f is torch.ops.aten._foreach_copy_.default]
    assert len(batched) == 1 and len(batched[0]) == 16


def test_no_batch_without_autocast_or_gradients():
    """Off autocast nothing is cast; without gradients (evaluation) each op casts its own, so each
    copy is freed after its layer."""
    blocks, norm = _timm_stack(depth=1)
    x = torch.randn(2, 11, 48, device=DEVICE)
    for autocast, grad in ((False, True), (True, False)):
        with _Ops() as rec, torch.autocast(DEVICE, dtype=HALF, enabled=autocast), torch.set_grad_enabled(grad):
            blocks_module.forward_blocks(x, blocks, norm, kernels="triton")
        assert not any(f is torch.ops.aten._foreach_copy_.default for f, _ in rec.calls)


def test_cast_param_finds_the_batched_copy_by_storage():
    w = torch.randn(5, 3, device=DEVICE, requires_grad=True)
    b = torch.randn(5, device=DEVICE, requires_grad=True)
    other = torch.randn(5, device=DEVICE)
    with torch.autocast(DEVICE, dtype=HALF):
        with batched_casts([w, None, b, w], DEVICE):
            cw = cast_param(w, HALF)
            assert cw.dtype == HALF and torch.equal(cw, w.detach().to(HALF)) and not cw.requires_grad
            assert cast_param(w, HALF) is cw  # the same copy each time
            assert cast_param(b.detach(), HALF) is cast_param(b, HALF)  # a detached alias finds it too
            assert cast_param(b[:3], HALF) is not None and cast_param(b[:3], HALF).shape == (3,)  # a view: cast now
            fresh = cast_param(other, HALF)
            assert torch.equal(fresh, other.to(HALF))
            assert cast_param(w, torch.float64).dtype == torch.float64  # another dtype: cast now
            with batched_casts([other], DEVICE):  # nested: both sets
                assert cast_param(other, HALF) is cast_param(other, HALF) and cast_param(w, HALF) is cw
            assert cast_param(other, HALF) is not cast_param(other, HALF)  # the inner set is gone
        assert cast_param(w, HALF) is not cw  # outside: a cast each call
    assert cast_param(None, HALF) is None and cast_param(cw, HALF) is cw


@pytest.mark.parametrize("w_dtype", [torch.float32, None])
def test_weight_grad(w_dtype):
    """g.T @ inp in the parameter's dtype; on CUDA with an fp32 weight written in fp32 by the
    matmul, with at most eager's error against float64."""
    torch.manual_seed(0)
    g = torch.randn(333, 40, device=DEVICE).to(HALF)
    inp = torch.randn(333, 24, device=DEVICE).to(HALF)
    w_dtype = w_dtype or HALF
    got = weight_grad(g, inp, w_dtype)
    assert got.dtype == w_dtype and got.shape == (40, 24)
    eager = (g.t() @ inp).to(w_dtype)
    fp32_out = fp32_weight_grads(g, w_dtype)
    assert fp32_out == (DEVICE == "cuda" and w_dtype == torch.float32)
    if not fp32_out:
        assert torch.equal(got, eager)
        return
    exact = g.double().t() @ inp.double()
    assert (got.double() - exact).abs().max() <= (eager.double() - exact).abs().max()
    assert not torch.equal(got, eager)  # one rounding fewer than eager's bf16 product


@pytest.mark.skipif(DEVICE != "cuda", reason="fp32 weight gradients from the matmul: CUDA only (torch's mm.dtype)")
def test_fused_stack_backward_casts_no_weight_gradient():
    """On CUDA the fused stack's backward writes every Linear weight's gradient in fp32 from the
    matmul: no bf16-to-fp32 copy of a weight-shaped gradient."""
    blocks, norm = _timm_stack(depth=2)
    shapes = {tuple(p.shape) for n, p in blocks.named_parameters() if n.endswith("weight") and p.dim() == 2}
    x = torch.randn(2, 11, 48, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE, dtype=HALF):
        y = blocks_module.forward_blocks(x, blocks, norm, kernels="triton")
    with _Ops() as rec:
        y.float().sum().backward()
    casts = [tuple(a.shape) for f, a in rec.calls if f is torch.ops.aten._to_copy.default and a.dtype == HALF]
    assert not [s for s in casts if s in shapes], casts
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in blocks.parameters())
