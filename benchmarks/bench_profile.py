"""Where the time of an MAE ViT-B/16 training step goes (B = 256, bf16 autocast, kernels on):
the 25 largest CUDA time consumers from ``torch.profiler``, grouped by operator, as rows of the
results table. This is the evidence for choosing the next fusions (issue: end-to-end speed).

    python -m benchmarks.run --out DIR --only profile
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import harness
from mimfast.models import create_model

BENCH = "profile"
DEVICE = "cuda"


def _profile(ctx, case: str, kernels: str, n: int = 256, top: int = 25) -> None:
    model = create_model("mae_vit_base_patch16", norm_pix_loss=True, kernels=kernels).to(DEVICE)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    imgs = torch.randn(n, 3, 224, 224, device=DEVICE, generator=g)
    noise = torch.rand(n, 196, device=DEVICE, generator=g)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(imgs, 0.75, noise)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    steps = 3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    for e in events[:top]:
        ms = e.self_device_time_total / 1e3 / steps  # profiler times are in microseconds
        ctx.add(BENCH, case, e.key[:80], ms, calls_per_step=e.count // steps,
                share_pct=round(100 * e.self_device_time_total / total, 1))


def run(ctx: harness.Context) -> None:
    _profile(ctx, "mae_vit_b16_mimfast", "auto")
    if not ctx.quick:
        _profile(ctx, "mae_vit_b16_eager", "eager")
