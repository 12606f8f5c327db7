"""How the benchmarks compute their figures, checked on the CPU: the step's FLOP count against
PyTorch's FLOP counter, the input pipeline's measurement windows on a simulated loader, the
compile settings, the SDPA baseline really on SDPA, and what the BEiT step's peak counts.

The GPU run's numbers become the project's published figures; a wrong formula or window there
costs a GPU run to find, so each is checked here where it can be without a GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # plain `pytest` puts tests/ on sys.path, not the repo root
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_input_pipeline as bip  # noqa: E402
from benchmarks import bench_step, harness  # noqa: E402
from mimfast.models import create_model  # noqa: E402

_MAE = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=24,
            decoder_depth=1, decoder_num_heads=2)
_BEIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, vocab_size=64)


def _counted(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def test_mae_step_flops_match_the_flop_counter():
    """The eager model's forward + backward, counted by PyTorch, is the formula plus the
    patches the reference embeds and then drops (the formula counts the kept ones only)."""
    torch.manual_seed(0)
    n, ratio = 3, 0.75
    model = create_model("mae_vit_tiny_patch16", norm_pix_loss=True, kernels="eager", **_MAE)
    L, p, D = model.patch_embed.num_patches, model.patch_size, 32
    K = int(L * (1 - ratio))
    imgs = torch.randn(n, 3, 32, 32)

    def step():
        model(imgs, ratio)[0].backward()

    dropped = 2 * n * (L - K) * (3 * p * p) * D  # per pass over the removed patches
    assert _counted(step) == bench_step.mae_step_flops(model, n, ratio) + 2 * dropped  # forward + weight grad


def test_beit_step_flops_match_the_flop_counter():
    from benchmarks.bench_beit import _model_flops

    torch.manual_seed(0)
    n, masked = 2, 6
    model = create_model("beit_base_patch16_224_8k_vocab", kernels="eager", **_BEIT)
    L = model.patch_embed.num_patches
    imgs = torch.randn(n, 3, 32, 32)
    mask = torch.zeros(n, L, dtype=torch.bool)
    mask[:, :masked] = True
    labels = torch.randint(0, 64, (n * masked,))

    def step():
        model(imgs, mask, labels=labels).backward()

    want = bench_step.beit_step_flops(model, n, masked, 64)
    assert _counted(step) == want
    assert _model_flops(model, n, masked) == want  # bench_beit's step counts the same


def test_beit_bench_step_frees_the_gradients():
    """peak_memory_bytes measures from what is allocated before the call: gradients left from
    the previous call would be in that baseline and freed inside the call, off the peak."""
    from benchmarks.bench_beit import _step

    model = create_model("beit_base_patch16_224_8k_vocab", kernels="eager", **_BEIT)
    L = model.patch_embed.num_patches
    mask = torch.zeros(2, L, dtype=torch.bool)
    mask[:, :3] = True
    loss = _step(model, torch.randn(2, 3, 32, 32), mask, torch.randint(0, 64, (6,)))
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in model.parameters())


def test_try_compile_specialises_shapes(monkeypatch, dynamo_recompile_limit):
    import torch._dynamo

    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    monkeypatch.setattr(harness, "_active", dict(harness._active, smoke=False, deadline=float("inf")))
    torch._dynamo.config.recompile_limit = 8
    assert harness.try_compile(len) is len
    assert seen == [{"dynamic": False}]
    assert torch._dynamo.config.recompile_limit >= harness.RECOMPILE_LIMIT
    harness.try_compile(len, dynamic=None)  # a caller may still ask otherwise
    assert seen[-1] == {"dynamic": None}


def test_timm_sdpa_baseline_is_sdpa_whatever_the_environment(monkeypatch):
    import timm.layers.attention as timm_attention

    monkeypatch.setattr(timm_attention, "use_fused_attn", lambda *a, **k: False)  # as TIMM_FUSED_ATTN=0
    model = create_model("mae_vit_tiny_patch16", kernels="eager", **_MAE)
    assert bench_step._to_timm_sdpa(model) == 3
    swapped = [m for m in model.modules() if isinstance(m, timm_attention.Attention)]
    assert len(swapped) == 3 and all(m.fused_attn for m in swapped)


@pytest.mark.parametrize("name", ["mae_vit_tiny_patch16", "beit_base_patch16_224_8k_vocab"])
def test_step_variants_reference_on_timm_modules_mimfast_on_its_own(name):
    """The reference variants run timm's Mlp (and with SDPA their attention on it); mimfast's
    run mimfast.nn.Mlp; all with the same weights."""
    import types

    from timm.layers import Attention as TimmAttention
    from timm.layers import Mlp as TimmMlp

    from mimfast.nn import Mlp

    kw = dict(_MAE, norm_pix_loss=True) if name.startswith("mae") else dict(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, vocab_size=64)
    state = create_model(name, kernels="eager", **kw).state_dict()
    ref = bench_step.variant_model(name, "eager", True, "cpu", state, **kw)
    ours = bench_step.variant_model(name, "auto", False, "cpu", state, **kw)
    mlps = [m for m in ref.modules() if isinstance(m, TimmMlp)]
    assert mlps and all(type(m) is TimmMlp for m in mlps)
    assert all(type(m) is Mlp for m in ours.modules() if isinstance(m, TimmMlp))
    sdpa = [m for m in ref.modules() if isinstance(m, TimmAttention) or isinstance(m.forward, types.MethodType)
            and m.forward.__func__ is bench_step._beit_sdpa_forward]
    assert len(sdpa) == 2 + (1 if name.startswith("mae") else 0)
    for a, b in zip(ref.state_dict().values(), ours.state_dict().values()):
        assert torch.equal(a, b)


def test_pipeline_window_takes_whole_worker_rounds():
    assert bip._window(16, 2, 6) == (16, 16)
    assert bip._window(16, 16, 32) == (16, 32)
    assert bip._window(8, 16, 32) == (16, 32)
    assert bip._window(16, 2, 20) == (16, 32)
    assert bip._window(1, 2, 2) == (2, 2)  # the smoke run's single worker
    assert bip._window(0, 2, 3) == (2, 3)


def test_pipeline_sampler_spans_the_measurement_in_one_epoch():
    data = list(range(12))
    sampler = bip._sampler(data, n_batches=5, batch=4)
    drawn = list(sampler)
    assert len(drawn) == 20 and set(drawn) == set(data)
    assert sorted(drawn[:12]) == data  # a whole permutation first


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _simulated_loader(clock, workers: int, batch_s: float, n: int):
    """DataLoader's timing: worker k % workers makes batch k, each worker one batch per
    ``batch_s``, all starting together, batches handed out in order."""
    for k in range(n):
        clock.t = max(clock.t, (k // workers + 1) * batch_s)
        yield torch.zeros(1), None


@pytest.mark.parametrize("workers", [16, 8, 3])
def test_pipeline_throughput_is_the_steady_state(monkeypatch, workers):
    clock = _Clock()
    monkeypatch.setattr(bip.time, "perf_counter", clock)
    monkeypatch.setattr(harness, "_active", dict(harness._active, device="cpu"))
    batch, batch_s = 256, 1.3
    steady = workers * batch / batch_s
    warm, timed = bip._window(workers, 2, 6)
    _, ips = bip._throughput(_simulated_loader(clock, workers, batch_s, warm + timed), batch, warm, timed, "cpu")
    assert ips == pytest.approx(steady)
    # the same loader feeding a step faster than it: the step waits for it
    clock.t = 0.0
    step_s = 0.2 * batch_s / workers

    def step(imgs):
        clock.t += step_s

    warm, timed = bip._window(workers, 16, 32)
    _, ips = bip._throughput(_simulated_loader(clock, workers, batch_s, warm + timed), batch, warm, timed, "cpu",
                             consume=step)
    assert ips == pytest.approx(steady, rel=0.05)


# ------------------------------------------------------------------------------------------------
# branches the smoke run leaves out (torch.compile, flash-attn, SDPA's padded bias), run on the CPU
# with torch.compile as the identity: their call signatures and rows, not their speed
# ------------------------------------------------------------------------------------------------

def _smoke_ctx(quick=True):
    return harness.Context(copy_gbps=100.0, matmul_tflops=1.0, device="cpu", smoke=True, quick=quick,
                           ceilings="placeholder")


@pytest.fixture
def compile_is_identity(monkeypatch):
    monkeypatch.setattr(harness, "try_compile", lambda fn, **kw: fn)
    monkeypatch.setattr(harness, "_active", dict(harness._active))
    yield


@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
@pytest.mark.parametrize("name,variant", [("bench_masking", "compile"), ("bench_patch_loss", "torch.compile"),
                                          ("bench_fusions", "compile")])
def test_compile_variants_run(compile_is_identity, name, variant):
    import importlib

    ctx = _smoke_ctx()
    importlib.import_module(f"benchmarks.{name}").run(ctx)
    rows = [r for r in ctx.rows if r["variant"] == variant]
    assert rows and all("error" not in r and r["ms"] > 0 for r in rows), [r.get("error") for r in rows]
    if name != "bench_fusions":  # ratios against the compiled reference, within each case
        assert all(r.get(f"speedup_vs_{variant}") == 1.0 for r in rows)


def test_beit_lm_head_compile_variant_runs(compile_is_identity):
    from benchmarks import bench_beit

    ctx = _smoke_ctx(quick=False)
    bench_beit._bench_lm_head(ctx)
    row = next(r for r in ctx.rows if r["variant"] == "torch.compile")
    assert "error" not in row and row["loss_err_vs_eager"] == 0.0


def test_step_compile_variant_passes_static_shapes(monkeypatch):
    import torch._dynamo

    seen, resets = [], []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.append(kw) or model)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))  # frees the CUDA graphs' pool
    monkeypatch.setattr(harness, "_active", dict(harness._active))
    ctx = _smoke_ctx()
    model = create_model("mae_vit_tiny_patch16", kernels="eager", **_MAE)
    imgs = torch.randn(2, 3, 32, 32)

    def loss_fn(m):
        return lambda model: model(imgs, 0.75)[0]

    bench_step._measure(ctx, "c", "mimfast+cudagraphs", model, loss_fn, 2, 1e9, compile_model="reduce-overhead")
    bench_step._measure(ctx, "c", "mimfast+compile", model, loss_fn, 2, 1e9, compile_model=True)
    assert seen == [{"dynamic": False, "mode": "reduce-overhead"}, {"dynamic": False}]
    assert [r["variant"] for r in ctx.rows] == ["mimfast+cudagraphs", "mimfast+compile"]
    assert "peak_mem_note" in ctx.rows[0] and "peak_mem_note" not in ctx.rows[1]
    assert len(resets) == 2
    bench_step._measure(ctx, "c", "mimfast", model, loss_fn, 2, 1e9)
    assert len(resets) == 2 and len(seen) == 2


def _fake_flash_attn(monkeypatch):
    import types

    def flash_attn_qkvpacked_func(qkv):  # (B, S, 3, H, Dh) -> (B, S, H, Dh), scale Dh ** -0.5
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(
        flash_attn_qkvpacked_func=flash_attn_qkvpacked_func))


def test_attention_optional_baselines_compute_attention(monkeypatch, compile_is_identity):
    """flash-attn (packed qkv), torch.compile of the reference and SDPA with the padded bias
    copy: the same output and gradients as the reference from the same packed qkv."""
    from torch.nn.attention import SDPBackend

    from benchmarks import bench_attention as ba
    from mimfast.ops.attention import attention_reference

    _fake_flash_attn(monkeypatch)
    B, H, S, Dh = 2, 3, 13, 8
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, S, 3 * H * Dh, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(H, S, S, generator=g, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(B, S, H * Dh, generator=g, dtype=torch.float64)
    cases = {"flash_attn": (ba._variants(H, S, Dh, False, False, True, "cpu")["flash_attn"], None),
             "compile": (ba._variants(H, S, Dh, True, False, True, "cpu")["compile"], bias),
             "sdpa_math_padded_bias": (ba._sdpa(SDPBackend.MATH, H, pad_bias=True), bias)}
    assert "flash_attn" not in ba._variants(H, S, Dh, True, True, True, "cpu")  # it takes no bias
    for name, (fn, b) in cases.items():
        inputs = (qkv,) if b is None else (qkv, b)
        want = attention_reference(qkv, H, b)
        got = fn(qkv, b)
        assert got.shape == (B, S, H * Dh), name
        torch.testing.assert_close(got, want, msg=name)
        for a, w in zip(torch.autograd.grad(got, inputs, grad_out), torch.autograd.grad(want, inputs, grad_out)):
            torch.testing.assert_close(a, w, msg=name)


def test_beit_sdpa_baseline_is_the_same_model():
    """bench_step's (b) for BEiT: attention on SDPA with the relative position bias as the mask
    gives the eager model's loss and gradients (same weights)."""
    torch.manual_seed(0)
    eager = create_model("beit_base_patch16_224_8k_vocab", kernels="eager", **_BEIT).double()
    sdpa = create_model("beit_base_patch16_224_8k_vocab", kernels="eager", **_BEIT).double()
    sdpa.load_state_dict(eager.state_dict())
    assert bench_step._beit_to_sdpa(sdpa) == 2
    with torch.no_grad():  # a non-zero bias, so that its gradient and its use are checked
        for m in (eager, sdpa):
            m.rel_pos_bias.relative_position_bias_table.copy_(
                torch.linspace(-1, 1, m.rel_pos_bias.relative_position_bias_table.numel()).view_as(
                    m.rel_pos_bias.relative_position_bias_table))
    L = eager.patch_embed.num_patches
    imgs = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    mask = torch.zeros(2, L, dtype=torch.bool)
    mask[:, 3:9] = True
    labels = torch.randint(0, 64, (12,))
    losses = []
    for m in (eager, sdpa):
        loss = m(imgs, mask, labels=labels)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0])
    for (name, a), b in zip(sdpa.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
