"""MAE model: official configs, parameter counts and keys, init, and the official forward's
numbers on the same weights and noise."""

import pytest
import torch

from mimfast.models import (
    MaskedAutoencoderViT,
    mae_vit_base_patch16,
    mae_vit_base_patch16_dec512d8b,
    mae_vit_huge_patch14,
    mae_vit_large_patch16,
    mae_vit_tiny_patch16,
)
from mimfast.models.pos_embed import get_2d_sincos_pos_embed


def _official_keys(depth, decoder_depth):
    """state_dict keys of facebookresearch/mae MaskedAutoencoderViT (timm 0.3.2 Block)."""
    keys = ["cls_token", "pos_embed", "mask_token", "decoder_pos_embed",
            "patch_embed.proj.weight", "patch_embed.proj.bias"]
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
             "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
             "mlp.fc2.weight", "mlp.fc2.bias"]
    keys += [f"blocks.{i}.{k}" for i in range(depth) for k in block]
    keys += ["norm.weight", "norm.bias", "decoder_embed.weight", "decoder_embed.bias"]
    keys += [f"decoder_blocks.{i}.{k}" for i in range(decoder_depth) for k in block]
    keys += ["decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"]
    return set(keys)


@pytest.mark.parametrize(
    "factory,depth,total,trainable",
    [
        (mae_vit_base_patch16, 12, 111_907_840, 111_655_680),
        (mae_vit_large_patch16, 24, 329_541_888, 329_239_296),
        (mae_vit_huge_patch14, 32, 657_074_508, 656_613_964),
    ],
)
def test_official_parameter_counts_and_keys(factory, depth, total, trainable):
    with torch.device("meta"):
        model = factory()
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    assert set(model.state_dict().keys()) == _official_keys(depth, 8)


def test_alias_names():
    assert mae_vit_base_patch16 is mae_vit_base_patch16_dec512d8b


def _assert_xavier_uniform(w, fan_in, fan_out, name):
    """U(-a, a) with a = sqrt(6 / (fan_in + fan_out)): bounded by a, reaching it, with the
    uniform's std a / sqrt(3) (PyTorch's default Linear init, or BEiT's truncated normal, fails:
    narrower, or another spread)."""
    bound = (6 / (fan_in + fan_out)) ** 0.5
    assert w.abs().max() <= bound, name
    assert w.abs().max() > 0.99 * bound, name
    assert abs(w.std().item() / (bound / 3**0.5) - 1) < 0.05, name
    assert abs(w.mean().item()) < 0.05 * bound, name


def test_init_matches_reference():
    torch.manual_seed(0)
    m = mae_vit_tiny_patch16(img_size=64, patch_size=16)
    pe = torch.from_numpy(get_2d_sincos_pos_embed(192, 4, cls_token=True)).float()
    assert torch.equal(m.pos_embed[0], pe) and not m.pos_embed.requires_grad
    dpe = torch.from_numpy(get_2d_sincos_pos_embed(128, 4, cls_token=True)).float()
    assert torch.equal(m.decoder_pos_embed[0], dpe) and not m.decoder_pos_embed.requires_grad
    linears = 0
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert torch.all(mod.bias == 0), name
            _assert_xavier_uniform(mod.weight, mod.in_features, mod.out_features, name)
            linears += 1
        if isinstance(mod, torch.nn.LayerNorm):
            assert mod.eps == 1e-6 and torch.all(mod.weight == 1) and torch.all(mod.bias == 0)
    assert linears == 12 * 4 + 2 * 4 + 2  # blocks (qkv, proj, fc1, fc2), decoder_embed, decoder_pred
    w = m.patch_embed.proj.weight  # xavier on its (out, in * p * p) view, as nn.Linear
    _assert_xavier_uniform(w, w[0].numel(), w.shape[0], "patch_embed.proj")
    b = m.patch_embed.proj.bias  # untouched by the reference: Conv2d's default U(-1/sqrt(fan_in), +)
    assert b.abs().max() <= w[0].numel() ** -0.5 and b.abs().max() > 0.5 * w[0].numel() ** -0.5
    for t in (m.cls_token, m.mask_token):  # N(0, 0.02) over 192 and 128 values
        assert 0.016 < t.std() < 0.024 and t.abs().max() > 0.04


def _official_forward(model, imgs, mask_ratio):
    """facebookresearch/mae models_mae.py forward, line by line, on the model's own modules."""
    x = model.patch_embed(imgs)
    x = x + model.pos_embed[:, 1:, :]
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    noise = torch.rand(N, L, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    cls_token = model.cls_token + model.pos_embed[:, :1, :]
    x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    for blk in model.blocks:
        x = blk(x)
    x = model.norm(x)
    # decoder
    x = model.decoder_embed(x)
    mask_tokens = model.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    x = x + model.decoder_pos_embed
    for blk in model.decoder_blocks:
        x = blk(x)
    x = model.decoder_norm(x)
    pred = model.decoder_pred(x)[:, 1:, :]
    # loss
    p = model.patch_embed.patch_size[0]
    h = w = imgs.shape[2] // p
    target = imgs.reshape(imgs.shape[0], 3, h, p, w, p)
    target = torch.einsum("nchpwq->nhwpqc", target).reshape(imgs.shape[0], h * w, p**2 * 3)
    if model.norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    loss = (loss * mask).sum() / mask.sum()
    return loss, pred, mask


@pytest.mark.parametrize("norm_pix", [False, True])
def test_forward_equals_official_semantics_same_seed(norm_pix):
    torch.manual_seed(1)
    model = mae_vit_tiny_patch16(img_size=64, depth=2, norm_pix_loss=norm_pix, kernels="eager")
    imgs = torch.randn(3, 3, 64, 64)
    torch.manual_seed(7)
    want = _official_forward(model, imgs, 0.75)
    torch.manual_seed(7)
    got = model(imgs, mask_ratio=0.75)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    # passing the noise the reference would draw gives the same too
    torch.manual_seed(7)
    noise = torch.rand(3, 16)
    torch.testing.assert_close(model(imgs, 0.75, noise=noise)[0], want[0])


def test_state_dict_roundtrip_strict():
    a = mae_vit_tiny_patch16(img_size=32, patch_size=8, depth=1)
    b = mae_vit_tiny_patch16(img_size=32, patch_size=8, depth=1)
    b.load_state_dict(a.state_dict(), strict=True)
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    assert torch.equal(a(imgs, noise=noise)[0], b(imgs, noise=noise)[0])


def test_forward_features_and_custom_sizes():
    m = MaskedAutoencoderViT(img_size=48, patch_size=12, in_chans=1, embed_dim=64, depth=1, num_heads=2,
                             decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, kernels="eager")
    feats = m.forward_features(torch.randn(2, 1, 48, 48))
    assert feats.shape == (2, 17, 64)
    loss, pred, mask = m(torch.randn(2, 1, 48, 48), mask_ratio=0.5)
    assert pred.shape == (2, 16, 144) and mask.sum().item() == 16
    assert m.unpatchify(pred).shape == (2, 1, 48, 48)


@pytest.mark.parametrize(
    "imgs,ratio,match",
    [
        (torch.randn(2, 3, 30, 32), 0.75, "multiple"),
        (torch.randn(2, 1, 32, 32), 0.75, "channels"),
        (torch.randn(0, 3, 32, 32), 0.75, "empty"),
        (torch.randn(2, 3, 32, 32), 1.0, "mask_ratio"),
        (torch.randn(2, 3, 32, 32), -0.1, "mask_ratio"),
        (torch.randn(2, 3, 32, 32), float("inf"), "mask_ratio"),
        (torch.randn(2, 3, 64, 64), 0.75, "differs"),
    ],
)
def test_bad_input(imgs, ratio, match):
    m = mae_vit_tiny_patch16(img_size=32, patch_size=8, depth=1, kernels="eager")
    with pytest.raises(ValueError, match=match):
        m(imgs, mask_ratio=ratio)
    with pytest.raises(ValueError, match="multiple"):
        mae_vit_tiny_patch16(img_size=30, patch_size=8)


@pytest.mark.parametrize("factory", [mae_vit_base_patch16, mae_vit_large_patch16, mae_vit_huge_patch14])
def test_full_size_models_equal_official_semantics(factory):
    """Base, large and huge: the official forward's loss, prediction and mask, same weights and seed."""
    torch.manual_seed(0)
    model = factory(norm_pix_loss=True, kernels="eager")
    imgs = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.manual_seed(5)
        want = _official_forward(model, imgs, 0.75)
        torch.manual_seed(5)
        got = model(imgs, mask_ratio=0.75)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
