"""Triton attention (kernels/attention.py via ops.attention) against the eager reference.

Output and every gradient (qkv, bias) against float64 eager math with the 2x-error rule; every
buffer the kernels write is poisoned with NaN first. Under the interpreter a representative
subset of shapes runs; on a GPU the whole grid S x Dh x H of the issue.
"""

import itertools
from dataclasses import replace

import pytest
import torch

from mimfast import ops
from mimfast.kernels import attention as K
from mimfast.ops.attention import attention_reference
from tolerance import DEVICE, assert_2x_rule, poison_

CUDA = DEVICE == "cuda"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every output and scratch buffer of the kernels starts as NaN."""
    monkeypatch.setattr(K, "_empty",
                        lambda *shape, device, dtype: poison_(torch.empty(*shape, device=device, dtype=dtype)))
    monkeypatch.setattr(K, "_empty_like", lambda t: poison_(torch.empty_like(t)))


def _inputs(B, S, H, Dh, dtype, device, bias=False, bias_dtype=None):
    qkv = torch.randn(B, S, 3 * H * Dh, device=device, dtype=dtype)
    b = torch.randn(H, S, S, device=device, dtype=bias_dtype or dtype) if bias else None
    return qkv, b


def _grads(fn, qkv, bias, grad_out=None):
    qkv = qkv.detach().requires_grad_()
    bias = bias.detach().requires_grad_() if bias is not None else None
    out = fn(qkv, bias)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [qkv] + ([bias] if bias is not None else []), grad_out.to(out.dtype))
    return out, grads, grad_out


def check_against_reference(B, S, H, Dh, dtype, device, bias=False, scale=None, config=None, bias_dtype=None,
                            factor=2.0):
    qkv, b = _inputs(B, S, H, Dh, dtype, device, bias, bias_dtype)

    def kernel(q, bb):
        if config is None:
            return ops.attention(q, H, bias=bb, scale=scale, backend="triton")
        from mimfast.ops._attention_triton import attention_triton

        return attention_triton(q, H, bb, scale, config=config)

    out, grads, g = _grads(kernel, qkv, b)
    ref64, grads64, _ = _grads(lambda q, bb: attention_reference(q, H, bb, scale), qkv.double(),
                               b.double() if b is not None else None, g.double())
    # eager in the low precision (an fp32 bias is rounded to it: eager cannot mix the two)
    low, grads_low, _ = _grads(lambda q, bb: attention_reference(q, H, bb, scale), qkv,
                               b.to(dtype) if b is not None else None, g)
    tag = f"B={B} S={S} H={H} Dh={Dh} {dtype} bias={bias}"
    # fp32: the eager error is rounding-level, so give an atol at a few ulps of the values
    atol = 1e-6 if dtype != torch.float32 else 2e-6
    assert out.dtype == dtype and out.shape == (B, S, H * Dh)
    assert_2x_rule(f"out {tag}", out, low, ref64, atol=atol, factor=factor)
    assert_2x_rule(f"dqkv {tag}", grads[0], grads_low[0], grads64[0], atol=atol * 4, factor=factor)
    if bias:
        assert grads[1].dtype == b.dtype
        assert_2x_rule(f"dbias {tag}", grads[1], grads_low[1], grads64[1], atol=atol * 4 * B, factor=factor)


# (B, S, H, Dh, dtype, bias): the default configs run the fused backward at S = 1, 17, 48, 50 (fp16)
# and 1 (fp32, Dh 32); the split one with the bias gradient in registers at S = 65 (fp16),
# 17 (fp32, Dh 80: fused only to S = 16) and 80 (fp32), the tiled bias gradient at 257 (> 256),
# the split one without a bias at 197; Dh = 80 pads to 128.
# test_interpreted_cases_cover_every_backward_path checks this.
INTERPRETED_CASES = [
    (2, 1, 3, 32, torch.float32, True),
    (2, 17, 3, 32, torch.float16, False),
    (3, 17, 1, 80, torch.float32, True),
    (1, 50, 2, 64, torch.float16, True),
    (2, 65, 1, 80, torch.float16, True),
    (1, 197, 1, 32, torch.float32, False),
    (1, 257, 1, 32, torch.float16, True),
    # S a multiple of 16: the bias is read in place, not from a copy padded to 16 columns
    (2, 48, 2, 32, torch.float16, True),
    (1, 80, 2, 32, torch.float32, True),
]
GPU_GRID = list(itertools.product((1, 17, 50, 65, 197, 257), (32, 64, 80), (1, 3, 12, 16)))


def _backward_path(S, Dh, bias, dtype):
    cfg = K.default_config(S, Dh, bias, dtype)
    if cfg.bwd == "fused":
        return "fused"
    return "split, dbias in registers" if cfg.dq_block_n >= S else "split, dbias tiled"


@pytest.mark.parametrize("B,S,H,Dh,dtype,bias", INTERPRETED_CASES, ids=str)
def test_matches_reference(B, S, H, Dh, dtype, bias, device):
    check_against_reference(B, S, H, Dh, dtype, device, bias=bias)


def test_interpreted_cases_cover_every_backward_path():
    """The shapes above reach each backward the default configs choose, with and without a bias."""
    seen = {(_backward_path(S, Dh, bias, dtype), bias) for _, S, _, Dh, dtype, bias in INTERPRETED_CASES}
    assert {("fused", True), ("fused", False), ("split, dbias in registers", True),
            ("split, dbias tiled", True)} <= seen, seen
    assert any(path != "fused" and not bias for path, bias in seen), seen


@pytest.mark.parametrize("S", [1, 16, 50, 197])
def test_padded_bias(S, device):
    """Bias rows are padded with zeros to a multiple of 16 (vector loads); a bias whose rows are
    already a multiple of 16 is passed through untouched, whatever its strides."""
    bias = torch.randn(3, S, S, device=device).transpose(1, 2)
    padded, S_B = K._padded_bias(bias, S)
    assert S_B % 16 == 0 and S <= S_B < S + 16
    if S_B == S:
        assert padded is bias
    else:
        assert padded.shape == (3, S, S_B) and padded.is_contiguous()
        assert torch.equal(padded[..., :S], bias) and not padded[..., S:].any()
    assert K._padded_bias(None, S) == (None, S)


@pytest.mark.parametrize("S", [17, 48])
def test_bias_gradient_is_dense(S, device):
    """The bias gradient comes back (H, S, S) and contiguous, without the padded columns."""
    qkv, bias = _inputs(2, S, 2, 32, torch.float32, device, bias=True)
    out, lse = K.attention_forward(qkv, 2, bias)
    _, dbias, _ = K.attention_backward(qkv, out, lse, torch.randn_like(out), 2, bias)
    assert dbias.shape == (2, S, S) and dbias.is_contiguous() and torch.isfinite(dbias).all()


@pytest.mark.skipif(not CUDA, reason="the full grid runs compiled on a GPU")
@pytest.mark.parametrize("S,Dh,H", GPU_GRID, ids=str)
def test_grid_bf16_gpu(S, Dh, H, device):
    check_against_reference(2, S, H, Dh, torch.bfloat16, device)


# the bias variants on fewer cases: each (block choice, Dh, bias) is one more compiled kernel
@pytest.mark.skipif(not CUDA, reason="GPU bias sweep")
@pytest.mark.parametrize("S,Dh", [(1, 64), (17, 64), (50, 64), (65, 64), (197, 64), (257, 64), (197, 80), (50, 32)],
                         ids=str)
def test_bias_bf16_gpu(S, Dh, device):
    check_against_reference(2, S, 3, Dh, torch.bfloat16, device, bias=True)


@pytest.mark.skipif(not CUDA, reason="GPU dtype sweep")
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
@pytest.mark.parametrize("S,Dh", [(50, 64), (197, 64)], ids=str)
def test_dtypes_with_bias_gpu(S, Dh, dtype, device):
    check_against_reference(3, S, 12, Dh, dtype, device, bias=True)


@pytest.mark.skipif(not CUDA, reason="the batch loop of the bias gradient needs a batch larger than the GPU's width")
def test_bias_gradient_batch_loop_gpu(device):
    # B = 48 at H = 12, S = 197: the dq programs sum the bias gradient over several batches each
    cfg = K.default_config(197, 64, True, torch.bfloat16)
    assert K._bias_batches(cfg, 48, 12 * triton_cdiv(197, cfg.dq_block_m), torch.device(device)) > 1
    check_against_reference(48, 197, 12, 64, torch.bfloat16, device, bias=True)


def triton_cdiv(a, b):
    return -(-a // b)


# TF32 against cuBLAS's TF32: Triton's tf32 dot hands the fp32 registers to the tensor cores,
# which drop the low 13 mantissa bits (truncation: no cvt.rna.tf32 in the sm_90 PTX), where cuBLAS
# rounds each operand to nearest. Truncation errors all lean towards zero, so they add up over the
# 64 / 197-term sums instead of cancelling: a float64 model of the eager (autograd) and the
# FlashAttention-2 (delta = rowsum(o * do)) computations with the two roundings, at this shape over
# 16 seeds, puts the max-error ratio kernel / eager at 1.7-6.3 for out, 2.3-5.1 for dqkv and
# 2.4-5.1 for the bias gradient (0.96-1.9 with the kernel rounding like cuBLAS: the algorithm
# itself costs nothing); the H200 run measured 4.35 for dqkv. Hence 8x here, for fp32 with TF32
# only; a wrong term or a lost block gives errors orders of magnitude above TF32's 2^-11.
TF32_FACTOR = 8.0


@pytest.mark.skipif(not CUDA, reason="TF32 only exists on a GPU")
def test_fp32_honours_allow_tf32(device):
    """The kernel under ``allow_tf32`` against eager fp32 attention with TF32 matmuls. Eager's TF32 is
    modelled (every matmul operand rounded to TF32 in float64, as cuBLAS rounds), not run: cuBLAS
    takes the switch where the call happens, and autograd's backward runs on its own thread (the
    H200 run's eager bias gradient had fp32's error, 1.6e-6, beside its TF32 forward)."""
    from test_gpu_fixes_tf32_model import eager_tf32

    B, S, H, Dh = 2, 197, 3, 64
    qkv, b = _inputs(B, S, H, Dh, torch.float32, device, bias=True)
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        out, grads, g = _grads(lambda q, bb: ops.attention(q, H, bias=bb, backend="triton"), qkv, b)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    ref64, grads64, _ = _grads(lambda q, bb: attention_reference(q, H, bb), qkv.double(), b.double(), g.double())

    def heads(t):  # (B, S, H * Dh) -> (B, H, S, Dh), float64 on the CPU
        return t.detach().cpu().double().reshape(B, S, H, Dh).transpose(1, 2)

    q, k, v = (heads(t) for t in qkv.cpu().chunk(3, dim=-1))
    low = eager_tf32(q, k, v, heads(g), b.detach().cpu().double(), Dh ** -0.5)
    out_low = low[0].transpose(1, 2).reshape(B, S, H * Dh)
    dqkv_low = torch.cat([t.transpose(1, 2).reshape(B, S, H * Dh) for t in low[1:4]], dim=-1)
    atol = 2e-6
    assert_2x_rule("out tf32", out, out_low, ref64.cpu(), atol=atol, factor=TF32_FACTOR)
    assert_2x_rule("dqkv tf32", grads[0], dqkv_low, grads64[0].cpu(), atol=atol * 4, factor=TF32_FACTOR)
    assert_2x_rule("dbias tf32", grads[1], low[4], grads64[1].cpu(), atol=atol * 4 * B, factor=TF32_FACTOR)


def test_tf32_switch_reaches_the_dot(no_tf32):
    from mimfast.ops._attention_triton import allow_tf32

    assert not allow_tf32() and K._dot_precision(torch.float32, allow_tf32()) == "ieee"
    torch.backends.cuda.matmul.allow_tf32 = True  # restored by no_tf32
    assert allow_tf32() and K._dot_precision(torch.float32, allow_tf32()) == "tf32"
    assert K._dot_precision(torch.bfloat16, True) == "ieee"  # only fp32 operands have a TF32 mode


def test_configs_agree(device):
    """Every backward variant on one shape: fused, split with the bias gradient in registers,
    split with the tiled (in-memory) bias gradient summed over several batches or stored per batch,
    an all-keys forward."""
    cfgs = [
        K.AttentionConfig(fwd_block_m=32, fwd_block_n=32, bwd="fused", fused_block=32, bias_batches=2),
        K.AttentionConfig(fwd_block_m=16, fwd_block_n=16, bwd="split", dq_block_m=16, dq_block_n=32,
                          dkdv_block_m=32, dkdv_block_n=16, bias_batches=1),
        K.AttentionConfig(fwd_block_m=32, fwd_block_n=32, bwd="split", dq_block_m=32, dq_block_n=16,
                          dkdv_block_m=16, dkdv_block_n=32, bias_batches=2),
        # tiled, one batch per strip: each tile stored once into the (poisoned) per-batch buffer
        K.AttentionConfig(fwd_block_m=32, fwd_block_n=32, bwd="split", dq_block_m=16, dq_block_n=16,
                          dkdv_block_m=16, dkdv_block_n=32, bias_batches=1),
    ]
    for cfg in cfgs:
        check_against_reference(3, 21, 1, 16, torch.float32, device, bias=True, config=cfg)
        # the dq kernel on (keys x queries) tiles: bias and its gradient transposed, dq^T += k^T dS^T
        check_against_reference(3, 21, 1, 16, torch.float32, device, bias=True, config=replace(cfg, dq_keys_major=True))
    # one pass: every key in one program, query blocks of 16 in a loop (two, the second padded);
    # with the bias, each batch's gradient stored once into the (poisoned) per-batch buffer, or
    # (batch loop) two batches a program: stored by the first, added to by the second, and a
    # last group of one batch
    onepass = K.AttentionConfig(fwd_block_m=32, fwd_block_n=32, bwd="onepass", dq_block_m=16, dq_warps=4,
                                bias_batches=1)
    for bias in (False, True):
        check_against_reference(3, 21, 2, 16, torch.float32, device, bias=bias, config=onepass)
        check_against_reference(3, 21, 2, 16, torch.float32, device, bias=bias,
                                config=replace(onepass, dq_keys_major=True))
    check_against_reference(3, 21, 2, 16, torch.float32, device, bias=True,
                            config=K.AttentionConfig(fwd_block_m=32, fwd_block_n=32, bwd="onepass", dq_block_m=16,
                                                     dq_warps=4, bias_batches=2))
    # query blocks of 64 without a bias (the candidate for MAE's decoder): two blocks, the second padded
    check_against_reference(2, 70, 2, 32, torch.float16, device,
                            config=K.AttentionConfig(fwd_block_m=32, fwd_block_n=32, bwd="onepass", dq_block_m=64,
                                                     dq_warps=16, bias_batches=1))
    with pytest.raises(ValueError, match="S <= 256, got S=257"):
        check_against_reference(1, 257, 1, 16, torch.float32, device, config=onepass)
    # the peeled forward: whole key blocks unmasked, then the partial one (S = 37: two whole blocks of
    # 16 and one of 5 keys), none partial (S = 32), no whole block (S = 9: one masked block), with and
    # without the bias and with a padded head (Dh 24 in 32: the unmasked loads still mask the head)
    for S, Dh in ((37, 16), (32, 16), (9, 16), (37, 24)):
        for bias in (False, True):
            check_against_reference(2, S, 2, Dh, torch.float32, device, bias=bias,
                                    config=K.AttentionConfig(fwd_block_m=16, fwd_block_n=16, fwd_peel=True,
                                                             bwd="split", dq_block_m=16, dq_block_n=16,
                                                             dkdv_block_m=16, dkdv_block_n=16, bias_batches=1))
    # the inner loops' partial last block in steps of 16 (forward, dq, dk / dv; blocks of 32): S = 37
    # (one tail step of 5 rows), 60 (two: 16 and 12), 64 (none), 21 (no whole block); the dq kernel
    # tiled with the bias gradient summed over two batches, and keys-major
    tails = K.AttentionConfig(fwd_block_m=32, fwd_block_n=32, fwd_tail=16, bwd="split", dq_block_m=32, dq_block_n=32,
                              dkdv_block_m=32, dkdv_block_n=32, bwd_tail=16, bias_batches=1)
    for S in (37, 60, 64, 21):
        for bias in (False, True):
            check_against_reference(2, S, 2, 16, torch.float32, device, bias=bias, config=tails)
            # the forward on (keys x queries) tiles, 16 query rows a program, with and without a tail
            check_against_reference(2, S, 2, 16, torch.float32, device, bias=bias,
                                    config=replace(tails, fwd_block_m=16, fwd_keys_major=True, fwd_tail=16 * (S % 2)))
        check_against_reference(3, S, 1, 16, torch.float32, device, bias=True,
                                config=replace(tails, bias_batches=2, dq_keys_major=True))


_QSUM_CONFIGS = {
    "fused": K.AttentionConfig(fwd_block_m=32, fwd_block_n=32, bwd="fused", fused_block=32, bias_batches=1),
    "fused, batch loop": K.AttentionConfig(fwd_block_m=32, fwd_block_n=32, bwd="fused", fused_block=32,
                                           bias_batches=2),
    # more query blocks (2) than key blocks (1): rows of the partials written by the dq kernel only
    "split, all keys": K.AttentionConfig(fwd_block_m=16, fwd_block_n=16, bwd="split", dq_block_m=16, dq_block_n=32,
                                         dkdv_block_m=16, dkdv_block_n=32, bias_batches=1),
    # fewer query blocks (1) than key blocks (2), tiled bias gradient over two batches a program
    "split, tiled": K.AttentionConfig(fwd_block_m=32, fwd_block_n=32, bwd="split", dq_block_m=32, dq_block_n=16,
                                      dkdv_block_m=16, dkdv_block_n=16, bias_batches=2),
    "onepass": K.AttentionConfig(fwd_block_m=32, fwd_block_n=32, bwd="onepass", dq_block_m=16, dq_warps=4,
                                 bias_batches=1),
    "onepass, batch loop": K.AttentionConfig(fwd_block_m=32, fwd_block_n=32, bwd="onepass", dq_block_m=16,
                                             dq_warps=4, bias_batches=2),
    "split, all keys, keys-major dq": K.AttentionConfig(fwd_block_m=16, fwd_block_n=16, bwd="split", dq_block_m=16,
                                                        dq_block_n=32, dkdv_block_m=16, dkdv_block_n=32,
                                                        bias_batches=1, dq_keys_major=True),
    "split, tiled, keys-major dq": K.AttentionConfig(fwd_block_m=32, fwd_block_n=32, bwd="split", dq_block_m=32,
                                                     dq_block_n=16, dkdv_block_m=16, dkdv_block_n=16,
                                                     bias_batches=2, dq_keys_major=True),
    "split, tails of 16": K.AttentionConfig(fwd_block_m=32, fwd_block_n=32, fwd_tail=16, bwd="split", dq_block_m=16,
                                            dq_block_n=32, dkdv_block_m=32, dkdv_block_n=16, bwd_tail=16,
                                            bias_batches=2),
    "onepass, keys-major dq": K.AttentionConfig(fwd_block_m=32, fwd_block_n=32, bwd="onepass", dq_block_m=16,
                                                dq_warps=4, bias_batches=1, dq_keys_major=True),
}


@pytest.mark.parametrize("name", list(_QSUM_CONFIGS))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_qkv_sum_in_every_backward_path(name, dtype, device):
    """``need_qkv_sum``: dqkv summed over batch and tokens (a qkv bias's gradient) by the passes
    that write dqkv, equal to the sum of the dqkv they return (which does not change), for every
    backward: padded query and key rows (S = 21 in blocks of 16 / 32) left out, partial rows of
    the batch loops and of the split kernels' unequal block counts."""
    cfg = _QSUM_CONFIGS[name]
    B, S, H, Dh = 3, 21, 2, 16
    for bias in (False, True):
        qkv, b = _inputs(B, S, H, Dh, dtype, device, bias)
        out, lse = K.attention_forward(qkv, H, b, config=cfg)
        g = torch.randn_like(out)
        dqkv0, db0, none = K.attention_backward(qkv, out, lse, g, H, b, config=cfg)
        dqkv, db, qsum = K.attention_backward(qkv, out, lse, g, H, b, config=cfg, need_qkv_sum=True)
        assert none is None and torch.equal(dqkv, dqkv0) and (db is None or torch.equal(db, db0))
        assert qsum.dtype == torch.float32 and qsum.shape == (3 * H * Dh,)
        ref = dqkv.double().sum((0, 1))
        err = (qsum.double() - ref).abs().max().item()
        assert err <= 1e-5 * dqkv.double().abs().sum((0, 1)).max().item(), (name, bias, err)


def test_custom_scale_and_fp32_bias_on_half(device):
    check_against_reference(2, 23, 2, 32, torch.float16, device, bias=True, scale=0.3, bias_dtype=torch.float32)


def test_strided_inputs(device):
    """qkv a slice of a wider tensor, bias a transposed view, grad_out non-contiguous."""
    B, S, H, Dh = 2, 19, 2, 16
    wide = torch.randn(B, S + 3, 3 * H * Dh + 8, device=device)
    qkv = wide[:, 2:2 + S, 4:4 + 3 * H * Dh]
    bias = torch.randn(H, S, S, device=device).transpose(1, 2)
    g = torch.randn(B, H * Dh, S, device=device).transpose(1, 2)
    out, grads, _ = _grads(lambda q, bb: ops.attention(q, H, bias=bb, backend="triton"), qkv, bias, g)
    ref, grads_ref, _ = _grads(lambda q, bb: attention_reference(q, H, bb), qkv.double(), bias.double(), g.double())
    low, grads_low, _ = _grads(lambda q, bb: attention_reference(q, H, bb), qkv, bias, g)
    # the 2x rule with check_against_reference's fp32 atols (1e-5 against float64 passed 1e-5 errors)
    assert_2x_rule("out (strided)", out, low, ref, atol=2e-6)
    assert_2x_rule("dqkv (strided)", grads[0], grads_low[0], grads_ref[0], atol=8e-6)
    assert_2x_rule("dbias (strided)", grads[1], grads_low[1], grads_ref[1], atol=8e-6 * B)


@pytest.mark.parametrize("S", [9, 70])
def test_requires_grad_combinations(S, device):
    """A bias without grad (the kernels skip its gradient) and a qkv without grad, on the fused
    (S = 9) and the split (S = 70) backward, with a random incoming gradient."""
    B, H, Dh = 2, 2, 16
    assert _backward_path(S, Dh, True, torch.float32) == ("fused" if S == 9 else "split, dbias in registers")
    qkv, bias = _inputs(B, S, H, Dh, torch.float32, device, bias=True)
    g = torch.randn(B, S, H * Dh, device=device)

    def grad(backend, q, b, wrt):
        leaf = (q if wrt == "qkv" else b).detach().clone().requires_grad_()
        args = (leaf, b) if wrt == "qkv" else (q, leaf)
        if backend == "triton":
            out = ops.attention(args[0], H, bias=args[1], backend="triton")
        else:
            out = attention_reference(args[0], H, args[1])
        return torch.autograd.grad(out, [leaf], g.to(out.dtype))[0]

    for wrt in ("qkv", "bias"):  # bias without grad: only dqkv; qkv without grad: only dbias
        got = grad("triton", qkv, bias, wrt)
        assert got.dtype == torch.float32
        assert_2x_rule(f"d{wrt} alone", got, grad("eager", qkv, bias, wrt),
                       grad("eager", qkv.double(), bias.double(), wrt), atol=8e-6 if wrt == "qkv" else 8e-6 * B)


def test_bias_gradient_is_deterministic(device):
    B, S, H, Dh = 4, 33, 2, 16
    qkv, bias = _inputs(B, S, H, Dh, torch.float16, device, bias=True)
    g = torch.randn(B, S, H * Dh, device=device, dtype=torch.float16)
    runs = [_grads(lambda q, bb: ops.attention(q, H, bias=bb, backend="triton"), qkv, bias, g)[1] for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_default_config_is_valid():
    for S, Dh, bias, dtype in itertools.product((1, 16, 17, 50, 64, 65, 128, 197, 256, 257, 1024),
                                                (16, 32, 64, 80, 128), (False, True), K._DTYPES):
        cfg = K.default_config(S, Dh, bias, dtype)
        blocks = [cfg.fwd_block_m, cfg.fwd_block_n, cfg.fused_block, cfg.dq_block_m, cfg.dq_block_n,
                  cfg.dkdv_block_m, cfg.dkdv_block_n]
        assert all(b >= 16 and b & (b - 1) == 0 for b in blocks), (S, Dh, cfg)
        assert cfg.bwd in ("fused", "split")
        if cfg.bwd == "fused":
            assert S <= cfg.fused_block


def test_bad_inputs(device):
    qkv = torch.randn(2, 5, 3 * 2 * 16, device=device)
    with pytest.raises(TypeError, match="qkv must be float16, bfloat16 or float32"):
        ops.attention(qkv.double(), 2, backend="triton")
    with pytest.raises(TypeError, match="qkv must be a floating-point tensor"):
        ops.attention(qkv.long(), 2, backend="triton")
    with pytest.raises(ValueError, match=r"bias must be \(H, S, S\)"):
        ops.attention(qkv, 2, bias=torch.zeros(2, 5, 4, device=device), backend="triton")
    with pytest.raises(TypeError, match="bias must be a floating-point tensor"):
        ops.attention(qkv, 2, bias=torch.zeros(2, 5, 5, device=device, dtype=torch.int32), backend="triton")
    with pytest.raises(ValueError, match="bias is on meta"):
        ops.attention(qkv, 2, bias=torch.zeros(2, 5, 5, device="meta"), backend="triton")
    with pytest.raises(TypeError, match="bias must be float16, bfloat16 or float32"):
        K.attention_forward(qkv, 2, bias=torch.zeros(2, 5, 5, device=device, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_heads=5"):
        ops.attention(qkv, 5, backend="triton")
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        ops.attention(qkv, True, backend="triton")
    with pytest.raises(ValueError, match="scale must be positive"):
        ops.attention(qkv, 2, scale=-0.5, backend="triton")
    with pytest.raises(ValueError, match="non-empty batch"):
        ops.attention(qkv[:0], 2, backend="triton")
    with pytest.raises(ValueError, match="head_dim must be <= 128"):
        K.attention_forward(torch.randn(1, 2, 3 * 256, device=device), 1)
    with pytest.raises(ValueError, match=r"qkv must be \(B, S, 3 \* H \* Dh\)"):
        ops.attention(qkv[0], 2, backend="triton")
    with pytest.raises(ValueError, match="config.bwd='fused' needs S <= fused_block=16"):
        out, lse = K.attention_forward(torch.randn(1, 20, 3 * 16, device=device), 1)
        K.attention_backward(torch.randn(1, 20, 3 * 16, device=device), out, lse, torch.ones_like(out), 1,
                             config=K.AttentionConfig(bwd="fused", fused_block=16))
