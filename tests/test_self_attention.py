"""proj(attention(qkv(x))) as one autograd function (ops.self_attention): output and every
gradient against eager and float64 (2x rule), with and without the Linears' biases and the
attention bias, autocast, what autograd saves, the modules that use it, bad input."""

import pytest
import torch

from mimfast import ops
from tolerance import DEVICE, assert_2x_rule

NAMES = ("x", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias", "bias")


def _inputs(B, S, C, H, Dh, c_out=None, seed=0, attn_bias=True):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(B, S, C, device=DEVICE, generator=g)
    wq = torch.randn(3 * H * Dh, C, device=DEVICE, generator=g) * C ** -0.5
    bq = torch.randn(3 * H * Dh, device=DEVICE, generator=g) * 0.1
    wp = torch.randn(c_out or C, H * Dh, device=DEVICE, generator=g) * (H * Dh) ** -0.5
    bp = torch.randn(c_out or C, device=DEVICE, generator=g) * 0.1
    bias = torch.randn(H, S, S, device=DEVICE, generator=g) * 0.5 if attn_bias else None
    gy = torch.randn(B, S, c_out or C, device=DEVICE, generator=g)
    return [x, wq, bq, wp, bp, bias], gy


def _run(tensors, gy, H, backend, cast=None, autocast=None):
    ts = [t.detach().clone() if t is not None else None for t in tensors]
    if cast is not None:
        ts = [t.to(cast) if t is not None else None for t in ts]
    leaves = [t.requires_grad_(True) for t in ts if t is not None]
    with torch.autocast(DEVICE, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        y = ops.self_attention(*ts[:5], H, bias=ts[5], backend=backend)
    grads = torch.autograd.grad(y, leaves, gy.to(y.dtype))
    return y.detach(), grads, [n for n, t in zip(NAMES, ts) if t is not None]


@pytest.mark.parametrize("shape", [(2, 17, 24, 2, 16, None), (1, 50, 32, 2, 16, 40), (3, 5, 8, 1, 8, None)], ids=str)
@pytest.mark.parametrize("which", ["all", "no_linear_bias", "no_attn_bias"])
def test_fp32_matches_eager_and_float64(shape, which):
    B, S, C, H, Dh, c_out = shape
    tensors, gy = _inputs(B, S, C, H, Dh, c_out, attn_bias=which != "no_attn_bias")
    if which == "no_linear_bias":
        tensors[2] = tensors[4] = None
    yt, gt, names = _run(tensors, gy, H, "triton")
    ye, ge, _ = _run(tensors, gy, H, "eager")
    y64, g64, _ = _run(tensors, gy, H, "eager", cast=torch.float64)
    assert_2x_rule("y", yt, ye, y64, atol=2e-6)
    for name, a, e, f in zip(names, gt, ge, g64):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert_2x_rule(f"grad {name}", a, e, f, atol=2e-6 * max(1.0, f.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast(dtype):
    """fp32 parameters and tokens under autocast, as training runs the blocks (the interpreter's
    bf16 dot is wrong: bf16 only on a GPU)."""
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the interpreter's bf16 tl.dot is wrong (triton-lang/triton#11584); runs on a GPU")
    B, S, C, H, Dh = (2, 17, 32, 2, 16) if DEVICE == "cpu" else (8, 197, 768, 12, 64)
    tensors, gy = _inputs(B, S, C, H, Dh, seed=1)
    yt, gt, names = _run(tensors, gy, H, "triton", autocast=dtype)
    ye, ge, _ = _run(tensors, gy, H, "eager", autocast=dtype)
    y64, g64, _ = _run(tensors, gy, H, "eager", cast=torch.float64)
    assert yt.dtype == ye.dtype == dtype
    assert_2x_rule("y", yt, ye, y64, atol=1e-3)
    for name, a, e, f in zip(names, gt, ge, g64):
        assert a.dtype == e.dtype, name
        assert_2x_rule(f"grad {name}", a, e, f, atol=2e-3 * max(1.0, f.abs().max().item()))


def test_saves_the_input_in_the_compute_dtype():
    """Under autocast the qkv Linear's input is kept in the autocast dtype (as eager's cast is),
    not in the caller's fp32."""
    tensors, _ = _inputs(2, 17, 24, 2, 16, attn_bias=False)  # C = 24: no other saved tensor has x's shape
    seen = []
    x = tensors[0].clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        with torch.autocast(DEVICE, dtype=torch.float16):
            ops.self_attention(x, *[t.requires_grad_(True) for t in tensors[1:5]], 2, backend="triton")
    inputs = [t for t in seen if t.shape == x.shape]
    assert len(inputs) == 1 and inputs[0].dtype == torch.float16
    # the weights as autocast cast them (the backward casts nothing again)
    weights = [t for t in seen if t.shape in (tensors[1].shape, tensors[3].shape)]
    assert len(weights) == 2 and all(t.dtype == torch.float16 for t in weights)


def test_modules_run_it_and_fall_back():
    """mimfast.nn.Attention runs the one op when its Linears are plain and nothing normalises
    or gates; a hook on qkv sends it the old way, with the same result."""
    from mimfast.nn import Attention

    torch.manual_seed(0)
    attn = Attention(32, num_heads=2, qkv_bias=True, kernels="triton").to(DEVICE)
    x = torch.randn(2, 17, 32, device=DEVICE)
    assert attn._one_op()
    y = attn(x)
    handle = attn.qkv.register_forward_hook(lambda m, i, o: None)
    assert not attn._one_op()
    torch.testing.assert_close(attn(x), y, rtol=1e-5, atol=1e-6)
    handle.remove()
    ref = ops.self_attention_reference(x, attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias, 2)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_bad_input():
    (x, wq, bq, wp, bp, bias), _ = _inputs(2, 5, 8, 2, 4)
    with pytest.raises(ValueError, match="x must be"):
        ops.self_attention(x[0], wq, bq, wp, bp, 2, backend="triton")
    with pytest.raises(ValueError, match="qkv_weight must be"):
        ops.self_attention(x, wq[:, :5], bq, wp, bp, 2, backend="triton")
    with pytest.raises(ValueError, match="qkv_bias"):
        ops.self_attention(x, wq, bq[:3], wp, bp, 2, backend="triton")
    with pytest.raises(ValueError, match="num_heads"):
        ops.self_attention(x, wq, bq, wp, bp, 5, backend="triton")
    with pytest.raises(ValueError, match="proj_weight must take"):
        ops.self_attention(x, wq, bq, wp[:, :3], bp, 2, backend="triton")
    with pytest.raises(ValueError, match="bias must be"):
        ops.self_attention(x, wq, bq, wp, bp, 2, bias=bias[:, :3], backend="triton")
