"""torch.compile(fullgraph=True) traces the MAE and BEiT models without graph breaks, with
the eager references and with the Triton ops (registered as torch.library custom ops); the
compiled step gives the eager step's loss and gradients."""

import pytest
import torch

from mimfast.models import create_model
from tolerance import DEVICE, INTERPRETED

# the interpreter cannot run inductor's generated code on CPU without a C++ toolchain; the
# graph capture (dynamo + AOTAutograd) is what must not break
BACKEND = "aot_eager" if INTERPRETED else "inductor"


def _count_kernel_launches(monkeypatch) -> dict:
    """Count calls of two kernel launchers from their custom ops' implementations (looked up at
    call time, so a compiled graph's calls count too)."""
    from mimfast.ops import _attention_triton, _layer_norm_triton

    counts = {}
    for module, name in ((_attention_triton, "attention_forward"), (_layer_norm_triton, "add_layer_norm_fwd")):
        real = getattr(module, name)
        counts[name] = 0

        def counting(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)
    return counts


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(model, loss_fn, kernels, monkeypatch, rtol=1e-4, atol=1e-5):
    loss = loss_fn(model)
    loss.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND)
    launches = _count_kernel_launches(monkeypatch)
    got_loss = loss_fn(compiled)
    got_loss.backward()
    got = _grads(model)
    # the compiled step really runs the Triton ops (their custom ops reach the launchers), or none
    if kernels == "triton":
        assert launches["attention_forward"] > 0 and launches["add_layer_norm_fwd"] > 0, launches
    else:
        assert sum(launches.values()) == 0, launches
    torch.testing.assert_close(got_loss, loss, rtol=rtol, atol=atol)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol, msg=k)


@pytest.mark.parametrize("kernels,autocast", [("eager", False), ("triton", False), ("triton", True)])
def test_mae_fullgraph(kernels, autocast, monkeypatch):
    """With autocast too: the eager step casts the fused stack's parameters in one batch, the
    traced one leaves the casts to the compiler (no batch while tracing)."""
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=1, embed_dim=64, num_heads=2,
                         decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True,
                         kernels=kernels, fused_norm=True).to(DEVICE)  # every op traced, the fused blocks too
    imgs = torch.randn(2, 3, 32, 32, device=DEVICE)
    noise = torch.rand(2, 16, device=DEVICE)
    # fp16 on the CPU: the interpreter's bf16 dot products are wrong (triton-lang/triton#11584)
    half = torch.bfloat16 if DEVICE == "cuda" else torch.float16

    def loss_fn(m):
        with torch.autocast(DEVICE, dtype=half, enabled=autocast):
            return m(imgs, 0.75, noise)[0]

    # inductor's bf16 kernels round their fused intermediates once where eager rounds each op's output
    tol = (dict(rtol=5e-2, atol=1e-2) if DEVICE == "cuda" else dict(rtol=2e-2, atol=2e-3)) if autocast else {}
    _compare(model, loss_fn, kernels, monkeypatch, **tol)


@pytest.mark.parametrize("num_masked", [None, 5])
@pytest.mark.parametrize("kernels", ["eager", "triton"])
def test_beit_fullgraph(kernels, num_masked, monkeypatch):
    torch.manual_seed(0)
    model = create_model("beit_tiny_patch16_224_8k_vocab", img_size=32, patch_size=8, depth=1, embed_dim=64,
                         num_heads=2, vocab_size=96, kernels=kernels).to(DEVICE)
    imgs = torch.randn(2, 3, 32, 32, device=DEVICE)
    mask = torch.zeros(2, 16, dtype=torch.bool, device=DEVICE)
    mask[:, [1, 2, 5, 6, 9]] = True
    labels = torch.randint(0, 96, (10,), device=DEVICE)
    if num_masked is not None:  # gathered by count: static shapes, nothing data-dependent to capture
        _compare(model, lambda m: m(imgs, mask, labels=labels, num_masked=num_masked), kernels, monkeypatch)
        return
    # x[bool_masked_pos] has a data-dependent size: dynamo captures it with this switch
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        _compare(model, lambda m: m(imgs, mask, labels=labels), kernels, monkeypatch)
