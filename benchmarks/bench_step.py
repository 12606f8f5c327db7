"""End to end: one pretraining step (forward + backward + fused AdamW, bf16 autocast) of MAE
ViT-B/16 (B = 256), MAE ViT-L/16 (B = 128) and BEiT-B (B = 256), in images/s, ms/step, peak
memory and MFU against the device's dense bf16 matmul peak (FLOPs counted in code below).

Variants, side by side in one run:
  (a) eager   — the reference math everywhere, explicit attention (as the official MAE code
                ran with timm 0.3.2): ``kernels="eager"``
  (b) timm-sdpa — modern timm ``Attention`` (SDPA) in every block, eager masking and loss
  (c) timm-sdpa+compile — ``torch.compile`` of (b)
  (d) mimfast — ``kernels="auto"``: every hot path on its Triton kernel
  (e) mimfast+compile — ``torch.compile`` of (d) (the ops are torch.library custom ops)

    python -m benchmarks.run --out DIR --only step
"""

from __future__ import annotations

import time

import torch

from benchmarks import harness
from mimfast.models import create_model

BENCH = "step"
DEVICE = "cuda"
MAE_CASES = {"mae_vit_b16": ("mae_vit_base_patch16", 256), "mae_vit_l16": ("mae_vit_large_patch16", 128)}
BEIT_CASES = {"beit_b16": ("beit_base_patch16_224_8k_vocab", 256)}
COMPILE_BUDGET_S = 120  # compile variants are skipped once this much time went to compiling


def _linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


def _block_flops(n: int, s: int, d: int, mlp_ratio: float = 4.0) -> int:
    """One pre-norm ViT block on n sequences of s tokens of width d: qkv, proj, MLP, attention."""
    hidden = int(d * mlp_ratio)
    tokens = n * s
    linear = _linear_flops(tokens, d, 3 * d) + _linear_flops(tokens, d, d)
    linear += _linear_flops(tokens, d, hidden) + _linear_flops(tokens, hidden, d)
    attn = 4 * n * s * s * d  # q k^T and attn @ v
    return linear + attn


def mae_step_flops(model, n: int, mask_ratio: float = 0.75) -> int:
    """FLOPs of one MAE training step: 3 x the forward's matmul FLOPs (backward = 2 x forward)."""
    L = model.patch_embed.num_patches
    K = int(L * (1 - mask_ratio))
    p, C = model.patch_size, model.in_chans
    D = model.cls_token.shape[-1]
    Dd = model.mask_token.shape[-1]
    fwd = _linear_flops(n * K, p * p * C, D)  # the patch embedding of kept patches only
    fwd += sum(_block_flops(n, 1 + K, D) for _ in model.blocks)
    fwd += _linear_flops(n * (1 + K), D, Dd)
    fwd += sum(_block_flops(n, 1 + L, Dd) for _ in model.decoder_blocks)
    fwd += _linear_flops(n * (1 + L), Dd, p * p * C)
    return 3 * fwd


def beit_step_flops(model, n: int, num_masked: int = 75, vocab: int = 8192) -> int:
    L = model.patch_embed.num_patches
    p = model.patch_size
    D = model.cls_token.shape[-1]
    fwd = _linear_flops(n * L, p * p * 3, D)
    fwd += sum(_block_flops(n, 1 + L, D) for _ in model.blocks)
    fwd += _linear_flops(n * num_masked, D, vocab)
    return 3 * fwd


def _to_timm_sdpa(model) -> int:
    """Replace each mimfast Attention by timm's (SDPA) with the same weights."""
    from timm.layers import Attention as TimmAttention

    from mimfast.nn import Attention

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Attention):
                new = TimmAttention(child.qkv.in_features, num_heads=child.num_heads, qkv_bias=True)
                new.qkv, new.proj = child.qkv, child.proj
                setattr(parent, name, new.to(child.qkv.weight.device))
                swapped += 1
    return swapped


def _step_fn(model, loss_fn, opt):
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def _measure(ctx, case, variant, model, loss_fn, n, flops, compile_model=False):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    target = torch.compile(model) if compile_model else model
    step = _step_fn(target, loss_fn(target), opt)
    t0 = time.time()
    for _ in range(3):  # warm-up (and compilation)
        step()
    torch.cuda.synchronize()
    warm_s = time.time() - t0
    peak = harness.peak_memory_bytes(step)
    ms = harness.time_ms(step, warmup_ms=50, rep_ms=400)
    ctx.add(BENCH, case, variant, ms, flops=flops, peak_mem=peak, images_per_s=round(n / ms * 1e3, 1),
            mfu_pct=round(100 * flops / ms / 1e9 / ctx.matmul_tflops, 1), warmup_s=round(warm_s, 1))
    return warm_s


def _mae_cases(ctx, compile_spent):
    cases = {"mae_vit_b16": MAE_CASES["mae_vit_b16"]} if ctx.quick else MAE_CASES
    for case, (name, n) in cases.items():
        g = torch.Generator(device=DEVICE).manual_seed(0)
        imgs = torch.randn(n, 3, 224, 224, device=DEVICE, generator=g)
        noise = torch.rand(n, 196, device=DEVICE, generator=g)

        def loss_fn(m):
            return lambda model: model(imgs, 0.75, noise)[0]

        base = create_model(name, norm_pix_loss=True, kernels="eager").to(DEVICE)
        state = base.state_dict()
        flops = mae_step_flops(base, n)
        variants = [("eager", "eager", False, False), ("timm-sdpa", "eager", True, False),
                    ("timm-sdpa+compile", "eager", True, True), ("mimfast", "auto", False, False),
                    ("mimfast+compile", "auto", False, True)]
        for variant, kernels, sdpa, comp in variants:
            if comp and compile_spent[0] > COMPILE_BUDGET_S:
                continue
            model = create_model(name, norm_pix_loss=True, kernels=kernels).to(DEVICE)
            model.load_state_dict(state)
            if sdpa:
                _to_timm_sdpa(model)
            try:
                spent = _measure(ctx, case, variant, model, loss_fn, n, flops, compile_model=comp)
                if comp:
                    compile_spent[0] += spent
            except Exception as e:  # one failing variant must not hide the others
                ctx.add(BENCH, case, variant, float("nan"), error=f"{type(e).__name__}: {e}"[:200])
            del model
            torch.cuda.empty_cache()
        ctx.speedups(BENCH, case, "eager")
        ctx.speedups(BENCH, case, "timm-sdpa")
        ctx.speedups(BENCH, case, "timm-sdpa+compile")


def _beit_cases(ctx, compile_spent):
    from mimfast.data.masking_generators import BlockwiseMaskingGenerator

    for case, (name, n) in BEIT_CASES.items():
        g = torch.Generator(device=DEVICE).manual_seed(0)
        imgs = torch.randn(n, 3, 224, 224, device=DEVICE, generator=g)
        masks = torch.from_numpy(BlockwiseMaskingGenerator((14, 14), 75)(n)).to(DEVICE).bool()
        labels = torch.randint(0, 8192, (int(masks.sum().item()),), device=DEVICE, generator=g)

        def loss_fn(m):
            return lambda model: model(imgs, masks, labels=labels)

        base = create_model(name, kernels="eager").to(DEVICE)
        state = base.state_dict()
        flops = beit_step_flops(base, n)
        for variant, kernels, comp in [("eager", "eager", False), ("mimfast", "auto", False),
                                       ("mimfast+compile", "auto", True)]:
            if comp and compile_spent[0] > COMPILE_BUDGET_S:
                continue
            model = create_model(name, kernels=kernels).to(DEVICE)
            model.load_state_dict(state)
            try:
                spent = _measure(ctx, case, variant, model, loss_fn, n, flops, compile_model=comp)
                if comp:
                    compile_spent[0] += spent
            except Exception as e:
                ctx.add(BENCH, case, variant, float("nan"), error=f"{type(e).__name__}: {e}"[:200])
            del model
            torch.cuda.empty_cache()
        ctx.speedups(BENCH, case, "eager")


def run(ctx: harness.Context) -> None:
    compile_spent = [0.0]
    _mae_cases(ctx, compile_spent)
    _beit_cases(ctx, compile_spent)
