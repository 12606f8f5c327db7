"""Where the time of an MAE ViT-B/16 training step goes (B = 256, bf16 autocast, kernels on):
the 25 largest CUDA time consumers from ``torch.profiler``, grouped by operator, as rows of the
results table. This is the evidence for choosing the next fusions (issue: end-to-end speed).

An operator's time is the GPU time of the kernels it launched itself (its children's kernels
are theirs); ``share_pct`` is its part of all kernels' GPU time. The profiler also lists each
kernel as an event of its own, which holds the same time again: those are not rows, they are
the total. Kernels that no operator claims show as one row, ``(kernels outside any operator)``.

    python -m benchmarks.run --out DIR --only profile

Each case also has a ``(step wall time)`` row (steps back to back, no profiler) and an
``(all kernels)`` row (the GPU time of all of a step's kernels): their gap is the time the GPU
waits for the host. Rows with ``by_shape`` split the generic operators (``BY_SHAPE``: matmuls,
casts, sums, adds, GELU) by their inputs' shapes, the largest five of each: which of a step's
matmuls run slowly, which tensors are cast (the third H200 run's MAE step spent 1.2 ms in
``aten::copy_`` from call sites it could not name).

Cases: the MAE step with kernels on (its blocks fused: residual add + LayerNorm, the MLP), with its
blocks unfused too (timm's residual adds and LayerNorms) and, in full runs, eager; BEiT-B's step with
kernels on (B = 256, 75 masked patches); and BEiT-B's LM-head loss
(linear + cross-entropy, forward and backward, M = 19200 rows, D = 768, V = 8192, bf16 autocast)
on its Triton path and eager: where that op's time goes (its matmuls, the cross-entropy kernel,
the fp32 gradient accumulation) beside eager's.

While profiling, every kernel launch of the ops goes through its ``torch.library`` custom op
(``mimfast.ops._custom_op.ALWAYS_DISPATCH``), so the profiler names the op that launched each
Triton kernel (a direct launch has no operator event to claim it). That adds host time, not GPU
time: the rows are GPU time.

Smoke mode (``ctx.smoke``, CPU): a one-block MAE and BEiT of 32 px images, B = 2, and an LM head of
M = 64, D = 32, V = 128, one warm-up and one profiled step, CPU activities only; rows rank the
self CPU time instead.
"""

from __future__ import annotations

import contextlib
import functools
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks import harness
from mimfast import ops
from mimfast.models import create_model
from mimfast.ops import _custom_op

BENCH = "profile"
MODEL = ("mae_vit_base_patch16", 256, {})  # name, batch, overrides
SMOKE_MODEL = ("mae_vit_tiny_patch16", 2, dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                               decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2))
BEIT = ("beit_base_patch16_224_8k_vocab", 256, {}, 75)  # name, batch, overrides, masked patches
SMOKE_BEIT = ("beit_base_patch16_224_8k_vocab", 2,
              dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, vocab_size=64), 6)
LM_HEAD = (256 * 75, 768, 8192)  # BEiT-B: rows (B x masked patches), width, vocabulary
SMOKE_LM_HEAD = (64, 32, 128)


@contextlib.contextmanager
def _named_launches():
    """Every kernel launch through its custom op while profiling (module docstring)."""
    before = _custom_op.ALWAYS_DISPATCH
    _custom_op.ALWAYS_DISPATCH = True
    try:
        yield
    finally:
        _custom_op.ALWAYS_DISPATCH = before


def _profile(ctx, case: str, kernels: str, top: int = 25, **model_kwargs) -> None:
    dev = ctx.device
    name, n, overrides = SMOKE_MODEL if ctx.smoke else MODEL
    model = create_model(name, norm_pix_loss=True, kernels=kernels, **overrides, **model_kwargs).to(dev)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    size, L = model.img_size, model.patch_embed.num_patches
    g = torch.Generator(device=dev).manual_seed(0)
    imgs = torch.randn(n, 3, size, size, device=dev, generator=g)
    noise = torch.rand(n, L, device=dev, generator=g)

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = model(imgs, 0.75, noise)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    _profile_steps(ctx, case, step, top)


def _profile_beit(ctx, case: str, kernels: str, top: int = 25) -> None:
    """BEiT-B's pretraining step (75 of 196 patches masked, bf16 autocast, fused AdamW), its
    masked tokens gathered by count where kernels are on (as the step benchmark runs it)."""
    from mimfast.data.masking_generators import BlockwiseMaskingGenerator

    dev = ctx.device
    name, n, overrides, masked = SMOKE_BEIT if ctx.smoke else BEIT
    model = create_model(name, kernels=kernels, **overrides).to(dev)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    g = torch.Generator(device=dev).manual_seed(0)
    size, grid = model.img_size, tuple(model.patch_embed.grid_size)
    imgs = torch.randn(n, 3, size, size, device=dev, generator=g)
    masks = torch.from_numpy(BlockwiseMaskingGenerator(grid, masked)(n)).to(dev).bool()
    labels = torch.randint(0, model.lm_head.out_features, (n * masked,), device=dev, generator=g)
    count = {} if kernels == "eager" else {"num_masked": masked}

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = model(imgs, masks, labels=labels, **count)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    _profile_steps(ctx, case, step, top)


def _profile_steps(ctx, case: str, step, top: int) -> None:
    """Warm-up steps, the timed ones, then the profiled ones; one row per top consumer, in ms per
    step, and two rows that say whether the step is launch-bound: ``(step wall time)`` (the
    steps run back to back without the profiler, as training runs them; launches made directly,
    not through the custom ops) and ``(all kernels)`` (the GPU time of every kernel of a step:
    where it is well below the wall time, the GPU waits for the host)."""
    on_cuda = ctx.device == "cuda"
    steps = 1 if ctx.smoke else 3
    for _ in range(1 if ctx.smoke else 3):
        step()
    harness.sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    harness.sync()
    ctx.add(BENCH, case, "(step wall time)", (time.perf_counter() - t0) * 1e3 / steps)
    with _named_launches():
        step()  # the launches through the custom ops: a first call of each takes the slow path
        harness.sync()
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_cuda else [ProfilerActivity.CPU]
        with profile(activities=activities, record_shapes=True) as prof:
            for _ in range(steps):
                step()
            harness.sync()
    consumers, total = top_consumers(prof.key_averages(), on_cuda, top, with_total=True)
    ctx.add(BENCH, case, "(all kernels)" if on_cuda else "(all operators, CPU)", total / 1e3 / steps)
    for key, self_us, count, share in consumers:
        ctx.add(BENCH, case, key[:80], self_us / 1e3 / steps,  # profiler times are in microseconds
                calls_per_step=count // steps, share_pct=round(share, 1))
    # the generic operators split by their inputs' shapes: which matmuls, casts and sums they are
    for key, shapes, self_us, count, share in by_input_shape(prof.key_averages(group_by_input_shape=True),
                                                             on_cuda, total):
        ctx.add(BENCH, case, f"{key} {shapes}"[:160], self_us / 1e3 / steps, calls_per_step=count // steps,
                share_pct=round(share, 1), by_shape=True)


def _profile_lm_head(ctx, case: str, backend: str, top: int = 15) -> None:
    """BEiT-B's LM-head loss, forward + backward (gradients of hidden, weight and bias)."""
    dev = ctx.device
    M, D, V = SMOKE_LM_HEAD if ctx.smoke else LM_HEAD
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(M, D, device=dev, generator=g).requires_grad_()
    weight = (torch.randn(V, D, device=dev, generator=g) * 0.02).requires_grad_()
    bias = torch.zeros(V, device=dev).requires_grad_()
    labels = torch.randint(0, V, (M,), device=dev, generator=g)
    loss_fn = functools.partial(ops.linear_cross_entropy, backend=backend)

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = loss_fn(hidden, weight, bias, labels)
        torch.autograd.grad(loss, (hidden, weight, bias))

    _profile_steps(ctx, case, step, top)


def top_consumers(events, on_cuda: bool, top: int, with_total: bool = False):
    """(key, self time in us, calls, % of the total) of the ``top`` largest operators (and the
    total in us, with ``with_total``).

    On CUDA: operators (CPU-side events) ranked by the GPU time of the kernels each launched
    itself, against the total of the kernel events (user annotations on the GPU timeline left
    out: they span kernels counted already). On the CPU (smoke run): self CPU time.
    """
    if on_cuda:
        ops = [e for e in events if e.device_type == DeviceType.CPU and e.self_device_time_total > 0]
        kernels = [e for e in events
                   if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)]
        total = sum(e.self_device_time_total for e in kernels)
        rows = [(e.key, e.self_device_time_total, e.count) for e in ops]
        claimed = sum(r[1] for r in rows)
        if total - claimed > 0.01 * total:
            rows.append(("(kernels outside any operator)", total - claimed, 0))
    else:
        rows = [(e.key, e.self_cpu_time_total, e.count) for e in events if e.self_cpu_time_total > 0]
        total = sum(r[1] for r in rows)
    rows.sort(key=lambda r: r[1], reverse=True)
    out = [(k, t, n, 100 * t / (total or 1.0)) for k, t, n in rows[:top]]
    return (out, total) if with_total else out


# operators whose rows say little without their shapes (several call sites each)
BY_SHAPE = ("aten::mm", "aten::addmm", "aten::copy_", "aten::sum", "aten::add", "aten::gelu")
BY_SHAPE_TOP = 5  # largest shapes of each


def by_input_shape(events, on_cuda: bool, total: float, names=BY_SHAPE, top: int = BY_SHAPE_TOP):
    """(operator, input shapes, self time in us, calls, % of ``total``) of the ``top`` largest
    input-shape groups of each operator in ``names`` (events from ``key_averages(
    group_by_input_shape=True)`` of a profile that recorded shapes): GPU time on CUDA, self CPU
    time otherwise; per operator in ``names``' order, largest first."""
    out = []
    for name in names:
        rows = []
        for e in events:
            if e.key != name or (on_cuda and e.device_type != DeviceType.CPU):
                continue
            t = e.self_device_time_total if on_cuda else e.self_cpu_time_total
            if t > 0:  # the tensor inputs' shapes (scalars and unrecorded inputs left out)
                shapes = ", ".join("x".join(map(str, s)) for s in (e.input_shapes or []) if s)
                rows.append((name, f"[{shapes or '()'}]", t, e.count))
        rows.sort(key=lambda r: r[2], reverse=True)
        out += [(k, sh, t, n, 100 * t / (total or 1.0)) for k, sh, t, n in rows[:top]]
    return out


def run(ctx: harness.Context) -> None:
    _profile(ctx, "mae_vit_b16_mimfast", "auto")
    # the blocks unfused (the model's default is fused): where the other form's time goes
    _profile(ctx, "mae_vit_b16_mimfast_unfused_blocks", "auto", fused_norm=False)
    _profile_beit(ctx, "beit_b16_mimfast", "auto")
    _profile_lm_head(ctx, "beit_lm_head_triton", "triton" if ctx.device == "cuda" or ctx.smoke else "eager")
    _profile_lm_head(ctx, "beit_lm_head_eager", "eager")
    if not ctx.quick:
        _profile(ctx, "mae_vit_b16_eager", "eager")
