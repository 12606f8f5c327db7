"""Fused LM head + cross-entropy (ops.linear_cross_entropy, Triton branch) against
F.cross_entropy(x @ W.T + b): loss and every gradient, odd shapes, V = 8192 and 8191, several
chunks with a ragged tail, ignore_index, autocast; the per-row kernel on its own, both paths."""

import pytest
import torch
import torch.nn.functional as F

from mimfast import ops
from mimfast.kernels.linear_ce import cross_entropy_fwd_grad_
from mimfast.ops._linear_ce_triton import linear_cross_entropy_triton
from tolerance import DEVICE, FLOAT_DTYPES, assert_2x_rule, max_err, poison_, poison_new_buffers

@pytest.fixture(autouse=True)
def _poison_new_buffers(monkeypatch):
    """Every buffer the op allocates (per-row losses, grad_hidden, the logits chunk) starts as
    NaN, so a row the kernel or the chunk loop forgets to write fails the comparison."""
    poison_new_buffers(monkeypatch)


# (M, D, V, chunk_rows): odd everything with 3 chunks and a tail; the BEiT vocabulary in one chunk
SHAPES = [(47, 123, 8191, 20), (24, 64, 8192, None)]
if DEVICE == "cuda":
    SHAPES += [(4099, 768, 8192, None), (19200, 768, 8192, None)]


def _inputs(M, D, V, dtype, device, bias=True, ignore=0.2, ignore_index=-100):
    h = torch.randn(M, D, device=device).to(dtype).requires_grad_()
    w = (torch.randn(V, D, device=device) * D ** -0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, device=device) * 0.5).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (M,), device=device)
    labels[torch.rand(M, device=device) < ignore] = ignore_index
    return h, w, b, labels


def _grads(loss, tensors):
    grads = torch.autograd.grad(loss, [t for t in tensors if t is not None])
    it = iter(grads)
    return [next(it) if t is not None else None for t in tensors]


def _f64_reference(h, w, b, labels, ignore_index=-100):
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (h, w, b)]
    logits = leaves[0] @ leaves[1].t() + (leaves[2] if leaves[2] is not None else 0)
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index)
    return loss, _grads(loss, leaves)


def _grad_atol(g: torch.Tensor, ref64: torch.Tensor) -> float:
    """fp32 gradients: a few ulps of the largest value (an absolute 1e-6 was 1e-4 of these small
    mean-loss gradients and passed a gradient 1e-5 off); low precision: 1e-5."""
    return 2e-6 * ref64.abs().max().item() if g.dtype == torch.float32 else 1e-5


CASES = [(shape, dtype) for shape in SHAPES for dtype in FLOAT_DTYPES
         if DEVICE == "cuda" or shape[2] == 8192 or dtype != torch.bfloat16]  # interpreter time


@pytest.mark.parametrize("shape,dtype", CASES)
def test_loss_and_grads_vs_eager(shape, dtype, device):
    M, D, V, chunk_rows = shape
    h, w, b, labels = _inputs(M, D, V, dtype, device)
    loss = linear_cross_entropy_triton(h, w, b, labels, -100, chunk_rows=chunk_rows)
    grads = _grads(loss, (h, w, b))
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert [g.dtype for g in grads] == [dtype] * 3

    ref = ops.linear_cross_entropy_reference(h, w, b, labels)  # eager, same precision
    ref_grads = _grads(ref, (h, w, b))
    ref64, ref64_grads = _f64_reference(h, w, b, labels)
    if dtype == torch.float32:
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7, msg=name)
    atol = 1e-6 if dtype == torch.float32 else 1e-5
    assert_2x_rule("loss", loss, ref, ref64, atol=atol)
    for name, g, r, r64 in zip(("hidden", "weight", "bias"), grads, ref_grads, ref64_grads):
        assert_2x_rule(f"grad {name}", g, r, r64, atol=_grad_atol(g, r64))


def test_no_bias_frozen_weight_and_grad_scale(device):
    M, D, V = 33, 40, 1000
    h, w, _, labels = _inputs(M, D, V, torch.float32, device, bias=False)
    w.requires_grad_(False)
    loss = linear_cross_entropy_triton(h, w, None, labels, chunk_rows=8)
    (g,) = torch.autograd.grad(3.0 * loss, h)
    ref = ops.linear_cross_entropy_reference(h, w, None, labels)
    (rg,) = torch.autograd.grad(3.0 * ref, h)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-7)
    ref64, (g64, _, _) = _f64_reference(h, w, None, labels)
    assert_2x_rule("loss", loss, ref, ref64, atol=1e-6)
    assert_2x_rule("grad hidden", g, rg, 3.0 * g64, atol=_grad_atol(g, g64))


@pytest.mark.parametrize("ignore_index", [-100, 7])
def test_ignore_index(ignore_index, device):
    M, D, V = 29, 32, 520
    h, w, b, labels = _inputs(M, D, V, torch.float32, device, ignore=0.4, ignore_index=ignore_index)
    labels[:3] = ignore_index
    loss = ops.linear_cross_entropy(h, w, b, labels, ignore_index=ignore_index, backend="triton")
    grads = _grads(loss, (h, w, b))
    ref = F.cross_entropy(F.linear(h, w, b), labels, ignore_index=ignore_index)
    ref_grads = _grads(ref, (h, w, b))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)
    ref64, ref64_grads = _f64_reference(h, w, b, labels, ignore_index=ignore_index)
    assert_2x_rule("loss", loss, ref, ref64, atol=1e-6)
    for name, g, r, r64 in zip(("hidden", "weight", "bias"), grads, ref_grads, ref64_grads):
        assert_2x_rule(f"grad {name}", g, r, r64, atol=_grad_atol(g, r64))
    assert torch.all(grads[0][labels == ignore_index] == 0)


def test_all_rows_ignored_is_nan_with_zero_grads_as_eager(device):
    h, w, b, labels = _inputs(9, 16, 100, torch.float32, device)
    labels.fill_(-100)
    loss = linear_cross_entropy_triton(h, w, b, labels)
    grads = _grads(loss, (h, w, b))
    assert torch.isnan(loss)
    assert all(torch.all(g == 0) for g in grads)


def test_out_of_range_label_gives_nan(device):
    h, w, b, labels = _inputs(9, 16, 100, torch.float32, device, ignore=0.0)
    labels[4] = 100
    with torch.no_grad():
        assert torch.isnan(linear_cross_entropy_triton(h, w, b, labels))


@pytest.mark.parametrize("fp32_gemm_out", [True, False])
def test_autocast_matches_eager_autocast(fp32_gemm_out, device):
    """The model's case: fp32 hidden and weights, bf16 autocast; the loss is fp32. On CUDA the
    gradient GEMMs write fp32 from their accumulator, or bf16 as eager's (``fp32_gemm_out``);
    the CPU always rounds to bf16 first."""
    M, D, V = 21, 48, 8192
    h, w, b, labels = _inputs(M, D, V, torch.float32, device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        loss = linear_cross_entropy_triton(h, w, b, labels, chunk_rows=8, fp32_gemm_out=fp32_gemm_out)
        ref = ops.linear_cross_entropy_reference(h, w, b, labels)
    grads = _grads(loss, (h, w, b))
    ref_grads = _grads(ref, (h, w, b))
    ref64, ref64_grads = _f64_reference(h, w, b, labels)
    assert [g.dtype for g in grads] == [torch.float32] * 3
    assert_2x_rule("loss", loss, ref, ref64, atol=1e-5)
    for name, g, r, r64 in zip(("hidden", "weight", "bias"), grads, ref_grads, ref64_grads):
        assert_2x_rule(f"grad {name}", g, r, r64, atol=1e-5)


def test_no_grad_forward_and_dispatch(device):
    h, w, b, labels = _inputs(17, 24, 300, torch.float32, device)
    with torch.no_grad():
        loss = ops.linear_cross_entropy(h, w, b, labels, backend="triton")
    torch.testing.assert_close(loss, ops.linear_cross_entropy_reference(h, w, b, labels).detach(),
                               rtol=1e-5, atol=1e-6)
    assert loss.grad_fn is None


def test_second_backward_raises(device):
    h, w, b, labels = _inputs(5, 8, 64, torch.float32, device)
    loss = linear_cross_entropy_triton(h, w, b, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_bad_input(device):
    h, w, b, labels = _inputs(5, 8, 64, torch.float32, device)
    with pytest.raises(TypeError, match="weight"):
        linear_cross_entropy_triton(h, w.detach().half(), b, labels)
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy_triton(h, w, b, labels, chunk_rows=0)
    with pytest.raises(ValueError, match="labels"):
        ops.linear_cross_entropy(h, w, b, labels[:4], backend="triton")
    with pytest.raises(ValueError, match="weight"):
        ops.linear_cross_entropy(h, w[:, :7], b, labels, backend="triton")
    logits = torch.randn(4, 10, device=device)
    loss_out = torch.empty(4, device=device)
    scale = torch.ones(1, device=device)
    with pytest.raises(ValueError, match="unit column stride"):
        cross_entropy_fwd_grad_(logits.t().contiguous().t(), labels[:4], scale, -100, loss_out)
    with pytest.raises(TypeError, match="logits"):
        cross_entropy_fwd_grad_(logits.double(), labels[:4], scale, -100, loss_out)
    with pytest.raises(ValueError, match="block_v"):
        cross_entropy_fwd_grad_(logits, labels[:4], scale, -100, loss_out, block_v=48)


@pytest.mark.parametrize("block_v", [None, 256])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_row_kernel_both_paths(block_v, dtype, device):
    """One chunk straight through the kernel: registers (None) and the two-pass loop (256 < V)."""
    C, V = 7, 600
    x = (torch.randn(C, V, device=device) * 3).to(dtype)
    labels = torch.randint(0, V, (C,), device=device)
    labels[2] = -1
    scale = torch.full((1,), 1.0 / 6, device=device)
    loss = poison_(torch.empty(C, device=device))
    buf = poison_(torch.empty(C, V + 24, device=device, dtype=dtype))
    logits = buf[:, :V]  # row stride != V
    logits.copy_(x)
    cross_entropy_fwd_grad_(logits, labels, scale, -1, loss, block_v=block_v)
    assert torch.isnan(buf[:, V:]).all()  # nothing written past the row

    xd = x.double().requires_grad_()
    ref = F.cross_entropy(xd, labels, ignore_index=-1, reduction="none") / 6
    (ref_grad,) = torch.autograd.grad(ref.sum(), xd)
    ref_lowp = F.cross_entropy(x.float(), labels, ignore_index=-1, reduction="none") / 6
    assert max_err(loss, ref) < 1e-6
    assert max_err(loss, ref_lowp) < 1e-6
    tol = {torch.float32: 2e-7, torch.float16: 1e-4, torch.bfloat16: 8e-4}[dtype]  # > half an ulp of 1/6
    assert max_err(logits, ref_grad) < tol
    assert torch.all(logits[2] == 0)


def test_fp32_accumulation():
    """grad_W's chunk partials are accumulated in fp32: by the GEMM itself on CUDA (beta = 1,
    fp32 output), by an add elsewhere; both equal the fp32 sum of the products."""
    from mimfast.ops import _linear_ce_triton as T

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    acc = torch.randn(40, 24, device=dev, generator=g)
    want = acc.clone()
    for _ in range(3):
        a = torch.randn(40, 300, device=dev, generator=g).to(dt)
        b = torch.randn(300, 24, device=dev, generator=g).to(dt)
        want += a.double().matmul(b.double()).float()
        T._accumulate_f32(acc, a, b)
    torch.testing.assert_close(acc, want, rtol=1e-4, atol=1e-3)
    out = torch.full((80, 24), float("nan"), device=dev)
    T._mm_f32_into(out[40:], a, b)  # a row slice of the hidden gradient, written in place
    torch.testing.assert_close(out[40:], a.double().matmul(b.double()).float(), rtol=1e-4, atol=1e-3)
    assert out[:40].isnan().all()
    if dev == "cuda":
        assert T._addmm_f32_ok and T._mm_f32_ok  # the GEMMs wrote fp32, no fallback
