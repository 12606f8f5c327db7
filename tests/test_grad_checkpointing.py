"""Activation checkpointing of the blocks (``model.set_grad_checkpointing()``, ``forward_blocks(...,
grad_checkpointing=True)``, ``mimfast pretrain --grad-checkpointing``): the same loss and
gradients, bit for bit, for a fraction of the activations kept for the backward."""

import os

import pytest
import torch

import mimfast.nn.blocks as blocks_module
from benchmarks.activation_memory import saved_bytes
from mimfast.models import create_model
from test_add_layer_norm import _timm_stack

DEVICE = os.environ.get("MIMFAST_TEST_DEVICE", "cpu")
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # the interpreter's bf16 dots are wrong


def _grads(fn, params):
    torch.manual_seed(3)  # drop path draws the same masks in both runs
    out = fn()
    grads = torch.autograd.grad(out.float().sum() if out.dim() else out, params)
    return out.detach(), grads


@pytest.mark.parametrize("fused,autocast", [(True, False), (True, True), (False, False)])
def test_stack_with_checkpointing_equals_without(fused, autocast):
    """Fused and plain stacks, layer scale and an active drop path (its random draws repeated in
    the recompute): output and every gradient equal to the run without checkpointing."""
    blocks, norm = _timm_stack(depth=3, init_values=0.1)
    for blk in blocks:
        blk.drop_path1.drop_prob = blk.drop_path2.drop_prob = 0.2
    blocks.train()
    x = torch.randn(2, 11, 48, device=DEVICE, requires_grad=True)
    params = [x] + list(blocks.parameters()) + list(norm.parameters())

    def run(checkpointing):
        def fn():
            with torch.autocast(DEVICE, dtype=HALF, enabled=autocast):
                if fused:
                    return blocks_module.forward_blocks(x, blocks, norm, kernels="triton",
                                                        grad_checkpointing=checkpointing)
                return norm(blocks_module._run_plain(x, blocks, checkpointing, {}))
        return _grads(fn, params)

    y0, g0 = run(False)
    y1, g1 = run(True)
    assert torch.equal(y0, y1)
    for p, a, b in zip(params, g0, g1):
        assert torch.equal(a, b), tuple(p.shape)


def _tiny(name, depth=3, decoder_depth=2):
    torch.manual_seed(0)
    if name == "mae":
        return create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=depth, embed_dim=64, num_heads=2,
                            decoder_embed_dim=32, decoder_depth=decoder_depth, decoder_num_heads=2,
                            norm_pix_loss=True, kernels="triton").to(DEVICE)
    return create_model("beit_tiny_patch16_224_8k_vocab", img_size=32, patch_size=8, depth=3, embed_dim=64,
                        num_heads=2, vocab_size=96, drop_path_rate=0.1, kernels="triton").to(DEVICE)


def _loss_fn(name, model):
    g = torch.Generator(device="cpu").manual_seed(1)
    imgs = torch.randn(2, 3, 32, 32, generator=g).to(DEVICE)
    if name == "mae":
        noise = torch.rand(2, 16, generator=g).to(DEVICE)
        return lambda: model(imgs, 0.75, noise)[0]
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, [1, 2, 5, 6, 9]] = True
    labels = torch.randint(0, 96, (10,), generator=g).to(DEVICE)
    return lambda: model(imgs, mask.to(DEVICE), labels=labels, num_masked=5)


@pytest.mark.parametrize("name", ["mae", "beit"])
def test_model_switch(name):
    """``set_grad_checkpointing()`` on MAE (encoder and decoder stacks) and BEiT (its shared
    relative position bias passed to each checkpointed block, drop path on): the same loss and
    gradients; off again, the plain forward."""
    model = _tiny(name)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    fn = _loss_fn(name, model)
    l0, g0 = _grads(fn, params)
    model.set_grad_checkpointing()
    assert model.grad_checkpointing
    l1, g1 = _grads(fn, params)
    assert torch.equal(l0, l1)
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)
    model.set_grad_checkpointing(False)
    with torch.no_grad():  # no gradients recorded: nothing to checkpoint either way
        model.set_grad_checkpointing(True)
        torch.manual_seed(3)
        assert torch.equal(fn(), l0)


def test_random_state_saved_only_for_blocks_that_draw(monkeypatch):
    """The checkpoints save the device's random state (``preserve_rng_state``) only where the
    blocks draw random numbers: BEiT's drop path in training mode, not MAE's blocks (nor BEiT's in
    eval mode or at drop path 0), which lets a CUDA graph capture MAE's checkpointed step."""
    from torch import nn

    recorded = []
    real = blocks_module.checkpoint

    def recording(function, *args, **kwargs):
        recorded.append(kwargs["preserve_rng_state"])
        return real(function, *args, **kwargs)

    monkeypatch.setattr(blocks_module, "checkpoint", recording)
    for name, draws in (("mae", False), ("beit", True)):
        model = _tiny(name)
        model.train()
        assert blocks_module.draws_random(model) is draws
        model.set_grad_checkpointing()
        recorded.clear()
        _loss_fn(name, model)().backward()
        assert recorded and set(recorded) == {draws}, (name, recorded)
    model.eval()
    assert not blocks_module.draws_random(model)
    assert blocks_module.draws_random(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)))
    assert not blocks_module.draws_random(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0)))
    # the plain (unfused) loop too
    blocks, _ = _timm_stack(depth=2)
    blocks.train()
    recorded.clear()
    blocks_module._run_plain(torch.randn(2, 5, 48, device=DEVICE), blocks, True, {})
    assert recorded == [False, False]
    blocks[1].drop_path1.drop_prob = 0.1
    recorded.clear()
    blocks_module._run_plain(torch.randn(2, 5, 48, device=DEVICE), blocks, True, {})
    assert recorded == [True, True]


def test_checkpointing_keeps_a_fraction_of_the_activations(monkeypatch):
    """With checkpointing the fused MAE model keeps for the backward (autograd's saved tensors:
    those outside the blocks and each block's inputs, which the checkpoint saves) under a quarter
    of what it keeps without; every encoder and decoder block is checkpointed."""
    model = _tiny("mae", depth=6, decoder_depth=4)
    params = list(model.parameters())
    fn = _loss_fn("mae", model)
    full = saved_bytes(fn, exclude=params)
    inputs = []
    real = blocks_module.checkpoint

    def recording(function, *args, **kwargs):
        inputs.extend(a for a in args if isinstance(a, torch.Tensor))
        return real(function, *args, **kwargs)

    monkeypatch.setattr(blocks_module, "checkpoint", recording)
    model.set_grad_checkpointing()
    kept = saved_bytes(fn, exclude=params)
    assert len(inputs) == 2 * (6 + 4)  # (r, y) of every encoder and decoder block
    block_inputs = sum(t.numel() * t.element_size() for t in inputs)
    assert block_inputs < kept < full / 4, (block_inputs, kept, full)


def test_pretrain_flag_trains_as_without(tmp_path, monkeypatch):
    """``mimfast pretrain --grad-checkpointing``: the model's blocks checkpointed, the same losses
    step for step as the run without."""
    from mimfast.train.pretrain import pretrain
    from test_pretrain import _cfg, _logged

    calls = []
    real = blocks_module.checkpoint
    monkeypatch.setattr(blocks_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = {}
    for flag in (False, True):
        out = tmp_path / str(flag)
        summary = pretrain(_cfg(out, grad_checkpointing=flag, epochs=1))
        assert summary["status"] == "done"
        runs[flag] = _logged(out)
        assert bool(calls) == flag
    assert len(runs[True]) > 1 and runs[True] == runs[False]


@pytest.mark.parametrize("name", ["mae", "beit"])
def test_fullgraph_compile_of_checkpointed_blocks(name):
    """``torch.compile(fullgraph=True)`` traces the checkpointed blocks (no graph break) and gives
    the eager step's loss and gradients."""
    model = _tiny(name)
    model.train()
    for m in model.modules():  # inductor draws its own random numbers: no drop path here
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
    model.set_grad_checkpointing()
    params = [p for p in model.parameters() if p.requires_grad]
    l0, g0 = _grads(_loss_fn(name, model), params)
    torch._dynamo.reset()
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"  # no C++ toolchain for inductor's CPU code
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    l1, g1 = _grads(_loss_fn(name, compiled), params)
    torch.testing.assert_close(l1, l0, rtol=1e-4, atol=1e-5)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
