"""The block fusions on their own: residual add + LayerNorm (``ops.add_layer_norm``), the MLP's
``fc2(gelu(h))`` keeping only h (``ops.gelu_linear``) and the whole MLP (``ops.mlp``), at the
MAE / BEiT block shapes, bf16
autocast as training runs them.

- ``add_layer_norm``: x (M, D) bf16 branch output, residual (M, D) fp32, LayerNorm fp32
  parameters, y written in bf16 (what the next Linear casts to). Eager = ``r = residual + x;
  y = layer_norm(r).to(bf16)`` under autocast; compile = ``torch.compile`` of it; triton = the op.
  GB/s on the bytes that must move: forward x + r in + r out + y; backward r + dy + dr in +
  dr out + dx.
- ``gelu_linear``: h (M, 4D) bf16 (fc1's output), fc2 weight fp32 under autocast. Eager =
  ``F.linear(F.gelu(h), w, b)``; triton = the op (GELU's backward recomputes gelu(h)).
  ``saved_mib`` is the memory autograd holds between forward and backward (the activation
  cost per MLP), ``peak_mem`` that of one forward + backward.
- ``self_attention``: the attention branch, x (N, S, D) bf16, H = D / 64 heads, fp32 weights
  under autocast. Eager = ``ops.self_attention(backend="eager")`` (the reference math);
  ``three_ops`` = qkv Linear, ``ops.attention``, proj Linear (what the blocks ran before);
  triton = ``ops.self_attention`` (both bias gradients summed in one pass each).
- ``mlp``: the whole MLP, x (M, D) bf16, fp32 weights under autocast. Eager = ``fc2(gelu(fc1(x)))``;
  ``gelu_linear`` = fc1 then the op above; triton = ``ops.mlp`` (as ``gelu_linear``, and fc1's bias
  gradient summed in GELU's backward pass instead of a separate pass over the hidden gradient).
- ``mlp_gemms``: the MLP's two GEMMs with a GELU pass (:mod:`mimfast.kernels.gelu_matmul`), each
  candidate the tuner chooses among: ``cublas`` (the matmul, then the pass) and the Triton GEMMs
  with the pass in their epilogue. ``fc1+gelu``: h, a = x @ w1^T + b1, gelu(h); ``dgrad+gelu_bwd``:
  a, dh, fc1's bias sums from g @ w2 and h. bf16 operands; TFLOP/s on the matmul, GB/s on the
  fused kernel's bytes (operands, h, the outputs).

Every row has ``host_ms`` and, but for ``compile``, ``graph_ms`` and its rates
(``harness.measure``: the kernels' time without launch overhead).

    python -m benchmarks.run --out DIR --only fusions

Smoke mode (``ctx.smoke``, CPU): ``SMOKE_CASES`` (M = 2 x 5 rows, D = 24), the same rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks import harness
from mimfast import ops

# case: (N, S, D): MAE encoder ViT-B / ViT-L (49 visible + cls), MAE decoder, BEiT-B
CASES = {"mae_enc_b": (256, 50, 768), "mae_enc_l": (256, 50, 1024), "mae_dec": (256, 197, 512),
         "beit_b": (256, 197, 768)}
QUICK = ("mae_enc_b", "mae_dec")
SMOKE_CASES = {"mae_enc_b": (2, 5, 24), "mae_enc_l": (2, 5, 40), "mae_dec": (2, 9, 16), "beit_b": (2, 9, 24)}
BF16 = 2


def _time(fn, name: str) -> harness.Timing:
    graph = harness.NO_GRAPH_COMPILED if name == "compile" else True
    return harness.measure(fn, warmup_ms=10, rep_ms=50, graph=graph)


def _saved_bytes(fn):
    """Memory held after ``fn()`` returns its output (the graph alive): the saved activations."""
    if not harness.on_cuda():
        return None
    harness.sync()
    base = torch.cuda.memory_allocated()
    out = fn()
    harness.sync()
    held = torch.cuda.memory_allocated() - base
    del out
    return held


def _rows(ctx, bench, case, variants, fwd_bytes, bwd_bytes, fwd_flops=None, saved=False):
    for mode in ("fwd", "fwd+bwd"):
        for name, (fwd, fwd_bwd) in variants.items():
            fn = fwd if mode == "fwd" else fwd_bwd
            try:
                ms = _time(fn, name)
                extra = {}
                if mode == "fwd+bwd":
                    extra["peak_mem"] = harness.peak_memory_bytes(fn)
                if saved and mode == "fwd":
                    held = _saved_bytes(fn)
                    if held is not None:
                        extra["saved_mib"] = round(held / 2**20, 1)
            except Exception as e:  # one failing variant must not hide the others
                ctx.fail(bench, f"{case} {mode}", name, e)
                continue
            nbytes = fwd_bytes if mode == "fwd" else fwd_bytes + bwd_bytes
            flops = None if fwd_flops is None else (fwd_flops if mode == "fwd" else 3 * fwd_flops)
            ctx.add(bench, f"{case} {mode}", name, ms, bytes_moved=nbytes, flops=flops, **extra)
        ctx.speedups(bench, f"{case} {mode}", "eager")


def _autocast(device, fn):
    def run():
        with torch.autocast(device, dtype=torch.bfloat16):
            return fn()

    return run


def _grad(fwd, inputs, grads):
    def run():
        out = fwd()
        outs = out if isinstance(out, tuple) else (out,)
        return torch.autograd.grad(outs, inputs, grads[: len(outs)])

    return run


def _variants(device, fns, inputs, grads):
    """{name: (forward, forward + backward)} of each ``fns`` entry under bf16 autocast."""
    return {k: (_autocast(device, f), _grad(_autocast(device, f), inputs, grads)) for k, f in fns.items()}


def _linear_params(out_features, in_features, g, device):
    """A Linear's weight (fan-in scaled) and bias, fp32 leaves that take gradients."""
    w = torch.randn(out_features, in_features, device=device, generator=g) * in_features ** -0.5
    b = 0.1 * torch.randn(out_features, device=device, generator=g)
    return w.requires_grad_(True), b.requires_grad_(True)


def _bench_add_layer_norm(ctx, case, N, S, D):
    dev = ctx.device
    g = torch.Generator(device=dev).manual_seed(0)
    M = N * S
    x = torch.randn(M, D, device=dev, generator=g).to(torch.bfloat16).requires_grad_(True)
    res = torch.randn(M, D, device=dev, generator=g).requires_grad_(True)
    w = (1 + 0.1 * torch.randn(D, device=dev, generator=g)).requires_grad_(True)
    b = (0.1 * torch.randn(D, device=dev, generator=g)).requires_grad_(True)
    dy = torch.randn(M, D, device=dev, generator=g).to(torch.bfloat16)
    dr = torch.randn(M, D, device=dev, generator=g)
    inputs = (x, res, w, b)

    def eager():
        r = res + x
        return r, F.layer_norm(r, (D,), w, b, 1e-6).to(torch.bfloat16)

    def triton():
        return ops.add_layer_norm(x, res, w, b, 1e-6, out_dtype=torch.bfloat16, backend="triton")

    variants = {"eager": eager, "triton": triton}
    comp = harness.try_compile(eager)
    if comp is not None:
        variants["compile"] = comp
    variants = _variants(dev, variants, inputs, (dr, dy))
    # outputs are (r, y): the gradient of r comes first
    fwd_bytes = M * D * (BF16 + 4 + 4 + BF16)
    bwd_bytes = M * D * (4 + BF16 + 4 + 4 + BF16)
    _rows(ctx, "add_layer_norm", case, variants, fwd_bytes, bwd_bytes)


def _bench_gelu_linear(ctx, case, N, S, D):
    dev = ctx.device
    g = torch.Generator(device=dev).manual_seed(1)
    M, Hd = N * S, 4 * D
    h = torch.randn(M, Hd, device=dev, generator=g).to(torch.bfloat16).requires_grad_(True)
    w, b = _linear_params(D, Hd, g, dev)
    go = torch.randn(M, D, device=dev, generator=g).to(torch.bfloat16)
    inputs = (h, w, b)
    fns = {"eager": lambda: F.linear(F.gelu(h), w, b),
           "triton": lambda: ops.gelu_linear(h, w, b, backend="triton")}
    variants = _variants(dev, fns, inputs, (go,))
    # GELU in (h) and out, the matmul's operands and output; backward: da, h, a, dh and the matmuls'
    fwd_bytes = M * Hd * BF16 * 3 + M * D * BF16 + D * Hd * BF16
    bwd_bytes = M * Hd * BF16 * 4 + M * D * BF16 * 2 + D * Hd * 4
    _rows(ctx, "gelu_linear", case, variants, fwd_bytes, bwd_bytes, fwd_flops=2 * M * Hd * D, saved=True)


def _bench_mlp(ctx, case, N, S, D):
    dev = ctx.device
    g = torch.Generator(device=dev).manual_seed(2)
    M, Hd = N * S, 4 * D
    x = torch.randn(M, D, device=dev, generator=g).to(torch.bfloat16).requires_grad_(True)
    w1, b1 = _linear_params(Hd, D, g, dev)
    w2, b2 = _linear_params(D, Hd, g, dev)
    go = torch.randn(M, D, device=dev, generator=g).to(torch.bfloat16)
    inputs = (x, w1, b1, w2, b2)
    fns = {"eager": lambda: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2),
           "gelu_linear": lambda: ops.gelu_linear(F.linear(x, w1, b1), w2, b2, backend="triton"),
           "triton": lambda: ops.mlp(x, w1, b1, w2, b2, backend="triton")}
    variants = _variants(dev, fns, inputs, (go,))
    # forward: x, h out, GELU in and out, fc2's input and output, both weights; backward: the
    # output gradient (twice), da, h, a, dh, dh (fc1's matmuls), x, dx, the weight gradients
    fwd_bytes = M * Hd * BF16 * 4 + M * D * BF16 * 2 + 2 * D * Hd * BF16
    bwd_bytes = M * Hd * BF16 * 6 + M * D * BF16 * 4 + 2 * D * Hd * 4
    _rows(ctx, "mlp", case, variants, fwd_bytes, bwd_bytes, fwd_flops=4 * M * Hd * D, saved=True)


def _bench_self_attention(ctx, case, N, S, D):
    dev = ctx.device
    g = torch.Generator(device=dev).manual_seed(3)
    M, H = N * S, max(1, D // 64)
    x = torch.randn(N, S, D, device=dev, generator=g).to(torch.bfloat16).requires_grad_(True)
    wq, bq = _linear_params(3 * D, D, g, dev)
    wp, bp = _linear_params(D, D, g, dev)
    go = torch.randn(N, S, D, device=dev, generator=g).to(torch.bfloat16)
    inputs = (x, wq, bq, wp, bp)
    fns = {"eager": lambda: ops.self_attention(x, wq, bq, wp, bp, H, backend="eager"),
           "three_ops": lambda: F.linear(ops.attention(F.linear(x, wq, bq), H, backend="triton"), wp, bp),
           "triton": lambda: ops.self_attention(x, wq, bq, wp, bp, H, backend="triton")}
    variants = _variants(dev, fns, inputs, (go,))
    # forward: x, qkv out and in, the attention output out and in, y; the weights; backward about
    # twice that plus the bias-gradient reads (the attention's own traffic is counted once)
    fwd_bytes = M * D * BF16 * (1 + 3 + 3 + 1 + 1 + 1) + 4 * D * D * BF16
    bwd_bytes = 2 * fwd_bytes
    _rows(ctx, "self_attention", case, variants, fwd_bytes, bwd_bytes,
          fwd_flops=2 * M * 4 * D * D + 4 * N * H * S * S * (D // H))


def _bench_mlp_gemms(ctx, case, N, S, D):
    from mimfast.kernels import gelu_matmul as GM

    dev = ctx.device
    g = torch.Generator(device=dev).manual_seed(4)
    dt = torch.bfloat16 if harness.on_cuda() else torch.float16  # the interpreter's bf16 dot is wrong
    M, Hd = N * S, 4 * D
    x = torch.randn(M, D, device=dev, generator=g).to(dt)
    w1 = (torch.randn(Hd, D, device=dev, generator=g) * D ** -0.5).to(dt)
    b1 = (0.1 * torch.randn(Hd, device=dev, generator=g)).to(dt)
    go = torch.randn(M, D, device=dev, generator=g).to(dt)
    w2 = (torch.randn(D, Hd, device=dev, generator=g) * Hd ** -0.5).to(dt)
    h = torch.randn(M, Hd, device=dev, generator=g).to(dt)
    flops = 2 * M * Hd * D
    operands = (M * D + Hd * D) * BF16
    parts = {"fc1+gelu": (lambda c: GM.linear_bias_gelu(x, w1, b1, c), operands + 2 * M * Hd * BF16),
             "dgrad+gelu_bwd": (lambda c: GM.matmul_gelu_bwd(go, w2, h, True, c), operands + 3 * M * Hd * BF16)}
    for part, (fn, nbytes) in parts.items():
        for name, cfg in GM.CANDIDATES:
            try:
                ms = _time(lambda: fn(cfg), name)
            except Exception as e:  # a tile the card cannot run
                ctx.fail("mlp_gemms", f"{case} {part}", name, e)
                continue
            ctx.add("mlp_gemms", f"{case} {part}", name, ms, bytes_moved=nbytes, flops=flops)
        ctx.speedups("mlp_gemms", f"{case} {part}", "cublas")


def run(ctx: harness.Context) -> None:
    cases = SMOKE_CASES if ctx.smoke else CASES
    names = QUICK if ctx.quick else tuple(cases)
    for name in names:
        N, S, D = cases[name]
        label = f"{name} N={N} S={S} D={D}"
        _bench_add_layer_norm(ctx, label, N, S, D)
        _bench_gelu_linear(ctx, label, N, S, D)
        _bench_mlp(ctx, label, N, S, D)
        _bench_mlp_gemms(ctx, label, N, S, D)
        _bench_self_attention(ctx, label, N, S, D)
        harness.empty_cache()
