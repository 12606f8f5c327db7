"""BEiT pretraining model: the reference's keys, parameter counts and init, its forward line by
line on the same weights, and loss + every gradient with kernels on and off; the pixel variant."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mimfast import ops
from mimfast.data.masking_generators import BlockwiseMaskingGenerator
from mimfast.models import MODELS, create_model
from mimfast.models.beit import (
    VisionTransformerForMaskedImageModeling,
    beit_base_patch16_224_8k_vocab,
    beit_base_patch16_224_pixel,
    beit_large_patch16_224_8k_vocab,
    beit_tiny_patch16_224_8k_vocab,
    beit_tiny_patch16_224_pixel,
)
from mimfast.nn import BEiTAttention
from tolerance import DEVICE

# small model for the interpreter: 4 x 4 patches (S = 17), head dim 32
SMALL = dict(img_size=64, embed_dim=96, depth=2, num_heads=3, vocab_size=1000)


def _reference_keys(depth):
    """state_dict keys of microsoft/unilm VisionTransformerForMaskedImageModeling built by
    run_beit_pretraining.py (use_shared_rel_pos_bias=True, use_abs_pos_emb=False, layer scale)."""
    keys = ["cls_token", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "rel_pos_bias.relative_position_bias_table", "rel_pos_bias.relative_position_index",
            "norm.weight", "norm.bias", "lm_head.weight", "lm_head.bias"]
    block = ["gamma_1", "gamma_2", "norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias",
             "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
             "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    return set(keys + [f"blocks.{i}.{k}" for i in range(depth) for k in block])


def _reference_param_count(dim, depth, heads, vocab=8192, patch=16, chans=3, grid=14, mlp_ratio=4):
    """Parameters of the reference architecture, module by module."""
    patch_embed = dim * chans * patch * patch + dim  # Conv2d weight + bias
    tokens = 2 * dim  # cls_token, mask_token
    rel_pos_table = ((2 * grid - 1) ** 2 + 3) * heads  # shared RelativePositionBias
    hidden = dim * mlp_ratio
    block = (
        2 * dim  # gamma_1, gamma_2
        + 2 * dim  # norm1
        + 3 * dim * dim + 2 * dim  # qkv (no bias) + q_bias, v_bias
        + dim * dim + dim  # proj
        + 2 * dim  # norm2
        + dim * hidden + hidden + hidden * dim + dim  # fc1, fc2
    )
    return patch_embed + tokens + rel_pos_table + depth * block + 2 * dim + dim * vocab + vocab


@pytest.mark.parametrize("factory,dim,depth,heads", [
    (beit_base_patch16_224_8k_vocab, 768, 12, 12),
    (beit_large_patch16_224_8k_vocab, 1024, 24, 16),
])
def test_reference_keys_and_parameter_count(factory, dim, depth, heads):
    with torch.device("meta"):
        model = factory()
    assert set(model.state_dict().keys()) == _reference_keys(depth)
    n = sum(p.numel() for p in model.parameters())
    assert n == _reference_param_count(dim, depth, heads)
    table = model.state_dict()["rel_pos_bias.relative_position_bias_table"]
    assert tuple(table.shape) == (732, heads)
    if dim == 768:
        assert n == 91_965_776  # 85.7M encoder + 6.3M LM head (the paper's "86M" for BEiT-B)
    assert model.blocks[0].gamma_1.shape == (dim,)


def test_pixel_variant_keys():
    with torch.device("meta"):
        model = beit_base_patch16_224_pixel()
    keys = _reference_keys(12) - {"lm_head.weight", "lm_head.bias"} | {"pixel_head.weight", "pixel_head.bias"}
    assert set(model.state_dict().keys()) == keys
    assert tuple(model.pixel_head.weight.shape) == (768, 768)


def test_registry():
    for name in ("beit_base_patch16_224_8k_vocab", "beit_large_patch16_224_8k_vocab",
                 "beit_tiny_patch16_224_8k_vocab", "beit_base_patch16_224_pixel"):
        assert name in MODELS
    m = create_model("beit_tiny_patch16_224_8k_vocab", num_classes=0, **SMALL)
    assert isinstance(m, VisionTransformerForMaskedImageModeling) and m.img_size == 64


def test_init_matches_reference():
    torch.manual_seed(0)
    m = beit_tiny_patch16_224_8k_vocab(img_size=64, depth=3)
    std = 0.02
    for name, mod in m.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            bound = std
            if name.endswith("attn.proj") or name.endswith("mlp.fc2"):
                layer_id = int(name.split(".")[1]) + 1
                bound = std / math.sqrt(2 * layer_id)
            assert mod.weight.abs().max() <= bound + 1e-9, name
            assert mod.weight.abs().max() > 0.9 * bound, name  # truncated at +-std, not wider
            assert mod.bias is None or torch.all(mod.bias == 0), name
        if isinstance(mod, torch.nn.LayerNorm):
            assert mod.eps == 1e-6 and torch.all(mod.weight == 1) and torch.all(mod.bias == 0)
        if isinstance(mod, BEiTAttention):
            assert mod.qkv.bias is None and torch.all(mod.q_bias == 0) and torch.all(mod.v_bias == 0)
    for t in (m.cls_token, m.mask_token):
        assert t.abs().max() <= std and 0.5 * 0.538 * std < t.std() < 1.5 * 0.538 * std  # N(0, std) cut at +-std
    assert torch.all(m.rel_pos_bias.relative_position_bias_table == 0)
    assert all(torch.all(b.gamma_1 == 0.1) and torch.all(b.gamma_2 == 0.1) for b in m.blocks)
    assert m.pos_embed is None
    with torch.device("meta"):
        large = beit_large_patch16_224_8k_vocab(depth=1)
    assert large.blocks[0].gamma_1.shape == (1024,)
    torch.manual_seed(0)
    assert torch.all(beit_tiny_patch16_224_8k_vocab(img_size=64, depth=1, init_values=1e-5).blocks[0].gamma_2 == 1e-5)


def test_relative_position_index():
    """Index of (query i, key j): relative offset (dy, dx) of their patches -> (dy + 13) * 27 +
    (dx + 13); cls rows / columns use the last three entries (729 cls-to-token, 730
    token-to-cls, 731 cls-to-cls)."""
    with torch.device("meta"):
        m = beit_base_patch16_224_8k_vocab(depth=1)
    idx = beit_tiny_patch16_224_8k_vocab(depth=1).rel_pos_bias.relative_position_index
    assert idx.shape == (197, 197) and idx.dtype == torch.int64
    rng = np.random.default_rng(0)
    for _ in range(50):
        i, j = rng.integers(0, 196, 2)
        dy, dx = i // 14 - j // 14, i % 14 - j % 14
        assert idx[1 + i, 1 + j] == (dy + 13) * 27 + (dx + 13)
    assert torch.all(idx[0, 1:] == 729) and torch.all(idx[1:, 0] == 730) and idx[0, 0] == 731
    assert idx.max() == 731 == m.rel_pos_bias.num_relative_distance - 1


def _reference_forward(model, imgs, bool_masked_pos):
    """microsoft/unilm modeling_pretrain.py forward + modeling_finetune.py Block / Attention,
    line by line, on the model's own parameters (drop path and dropout off)."""
    x = model.patch_embed.proj(imgs).flatten(2).transpose(1, 2)
    batch_size, seq_len, _ = x.size()
    cls_tokens = model.cls_token.expand(batch_size, -1, -1)
    mask_token = model.mask_token.expand(batch_size, seq_len, -1)
    w = bool_masked_pos.unsqueeze(-1).type_as(mask_token)
    x = x * (1 - w) + mask_token * w
    x = torch.cat((cls_tokens, x), dim=1)
    rpb = model.rel_pos_bias
    s = rpb.window_size[0] * rpb.window_size[1] + 1
    rel_pos_bias = rpb.relative_position_bias_table[rpb.relative_position_index.view(-1)].view(s, s, -1)
    rel_pos_bias = rel_pos_bias.permute(2, 0, 1).contiguous()
    for blk in model.blocks:
        a = blk.attn
        y = blk.norm1(x)
        B, N, C = y.shape
        qkv_bias = torch.cat((a.q_bias, torch.zeros_like(a.v_bias, requires_grad=False), a.v_bias))
        qkv = F.linear(input=y, weight=a.qkv.weight, bias=qkv_bias)
        qkv = qkv.reshape(B, N, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * a.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn + rel_pos_bias
        attn = attn.softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        y = a.proj(y)
        x = x + blk.gamma_1 * y
        x = x + blk.gamma_2 * blk.mlp.fc2(blk.mlp.act(blk.mlp.fc1(blk.norm2(x))))
    x = model.norm(x)
    x = x[:, 1:]
    return model.lm_head(x[bool_masked_pos])


def _batch(model, n=2, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    L = model.patch_embed.num_patches
    grid = model.patch_embed.grid_size
    imgs = torch.randn(n, 3, model.img_size, model.img_size, generator=g)
    masks = BlockwiseMaskingGenerator(tuple(grid), L * 3 // 8, min_num_patches=4)(n, rng=np.random.default_rng(seed))
    bool_masked_pos = torch.from_numpy(masks).flatten(1)
    labels = torch.randint(0, model.lm_head.out_features if hasattr(model, "lm_head") else 2, (n, L), generator=g)
    return imgs.to(device), bool_masked_pos.to(device), labels.to(device)


def _randomize(model):
    """Non-trivial values where the init is zero or constant, so every path is exercised."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name or name.endswith(("q_bias", "v_bias", "gamma_1", "gamma_2")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (0.5 if "gamma" in name else 0.0))


def test_forward_matches_reference_line_by_line():
    torch.manual_seed(0)
    model = beit_tiny_patch16_224_8k_vocab(kernels="eager", **SMALL)
    _randomize(model)
    imgs, bool_masked_pos, labels = _batch(model)
    logits = model(imgs, bool_masked_pos)
    ref = _reference_forward(model, imgs, bool_masked_pos)
    assert logits.shape == (bool_masked_pos.sum().item(), 1000)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    m_labels = labels[bool_masked_pos]
    loss = model(imgs, bool_masked_pos, labels=m_labels)
    torch.testing.assert_close(loss, F.cross_entropy(ref, m_labels), rtol=1e-5, atol=1e-6)
    # labels for every position, and an (N, h, w) mask, give the same loss
    torch.testing.assert_close(model(imgs, bool_masked_pos.view(2, 4, 4), labels=labels), loss)
    all_logits = model(imgs, bool_masked_pos, return_all_tokens=True)
    torch.testing.assert_close(all_logits[bool_masked_pos], logits)


def _loss_and_grads(model, imgs, bool_masked_pos, labels):
    model.zero_grad(set_to_none=True)
    loss = model(imgs, bool_masked_pos, labels=labels)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def dispatched(monkeypatch):
    """{op: the backends it resolved to} for every op call from here on (the ops dispatch through
    ``mimfast.backend.resolve``): proves which side of a kernels-on/off comparison ran what."""
    from mimfast import backend

    seen, real = {}, backend.resolve

    def spy(which, *tensors, op="op"):
        got = real(which, *tensors, op=op)
        seen.setdefault(op, set()).add(got)
        return got

    monkeypatch.setattr(backend, "resolve", spy)
    return seen


# Both comparisons below run with full fp32 convolutions (no_tf32): under cuDNN's default TF32 the
# patch projection's weight gradient rounds each run's incoming gradient to a 10-bit mantissa, so
# fp32-level differences upstream (the kernels' own rounding) can become whole TF32 steps there
# (2**-10 of a term), within a factor of about 2 of these tolerances in a TF32 emulation.
@pytest.mark.parametrize("attention", ["eager", "triton"])
def test_kernels_on_and_off_same_weights(attention, device, no_tf32, dispatched):
    torch.manual_seed(0)
    model = beit_tiny_patch16_224_8k_vocab(**SMALL).to(device)
    _randomize(model)
    imgs, bool_masked_pos, labels = _batch(model, n=3, device=device)
    labels[0, :2] = -100  # a few ignored rows

    model.set_kernels("eager")
    ref_loss, ref_grads = _loss_and_grads(model, imgs, bool_masked_pos, labels)
    assert dispatched == {"self_attention": {"eager"}, "linear_cross_entropy": {"eager"}, "mlp": {"eager"},
                          "patch_embed": {"eager"}}
    dispatched.clear()
    model.set_kernels("triton")
    if attention == "eager":
        for m in model.modules():
            if isinstance(m, BEiTAttention):
                m.kernels = "eager"
    loss, grads = _loss_and_grads(model, imgs, bool_masked_pos, labels)
    # the patch embedding, the fused blocks (residual add + LayerNorm, the MLP), the LM head's loss
    # and, unless held back, the attention ran their Triton kernels
    assert dispatched == {"self_attention": {attention}, "linear_cross_entropy": {"triton"},
                          "add_layer_norm": {"triton"}, "mlp": {"triton"}, "patch_embed": {"triton"}}

    assert set(grads) == set(ref_grads) and len(grads) == len(list(model.parameters()))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("attention", ["eager", "triton"])
def test_pixel_variant(attention, device, no_tf32, dispatched):
    torch.manual_seed(0)
    model = beit_tiny_patch16_224_pixel(img_size=64, embed_dim=96, depth=2, num_heads=3).to(device)
    _randomize(model)
    imgs, bool_masked_pos, _ = _batch(model, n=2, device=device)

    model.set_kernels("eager")
    model.zero_grad(set_to_none=True)
    ref_loss, ref_pred = model(imgs, bool_masked_pos)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    # SimMIM's loss on pixels: (l1 * mask).sum() / (mask.sum() + 1e-5) / in_chans
    p = model.patch_size
    pixel_pred = ops.unpatchify(ref_pred.detach(), p, 3, (4, 4))
    mask = bool_masked_pos.view(2, 4, 4).repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).float()
    l1 = F.l1_loss(imgs, pixel_pred, reduction="none")
    simmim = (l1 * mask).sum() / (mask.sum() + 1e-5) / 3
    torch.testing.assert_close(ref_loss.detach(), simmim, rtol=1e-5, atol=1e-6)
    assert dispatched == {"self_attention": {"eager"}, "masked_patch_loss": {"eager"}, "mlp": {"eager"},
                          "patch_embed": {"eager"}}
    dispatched.clear()

    model.set_kernels("triton")
    if attention == "eager":
        for m in model.modules():
            if isinstance(m, BEiTAttention):
                m.kernels = "eager"
    model.zero_grad(set_to_none=True)
    loss, pred = model(imgs, bool_masked_pos)
    loss.backward()
    assert dispatched == {"self_attention": {attention}, "masked_patch_loss": {"triton"},
                          "add_layer_norm": {"triton"}, "mlp": {"triton"}, "patch_embed": {"triton"}}
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred, ref_pred, rtol=1e-5, atol=1e-5)
    for n, p_ in model.named_parameters():
        torch.testing.assert_close(p_.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_train_mode_with_drop_path():
    """Stochastic depth at the reference's rates (linear in depth: 0 for the first block,
    drop_path_rate for the last), at work in training mode only."""
    from timm.layers import DropPath

    torch.manual_seed(0)
    model = beit_tiny_patch16_224_8k_vocab(drop_path_rate=0.1, kernels="eager", **SMALL).train()
    assert isinstance(model.blocks[0].drop_path, torch.nn.Identity)
    assert isinstance(model.blocks[1].drop_path, DropPath) and model.blocks[1].drop_path.drop_prob == pytest.approx(0.1)
    _randomize(model)
    plain = beit_tiny_patch16_224_8k_vocab(kernels="eager", **SMALL).eval()
    plain.load_state_dict(model.state_dict())
    imgs, bool_masked_pos, labels = _batch(model)
    with torch.no_grad():
        want = plain(imgs, bool_masked_pos, labels=labels)
        assert torch.equal(model.eval()(imgs, bool_masked_pos, labels=labels), want)  # off in eval mode
    model.train()
    loss = model(imgs, bool_masked_pos, labels=labels)
    assert abs(loss.item() - want.item()) > 1e-4  # each sample's last branch dropped or scaled by 1 / 0.9
    loss.backward()
    assert torch.isfinite(loss) and model.mask_token.grad.abs().sum() > 0
    assert model.rel_pos_bias.relative_position_bias_table.grad.abs().sum() > 0


def test_bad_input():
    model = beit_tiny_patch16_224_8k_vocab(kernels="eager", **SMALL)
    imgs, bool_masked_pos, labels = _batch(model)
    with pytest.raises(ValueError, match="bool_masked_pos"):
        model(imgs, bool_masked_pos[:, :5])
    with pytest.raises(TypeError, match="bool_masked_pos"):
        model(imgs, bool_masked_pos.float())
    with pytest.raises(ValueError, match="image size"):
        model(imgs[:, :, :32, :32], bool_masked_pos)
    with pytest.raises(ValueError, match="channels"):
        model(imgs[:, :1], bool_masked_pos)
    with pytest.raises(ValueError, match="labels"):
        model(imgs, bool_masked_pos, labels=labels[:, :3])
    with pytest.raises(ValueError, match="kernels"):
        model.set_kernels("fast")
    with pytest.raises(ValueError, match="attn_drop"):
        beit_tiny_patch16_224_8k_vocab(attn_drop_rate=0.1, **SMALL)
    with pytest.raises(ValueError, match="loss"):
        beit_tiny_patch16_224_pixel(img_size=64, depth=1, loss="huber")


@pytest.mark.skipif(DEVICE != "cuda", reason="full-size BEiT-B on the GPU only")
def test_base_bf16_kernels_on_and_off():
    torch.manual_seed(0)
    model = beit_base_patch16_224_8k_vocab().cuda()
    imgs = torch.randn(8, 3, 224, 224, device="cuda")
    masks = BlockwiseMaskingGenerator(14, 75)(8, rng=np.random.default_rng(0))
    bool_masked_pos = torch.from_numpy(masks).flatten(1).cuda()
    labels = torch.randint(0, 8192, (8, 196), device="cuda")
    out = {}
    for kernels in ("eager", "triton"):
        model.set_kernels(kernels)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(imgs, bool_masked_pos, labels=labels)
        loss.backward()
        out[kernels] = (loss.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters()})
    (l0, g0), (l1, g1) = out["eager"], out["triton"]
    assert abs(l0.item() - l1.item()) < 2e-2 * abs(l0.item())
    for n in g0:
        cos = F.cosine_similarity(g0[n].flatten(), g1[n].flatten(), dim=0)
        assert cos > 0.99, (n, cos.item())
