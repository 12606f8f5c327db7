"""mimfast.nn.Mlp, timm's Mlp on ops.mlp: the same parameters and outputs as timm's module, every
gradient against timm's and float64 (2x rule), what autograd keeps, the fall-backs to timm's
forward, patch_timm_mlp on a timm ViT, and the models' fused_mlp switch."""

import pytest
import torch
from timm.layers import Mlp as TimmMlp
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from mimfast.nn import Mlp, patch_timm_mlp
from tolerance import DEVICE, assert_2x_rule


def _pair(d_in=24, hidden=80, d_out=None, seed=0, **kwargs):
    torch.manual_seed(seed)
    ref = TimmMlp(d_in, hidden, d_out, **kwargs).to(DEVICE)
    ours = Mlp(d_in, hidden, d_out, kernels="triton", **kwargs).to(DEVICE)
    ours.load_state_dict(ref.state_dict())
    with torch.no_grad():  # biases away from timm's zero-mean init, so their gradients are tested
        for m in (ref, ours):
            torch.manual_seed(seed + 1)
            m.fc1.bias.uniform_(-0.5, 0.5)
            m.fc2.bias.uniform_(-0.5, 0.5)
    return ref, ours


def _out_and_grads(module, x, gout, cast=None):
    if cast is not None:
        module = module.to(cast)
        x, gout = x.to(cast), gout.to(cast)
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    params = [module.fc1.weight, module.fc1.bias, module.fc2.weight, module.fc2.bias]
    return out.detach(), torch.autograd.grad(out, [x] + params, gout)


@pytest.mark.parametrize("lead,d_in,hidden,d_out", [((2, 7), 24, 80, None), ((3, 17), 40, 96, 13), ((1,), 8, 32, 8)],
                         ids=str)
def test_matches_timm_and_float64(lead, d_in, hidden, d_out):
    ref, ours = _pair(d_in, hidden, d_out)
    assert list(ours.state_dict()) == list(ref.state_dict())
    g = torch.Generator(device=DEVICE).manual_seed(3)
    x = torch.randn(*lead, d_in, device=DEVICE, generator=g)
    gout = torch.randn(*lead, d_out or d_in, device=DEVICE, generator=g)
    oo, go = _out_and_grads(ours, x, gout)
    oe, ge = _out_and_grads(ref, x, gout)
    o64, g64 = _out_and_grads(_pair(d_in, hidden, d_out)[0], x, gout, cast=torch.float64)
    assert torch.equal(oo, oe)  # the forward is eager's own calls
    for name, a, e, f in zip(("x", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"), go, ge, g64):
        assert a.dtype == e.dtype, name
        assert_2x_rule(f"grad {name}", a, e, f, atol=1e-6 * max(1e-2, f.abs().max().item()))


def _hidden_tensors_kept(module, x, hidden) -> int:
    """How many (rows, hidden) tensors autograd keeps for the module's backward."""
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        module(x.clone().requires_grad_(True))
    return sum(1 for t in seen if t.shape[-1:] == (hidden,) and t.numel() == x.numel() // x.shape[-1] * hidden)


def test_keeps_one_hidden_tensor_fewer():
    """timm's Mlp keeps h and gelu(h) for the backward; ours keeps h only, also under autocast."""
    ref, ours = _pair(24, 80)
    x = torch.randn(3, 11, 24, device=DEVICE)
    assert _hidden_tensors_kept(ref, x, 80) == 2
    assert _hidden_tensors_kept(ours, x, 80) == 1
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    with torch.autocast(DEVICE, dtype=dtype):
        assert _hidden_tensors_kept(ref, x, 80) == 2
        assert _hidden_tensors_kept(ours, x, 80) == 1


@pytest.mark.parametrize("case", ["fused_off", "dropout", "hidden_norm", "tanh_gelu", "hook"])
def test_falls_back_to_timm_forward(case, monkeypatch):
    """Where ops.mlp would change what the module computes (or bypass a hook), timm's forward runs."""
    kwargs = {"dropout": {"drop": 0.1}, "hidden_norm": {"norm_layer": nn.LayerNorm},
              "tanh_gelu": {"act_layer": lambda: nn.GELU(approximate="tanh")}}.get(case, {})
    _, ours = _pair(16, 32, **kwargs)
    if case == "fused_off":
        ours.fused = False
    if case == "hook":
        ours.fc1.register_forward_hook(lambda m, i, o: None)
    calls = []
    monkeypatch.setattr("mimfast.ops.mlp", lambda *a, **k: calls.append(1))
    ours.train()
    x = torch.randn(2, 5, 16, device=DEVICE)
    assert ours(x).shape == (2, 5, 16) and not calls
    if case == "dropout":  # dropout at work only in training: in eval the op runs
        ours.eval()
        ours(x)
        assert calls


def test_bad_arguments():
    with pytest.raises(ValueError, match="kernels"):
        Mlp(16, 32, kernels="cuda")
    with pytest.raises(ValueError, match="kernels"):
        patch_timm_mlp(nn.Linear(2, 2), kernels="fast")


def _vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, num_classes=10, embed_dim=64, depth=2, num_heads=2).to(DEVICE)


def test_patch_timm_mlp_on_a_vit():
    model = _vit()
    keys, params = list(model.state_dict()), list(model.parameters())
    x = torch.randn(2, 3, 32, 32, device=DEVICE)

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(x)
        logits.square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    l0, g0 = run()
    assert patch_timm_mlp(model, kernels="triton") == 2
    assert sum(type(m) is Mlp for m in model.modules()) == 2
    assert list(model.state_dict()) == keys and list(model.parameters()) == params  # same tensors
    l1, g1 = run()
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert patch_timm_mlp(model) == 0  # already switched
    import mimfast

    assert mimfast.patch_timm_mlp is patch_timm_mlp


def test_block_takes_it_as_mlp_layer():
    blk = Block(32, 2, mlp_layer=Mlp).to(DEVICE)
    assert type(blk.mlp) is Mlp and blk.mlp.fc1.out_features == 128
    assert blk(torch.randn(2, 5, 32, device=DEVICE)).shape == (2, 5, 32)


def test_models_follow_fused_mlp_and_kernels():
    from mimfast.models import create_model, mae_vit_tiny_patch16

    mae = mae_vit_tiny_patch16(img_size=32, depth=2, decoder_depth=1)
    beit = create_model("beit_tiny_patch16_224_8k_vocab", img_size=32, patch_size=8, depth=2, vocab_size=64)
    for model, n in ((mae, 3), (beit, 2)):
        mlps = [m for m in model.modules() if isinstance(m, TimmMlp)]
        assert len(mlps) == n and all(type(m) is Mlp and m.fused for m in mlps)
        model.set_kernels("eager", fused_mlp=False)
        assert all(m.kernels == "eager" and not m.fused for m in mlps)
        model.set_kernels("triton", fused_mlp=True)
        assert all(m.kernels == "triton" and m.fused for m in mlps)
