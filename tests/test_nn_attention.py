"""mimfast.nn.Attention as a drop-in for timm's Attention, and patch_timm on timm and MAE models."""

import pytest
import torch
from torch import nn
from timm.layers import Attention as TimmAttention
from timm.models.vision_transformer import Block, VisionTransformer

import mimfast
from mimfast.models.mae import mae_vit_tiny_patch16
from mimfast.nn import Attention
from tolerance import DEVICE


def _tiny_vit(**kwargs):
    # 32 px / patch 8 -> 16 patches + cls = 17 tokens; 2 heads of 32
    cfg = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=64, depth=2, num_heads=2)
    cfg.update(kwargs)
    return VisionTransformer(**cfg)


def _logits_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    logits = model(x)
    logits.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads, x.grad


def _assert_same_model_outputs(before, after, atol=2e-5):
    logits0, grads0, dx0 = before
    logits1, grads1, dx1 = after
    torch.testing.assert_close(logits1, logits0, atol=atol, rtol=1e-4)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], atol=atol, rtol=1e-4, msg=name)
    torch.testing.assert_close(dx1, dx0, atol=atol, rtol=1e-4)


def _timm_attention_in(model):
    return sum(type(m) is TimmAttention for m in model.modules())


@pytest.mark.parametrize("variant", [{}, {"qk_norm": True}, {"scale_attn_norm": True}], ids=str)
def test_patched_vit_matches_timm(variant, device):
    torch.manual_seed(0)
    model = _tiny_vit(**variant).to(device).eval()
    x = torch.randn(2, 3, 32, 32, device=device)
    before = _logits_and_grads(model, x)
    keys = list(model.state_dict().keys())
    params = {n: p for n, p in model.named_parameters()}

    assert mimfast.patch_timm(model, kernels="triton") == 2
    assert _timm_attention_in(model) == 0 and sum(isinstance(m, Attention) for m in model.modules()) == 2
    assert list(model.state_dict().keys()) == keys  # checkpoints load both ways
    assert all(params[n] is p for n, p in model.named_parameters())  # optimizer state stays valid
    _assert_same_model_outputs(before, _logits_and_grads(model, x))


def test_patched_gated_attention(device):
    model = _tiny_vit(depth=1).to(device).eval()
    try:
        gated = TimmAttention(64, num_heads=2, qkv_bias=True, gated=True)
    except TypeError:
        pytest.skip("this timm has no gated attention")
    model.blocks[0].attn = gated.to(device)
    x = torch.randn(2, 3, 32, 32, device=device)
    before = _logits_and_grads(model, x)
    assert mimfast.patch_timm(model, kernels="triton") == 1
    assert model.blocks[0].attn.gate is gated.gate
    _assert_same_model_outputs(before, _logits_and_grads(model, x))


def test_block_attn_layer_drop_in(device):
    """timm's Block builds mimfast's Attention with the same parameter names and shapes."""
    torch.manual_seed(0)
    ref = Block(64, 2, qkv_bias=True).to(device)
    ours = Block(64, 2, qkv_bias=True, attn_layer=Attention).to(device)
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 17, 64, device=device)
    torch.testing.assert_close(ours(x), ref(x), atol=2e-5, rtol=1e-4)


def test_attention_module_eager_and_triton_agree(device):
    torch.manual_seed(0)
    attn = Attention(96, num_heads=3, qkv_bias=True, attn_head_dim=16, dim_out=40).to(device)
    x = torch.randn(2, 13, 96, device=device)
    outs, grads = [], []
    for kernels in ("eager", "triton"):
        attn.kernels = kernels
        xx = x.clone().requires_grad_()
        out = attn(xx)
        out.sum().backward()
        outs.append(out.detach())
        grads.append((xx.grad, attn.qkv.weight.grad.clone()))
        attn.zero_grad(set_to_none=True)
    assert outs[0].shape == (2, 13, 40)
    torch.testing.assert_close(outs[1], outs[0], atol=2e-5, rtol=1e-4)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def _official_style_mae(device):
    """An MAE whose blocks use timm's own Attention, as the official models_mae.py builds them."""
    torch.manual_seed(0)
    model = mae_vit_tiny_patch16(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32,
                                 decoder_depth=1, decoder_num_heads=2, kernels="eager")
    for blk in list(model.blocks) + list(model.decoder_blocks):
        ours = blk.attn
        timm_attn = TimmAttention(ours.qkv.in_features, num_heads=ours.num_heads, qkv_bias=True)
        timm_attn.load_state_dict(ours.state_dict())
        blk.attn = timm_attn
    return model.to(device)


def test_patch_timm_on_mae(device):
    model = _official_style_mae(device)
    imgs = torch.randn(2, 3, 32, 32, device=device)
    noise = torch.rand(2, 16, device=device)

    def step():
        model.zero_grad(set_to_none=True)
        loss, pred, _ = model(imgs, mask_ratio=0.75, noise=noise)
        loss.backward()
        return loss.detach(), pred.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                             if p.grad is not None}

    loss0, pred0, grads0 = step()
    assert mimfast.patch_timm(model, kernels="triton") == 3  # 2 encoder + 1 decoder blocks
    assert _timm_attention_in(model) == 0
    loss1, pred1, grads1 = step()
    torch.testing.assert_close(loss1, loss0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pred1, pred0, atol=2e-5, rtol=1e-4)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], atol=2e-5, rtol=1e-4, msg=name)
    # the model's own switch reaches the swapped modules too
    model.set_kernels("eager")
    assert all(m.kernels == "eager" for m in model.modules() if isinstance(m, Attention))


def test_attention_dropout_is_an_error(device):
    with pytest.raises(ValueError, match="attn_drop"):
        Attention(64, num_heads=2, attn_drop=0.1)
    with pytest.raises(ValueError, match="attn_drop"):
        Block(64, 2, attn_drop=0.1, attn_layer=Attention)
    model = _tiny_vit(attn_drop_rate=0.1)
    with pytest.raises(ValueError, match="attn_drop"):
        mimfast.patch_timm(model)
    assert _timm_attention_in(model) == 2  # nothing was swapped


def test_bad_arguments(device):
    with pytest.raises(ValueError, match="kernels"):
        Attention(64, num_heads=2, kernels="cuda")
    with pytest.raises(ValueError, match="kernels"):
        mimfast.patch_timm(_tiny_vit(), kernels="fast")
    with pytest.raises(ValueError, match="num_heads"):
        Attention(64, num_heads=3)
    with pytest.raises(ValueError, match="norm_layer"):
        Attention(64, num_heads=2, qk_norm=True)
    attn = Attention(64, num_heads=2).to(device)
    with pytest.raises(ValueError, match="attn_mask"):
        attn(torch.randn(1, 5, 64, device=device), attn_mask=torch.zeros(5, 5, device=device))


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 autocast through the kernel on a GPU")
def test_patched_vit_under_bf16_autocast(device):
    torch.manual_seed(0)
    model = _tiny_vit(embed_dim=192, num_heads=3, depth=2).to(device).eval()
    x = torch.randn(4, 3, 32, 32, device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = model(x).float()
    mimfast.patch_timm(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x).float()
        out.square().mean().backward()
    assert (out - ref).abs().max().item() < 5e-2 * ref.abs().max().item()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_module_is_an_nn_module():
    attn = Attention(64, num_heads=2, depth=3)  # Block passes depth=...; it is accepted and ignored
    assert isinstance(attn, nn.Module) and "num_heads=2" in repr(attn)
