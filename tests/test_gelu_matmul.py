"""The MLP's matmuls with GELU in their epilogue (kernels/gelu_matmul.py) against eager and
float64: fc1 + bias + GELU (h and a), fc2's input gradient + GELU's backward (a, dh and fc1's
bias gradient), every candidate tile, odd shapes, strided operands, poisoned buffers, bad input,
and ``ops.mlp`` with the fused GEMMs chosen."""

import pytest
import torch
import torch.nn.functional as F

from mimfast import ops
from mimfast.kernels import gelu_matmul as K
from tolerance import DEVICE, INTERPRETED, assert_2x_rule, max_err, poison_

# fp16 under the interpreter (its bf16 dot is wrong, triton-lang/triton#11584), bf16 on a GPU too
DTYPES = (torch.float16,) if INTERPRETED else (torch.float16, torch.bfloat16)
# (M, K, N): rows not a multiple of any tile, K not a multiple of BLOCK_K, N past one column block
SHAPES = [(37, 40, 96), (5, 24, 200), (130, 48, 72)]
if not INTERPRETED:
    SHAPES += [(1000, 512, 2048)]
TRITON = [(name, cfg) for name, cfg in K.CANDIDATES if cfg != "cublas"]
if INTERPRETED:  # small tiles besides: several row and column blocks, groups of row blocks
    TRITON += [("small", (32, 32, 16, 2, 4, 2)), ("tall", (16, 64, 32, 4, 4, 2))]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every buffer the launchers allocate for a kernel to write starts as NaN."""
    monkeypatch.setattr(K, "_empty", lambda shape, dtype, device: poison_(torch.empty(shape, dtype=dtype,
                                                                                      device=device)))


def _rand(*shape, dtype, scale=1.0, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return (torch.randn(*shape, device=DEVICE, generator=g) * scale).to(dtype)


def _gelu_grad64(h):
    cdf = 0.5 * (1 + torch.erf(h / 2 ** 0.5))
    return cdf + h * torch.exp(-0.5 * h * h) / (2 * torch.pi) ** 0.5


def _check_forward(name, cfg, M, K_, N, dtype, biases=(True, False)):
    x = _rand(M, K_, dtype=dtype, seed=1)
    w = _rand(N, K_, dtype=dtype, scale=K_ ** -0.5, seed=2)
    b = _rand(N, dtype=dtype, scale=0.5, seed=3)
    for bias in (b if with_bias else None for with_bias in biases):
        h, a = K.linear_bias_gelu(x, w, bias, cfg)
        h_e = F.linear(x, w, bias)
        a_e = F.gelu(h_e)
        h64 = F.linear(x.double(), w.double(), bias.double() if bias is not None else None)
        assert h.dtype == a.dtype == dtype and h.shape == a.shape == (M, N)
        assert_2x_rule(f"h {name}", h, h_e, h64, atol=1e-3)
        assert_2x_rule(f"a {name}", a, a_e, F.gelu(h64), atol=1e-3)
        # a is GELU of the h written, rounded once: what eager's F.gelu gives for that h (to an ulp:
        # a last-bit difference between two fp32 erf implementations may flip a rounding)
        ref = F.gelu(h).double()
        assert ((a.double() - ref).abs() <= 2 ** -7 * ref.abs() + 2 ** -24).all()


def _check_backward(name, cfg, M, K_, N, dtype, colsums=(True, False)):
    g = _rand(M, K_, dtype=dtype, seed=4)
    w2 = _rand(K_, N, dtype=dtype, scale=N ** -0.5, seed=5)  # fc2's weight (out, hidden)
    h = _rand(M, N, dtype=dtype, scale=1.5, seed=6)
    for colsum in colsums:
        a, dh, db = K.matmul_gelu_bwd(g, w2, h, colsum, cfg)
        da_e = g @ w2
        a_e = F.gelu(h)
        dh_e = torch.ops.aten.gelu_backward(da_e, h)
        h64 = h.double()
        dh64 = (g.double() @ w2.double()) * _gelu_grad64(h64)
        assert a.dtype == dh.dtype == dtype and a.shape == dh.shape == (M, N)
        assert_2x_rule(f"a {name}", a, a_e, F.gelu(h64), atol=1e-3)
        assert_2x_rule(f"dh {name}", dh, dh_e, dh64, atol=1e-3)
        if not colsum:
            assert db is None
            continue
        # fc1's bias gradient: the column sums of the dh written (fp32, any order of the rows)
        assert db.dtype == torch.float32 and db.shape == (N,)
        assert max_err(db, dh.double().sum(0)) <= 1e-5 * max(1.0, dh.double().abs().sum(0).max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K_,N", SHAPES, ids=str)
@pytest.mark.parametrize("name,cfg", TRITON, ids=[n for n, _ in TRITON])
def test_forward_matches_eager_and_float64(name, cfg, M, K_, N, dtype):
    """With and without fc1's bias."""
    _check_forward(name, cfg, M, K_, N, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K_,N", SHAPES, ids=str)
@pytest.mark.parametrize("name,cfg", TRITON, ids=[n for n, _ in TRITON])
def test_backward_matches_eager_and_float64(name, cfg, M, K_, N, dtype):
    """With and without fc1's bias gradient."""
    _check_backward(name, cfg, M, K_, N, dtype)


@pytest.mark.skipif(INTERPRETED, reason="ViT-B's MLP (M = 12800) on a GPU")
@pytest.mark.parametrize("name,cfg", TRITON, ids=[n for n, _ in TRITON])
def test_vit_b_mlp_shape_gpu(name, cfg):
    """The shape the tuner chooses at (the training's, bf16), with the bias and its gradient only:
    each check moves float64 copies of 39M-element tensors to the host."""
    _check_forward(name, cfg, 256 * 50, 768, 3072, torch.bfloat16, biases=(True,))
    _check_backward(name, cfg, 256 * 50, 768, 3072, torch.bfloat16, colsums=(True,))


@pytest.mark.parametrize("path", ["cublas", "triton"])
def test_strided_operands_and_empty_shapes(path):
    """x a column slice of a wider buffer, fc1's weight a transposed view, g and h row-strided;
    M = 0 and K = 0."""
    dtype = torch.float16
    cfg = "cublas" if path == "cublas" else TRITON[-1][1]
    wide = _rand(21, 70, dtype=dtype, seed=7)
    x = wide[:, 5:45]
    w = _rand(40, 56, dtype=dtype, scale=0.2, seed=8).t()  # (56, 40) with strides (1, 56)
    b = _rand(56, dtype=dtype, seed=9)
    h, a = K.linear_bias_gelu(x, w, b, cfg)
    h_e = F.linear(x, w, b)
    assert max_err(h, h_e) <= 2e-2 and max_err(a, F.gelu(h_e)) <= 2e-2
    g = _rand(21, 90, dtype=dtype, seed=10)[:, 3:43]
    w2 = _rand(40, 56, dtype=dtype, scale=0.2, seed=11)
    hh = _rand(21, 80, dtype=dtype, seed=12)[:, 10:66]
    a2, dh, db = K.matmul_gelu_bwd(g, w2, hh, True, cfg)
    dh_e = torch.ops.aten.gelu_backward(g @ w2, hh)
    assert max_err(a2, F.gelu(hh)) <= 2e-2 and max_err(dh, dh_e) <= 2e-2
    assert max_err(db, dh.double().sum(0)) <= 1e-3
    # empty batches and an empty reduction
    h0, a0 = K.linear_bias_gelu(x[:0], w, b, cfg)
    assert h0.shape == a0.shape == (0, 56)
    a0, dh0, db0 = K.matmul_gelu_bwd(g[:0], w2, hh[:0], True, cfg)
    assert a0.shape == dh0.shape == (0, 56) and torch.equal(db0, torch.zeros(56, device=DEVICE))
    hk, ak = K.linear_bias_gelu(x[:, :0], w[:, :0], b, cfg)
    assert torch.equal(hk, b.expand(21, 56)) and torch.equal(ak, F.gelu(hk))


def test_bad_input():
    x = _rand(4, 8, dtype=torch.float16)
    w = _rand(6, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="x must be 2-D"):
        K.linear_bias_gelu(x[0], w, None)
    with pytest.raises(ValueError, match="weight must be"):
        K.linear_bias_gelu(x, w[:, :5], None)
    with pytest.raises(TypeError, match="weight must be torch.float16"):
        K.linear_bias_gelu(x, w.float(), None)
    with pytest.raises(ValueError, match="bias must be"):
        K.linear_bias_gelu(x, w, _rand(5, dtype=torch.float16))
    g = _rand(4, 6, dtype=torch.float16)
    with pytest.raises(ValueError, match="weight must be"):
        K.matmul_gelu_bwd(g, w.t(), _rand(4, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="h must be"):
        K.matmul_gelu_bwd(g, w, _rand(4, 9, dtype=torch.float16))
    with pytest.raises(ValueError, match="unit stride"):
        K.matmul_gelu_bwd(g, w, _rand(8, 4, dtype=torch.float16).t())


def test_fp32_keeps_cublas():
    """fp32 operands take the matmul's own path (TF32 settings honoured there) whatever the config."""
    x, w, b = _rand(9, 16, dtype=torch.float32), _rand(24, 16, dtype=torch.float32), _rand(24, dtype=torch.float32)
    h, a = K.linear_bias_gelu(x, w, b, TRITON[0][1])
    assert torch.equal(h, F.linear(x, w, b)) and torch.equal(a, F.gelu(h))
    assert K._candidates(torch.float32) == (("cublas", "cublas"),)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mlp_with_the_fused_gemms(monkeypatch, dtype):
    """``ops.mlp`` with the fused GEMMs chosen (as the tuner may on a GPU): the output and every
    gradient as with cuBLAS and the separate passes, within the low precision's rounding."""
    torch.manual_seed(0)
    x = torch.randn(3, 13, 24, device=DEVICE).to(dtype)
    w1, b1 = torch.randn(96, 24, device=DEVICE) * 0.2, torch.randn(96, device=DEVICE) * 0.1
    w2, b2 = torch.randn(24, 96, device=DEVICE) * 0.1, torch.randn(24, device=DEVICE) * 0.1
    gy = torch.randn(3, 13, 24, device=DEVICE)
    leaves = [x, w1.to(dtype), b1.to(dtype), w2.to(dtype), b2.to(dtype)]

    def run():
        ts = [t.detach().clone().requires_grad_(True) for t in leaves]
        y = ops.mlp(*ts, backend="triton")
        return y.detach(), torch.autograd.grad(y, ts, gy.to(y.dtype))

    y0, g0 = run()
    monkeypatch.setattr(K, "_candidates", lambda dt: TRITON[-1:])  # the first candidate: the default off a GPU
    y1, g1 = run()
    ys = [F.linear(F.gelu(F.linear(t.double(), leaves[1].double(), leaves[2].double())), leaves[3].double(),
                   leaves[4].double()) for t in (x,)]
    assert_2x_rule("mlp out", y1, y0, ys[0], atol=1e-3)
    for i, (a, b) in enumerate(zip(g0, g1)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert max_err(a, b) <= 2e-2 * max(1.0, a.abs().max().item()), i
