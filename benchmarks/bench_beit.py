"""BEiT pretraining on the GPU: the LM head + loss alone, and a BEiT-B/16 step.

1. ``lm_head_loss``: BEiT-B's masked LM head and cross-entropy, forward + backward (gradients
   to hidden, weight, bias), M = 256 x 75 = 19200 masked tokens, D = 768, V = 8192, fp32
   hidden and weights under bf16 autocast (what the model feeds it). Variants: eager
   (``F.linear`` + ``F.cross_entropy``, the reference), ``torch.compile`` of it, the fused op
   (``backend="triton"``), the fused op with its gradient GEMMs writing bf16 as eager's do
   (``fp32_gemm_out=False``), and the fused op at other chunk sizes. TFLOP/s counts the three
   matmuls (6 M V D); peak memory is what one forward + backward allocates above the inputs.
   Target: peak <= 0.3x eager at >= 1.0x its speed. Each row also has ``host_ms`` and, but
   for ``torch.compile``, ``graph_ms`` / ``graph_tflops`` (one CUDA graph replay: the kernels
   without launch overhead; ``harness.measure``).
2. ``beit_b16_step``: ``beit_base_patch16_224_8k_vocab``, B = 256 images of 224 px, 75 masked
   patches each (blockwise masks), labels given, bf16 autocast, forward + backward (no optimizer
   step), with ``kernels="eager"`` (explicit attention, full logits), ``kernels="triton"``, and
   ``triton`` with eager attention (how much comes from the attention kernel). TFLOP/s counts
   the model's matmul FLOPs (``bench_step.beit_step_flops``); ``mfu_pct`` is their share of
   the data-sheet bf16 peak, as in bench_step. Peak memory: activations and gradients, above
   the parameters and inputs. Target: >= 1.25x eager at <= 0.8x its peak memory.
3. ``beit_masks``: 256 blockwise masks (14 x 14, 75 masked): the reference's Python loop, the
   batched numpy generator (one CPU core, wall time, median) and the Triton generator on the GPU
   (uniforms drawn + kernel). Target: well under 1 ms.

    python -m benchmarks.run --out DIR --only beit

Smoke mode (``ctx.smoke``, CPU): ``SMOKE`` sizes (B = 2, a 4 x 4 grid with 6 masked, D = 32,
V = 64, a one-block BEiT of 32 px images), the same variants (the compile one left out), one
timed call each.
"""

from __future__ import annotations

import functools
import random
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import harness
from mimfast import ops
from mimfast.data.masking_generators import BlockwiseMaskingGenerator, blockwise_mask_reference
from mimfast.models.beit import beit_base_patch16_224_8k_vocab
from mimfast.nn import BEiTAttention
from mimfast.ops._linear_ce_triton import linear_cross_entropy_triton

BATCH = 256
MASKED = 75
VOCAB = 8192
WIDTH = 768
GRID = 14
CHUNK_ROWS = (1024, 2048, 8192)
MODEL_OVERRIDES: dict = {}
# the smoke run's sizes (CPU, interpreter), same names as above
SMOKE = dict(BATCH=2, MASKED=6, VOCAB=64, WIDTH=32, GRID=4, CHUNK_ROWS=(4, 8, 64),
             MODEL_OVERRIDES=dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, vocab_size=64))


def _sizes(ctx: harness.Context) -> dict:
    names = ("BATCH", "MASKED", "VOCAB", "WIDTH", "GRID", "CHUNK_ROWS", "MODEL_OVERRIDES")
    return dict(SMOKE) if ctx.smoke else {k: globals()[k] for k in names}


# ----------------------------------------------------------------------------------------------
# 1. LM head + loss
# ----------------------------------------------------------------------------------------------

def _eager_lm_loss(hidden, weight, bias, labels):
    # F.linear writes M x V bf16 logits; .float() an fp32 copy; log_softmax another M x V fp32
    # (kept for the backward); the backward writes M x V fp32 then bf16 gradients of the logits
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), labels)


def _lm_fwd_bwd(loss_fn, hidden, weight, bias, labels):
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16):
        loss = loss_fn(hidden, weight, bias, labels)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    return loss, grads


def _bench_lm_head(ctx: harness.Context) -> None:
    sz, dev = _sizes(ctx), ctx.device
    M, D, V = sz["BATCH"] * sz["MASKED"], sz["WIDTH"], sz["VOCAB"]
    bench, case = "beit_lm_head_loss", f"M={M} D={D} V={V} bf16-autocast"
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(M, D, device=dev, generator=g).requires_grad_()
    weight = (torch.randn(V, D, device=dev, generator=g) * 0.02).requires_grad_()
    bias = torch.zeros(V, device=dev).requires_grad_()
    labels = torch.randint(0, V, (M,), device=dev, generator=g)
    flops = 6 * M * V * D

    variants = {
        "eager": _eager_lm_loss,
        "triton": functools.partial(ops.linear_cross_entropy, backend="triton"),
        # the gradient GEMMs writing bf16 as eager's do (grad_W's chunk partials summed in fp32)
        # instead of fp32 from the accumulator: whether cuBLAS's fp32-output GEMM is the slow part
        "triton bf16_gemm_out": functools.partial(linear_cross_entropy_triton, ignore_index=-100,
                                                  fp32_gemm_out=False),
    }
    if not ctx.quick:
        compiled = harness.try_compile(_eager_lm_loss)
        if compiled is not None:
            variants["torch.compile"] = compiled
        for rows in sz["CHUNK_ROWS"]:
            variants[f"triton chunk_rows={rows}"] = functools.partial(linear_cross_entropy_triton, ignore_index=-100,
                                                                      chunk_rows=rows)
    want_loss, want_grads = _lm_fwd_bwd(variants["eager"], hidden, weight, bias, labels)
    for name, loss_fn in variants.items():
        fn = functools.partial(_lm_fwd_bwd, loss_fn, hidden, weight, bias, labels)
        try:
            loss, grads = fn()  # warm-up / compile, and a check against eager on the same inputs
            errs = {f"grad_{k}_rel_err": float(f"{((a.float() - b.float()).norm() / b.float().norm()).item():.2e}")
                    for k, a, b in zip(("hidden", "weight", "bias"), grads, want_grads)}
            loss_err = abs(loss.item() - want_loss.item())
            del loss, grads
            ms = harness.measure(fn, graph=harness.NO_GRAPH_COMPILED if name == "torch.compile" else True)
            peak = harness.peak_memory_bytes(fn)
        except Exception as e:  # e.g. inductor failing, or out of memory: keep the other rows
            print(f"[{bench}] {name} failed: {type(e).__name__}: {e}")
            ctx.fail(bench, case, name, e)
            continue
        ctx.add(bench, case, name, ms, flops=flops, peak_mem=peak, loss_err_vs_eager=float(f"{loss_err:.2e}"),
                **errs)
    _peak_vs_eager(ctx, bench, case)
    ctx.speedups(bench, case, over="eager")
    ctx.speedups(bench, case, over="torch.compile")
    del hidden, weight, bias, labels, want_grads
    harness.empty_cache()


def _peak_vs_eager(ctx: harness.Context, bench: str, case: str) -> None:
    """``peak_vs_eager`` on each row of (bench, case) where peaks were measured (CUDA only)."""
    rows = [r for r in ctx.rows if r["bench"] == bench and r["case"] == case]
    eager = next((r for r in rows if r["variant"] == "eager" and r.get("peak_mem_mib")), None)
    if eager is None:
        return
    for r in rows:
        if "peak_mem_mib" in r:
            r["peak_vs_eager"] = round(r["peak_mem_mib"] / eager["peak_mem_mib"], 3)


# ----------------------------------------------------------------------------------------------
# 2. BEiT-B/16 step
# ----------------------------------------------------------------------------------------------

def _model_flops(model, batch: int, masked: int) -> float:
    """Matmul FLOPs of one forward + backward: bench_step's count for BEiT (3x the forward's,
    the patch embedding 2x)."""
    from benchmarks.bench_step import beit_step_flops

    return float(beit_step_flops(model, batch, masked, model.lm_head.out_features))


def _step(model, imgs, bool_masked_pos, labels, num_masked=None):
    """Forward + backward; the gradients are freed after it, as an optimizer's
    ``zero_grad(set_to_none=True)`` frees them, so the peak memory of a call counts them as
    bench_step does (from a baseline without gradients) for every variant. ``num_masked``: the
    masked tokens gathered by count (mimfast's variants), else by boolean indexing (eager's)."""
    with torch.autocast(imgs.device.type, dtype=torch.bfloat16):
        loss = model(imgs, bool_masked_pos, labels=labels, num_masked=num_masked)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss


def _set(model, kernels: str, attention: str | None = None) -> None:
    model.set_kernels(kernels)
    if attention is not None:
        for m in model.modules():
            if isinstance(m, BEiTAttention):
                m.kernels = attention


def _bench_step(ctx: harness.Context) -> None:
    bench = "beit_b16_step"
    sz, dev = _sizes(ctx), ctx.device
    torch.manual_seed(0)
    model = beit_base_patch16_224_8k_vocab(**sz["MODEL_OVERRIDES"]).to(dev)
    batch, size, L = sz["BATCH"], model.img_size, model.patch_embed.num_patches
    g = torch.Generator(device=dev).manual_seed(0)
    imgs = torch.randn(batch, 3, size, size, device=dev, generator=g)
    masks = BlockwiseMaskingGenerator(tuple(model.patch_embed.grid_size), sz["MASKED"])(
        batch, rng=np.random.default_rng(0))
    bool_masked_pos = torch.from_numpy(masks).flatten(1).to(dev)
    labels = torch.randint(0, model.lm_head.out_features, (batch, L), device=dev, generator=g)
    case = f"B={batch} {size}px bf16-autocast fwd+bwd"
    flops = _model_flops(model, batch, sz["MASKED"])

    variants = [("eager", "eager", None), ("triton", "triton", None)]
    if not ctx.quick:
        variants.append(("triton, attention eager", "triton", "eager"))
    want = None
    for name, kernels, attention in variants:
        _set(model, kernels, attention)
        fn = functools.partial(_step, model, imgs, bool_masked_pos, labels,
                               None if kernels == "eager" else sz["MASKED"])
        try:
            loss = fn().item()  # warm-up (Triton compiles here)
            ms = harness.time_ms(fn, warmup_ms=100, rep_ms=800)
            peak = harness.peak_memory_bytes(fn)
        except Exception as e:  # out of memory at this batch, say: the other variants still run
            print(f"[{bench}] {name} failed at B={batch}: {type(e).__name__}: {e}")
            model.zero_grad(set_to_none=True)
            ctx.fail(bench, case, name, e)
            continue
        want = loss if want is None else want
        ctx.add(bench, case, name, ms, flops=flops, peak_mem=peak, images_per_s=round(batch / ms * 1e3, 1),
                loss=round(loss, 4), loss_diff_vs_eager=float(f"{abs(loss - want):.2e}"), **ctx.mfu(flops, ms))
    _peak_vs_eager(ctx, bench, case)
    ctx.speedups(bench, case, over="eager")
    model.zero_grad(set_to_none=True)
    del model, imgs, labels
    harness.empty_cache()


# ----------------------------------------------------------------------------------------------
# 3. blockwise masks
# ----------------------------------------------------------------------------------------------

def _cpu_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def _bench_masks(ctx: harness.Context) -> None:
    sz = _sizes(ctx)
    batch, grid, masked = sz["BATCH"], sz["GRID"], sz["MASKED"]
    bench, case = "beit_masks", f"{batch} masks {grid}x{grid}, {masked} masked"
    gen = BlockwiseMaskingGenerator(grid, masked)
    rng = np.random.default_rng(0)
    py_rng = random.Random(0)
    gen(batch, rng)  # warm-up
    reps = 1 if ctx.smoke else 3
    ctx.add(bench, case, "reference loop (Python, CPU)",
            _cpu_ms(lambda: [blockwise_mask_reference(grid, grid, masked, rng=py_rng) for _ in range(batch)], reps))
    ctx.add(bench, case, "numpy batched (1 CPU core)", _cpu_ms(lambda: gen(batch, rng), 1 if ctx.smoke else 100))
    g = torch.Generator(device=ctx.device).manual_seed(0)
    fn = functools.partial(gen.torch_masks, batch, device=ctx.device, generator=g, backend="triton")
    try:
        fn()  # compile
        ctx.add(bench, case, "triton (GPU)", harness.time_ms(fn))
    except Exception as e:
        ctx.fail(bench, case, "triton (GPU)", e)
    ctx.speedups(bench, case, over="reference loop (Python, CPU)")


def run(ctx: harness.Context) -> None:
    _bench_lm_head(ctx)
    _bench_step(ctx)
    _bench_masks(ctx)
