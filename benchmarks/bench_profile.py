"""Where the time of an MAE ViT-B/16 training step goes (B = 256, bf16 autocast, kernels on):
the 25 largest CUDA time consumers from ``torch.profiler``, grouped by operator, as rows of the
results table. This is the evidence for choosing the next fusions (issue: end-to-end speed).

    python -m benchmarks.run --out DIR --only profile

Smoke mode (``ctx.smoke``, CPU): a one-block MAE of 32 px images, B = 2, one warm-up and one
profiled step, CPU activities only; rows rank the self CPU time instead.
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import harness
from mimfast.models import create_model

BENCH = "profile"
MODEL = ("mae_vit_base_patch16", 256, {})  # name, batch, overrides
SMOKE_MODEL = ("mae_vit_tiny_patch16", 2, dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                               decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2))


def _profile(ctx, case: str, kernels: str, top: int = 25) -> None:
    dev = ctx.device
    on_cuda = dev == "cuda"
    name, n, overrides = SMOKE_MODEL if ctx.smoke else MODEL
    model = create_model(name, norm_pix_loss=True, kernels=kernels, **overrides).to(dev)
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

    for _ in range(1 if ctx.smoke else 3):
        step()
    harness.sync()
    steps = 1 if ctx.smoke else 3
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        harness.sync()

    # on CUDA the GPU time of each operator; on the CPU (smoke run) its own CPU time
    def total(e):
        return e.device_time_total if on_cuda else e.cpu_time_total

    def self_time(e):
        return e.self_device_time_total if on_cuda else e.self_cpu_time_total

    events = [e for e in prof.key_averages() if total(e) > 0]
    overall = sum(self_time(e) for e in events) or 1.0
    events.sort(key=self_time, reverse=True)
    for e in events[:top]:
        ms = self_time(e) / 1e3 / steps  # profiler times are in microseconds
        ctx.add(BENCH, case, e.key[:80], ms, calls_per_step=e.count // steps,
                share_pct=round(100 * self_time(e) / overall, 1))


def run(ctx: harness.Context) -> None:
    _profile(ctx, "mae_vit_b16_mimfast", "auto")
    if not ctx.quick:
        _profile(ctx, "mae_vit_b16_eager", "eager")
