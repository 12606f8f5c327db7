"""End to end: one pretraining step (forward + backward + fused AdamW, bf16 autocast) of MAE
ViT-B/16 (B = 256), MAE ViT-L/16 (B = 128) and BEiT-B (B = 256), in images/s, ms/step, peak
memory and MFU against the device's data-sheet dense bf16 peak (FLOPs counted in code below;
``harness.DENSE_BF16_TFLOPS``), and against the measured matmul ceiling beside it.

Variants, side by side in one run:
  (a) eager   — the reference math everywhere, explicit attention (as the official MAE code
                ran with timm 0.3.2): ``kernels="eager"``, timm's own ``Mlp`` in every block
  (b) timm-sdpa — modern timm ``Attention`` (SDPA) in every block, eager masking and loss;
                for BEiT, its attention on SDPA with the relative position bias as the mask,
                as timm's ``Beit`` runs it
  (c) timm-sdpa+compile — ``torch.compile`` of (b)
  (d) mimfast — ``kernels="auto"``: every hot path on its Triton kernel
  (e) mimfast+compile — ``torch.compile`` of (d) (the ops are torch.library custom ops)
and (f) mimfast+cudagraphs — ``torch.compile(mode="reduce-overhead")`` of (d), the step's kernels
replayed from CUDA graphs (``mimfast pretrain --compile --compile-mode reduce-overhead``): for both
MAE cases in full runs, for MAE ViT-B/16 in --quick runs too (the launch-bound shape where it shows
the kernels' speed), after the other compile variants and only while the compile budget lasts;
(g) mimfast+graph — (d) with the whole step (forward, backward, fused AdamW) captured into one CUDA
graph without torch.compile (``mimfast.train.cuda_graph.GraphedStep``, ``mimfast pretrain
--cuda-graph``): a fresh model and optimizer, ``WARMUP_STEPS`` eager steps on a side stream, the
capture, then each timed step copies the inputs into the graph's and replays it; every case, in
--quick runs too (no compile cost). BEiT's mimfast variants gather the masked tokens by their
fixed count (``num_masked``; boolean-mask indexing synchronises mid-step, which capture forbids).
Its peak memory is not given, as for (f): the graph's memory is held from the capture on.
In smoke runs it runs eagerly (GraphedStep's CPU fallback, the same step function). MAE also has
mimfast+graph+unfused-blocks — (g) with ``fused_norm=False``: captured, the unfused blocks' fewer
launches gain nothing, so it shows their GPU time against the fused blocks';
mimfast+graph+grad-checkpointing — (g) with activation checkpointing (full runs: its time);
and ablations of (d), so a run shows what each block fusion is worth. The models run their blocks
fused by default (MAE since the second H200 run measured it faster), so the ablations switch
fusions off:
  mimfast-no-fused-mlp — (d) with ``fused_mlp=False`` (the MLP keeps gelu(h) as eager does)
  mimfast-no-fused-blocks — (d) with ``fused_norm=False`` (plain blocks: residual add and LayerNorm
                as timm runs them, the MLP still :class:`mimfast.nn.Mlp` on ``ops.mlp``; attention,
                masking and loss still on kernels)
  mimfast-no-block-fusions — (MAE) (d) with ``fused_norm=False, fused_mlp=False`` (timm's blocks
                with mimfast's attention)
--quick runs measure issue 9's comparison first: MAE ViT-B/16 and BEiT-B with (a), (b), (c), (d)
and (g) (``QUICK_CORE``), MAE ViT-L/16 with (b), (d), (g) and (c) (``QUICK_L_VARIANTS``; every (c)
while the compile budget lasts), then the other variants of ViT-B/16 and BEiT-B.

    python -m benchmarks.run --out DIR --only step

Every row has ``host_ms``: the CPU's time to enqueue one step (forward, backward, optimizer)
from an idle GPU without synchronising, median of ``HOST_STEPS`` steps after the timed ones
(``harness.host_time_ms``). ``host_ms`` close to ``ms``: the step is CPU-bound (or it waits for
the GPU inside: a step with more launches than the CUDA launch queue holds, or a synchronising
call); well below: the GPU is the limit.

Smoke mode (``ctx.smoke``, CPU): the same cases and variants (compile ones left out) on tiny
models of the same families (``SMOKE_*``: 32 px images, one or two blocks), B = 2, one warm-up
step.
"""

from __future__ import annotations

import time

import torch

from benchmarks import harness
from mimfast.models import create_model
from mimfast.train.cuda_graph import GraphedStep, make_capturable

BENCH = "step"
# case: (model name, batch, model overrides)
MAE_CASES = {"mae_vit_b16": ("mae_vit_base_patch16", 256, {}), "mae_vit_l16": ("mae_vit_large_patch16", 128, {})}
BEIT_CASES = {"beit_b16": ("beit_base_patch16_224_8k_vocab", 256, {})}
MASK_RATIO = 0.75
# the case that runs mimfast+cudagraphs in --quick runs too (its launch-bound shape)
QUICK_CUDAGRAPHS_CASE = "mae_vit_b16"
GRAPH_VARIANT = "mimfast+graph"  # (d) captured whole by GraphedStep (no torch.compile)
# --quick runs: these variants of MAE ViT-B/16 and BEiT-B first (issue 9's comparison), then MAE
# ViT-L/16 with QUICK_L_VARIANTS, then the other variants of ViT-B/16 and BEiT-B
QUICK_CORE = ("eager", "timm-sdpa", "timm-sdpa+compile", "mimfast", GRAPH_VARIANT)
QUICK_L_VARIANTS = ("timm-sdpa", "mimfast", GRAPH_VARIANT, "timm-sdpa+compile")
GRAPH_UNFUSED_VARIANT = "mimfast+graph+unfused-blocks"  # MAE: the same with fused_norm=False
# MAE: captured with activation checkpointing (its blocks draw no random numbers, so their
# checkpoints save no random state and the step can be captured)
GRAPH_CHECKPOINTING_VARIANT = "mimfast+graph+grad-checkpointing"
GRAPH_NOTE = "not measured: the CUDA graph's memory pool is held from the capture on, outside the replay's counts"
BEIT_MASKED = 75  # of 196 patches, as BEiT pretrains
COMPILE_BUDGET_S = 120  # compile variants are skipped once this much time went to compiling
# nor is one started with less of the run's time budget left (ctx.time_left): a cold compile of a
# whole model's forward and backward takes about a minute
COMPILE_MIN_LEFT_S = 120
WARMUP_STEPS = 3
HOST_STEPS = 5  # steps whose enqueue time is measured (host_ms), each from an idle GPU
# smoke run (CPU, interpreter): tiny models of the same families
_SMOKE_MAE = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=24,
                  decoder_depth=1, decoder_num_heads=2)
SMOKE_MAE_CASES = {"mae_vit_b16": ("mae_vit_tiny_patch16", 2, _SMOKE_MAE),
                   "mae_vit_l16": ("mae_vit_tiny_patch16", 2, dict(_SMOKE_MAE, depth=2))}
SMOKE_BEIT_CASES = {"beit_b16": ("beit_base_patch16_224_8k_vocab", 2,
                                 dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, vocab_size=64))}
SMOKE_BEIT_MASKED = 6  # of 16 patches
# (variant, kernels, timm SDPA, compile, model kwargs): (d) with one block fusion off
BEIT_ABLATIONS = [("mimfast-no-fused-mlp", "auto", False, False, {"fused_mlp": False}),
                  ("mimfast-no-fused-blocks", "auto", False, False, {"fused_norm": False}),
                  # activation checkpointing: its time cost and peak memory (an option, not an
                  # ablation; full runs only: --quick runs keep their budget for the comparison)
                  ("mimfast-grad-checkpointing", "auto", False, False, {"grad_checkpointing": True})]
FULL_ONLY = ("mimfast-grad-checkpointing", GRAPH_CHECKPOINTING_VARIANT)
MAE_ABLATIONS = BEIT_ABLATIONS + [("mimfast-no-block-fusions", "auto", False, False,
                                   {"fused_norm": False, "fused_mlp": False})]


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
    """Matmul FLOPs of one MAE training step: 3 x the forward's (the backward computes the
    gradients of a layer's input and of its weight, 2 x its forward), except the patch
    embedding, 2 x: the images need no gradient. The patch embedding counts the kept patches
    only (what the model needs; the reference embeds all L and then drops 75%)."""
    L = model.patch_embed.num_patches
    K = int(L * (1 - mask_ratio))
    p, C = model.patch_size, model.in_chans
    D = model.cls_token.shape[-1]
    Dd = model.mask_token.shape[-1]
    patch = _linear_flops(n * K, p * p * C, D)
    fwd = sum(_block_flops(n, 1 + K, D) for _ in model.blocks)
    fwd += _linear_flops(n * (1 + K), D, Dd)
    fwd += sum(_block_flops(n, 1 + L, Dd) for _ in model.decoder_blocks)
    fwd += _linear_flops(n * (1 + L), Dd, p * p * C)
    return 3 * fwd + 2 * patch


def beit_step_flops(model, n: int, num_masked: int = BEIT_MASKED, vocab: int = 8192) -> int:
    """Matmul FLOPs of one BEiT training step: 3 x the forward's, the patch embedding 2 x (no
    gradient for the images); the LM head on the masked tokens only, as the model runs it."""
    L = model.patch_embed.num_patches
    p = model.patch_size
    D = model.cls_token.shape[-1]
    patch = _linear_flops(n * L, p * p * 3, D)
    fwd = sum(_block_flops(n, 1 + L, D) for _ in model.blocks)
    fwd += _linear_flops(n * num_masked, D, vocab)
    return 3 * fwd + 2 * patch


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
                # SDPA whatever TIMM_FUSED_ATTN says: with it off this would be variant (a) again
                new.fused_attn = True
                setattr(parent, name, new.to(child.qkv.weight.device))
                swapped += 1
    return swapped


def _to_timm_mlp(model) -> int:
    """Turn each :class:`mimfast.nn.Mlp` back into timm's ``Mlp`` (same modules and weights), so
    the reference variants run timm's MLP as their users do."""
    from timm.layers import Mlp as TimmMlp

    from mimfast.nn import Mlp

    mlps = [m for m in model.modules() if type(m) is Mlp]
    for m in mlps:
        m.__class__ = TimmMlp
    return len(mlps)


def variant_model(name: str, kernels: str, sdpa: bool, device, state: dict | None = None, **model_kwargs):
    """A fresh model of one step variant (with ``state``'s weights where given): the reference
    variants (``kernels="eager"``) on timm's own ``Mlp``, and with ``sdpa`` their attention on
    SDPA (timm's ``Attention`` in MAE blocks, timm ``Beit``'s way in BEiT blocks).
    ``grad_checkpointing=True`` among ``model_kwargs`` switches on activation checkpointing."""
    checkpointing = model_kwargs.pop("grad_checkpointing", False)
    model = create_model(name, kernels=kernels, **model_kwargs).to(device)
    model.set_grad_checkpointing(checkpointing)  # (every model here has the switch)
    if state is not None:
        model.load_state_dict(state)
    if kernels == "eager":
        _to_timm_mlp(model)
    if sdpa:
        _to_timm_sdpa(model)  # each swaps its own kind of attention module only
        _beit_to_sdpa(model)
    return model


def _beit_sdpa_forward(self, x, rel_pos_bias=None):
    """BEiTAttention's forward as timm's ``Beit`` attention runs it with fused attention: q, k, v
    split from the qkv projection (permute), ``F.scaled_dot_product_attention`` with the bias as
    ``attn_mask`` (broadcast over the batch), heads merged (transpose + reshape), ``proj``."""
    B, S, _ = x.shape
    qkv_bias = None
    if self.q_bias is not None:
        qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias, requires_grad=False), self.v_bias))
    qkv = torch.nn.functional.linear(x, self.qkv.weight, qkv_bias)
    q, k, v = qkv.reshape(B, S, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    bias = rel_pos_bias
    if self.relative_position_bias_table is not None:
        s = self.window_size[0] * self.window_size[1] + 1
        own = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(s, s, -1)
        own = own.permute(2, 0, 1).contiguous()
        bias = own if bias is None else own + bias
    mask = None if bias is None else bias.to(q.dtype).unsqueeze(0)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
    return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, S, -1)))


def _beit_to_sdpa(model) -> int:
    """Run every BEiTAttention of ``model`` through SDPA (:func:`_beit_sdpa_forward`), weights
    unchanged; returns how many."""
    import types

    from mimfast.nn import BEiTAttention

    n = 0
    for m in model.modules():
        if isinstance(m, BEiTAttention):
            m.forward = types.MethodType(_beit_sdpa_forward, m)
            n += 1
    return n


def _step_fn(model, loss_fn, opt, device):
    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = loss_fn(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def _measure(ctx, case, variant, model, loss_fn, n, flops, compile_model=False):
    """``compile_model``: False, True (``torch.compile`` default mode) or a compile mode name."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    if compile_model:
        # static shapes, as harness.try_compile: ViT-L after ViT-B would otherwise compile shape-generic
        harness.static_compile_settings()
        target = torch.compile(model, dynamic=False, **({} if compile_model is True else {"mode": compile_model}))
    else:
        target = model
    step = _step_fn(target, loss_fn(target), opt, ctx.device)
    try:
        t0 = time.time()
        for _ in range(1 if ctx.smoke else WARMUP_STEPS):  # warm-up (and compilation)
            step()
        harness.sync()
        warm_s = time.time() - t0
        _record(ctx, case, variant, step, n, flops, warm_s, graphs=compile_model == "reduce-overhead")
    finally:
        if compile_model:
            # dynamo's caches keep the compiled step alive, and with it (mode "reduce-overhead")
            # its CUDA graphs' memory pool: freed before the next variant runs beside it
            import torch._dynamo as dynamo

            del step, target
            dynamo.reset()
    return warm_s


def _record(ctx, case, variant, step, n, flops, warm_s, graphs: bool) -> None:
    """Time a warmed-up ``step`` and add its row. ``graphs``: the step replays CUDA graphs, whose
    memory pool is outside the allocator's counts from the capture on (its peak would read as
    almost nothing): no peak is given, a note says why."""
    peak = None if graphs else harness.peak_memory_bytes(step)
    ms = harness.time_ms(step, warmup_ms=50, rep_ms=400)
    # off CUDA (smoke) a step is synchronous: its host time is its time
    host = harness.host_time_ms(step, calls=1, rounds=HOST_STEPS, warmup=False)
    extra = {"peak_mem_note": GRAPH_NOTE} if graphs else {}
    timing = harness.Timing(ms, host_ms=ms if host is None else host)
    ctx.add(BENCH, case, variant, timing, flops=flops, peak_mem=peak, images_per_s=round(n / ms * 1e3, 1),
            **ctx.mfu(flops, ms), warmup_s=round(warm_s, 1), **extra)


def _measure_graphed(ctx, case, model, loss, inputs, n, flops, variant=GRAPH_VARIANT):
    """Variant (g): the step of ``model`` (kernels "auto"), ``loss(model, *inputs)`` under bf16
    autocast + backward + fused AdamW, captured by :class:`GraphedStep` after the warm-up and
    timed by calls that copy ``inputs`` into the graph's inputs and replay it (what a training
    loop does). Off CUDA (smoke) the same calls run eagerly."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    make_capturable(opt)  # the learning rate a device tensor, the step counters on the device

    def step_fn(*args):
        with torch.autocast(ctx.device, dtype=torch.bfloat16):
            out = loss(model, *args)
        out.backward()
        opt.step()
        return out.detach()

    t0 = time.time()
    graphed = GraphedStep(step_fn, inputs, optimizer=opt, warmup=1 if ctx.smoke else WARMUP_STEPS)
    try:
        def step():
            return graphed(*inputs)

        if not graphed.captured:  # the eager fallback: one warm-up call, as _measure
            step()
        harness.sync()
        _record(ctx, case, variant, step, n, flops, time.time() - t0, graphs=graphed.captured)
    finally:
        graphed.reset()  # its memory pool, before the next variant runs beside it


def _skip_compile(ctx, case, variant, compile_spent) -> bool:
    """Whether to leave a compile variant out (recorded with the reason, except in a smoke run)."""
    if ctx.smoke:
        return True
    if compile_spent[0] > COMPILE_BUDGET_S:
        reason = f"{compile_spent[0]:.0f} s already spent compiling (COMPILE_BUDGET_S = {COMPILE_BUDGET_S})"
    elif ctx.time_left() < COMPILE_MIN_LEFT_S:
        reason = f"{max(ctx.time_left(), 0):.0f} s of the run's time budget left (< {COMPILE_MIN_LEFT_S})"
    else:
        return False
    print(f"  [{BENCH}] {case} {variant}: left out, {reason}", flush=True)
    ctx.skip(BENCH, case, variant, reason)
    return True


def _keep(variants, only, exclude):
    """The variants named in ``only`` (all when None) and not in ``exclude``."""
    return [v for v in variants if (only is None or v[0] in only) and v[0] not in exclude]


def _mae_cases(ctx, compile_spent, names=None, only=None, exclude=()):
    """The MAE step cases (``names``: those of them; default all, ViT-B/16 alone in --quick runs),
    each with every variant (``only``: those of them; ``exclude``: not those)."""
    dev = ctx.device
    all_cases = SMOKE_MAE_CASES if ctx.smoke else MAE_CASES
    names = names or (["mae_vit_b16"] if ctx.quick else list(all_cases))
    for case, (name, n, overrides) in ((c, all_cases[c]) for c in names):
        base = create_model(name, norm_pix_loss=True, kernels="eager", **overrides).to(dev)
        state = base.state_dict()
        flops = mae_step_flops(base, n, MASK_RATIO)
        size, L = base.img_size, base.patch_embed.num_patches
        del base
        g = torch.Generator(device=dev).manual_seed(0)
        imgs = torch.randn(n, 3, size, size, device=dev, generator=g)
        noise = torch.rand(n, L, device=dev, generator=g)

        def loss_fn(m):
            return lambda model: model(imgs, MASK_RATIO, noise)[0]

        variants = [("eager", "eager", False, False, {}), ("timm-sdpa", "eager", True, False, {}),
                    ("timm-sdpa+compile", "eager", True, True, {}), ("mimfast", "auto", False, False, {}),
                    ("mimfast+compile", "auto", False, True, {})] + MAE_ABLATIONS
        # captured, the fused blocks' extra launches cost nothing: the GPU time of both block forms
        variants += [(GRAPH_VARIANT, "auto", False, False, {}), (GRAPH_UNFUSED_VARIANT, "auto", False, False,
                                                                  {"fused_norm": False}),
                     (GRAPH_CHECKPOINTING_VARIANT, "auto", False, False, {"grad_checkpointing": True})]
        if not ctx.quick or case == QUICK_CUDAGRAPHS_CASE:
            variants.append(("mimfast+cudagraphs", "auto", False, "reduce-overhead", {}))
        for variant, kernels, sdpa, comp, extra in _keep(variants, only, exclude):
            if comp and _skip_compile(ctx, case, variant, compile_spent):
                continue
            model = variant_model(name, kernels, sdpa, dev, state, norm_pix_loss=True, **overrides, **extra)
            t0 = time.time()
            try:
                if variant.startswith(GRAPH_VARIANT):
                    _measure_graphed(ctx, case, model, lambda m, x, z: m(x, MASK_RATIO, z)[0], (imgs, noise), n,
                                     flops, variant)
                else:
                    _measure(ctx, case, variant, model, loss_fn, n, flops, compile_model=comp)
            except Exception as e:  # one failing variant must not hide the others
                ctx.fail(BENCH, case, variant, e)
            if comp:  # a compile that failed late took its time too
                compile_spent[0] += time.time() - t0
            del model
            harness.empty_cache()
        ctx.speedups(BENCH, case, "eager")
        ctx.speedups(BENCH, case, "timm-sdpa")
        ctx.speedups(BENCH, case, "timm-sdpa+compile")


def _beit_cases(ctx, compile_spent, only=None, exclude=()):
    """The BEiT step cases with every variant (``only``: those of them; ``exclude``: not those)."""
    from mimfast.data.masking_generators import BlockwiseMaskingGenerator

    dev = ctx.device
    cases, num_masked = (SMOKE_BEIT_CASES, SMOKE_BEIT_MASKED) if ctx.smoke else (BEIT_CASES, BEIT_MASKED)
    for case, (name, n, overrides) in cases.items():
        base = create_model(name, kernels="eager", **overrides).to(dev)
        state = base.state_dict()
        vocab = base.lm_head.out_features
        flops = beit_step_flops(base, n, num_masked, vocab)
        size, grid = base.img_size, tuple(base.patch_embed.grid_size)
        del base
        g = torch.Generator(device=dev).manual_seed(0)
        imgs = torch.randn(n, 3, size, size, device=dev, generator=g)
        masks = torch.from_numpy(BlockwiseMaskingGenerator(grid, num_masked)(n)).to(dev).bool()
        labels = torch.randint(0, vocab, (int(masks.sum().item()),), device=dev, generator=g)

        def loss_fn(m):
            if m.kernels == "eager":  # the references gather the masked tokens as the official code
                return lambda model: model(imgs, masks, labels=labels)
            # mimfast's: by the fixed count per image, with no host synchronisation mid-step
            return lambda model: model(imgs, masks, labels=labels, num_masked=num_masked)

        def graph_loss(model, imgs, masks, labels):
            return model(imgs, masks, labels=labels, num_masked=num_masked)

        # as for MAE: (b) / (c) run BEiT's attention on SDPA with the relative position bias as
        # its mask (timm's Beit does so), everything else eager
        variants = [("eager", "eager", False, False, {}), ("timm-sdpa", "eager", True, False, {}),
                    ("timm-sdpa+compile", "eager", True, True, {}), ("mimfast", "auto", False, False, {}),
                    ("mimfast+compile", "auto", False, True, {})] + BEIT_ABLATIONS
        variants.append((GRAPH_VARIANT, "auto", False, False, {}))
        for variant, kernels, sdpa, comp, extra in _keep(variants, only, exclude):
            if comp and _skip_compile(ctx, case, variant, compile_spent):
                continue
            model = variant_model(name, kernels, sdpa, dev, state, **overrides, **extra)
            t0 = time.time()
            try:
                if variant == GRAPH_VARIANT:
                    _measure_graphed(ctx, case, model, graph_loss, (imgs, masks, labels), n, flops)
                else:
                    _measure(ctx, case, variant, model, loss_fn, n, flops, compile_model=comp)
            except Exception as e:
                ctx.fail(BENCH, case, variant, e)
            if comp:
                compile_spent[0] += time.time() - t0
            del model
            harness.empty_cache()
        ctx.speedups(BENCH, case, "eager")
        ctx.speedups(BENCH, case, "timm-sdpa")
        ctx.speedups(BENCH, case, "timm-sdpa+compile")


def run(ctx: harness.Context) -> None:
    compile_spent = [0.0]
    if not ctx.quick:
        _mae_cases(ctx, compile_spent)
        _beit_cases(ctx, compile_spent)
        return
    # issue 9's comparison for each model first ((a), (b), (c) while the compile budget lasts,
    # (d) eager and captured), the ablations after: the third H200 run spent its budget on MAE's
    # ablations and left BEiT's and MAE ViT-L/16's (c) out
    _mae_cases(ctx, compile_spent, ["mae_vit_b16"], QUICK_CORE)
    _beit_cases(ctx, compile_spent, QUICK_CORE)
    _mae_cases(ctx, compile_spent, ["mae_vit_l16"], QUICK_L_VARIANTS)
    _mae_cases(ctx, compile_spent, ["mae_vit_b16"], exclude=QUICK_CORE + FULL_ONLY)
    _beit_cases(ctx, compile_spent, exclude=QUICK_CORE + FULL_ONLY)
