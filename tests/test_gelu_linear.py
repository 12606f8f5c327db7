"""fc2(gelu(h)) keeping only h (kernels/gelu.py): output and every gradient against eager and
float64 (2x rule), autocast, poisoned buffers, what autograd saves, bad input, and the block
stack with the fused MLP against the blocks' own forward."""

import pytest
import torch
import torch.nn.functional as F

from mimfast import ops
from mimfast.kernels import gelu as K
from tolerance import DEVICE, assert_2x_rule, max_err, poison_

SHAPES = [((2, 7), 40, 13), ((5,), 1, 3), ((3, 11), 96, 24), ((1, 50), 256, 64)]
if DEVICE == "cuda":
    SHAPES += [((64, 197), 2048, 512), ((32, 50), 3072, 768)]


@pytest.fixture(autouse=True)
def _poison_new_buffers(monkeypatch):
    monkeypatch.setattr(K, "_empty_like", lambda t: poison_(torch.empty_like(t, memory_format=torch.contiguous_format)))


def _inputs(lead, hidden, out, dtype=torch.float32, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    h = (torch.randn(*lead, hidden, device=DEVICE, generator=g) * 1.5).to(dtype)
    w = torch.randn(out, hidden, device=DEVICE, generator=g) * hidden ** -0.5
    b = torch.randn(out, device=DEVICE, generator=g) * 0.1
    gout = torch.randn(*lead, out, device=DEVICE, generator=g)
    return h, w, b, gout


def _run(h, w, b, gout, backend, cast=None, autocast=None):
    h, w = h.detach(), w.detach()
    b = b.detach() if b is not None else None
    if cast is not None:
        h, w, b = h.to(cast), w.to(cast), (b.to(cast) if b is not None else None)
    leaves = [t.requires_grad_(True) for t in (h, w, b) if t is not None]
    if autocast is not None:
        with torch.autocast(DEVICE, dtype=autocast):
            out = ops.gelu_linear(h, w, b, backend=backend)
    else:
        out = ops.gelu_linear(h, w, b, backend=backend)
    grads = torch.autograd.grad(out, leaves, gout.to(out.dtype))
    return out.detach(), grads


@pytest.mark.parametrize("lead,hidden,out", SHAPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False])
def test_fp32_matches_eager_and_float64(lead, hidden, out, with_bias):
    h, w, b, gout = _inputs(lead, hidden, out)
    b = b if with_bias else None
    ot, gt = _run(h, w, b, gout, "triton")
    oe, ge = _run(h, w, b, gout, "eager")
    o64, g64 = _run(h, w, b, gout, "eager", cast=torch.float64)
    assert torch.equal(ot, oe)  # the forward is eager's own calls
    assert len(gt) == len(ge) == (3 if with_bias else 2)
    for name, a, e, f in zip(("h", "weight", "bias"), gt, ge, g64):
        assert a.dtype == e.dtype, name
        # fp32: a few ulps of the largest gradient (1e-5 of it passed a GELU gradient 1e-5 off)
        assert_2x_rule(f"grad {name}", a, e, f, atol=1e-6 * max(1e-2, f.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["autocast", "model_in_dtype"])
def test_low_precision(dtype, mode):
    """Under autocast (fp32 weights, low-precision h as fc1 gives it) and with the whole MLP in
    the low dtype: output equal to eager, gradients within the 2x rule of float64."""
    lead, hidden, out = ((3, 9), 128, 32) if DEVICE == "cpu" else ((64, 197), 2048, 512)
    h, w, b, gout = _inputs(lead, hidden, out, dtype=dtype, seed=1)
    if mode == "autocast":
        ot, gt = _run(h, w, b, gout, "triton", autocast=dtype)
        oe, ge = _run(h, w, b, gout, "eager", autocast=dtype)
    else:
        ot, gt = _run(h, w.to(dtype), b.to(dtype), gout, "triton")
        oe, ge = _run(h, w.to(dtype), b.to(dtype), gout, "eager")
    o64, g64 = _run(h, w, b, gout, "eager", cast=torch.float64)
    assert ot.dtype == oe.dtype and torch.equal(ot, oe)
    for name, a, e, f in zip(("h", "weight", "bias"), gt, ge, g64):
        assert a.dtype == e.dtype, name
        assert_2x_rule(f"grad {name}", a, e, f, atol=1e-3 * max(1.0, f.abs().max().item()))


def _saved(fn, numel: int) -> int:
    """How many tensors of ``numel`` elements autograd saves for the backward of ``fn()``."""
    seen = []

    def pack(t):
        seen.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(1 for t in seen if t.numel() == numel)


def test_saves_only_the_gelu_input():
    """Autograd keeps h and the weight, not gelu(h): one hidden-width tensor fewer than eager."""
    h, w, b, gout = _inputs((4, 10), 64, 16)
    for backend, n in (("eager", 2), ("triton", 1)):
        fn = lambda: ops.gelu_linear(h.clone().requires_grad_(True), w.requires_grad_(True), b,  # noqa: E731
                                     backend=backend)
        assert _saved(fn, h.numel()) == n, backend


def test_kernel_alone_and_bad_input():
    h = torch.randn(3, 1000, device=DEVICE) * 3
    da = torch.randn(3, 1000, device=DEVICE)
    a, dh = K.gelu_bwd_recompute(h, da)
    hd = h.double().requires_grad_(True)
    ad = F.gelu(hd)
    (dhd,) = torch.autograd.grad(ad, hd, da.double())
    assert max_err(a, ad) < 1e-6 and max_err(dh, dhd) < 1e-5
    with pytest.raises(ValueError, match="da must have"):
        K.gelu_bwd_recompute(h, da[:, :10].contiguous())
    with pytest.raises(ValueError, match="contiguous"):
        K.gelu_bwd_recompute(h.t(), da.t())
    with pytest.raises(TypeError, match="h must be"):
        K.gelu_bwd_recompute(h.double(), da)
    w = torch.randn(8, 1000, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        ops.gelu_linear(h, w[:, :7], backend="triton")
    with pytest.raises(ValueError, match="bias"):
        ops.gelu_linear(h, w, torch.zeros(3, device=DEVICE), backend="triton")
    with pytest.raises(TypeError, match="float64"):
        ops.gelu_linear(h.double(), w.double(), backend="triton")


# ----------------------------------------------------------------------------------------------
# mlp: fc2(gelu(fc1(x))) with fc1's bias gradient summed in GELU's backward pass


MLP_SHAPES = [((2, 7), 24, 40, 13), ((5,), 3, 1, 3), ((3, 11), 32, 96, 24), ((1, 50), 64, 256, 64)]
if DEVICE == "cuda":
    MLP_SHAPES += [((64, 197), 512, 2048, 512), ((32, 50), 768, 3072, 768)]


def _mlp_inputs(lead, d_in, hidden, out, dtype=torch.float32, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(*lead, d_in, device=DEVICE, generator=g).to(dtype)
    w1 = torch.randn(hidden, d_in, device=DEVICE, generator=g) * d_in ** -0.5
    b1 = torch.randn(hidden, device=DEVICE, generator=g) * 0.5
    w2 = torch.randn(out, hidden, device=DEVICE, generator=g) * hidden ** -0.5
    b2 = torch.randn(out, device=DEVICE, generator=g) * 0.1
    gout = torch.randn(*lead, out, device=DEVICE, generator=g)
    return x, [w1, b1, w2, b2], gout


def _run_mlp(x, params, gout, backend, cast=None, autocast=None):
    x = x.detach().clone()
    params = [p.detach().clone() if p is not None else None for p in params]
    if cast is not None:
        x, params = x.to(cast), [p.to(cast) if p is not None else None for p in params]
    leaves = [t.requires_grad_(True) for t in [x] + params if t is not None]
    with torch.autocast(DEVICE, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = ops.mlp(x, *params, backend=backend)
    grads = torch.autograd.grad(out, leaves, gout.to(out.dtype))
    return out.detach(), grads


@pytest.mark.parametrize("lead,d_in,hidden,out", MLP_SHAPES, ids=str)
@pytest.mark.parametrize("biases", [(True, True), (False, True), (True, False)], ids=str)
def test_mlp_fp32_matches_eager_and_float64(lead, d_in, hidden, out, biases):
    x, (w1, b1, w2, b2), gout = _mlp_inputs(lead, d_in, hidden, out)
    params = [w1, b1 if biases[0] else None, w2, b2 if biases[1] else None]
    ot, gt = _run_mlp(x, params, gout, "triton")
    oe, ge = _run_mlp(x, params, gout, "eager")
    o64, g64 = _run_mlp(x, params, gout, "eager", cast=torch.float64)
    assert torch.equal(ot, oe)  # the forward is eager's own calls
    names = [n for n, p in zip(("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"), [x] + params)
             if p is not None]
    assert len(gt) == len(ge) == len(names)
    for name, a, e, f in zip(names, gt, ge, g64):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert_2x_rule(f"grad {name}", a, e, f, atol=1e-6 * max(1e-2, f.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["autocast", "model_in_dtype"])
def test_mlp_low_precision(dtype, mode):
    """Under autocast (fp32 weights; x in the low dtype as forward_blocks gives it) and with the
    whole MLP in the low dtype: output equal to eager, gradients within the 2x rule of float64."""
    lead, d_in, hidden, out = ((3, 9), 32, 128, 32) if DEVICE == "cpu" else ((64, 197), 512, 2048, 512)
    x, params, gout = _mlp_inputs(lead, d_in, hidden, out, dtype=dtype, seed=1)
    if mode == "autocast":
        ot, gt = _run_mlp(x, params, gout, "triton", autocast=dtype)
        oe, ge = _run_mlp(x, params, gout, "eager", autocast=dtype)
    else:
        low = [p.to(dtype) for p in params]
        ot, gt = _run_mlp(x, low, gout, "triton")
        oe, ge = _run_mlp(x, low, gout, "eager")
    o64, g64 = _run_mlp(x, params, gout, "eager", cast=torch.float64)
    assert ot.dtype == oe.dtype and torch.equal(ot, oe)
    for name, a, e, f in zip(("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"), gt, ge, g64):
        assert a.dtype == e.dtype, name
        assert_2x_rule(f"grad {name}", a, e, f, atol=1e-3 * max(1.0, f.abs().max().item()))


def test_mlp_saves_only_x_and_the_gelu_input():
    x, params, gout = _mlp_inputs((4, 10), 16, 64, 16)
    for backend, n in (("eager", 2), ("triton", 1)):  # hidden-width tensors: h and gelu(h), or h
        fn = lambda: ops.mlp(x.clone().requires_grad_(True),  # noqa: E731
                             *[p.clone().requires_grad_(True) for p in params], backend=backend)
        assert _saved(fn, 40 * 64) == n, backend
    # under autocast x and both weights are kept as autocast cast them (nothing cast again later)
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        with torch.autocast(DEVICE, dtype=torch.float16):
            ops.mlp(x.clone().requires_grad_(True), *[p.clone().requires_grad_(True) for p in params],
                    backend="triton")
    kept = [t for t in seen if t.shape in (x.shape, params[0].shape, params[2].shape)]
    assert len(kept) == 3 and all(t.dtype == torch.float16 for t in kept)


@pytest.mark.parametrize("M,N", [(1, 1), (3, 1000), (37, 96), (130, 17)])
def test_colsum_kernel(M, N):
    h = torch.randn(M, N, device=DEVICE) * 3
    da = torch.randn(M, N, device=DEVICE)
    a, dh, db = K.gelu_bwd_recompute_colsum(h, da)
    a0, dh0 = K.gelu_bwd_recompute(h, da)
    assert torch.equal(a, a0) and torch.equal(dh, dh0)  # the same arithmetic as the flat kernel
    torch.testing.assert_close(db, dh0.double().sum(0).float(), rtol=1e-5, atol=1e-5)
    hb, dab = h.to(torch.float16), da.to(torch.float16)
    _, dhb, dbb = K.gelu_bwd_recompute_colsum(hb, dab)
    assert dhb.dtype == torch.float16 and dbb.dtype == torch.float32
    torch.testing.assert_close(dbb, dhb.double().sum(0).float(), rtol=1e-5, atol=1e-4)  # sums of the rounded dh
    with pytest.raises(ValueError, match=r"\(M, N\)"):
        K.gelu_bwd_recompute_colsum(h.reshape(-1), da.reshape(-1))
    with pytest.raises(ValueError, match="da must have"):
        K.gelu_bwd_recompute_colsum(h, da[:, :1].contiguous() if N > 1 else da[:0])


def test_colsum_partials_poisoned(monkeypatch):
    """Every partial the kernel sums is written (a NaN-poisoned buffer leaves no trace)."""
    monkeypatch.setattr(K, "_empty", lambda shape, device: poison_(torch.empty(shape, device=device)))
    h, da = torch.randn(70, 33, device=DEVICE), torch.randn(70, 33, device=DEVICE)
    _, dh, db = K.gelu_bwd_recompute_colsum(h, da)
    assert torch.isfinite(db).all()
    torch.testing.assert_close(db, dh.double().sum(0).float(), rtol=1e-5, atol=1e-5)


def test_mlp_bad_input():
    x, (w1, b1, w2, b2), _ = _mlp_inputs((2, 3), 8, 16, 4)
    with pytest.raises(ValueError, match="fc1_weight"):
        ops.mlp(x, w1[:, :5], b1, w2, b2, backend="triton")
    with pytest.raises(ValueError, match="fc1_bias"):
        ops.mlp(x, w1, b1[:3], w2, b2, backend="triton")
    with pytest.raises(ValueError, match="weight"):
        ops.mlp(x, w1, b1, w2[:, :3], b2, backend="triton")
    with pytest.raises(ValueError, match="bias"):
        ops.mlp(x, w1, b1, w2, b2[:1], backend="triton")
    with pytest.raises(TypeError, match="float64"):
        ops.mlp(x.double(), w1.double(), b1.double(), w2.double(), b2.double(), backend="triton")
    with pytest.raises(TypeError, match="floating-point"):
        ops.mlp(x.long(), w1, b1, w2, b2, backend="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N", [(1, 1), (5, 1000), (37, 96), (300, 17)])
def test_column_sum(M, N, dtype, monkeypatch):
    real = K._colsum_tiles  # the GPU tilings, interpreted on the CPU too
    monkeypatch.setattr(K, "_colsum_tiles", lambda M, N, gpu, sms, config=None: real(M, N, True, 2, config))
    x = (torch.randn(M, N, device=DEVICE) * 4).to(dtype)
    got = K.column_sum(x)
    assert got.dtype == torch.float32 and got.shape == (N,)
    torch.testing.assert_close(got, x.double().sum(0).float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(K.column_sum(x.t().contiguous().t()), got, rtol=0, atol=0)  # strided: copied
    assert torch.equal(K.column_sum(x), got)  # fixed order
    for name, cfg in K._COLSUM_CANDIDATES:
        torch.testing.assert_close(K.column_sum(x, cfg), got, rtol=1e-5, atol=1e-4, msg=name)
    with pytest.raises(ValueError, match=r"\(M, N\)"):
        K.column_sum(x.reshape(-1))
    with pytest.raises(TypeError, match="float32"):
        K.column_sum(x.to(torch.int32))
