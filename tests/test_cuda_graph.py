"""Whole-step CUDA-graph capture (``mimfast.train.cuda_graph``, ``mimfast pretrain --cuda-graph``,
bench_step's ``mimfast+graph``).

On the CPU: the eager fallback is the direct call, the input and optimizer checks, the config
checks, the trainer's graph-mode loop (eagerly: same losses as a plain run, non-finite steps
skipped, exact resume) and BEiT's loss gathered by count (``num_masked``). On a GPU
(``MIMFAST_TEST_DEVICE=cuda``) the captured step itself: graphed equals eager for a tiny MAE and
a tiny BEiT, a learning rate set between replays takes effect, mask noise drawn inside the graph
changes per replay.
"""

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from mimfast.models import create_model
from mimfast.nn.blocks import draws_random
from mimfast.train.cuda_graph import (
    GraphedAccumulation,
    GraphedStep,
    check_optimizer,
    config_problems,
    make_capturable,
    set_lr_,
    skip_nonfinite_steps,
)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ON_CUDA = os.environ.get("MIMFAST_TEST_DEVICE") == "cuda"
gpu_only = pytest.mark.skipif(not ON_CUDA, reason="CUDA-graph capture needs a CUDA device")


@pytest.fixture(autouse=True)
def _generator_left_usable():
    """On a GPU, after every test: the device's random generator still draws. A capture that
    failed and left it in capture mode fails the test that did it, and the generator is repaired
    (a clone of its state is not in capture mode), so the tests after it on the same worker do not
    fail at their first random draw (the third H200 run lost 20 tests that way)."""
    yield
    if not ON_CUDA:
        return
    try:
        torch.rand(1, device="cuda")
    except RuntimeError as e:
        gen = torch.cuda.default_generators[torch.cuda.current_device()]
        gen.graphsafe_set_state(gen.clone_state())
        pytest.fail(f"the test left the CUDA generator unusable: {e}")

_MAE = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
            decoder_depth=1, decoder_num_heads=2)
_BEIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, vocab_size=64)


def _linear_setup(fused=False):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, **({"fused": True} if fused else {}))

    def step(x, y):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        return loss.detach()

    return model, opt, step


# --- CPU: the eager fallback and the checks


def test_eager_fallback_is_the_direct_call():
    data = [(torch.randn(5, 4), torch.randn(5, 3)) for _ in range(4)]
    model_a, opt_a, step_a = _linear_setup()
    direct = []
    for x, y in data:
        opt_a.zero_grad(set_to_none=True)
        direct.append(step_a(x, y))
    model_b, opt_b, step_b = _linear_setup()
    graphed = GraphedStep(step_b, optimizer=opt_b, warmup=1)
    through = [graphed(x, y) for x, y in data]
    assert not graphed.captured and graphed.calls == 4
    assert all(torch.equal(a, b) for a, b in zip(direct, through))
    assert all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters()))


def test_example_inputs_off_cuda_run_nothing_until_called():
    model, opt, step = _linear_setup()
    before = [p.detach().clone() for p in model.parameters()]
    graphed = GraphedStep(step, (torch.randn(5, 4), torch.randn(5, 3)), optimizer=opt)
    assert not graphed.captured and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match=r"input 0 is \[6, 4\] float32 on cpu; the step was set up for \[5, 4\]"):
        graphed(torch.randn(6, 4), torch.randn(5, 3))


def test_inputs_must_keep_shape_dtype_and_count():
    _, opt, step = _linear_setup()
    graphed = GraphedStep(step, optimizer=opt)
    graphed(torch.randn(5, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"input 1 is \[5, 2\] float32"):
        graphed(torch.randn(5, 4), torch.randn(5, 2))
    with pytest.raises(ValueError, match=r"input 0 is \[5, 4\] float64"):
        graphed(torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3))
    with pytest.raises(ValueError, match="takes 2 inputs"):
        graphed(torch.randn(5, 4))
    with pytest.raises(TypeError, match="input 1 is a float"):
        graphed(torch.randn(5, 4), 1.0)
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        GraphedStep(step, optimizer=opt, warmup=0)
    with pytest.raises(ValueError, match="needs its inputs on a CUDA device"):
        GraphedStep(step, optimizer=opt, enabled=True)(torch.randn(5, 4), torch.randn(5, 3))


def test_learning_rate_tensors_set_in_place():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW([{"params": [model.weight], "lr_scale": 0.5}, {"params": [model.bias]}], lr=1e-3)
    with pytest.raises(ValueError, match="learning rate must be a tensor"):
        check_optimizer(opt)
    make_capturable(opt)
    lrs = [g["lr"] for g in opt.param_groups]
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() == 0 for t in lrs)
    check_optimizer(opt)
    set_lr_(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == lrs  # the same tensors
    assert lrs[0].item() == 0.125 and lrs[1].item() == 0.25
    make_capturable(opt)  # idempotent
    assert all(g["lr"] is t for g, t in zip(opt.param_groups, lrs))


def test_enabled_grad_scaler_is_refused():
    _, opt, _ = _linear_setup()
    make_capturable(opt)

    class Scaler:
        def is_enabled(self):
            return True

    with pytest.raises(ValueError, match="GradScaler"):
        check_optimizer(opt, Scaler())


def test_nonfinite_loss_skips_the_fused_step():
    model, opt, _ = _linear_setup(fused=True)
    flag = skip_nonfinite_steps(opt)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    flag.copy_(~torch.isfinite(torch.tensor(float("nan"))))
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    flag.copy_(~torch.isfinite(torch.tensor(1.0)))
    opt.step()
    assert not torch.equal(before[0], model.weight)
    assert all(s["step"].item() == 1 for s in opt.state.values())  # the skipped step was not counted
    _, plain, _ = _linear_setup(fused=False)
    with pytest.raises(ValueError, match="fused"):
        skip_nonfinite_steps(plain)


def test_config_problems_name_the_conflicting_option():
    assert config_problems() == []
    assert "--precision bf16" in config_problems(precision="fp16")[0]
    assert "--compile" in config_problems(compile=True)[0]
    assert "one process" in config_problems(world_size=2)[0]
    assert "--grad-checkpointing" in config_problems(grad_checkpointing=True)[0]
    # checkpointed blocks that draw no random numbers (no drop path, no dropout) can be captured
    assert config_problems(grad_checkpointing=True, random_blocks=False) == []


@pytest.mark.parametrize("argv,match", [
    (["--compile"], "--compile"),
    (["--precision", "fp16"], "GradScaler"),
])
def test_cuda_graph_flag_conflicts_fail_at_start(argv, match):
    from mimfast.cli import build_parser
    from mimfast.train.config import config_from_args

    assert config_from_args(build_parser().parse_args(["pretrain", "--cuda-graph"])).cuda_graph
    # the default: decided by the run (on where a CUDA device and the settings allow it)
    assert config_from_args(build_parser().parse_args(["pretrain"])).cuda_graph is None
    assert config_from_args(build_parser().parse_args(["pretrain", "--no-cuda-graph"])).cuda_graph is False
    with pytest.raises(SystemExit, match=match):
        config_from_args(build_parser().parse_args(["pretrain", "--cuda-graph", *argv]))
    # gradient accumulation is captured too (two graphs)
    assert config_from_args(build_parser().parse_args(["pretrain", "--cuda-graph", "--accum-iter", "2"])).cuda_graph


def test_beit_loss_gathered_by_count_is_the_models():
    """model(..., num_masked=K): the masked rows gathered by index (no host synchronisation, so
    the step can be captured) give boolean-mask indexing's loss and gradients."""
    torch.manual_seed(0)
    model = create_model("beit_base_patch16_224_8k_vocab", kernels="eager", **_BEIT)
    imgs = torch.randn(2, 3, 32, 32)
    L = model.patch_embed.num_patches
    mask = torch.zeros(2, L, dtype=torch.bool)
    mask[0, [1, 5, 7]] = True
    mask[1, [0, 2, 15]] = True
    tokens = torch.randint(0, 64, (2, L))
    for labels in (tokens[mask], tokens):  # (M,) in x[mask] order, or one per position
        model.zero_grad(set_to_none=True)
        want = model(imgs, mask, labels=labels)
        want.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        got = model(imgs, mask, labels=labels, num_masked=3)
        got.backward()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        for g, p in zip(grads, model.parameters()):
            torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model(imgs, mask, num_masked=3), model(imgs, mask), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="exactly num_masked = 4"):
        model(imgs, mask, labels=tokens, num_masked=4)
    with pytest.raises(ValueError, match="num_masked must be an int"):
        model(imgs, mask, labels=tokens, num_masked=0)


class _HostReads:
    """Records the ops that make a CUDA host wait for the device: reading a value
    (``.item()``, ``bool(t)``, ``torch.equal``), ``nonzero`` and what calls it inside one op
    (boolean-mask indexing, ``masked_select``, ``unique``)."""

    WAITS = ("_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select", "unique", "_unique2")

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        seen = self.seen = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.__name__.split(".")[0]
                if name in _HostReads.WAITS or (name == "index" and any(
                        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] if
                        i is not None)):
                    seen.append(str(func))
                return func(*args, **(kwargs or {}))

        self.mode = Mode()


@pytest.mark.parametrize("case", ["mae", "mae_fused_blocks", "beit", "beit_pixel"])
def test_training_steps_never_wait_for_the_device(case, device):
    """What a captured step needs and a launch-bound step wants: the models' forward and backward
    with kernels on (MAE's blocks fused or not; BEiT told its masked count) read nothing back
    from the device. The test's own probe (``loss.item()``) is seen, so the check can fail."""
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 32, 32, device=device)
    if case.startswith("mae"):
        model = create_model("mae_vit_tiny_patch16", kernels="triton", norm_pix_loss=True,
                             fused_norm=case == "mae_fused_blocks", **_MAE).to(device)
        noise = torch.rand(2, model.patch_embed.num_patches, device=device)

        def step():
            return model(imgs, 0.75, noise)[0]
    else:
        name = "beit_base_patch16_224_pixel" if case == "beit_pixel" else "beit_base_patch16_224_8k_vocab"
        kw = {k: v for k, v in _BEIT.items() if case != "beit_pixel" or k != "vocab_size"}
        model = create_model(name, kernels="triton", **kw).to(device)
        mask = torch.zeros(2, model.patch_embed.num_patches, dtype=torch.bool, device=device)
        mask[0, [1, 5, 7]] = mask[1, [0, 2, 15]] = True
        if case == "beit_pixel":
            def step():
                return model(imgs, mask)[0]
        else:
            labels = torch.randint(0, 64, (6,), device=device)

            def step():
                return model(imgs, mask, labels=labels, num_masked=3)
    reads = _HostReads()
    with reads.mode:
        loss = step()
        loss.backward()
    assert reads.seen == [], reads.seen
    with reads.mode:
        loss.item()
    assert reads.seen == ["aten._local_scalar_dense.default"]


def test_bench_graph_variant_runs_eagerly_off_cuda():
    """CPU inputs (a smoke run's, on any machine): the variant's step runs eagerly."""
    from benchmarks import bench_step, harness

    active = dict(harness._active)  # the CPU context switches the harness to CPU timing: put it back
    try:
        ctx = harness.Context(copy_gbps=1.0, matmul_tflops=1.0, device="cpu", smoke=True, ceilings="placeholder")
        model = create_model("mae_vit_tiny_patch16", norm_pix_loss=True, kernels="eager", **_MAE)
        imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
        bench_step._measure_graphed(ctx, "mae", model, lambda m, x, z: m(x, 0.75, z)[0], (imgs, noise), 2, 1e6)
    finally:
        harness._active.update(active)
    (row,) = ctx.rows
    assert row["variant"] == bench_step.GRAPH_VARIANT and row["ms"] > 0 and row["host_ms"] == row["ms"]
    assert "peak_mem_mib" not in row and "error" not in row


# --- CPU: the trainer's --cuda-graph loop (eagerly off CUDA)


def _tiny_cfg(tmp_path, **kw):
    from test_pretrain import _cfg

    return _cfg(tmp_path, device="cpu", **kw)


def _losses(out: Path) -> list:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_pretrain_cuda_graph_off_cuda_trains_as_a_plain_run(tmp_path, capsys):
    from mimfast.train.pretrain import pretrain

    plain = pretrain(_tiny_cfg(tmp_path / "plain", epochs=1))
    graphed = pretrain(_tiny_cfg(tmp_path / "graph", epochs=1, cuda_graph=True))
    assert "the step runs eagerly" in capsys.readouterr().out
    assert graphed["steps"] == plain["steps"] == 4
    assert plain["cuda_graph"] is graphed["cuda_graph"] is False  # off CUDA nothing is captured
    # fused (graph mode) vs the plain run's single-tensor AdamW: the same update up to rounding
    assert _losses(tmp_path / "graph") == pytest.approx(_losses(tmp_path / "plain"), rel=1e-5)
    ckpt = torch.load(tmp_path / "graph" / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    for group in ckpt["optimizer"]["param_groups"]:  # saved as an eager run saves it
        assert isinstance(group["lr"], float) and group["capturable"] is False


def test_pretrain_cuda_graph_resumes_exactly(tmp_path):
    from mimfast.train.pretrain import pretrain

    pretrain(_tiny_cfg(tmp_path / "full", epochs=2, cuda_graph=True))
    pretrain(_tiny_cfg(tmp_path / "part", epochs=2, cuda_graph=True, save_every=3, max_steps=3))
    pretrain(_tiny_cfg(tmp_path / "part", epochs=2, cuda_graph=True, resume="auto"))
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")


def test_pretrain_cuda_graph_skips_nonfinite_steps(tmp_path):
    from mimfast.train.pretrain import pretrain

    summary = pretrain(_tiny_cfg(tmp_path, lr=1e30, warmup_epochs=0, max_nonfinite=2, epochs=4, cuda_graph=True))
    # as the plain run (test_pretrain): the first step blows the weights up, the next two are NaN
    assert summary["status"].startswith("stopped") and summary["nonfinite_steps"] == 2
    assert summary["steps"] == 3


@pytest.mark.parametrize("pixel", [False, True])
def test_pretrain_beit_cuda_graph_off_cuda_trains_as_a_plain_run(tmp_path, pixel):
    from mimfast.models.tokenizer import VQTokenizer, save_vq_tokenizer
    from test_beit_pretrain import _run

    if pixel:
        extra = ["--model", "beit_tiny_patch16_224_pixel"]
    else:
        vq = tmp_path / "vq.safetensors"
        save_vq_tokenizer(VQTokenizer(vocab_size=64, embed_dim=8, hidden=8, downsample=4), vq)
        extra = ["--tokenizer", f"vq:{vq}"]
    extra += ["--max-steps", "3", "--device", "cpu", "--vis-every", "0"]
    assert _run(tmp_path / "plain", *extra) == 0
    assert _run(tmp_path / "graph", *extra, "--cuda-graph") == 0
    assert len(_losses(tmp_path / "graph")) == 3
    assert _losses(tmp_path / "graph") == pytest.approx(_losses(tmp_path / "plain"), rel=1e-5)


# --- GPU: the captured step


def _mae_pair(kernels="auto"):
    torch.manual_seed(0)
    a = create_model("mae_vit_tiny_patch16", norm_pix_loss=True, kernels=kernels, **_MAE).cuda()
    b = create_model("mae_vit_tiny_patch16", norm_pix_loss=True, kernels=kernels, **_MAE).cuda()
    b.load_state_dict(a.state_dict())
    return a, b


def _adamw(model, lr=1e-3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, fused=True)
    make_capturable(opt)
    return opt


def _step_fn(model, opt, loss):
    def step(*inputs):
        out = loss(model, *inputs)
        out.backward()
        opt.step()
        return out.detach()

    return step


def _assert_same_params(a, b):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def _mae_loss(m, imgs, noise):
    return m(imgs, 0.75, noise)[0]


@gpu_only
@pytest.mark.parametrize("lazy", [True, False])
def test_graphed_mae_step_equals_eager(lazy):
    eager_model, graph_model = _mae_pair()
    eager_opt, graph_opt = _adamw(eager_model), _adamw(graph_model)
    eager = GraphedStep(_step_fn(eager_model, eager_opt, _mae_loss), optimizer=eager_opt, enabled=False)
    g = torch.Generator(device="cuda").manual_seed(1)
    batches = [(torch.randn(4, 3, 32, 32, device="cuda", generator=g), torch.rand(4, 16, device="cuda", generator=g))
               for _ in range(5)]
    if lazy:  # the trainer's way: 2 eager calls, the 3rd captures and replays
        graphed = GraphedStep(_step_fn(graph_model, graph_opt, _mae_loss), optimizer=graph_opt, warmup=2)
        steps = batches
    else:  # the bench's way: warm-up on the example inputs now
        graphed = GraphedStep(_step_fn(graph_model, graph_opt, _mae_loss), batches[0], optimizer=graph_opt, warmup=1)
        eager(*batches[0])
        steps = batches[1:]
    for i, batch in enumerate(steps):
        want = eager(*batch)
        got = graphed(*batch)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"step {i}: {m}")
    assert graphed.captured
    torch.cuda.synchronize()
    _assert_same_params(eager_model, graph_model)


@gpu_only
def test_graphed_mae_step_with_grad_checkpointing_equals_eager():
    """MAE's blocks draw no random numbers, so their checkpoints save no random state and the
    checkpointed step can be captured: it replays the eager checkpointed step's losses and
    weights (the default capture is allowed with --grad-checkpointing for such models)."""
    eager_model, graph_model = _mae_pair()
    for m in (eager_model, graph_model):
        m.set_grad_checkpointing()
    assert not draws_random(graph_model)
    eager_opt, graph_opt = _adamw(eager_model), _adamw(graph_model)
    eager = GraphedStep(_step_fn(eager_model, eager_opt, _mae_loss), optimizer=eager_opt, enabled=False)
    graphed = GraphedStep(_step_fn(graph_model, graph_opt, _mae_loss), optimizer=graph_opt, warmup=2)
    g = torch.Generator(device="cuda").manual_seed(1)
    for i in range(5):
        batch = (torch.randn(4, 3, 32, 32, device="cuda", generator=g), torch.rand(4, 16, device="cuda", generator=g))
        torch.testing.assert_close(graphed(*batch), eager(*batch), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, i=i: f"step {i}: {m}")
    assert graphed.captured
    torch.cuda.synchronize()
    _assert_same_params(eager_model, graph_model)


@gpu_only
def test_learning_rate_set_between_replays_takes_effect():
    eager_model, graph_model = _mae_pair()
    eager_opt, graph_opt = _adamw(eager_model), _adamw(graph_model)
    eager = GraphedStep(_step_fn(eager_model, eager_opt, _mae_loss), optimizer=eager_opt, enabled=False)
    graphed = GraphedStep(_step_fn(graph_model, graph_opt, _mae_loss), optimizer=graph_opt, warmup=1)
    batch = (torch.randn(4, 3, 32, 32, device="cuda"), torch.rand(4, 16, device="cuda"))
    for lr in (1e-3, 1e-3):  # warm-up, then capture + replay
        for opt in (eager_opt, graph_opt):
            set_lr_(opt, lr)
        eager(*batch), graphed(*batch)
    assert graphed.captured
    before = [p.detach().clone() for p in graph_model.parameters()]
    set_lr_(graph_opt, 0.0)
    set_lr_(eager_opt, 0.0)
    eager(*batch), graphed(*batch)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(before, graph_model.parameters())), "lr 0 still moved the weights"
    for lr in (5e-2, 1e-4):
        set_lr_(graph_opt, lr)
        set_lr_(eager_opt, lr)
        eager(*batch), graphed(*batch)
    torch.cuda.synchronize()
    assert not torch.equal(before[0], next(graph_model.parameters()))
    _assert_same_params(eager_model, graph_model)
    graph_opt.param_groups[0]["lr"] = 1e-3  # replaced, not set in place: the graph would not see it
    with pytest.raises(ValueError, match="set_lr_"):
        graphed(*batch)


@gpu_only
def test_mask_noise_drawn_inside_the_graph_changes_per_replay():
    _, model = _mae_pair()
    opt = _adamw(model, lr=0.0)
    graphed = GraphedStep(_step_fn(model, opt, lambda m, imgs: m(imgs, 0.75)[0]), optimizer=opt, warmup=1)
    imgs = torch.randn(4, 3, 32, 32, device="cuda")
    losses = [graphed(imgs).clone() for _ in range(4)]
    assert graphed.captured
    assert len({round(v.item(), 6) for v in losses[1:]}) == 3, losses  # fresh noise each replay
    assert all(math.isfinite(v.item()) for v in losses)


@gpu_only
def test_graphed_beit_step_equals_eager():
    torch.manual_seed(0)
    a = create_model("beit_base_patch16_224_8k_vocab", kernels="auto", **_BEIT).cuda()
    b = create_model("beit_base_patch16_224_8k_vocab", kernels="auto", **_BEIT).cuda()
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = _adamw(a), _adamw(b)

    def loss(m, imgs, mask, labels):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return m(imgs, mask, labels=labels, num_masked=6)

    eager = GraphedStep(_step_fn(a, opt_a, loss), optimizer=opt_a, enabled=False)
    graphed = GraphedStep(_step_fn(b, opt_b, loss), optimizer=opt_b, warmup=2)
    g = torch.Generator(device="cuda").manual_seed(2)
    L = a.patch_embed.num_patches
    for i in range(4):
        imgs = torch.randn(2, 3, 32, 32, device="cuda", generator=g)
        keys = torch.rand(2, L, device="cuda", generator=g)
        mask = torch.zeros(2, L, dtype=torch.bool, device="cuda").scatter_(1, keys.argsort(1)[:, :6], True)
        labels = torch.randint(0, 64, (2, L), device="cuda", generator=g)
        want, got = eager(imgs, mask, labels), graphed(imgs, mask, labels)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"step {i}: {m}")
    assert graphed.captured
    torch.cuda.synchronize()
    _assert_same_params(a, b)


@gpu_only
def test_pretrain_cuda_graph_on_cuda_trains_as_a_plain_run(tmp_path):
    from mimfast.train.pretrain import pretrain

    from test_pretrain import _cfg

    kw = dict(epochs=2, kernels="auto", precision="bf16", device="cuda")
    plain = pretrain(_cfg(tmp_path / "plain", cuda_graph=False, fusion_trial_steps=0, **kw))  # the model's form
    summary = pretrain(_cfg(tmp_path / "graph", cuda_graph=True, **kw))
    assert summary["status"] == "done" and summary["steps"] == 8  # 3 eager, the capture, 4 replays
    assert summary["cuda_graph"] and not plain["cuda_graph"]
    # the default: captured on CUDA where the run allows it; not with --accum-iter 2 unless asked for
    assert pretrain(_cfg(tmp_path / "default", max_steps=4, **kw))["cuda_graph"]
    assert not pretrain(_cfg(tmp_path / "accum", max_steps=2, accum_iter=2, **kw))["cuda_graph"]
    # the plain run's AdamW is fused too, its lr a float (the graph's a float32 tensor): close, not equal
    assert _losses(tmp_path / "graph") == pytest.approx(_losses(tmp_path / "plain"), rel=1e-3)


@gpu_only
def test_pretrain_default_graph_runs_eagerly_where_the_step_cannot_be_captured(tmp_path, monkeypatch, capsys):
    """The default (not asked for) capture gives way: a step that reads the device from the host
    fails the capture, and the run goes on eagerly from that step, the same number of steps."""
    from mimfast.train import pretrain as P

    from test_pretrain import _cfg

    real = P.MAETask.loss_of

    def syncing(self, model, imgs, noise):
        loss = real(self, model, imgs, noise)
        float(loss.detach())  # a host read: nothing of this can be captured
        return loss

    monkeypatch.setattr(P.MAETask, "loss_of", syncing)
    summary = P.pretrain(_cfg(tmp_path, epochs=2, kernels="auto", precision="bf16", device="cuda"))
    assert summary["status"] == "done" and summary["steps"] == 8 and summary["cuda_graph"] is False
    assert "could not be captured" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="could not be captured"):  # asked for: the failure stands
        P.pretrain(_cfg(tmp_path / "asked", epochs=2, kernels="auto", precision="bf16", device="cuda",
                        cuda_graph=True))
    # the failed capture left the device's generator usable (the next test draws from it)
    assert torch.rand(8, device="cuda").isfinite().all()


@gpu_only
def test_failed_capture_leaves_random_draws_working():
    """A capture that fails in capture_end must not leave the default generator in capture mode:
    the eager fall-back's dropout (BEiT's drop-path) and every later draw use it."""
    model = torch.nn.Linear(16, 16).cuda()
    opt = _adamw(model)

    def step(x):
        loss = torch.nn.functional.dropout(model(x), 0.5).square().mean()
        loss.backward()
        opt.step()
        float(loss.detach())  # a host read: the capture fails
        return loss.detach()

    graphed = GraphedStep(step, optimizer=opt, warmup=1)
    x = torch.randn(4, 16, device="cuda")
    graphed(x)  # the warm-up, eager
    with pytest.raises(RuntimeError, match="could not be captured"):
        graphed(x)
    graphed.enabled = False
    assert math.isfinite(graphed(x).item())  # eager again, dropout drawing from the same generator
    torch.manual_seed(5)
    a = torch.rand(64, device="cuda")
    torch.manual_seed(5)
    assert torch.equal(a, torch.rand(64, device="cuda"))


def _accum_pair(accum, enabled):
    """A linear model trained by GraphedAccumulation and the plain loop's reference copy."""
    torch.manual_seed(0)
    dev = "cuda" if enabled else "cpu"
    ref = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).to(dev)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).to(dev)
    model.load_state_dict(ref.state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for m in (ref, model)]
    make_capturable(opts[1])
    found_inf = skip_nonfinite_steps(opts[1])
    bad = torch.zeros((), dtype=torch.bool, device=dev)
    params = list(model.parameters())

    def micro(x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        (loss / accum).backward()
        loss = loss.detach()
        bad.logical_or_(~torch.isfinite(loss))
        return loss

    def step():
        found_inf.copy_(bad)
        opts[1].step()
        torch._foreach_zero_([p.grad for p in params])
        bad.zero_()

    acc = GraphedAccumulation(micro, step, optimizer=opts[1], accum_iter=accum, warmup=1, enabled=enabled)
    return ref, model, opts[0], acc


def _plain_window(ref, opt, batches, accum):
    for x, y in batches:
        (torch.nn.functional.mse_loss(ref(x), y) / accum).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_graphed_accumulation_off_cuda_is_the_plain_loop():
    accum = 3
    ref, model, opt, acc = _accum_pair(accum, enabled=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        batches = [(torch.randn(5, 8, generator=g), torch.randn(5, 4, generator=g)) for _ in range(accum)]
        _plain_window(ref, opt, batches, accum)
        for x, y in batches:
            acc(x, y)
        acc.step()
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())  # zeroed in place
    assert not acc.captured and acc.windows == 3
    _assert_same_params(ref, model)
    with pytest.raises(RuntimeError, match="each window is 3 micro-batches"):
        acc.step()
    with pytest.raises(ValueError, match="accum_iter"):
        GraphedAccumulation(lambda: None, lambda: None, optimizer=opt, accum_iter=0)
    with pytest.raises(ValueError, match="warmup"):
        GraphedAccumulation(lambda: None, lambda: None, optimizer=opt, accum_iter=2, warmup=0)


def test_pretrain_cuda_graph_with_accumulation_off_cuda_trains_as_a_plain_run(tmp_path, capsys):
    from mimfast.train.pretrain import pretrain

    plain = pretrain(_tiny_cfg(tmp_path / "plain", epochs=2, accum_iter=2))
    graphed = pretrain(_tiny_cfg(tmp_path / "graph", epochs=2, accum_iter=2, cuda_graph=True))
    assert "the step runs eagerly" in capsys.readouterr().out
    assert graphed["steps"] == plain["steps"] == 4
    # fused (graph mode) vs the plain run's single-tensor AdamW: the same update up to rounding
    assert _losses(tmp_path / "graph") == pytest.approx(_losses(tmp_path / "plain"), rel=1e-5)


@gpu_only
def test_graphed_accumulation_equals_the_plain_loop():
    """Two windows eager (warm-up), then the micro-batch graph and the step graph captured and
    replayed: the weights follow the plain loop's; a non-finite micro-batch loss skips its window's
    update on the device; the learning rate set in place between windows takes effect."""
    accum = 2
    ref, model, opt, acc = _accum_pair(accum, enabled=True)
    g = torch.Generator(device="cuda").manual_seed(1)
    for w in range(5):
        batches = [(torch.randn(5, 8, device="cuda", generator=g), torch.randn(5, 4, device="cuda", generator=g))
                   for _ in range(accum)]
        if w == 3:
            set_lr_(acc.optimizer, 5e-3)
            for group in opt.param_groups:
                group["lr"] = 5e-3
        _plain_window(ref, opt, batches, accum)
        for x, y in batches:
            acc(x, y)
        acc.step()
        torch.cuda.synchronize()
        _assert_same_params(ref, model)
    assert acc.captured
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(5, 8, device="cuda"), torch.randn(5, 4, device="cuda")
    acc(x, y)
    acc(x * float("nan"), y)  # the window's second loss is NaN: no update
    acc.step()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


@gpu_only
def test_pretrain_cuda_graph_with_accumulation_on_cuda_trains_as_a_plain_run(tmp_path):
    from mimfast.train.pretrain import pretrain

    from test_pretrain import _cfg

    kw = dict(epochs=2, kernels="auto", precision="bf16", device="cuda", accum_iter=2, fusion_trial_steps=0)
    plain = pretrain(_cfg(tmp_path / "plain", cuda_graph=False, **kw))
    summary = pretrain(_cfg(tmp_path / "graph", cuda_graph=True, **kw))
    assert summary["status"] == "done" and summary["steps"] == plain["steps"] == 4
    assert summary["cuda_graph"] and not plain["cuda_graph"]
    assert _losses(tmp_path / "graph") == pytest.approx(_losses(tmp_path / "plain"), rel=1e-3)
