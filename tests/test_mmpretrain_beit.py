"""open-mmlab/mmpretrain BEiT v1 checkpoints in and out (:mod:`mimfast.models.mmpretrain`).

- Key names: MMPretrain's, listed here from its source (``BEiTPretrainViT`` = ``BEiTViT`` with
  ``BEiTTransformerEncoderLayer`` (ln1, attn.{q_bias, v_bias, qkv, proj}, ln2, ffn.layers.0.0,
  ffn.layers.1, gamma_1, gamma_2), ``rel_pos_bias``, the final ``ln1``, ``mask_token``;
  ``BEiTV1Head.cls_head``; the ``DALL-E`` target generator's ``blocks.*``); round trips both ways
  are exact.
- Meaning: an eager transcription (written here from MMPretrain's source) of ``BEiT.loss`` --
  ``BEiTPretrainViT.forward(x, mask)``, ``BEiTAttention`` with the shared or per-block relative
  position bias, layer scale, ``BEiTV1Head.loss`` and ``DALLEEncoder`` on the target view -- run on
  MMPretrain's keys gives the features, logits and loss mimfast's model gives on the mapped weights
  (float64), for the shared-bias recipe, per-block tables with absolute positions and no layer
  scale, and a ``bias=True`` backbone (a k bias, which the mapping drops).
- The relative position index is MMPretrain's construction, and the table rows mean the same
  offsets, so the table maps unchanged.
- Files as mmengine writes them (the stand-ins of ``tests/test_mmpretrain_checkpoint.py``), read
  without mmengine: the model rebuilt from the weights and the config text, ``--init-from``, timm
  export, and ``mimfast tokenizer convert`` of the checkpoint's DALL-E weights (and of
  ``dalle_encoder.pth``-style state_dicts; the official ``encoder.pkl`` still converts).
- Refusals: BEiT v2, other heads, no final norm, a foreign index, VQKD, the pixel model.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
import test_dalle
from test_mmpretrain_checkpoint import _assert_same, _mmengine_file, _perturbed

from mimfast.cli import main
from mimfast.models import DalleEncoder, create_model
from mimfast.models.dalle import load_dalle_encoder, map_pixels
from mimfast.models.mmpretrain import (dalle_from_mmpretrain, from_mmpretrain, is_mmpretrain_state_dict,
                                       mmpretrain_model_config, parse_config_text, to_mmpretrain)
from mimfast.models.tokenizer import load_tokenizer
from mimfast.nn.beit_attention import relative_position_index
from mimfast.train.checkpoint import load_model_weights
from mimfast.train.export import export_checkpoint, export_mmpretrain
from mimfast.train.pretrained import build_model_from_config, load_pretrained_model, read_checkpoint_config

dall_e_modules = test_dalle.dall_e_modules  # the fixture: stand-in dall_e modules for a pickled Encoder

# 48 wide, 3 heads of 16, 2 blocks, 4 x 4 patches of 8 px, 64 visual tokens; DALL-E 8 wide, 1 block a group
KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, vocab_size=64)
HEADS, P, GRID, VOCAB = 3, 8, 4, 64
DALLE = dict(n_hid=8, n_blk_per_group=1, vocab_size=VOCAB)

# the model part of Config.pretty_text for such a model, in MMPretrain's config vocabulary
CFG_TEXT = """data_preprocessor = dict(
    mean=[123.675, 116.28, 103.53], second_mean=[-31.875, -31.875, -31.875],
    second_std=[318.75, 318.75, 318.75], std=[58.395, 57.12, 57.375], to_rgb=True,
    type='TwoNormDataPreprocessor')
default_scope = 'mmpretrain'
model = dict(
    backbone=dict(
        arch=dict(embed_dims=48, feedforward_channels=192, num_heads=3, num_layers=2),
        drop_path_rate=0.1,
        final_norm=True,
        img_size=32,
        init_cfg=[
            dict(layer='Linear', std=0.02, type='TruncNormal'),
            dict(layer='Conv2d', std=0.02, type='TruncNormal'),
            dict(bias=0.0, layer='LayerNorm', type='Constant', val=1.0),
        ],
        layer_scale_init_value=0.1,
        out_type='raw',
        patch_size=8,
        type='BEiTPretrainViT'),
    head=dict(embed_dims=48, loss=dict(type='CrossEntropyLoss'), num_embed=64, type='BEiTV1Head'),
    neck=None,
    target_generator=dict(
        init_cfg=dict(
            checkpoint='https://download.openmmlab.com/mmselfsup/1.x/target_generator_ckpt/dalle_encoder.pth',
            type='Pretrained'),
        n_blk_per_group=1,
        n_hid=8,
        type='DALL-E',
        vocab_size=64),
    type='BEiT')
train_dataloader = dict(
    batch_size=256,
    dataset=dict(
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(brightness=0.4, contrast=0.4, hue=0.0, saturation=0.4, type='ColorJitter'),
            dict(direction='horizontal', prob=0.5, type='RandomFlip'),
            dict(interpolation='bicubic', scale=(0.08, 1.0), second_interpolation='lanczos', second_size=32,
                 size=32, type='RandomResizedCropAndInterpolationWithTwoPic'),
            dict(input_size=(4, 4), max_num_patches=None, min_num_patches=2, num_masking_patches=6,
                 type='BEiTMaskGenerator'),
            dict(type='PackInputs'),
        ],
        type='ImageNet'))
"""


def _beit(**over):
    return _perturbed(create_model("beit_tiny_patch16_224_8k_vocab", **{**KW, **over}, kernels="eager"))


def _dalle():
    torch.manual_seed(3)
    return _perturbed(DalleEncoder(**DALLE, precision="fp32"))


def _dalle_encoder(state_dict):
    enc = DalleEncoder(**DALLE, precision="fp32")
    enc.load_state_dict(state_dict, strict=True)
    return enc.eval()


def _mm_sd(model, dalle=None):
    """The model's (and DALL-E's) weights as MMPretrain's BEiT holds them."""
    sd = to_mmpretrain({k: v.detach().clone() for k, v in model.state_dict().items()})
    if dalle is not None:
        sd.update({"target_generator." + k: v.detach().clone() for k, v in dalle.state_dict().items()})
    return sd


def _mm_keys(depth, shared=True, per_block=False, abs_pos=False, layer_scale=True, qv_bias=True):
    """BEiTPretrainViT + BEiTV1Head's state_dict keys, from MMPretrain's module names."""
    keys = {"backbone.cls_token", "backbone.mask_token", "backbone.patch_embed.projection.weight",
            "backbone.patch_embed.projection.bias", "backbone.ln1.weight", "backbone.ln1.bias",
            "head.cls_head.weight", "head.cls_head.bias"}
    if abs_pos:
        keys.add("backbone.pos_embed")
    if shared:
        keys |= {"backbone.rel_pos_bias.relative_position_bias_table", "backbone.rel_pos_bias.relative_position_index"}
    for i in range(depth):
        names = ["ln1.weight", "ln1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias", "ln2.weight",
                 "ln2.bias", "ffn.layers.0.0.weight", "ffn.layers.0.0.bias", "ffn.layers.1.weight",
                 "ffn.layers.1.bias"]
        names += ["attn.q_bias", "attn.v_bias"] if qv_bias else []
        names += ["gamma_1", "gamma_2"] if layer_scale else []
        names += ["attn.relative_position_bias_table", "attn.relative_position_index"] if per_block else []
        keys |= {f"backbone.layers.{i}.{n}" for n in names}
    return keys


# --- an eager transcription of MMPretrain's BEiT v1, on MMPretrain's keys


def _mm_rel_index(wh, ww):
    """RelativePositionBias.__init__(window_size=(wh, ww), with_cls_token=True) as MMPretrain writes it."""
    num_relative_distance = (2 * wh - 1) * (2 * ww - 1) + 3
    coords = torch.stack(torch.meshgrid([torch.arange(wh), torch.arange(ww)], indexing="ij"))  # 2, Wh, Ww
    coords_flatten = torch.flatten(coords, 1)
    relative_coords = coords_flatten[:, :, None] - coords_flatten[:, None, :]
    relative_coords = relative_coords.permute(1, 2, 0).contiguous()
    relative_coords[:, :, 0] += wh - 1
    relative_coords[:, :, 1] += ww - 1
    relative_coords[:, :, 0] *= 2 * ww - 1
    index = torch.zeros(size=(wh * ww + 1,) * 2, dtype=relative_coords.dtype)
    index[1:, 1:] = relative_coords.sum(-1)
    index[0, 0:] = num_relative_distance - 3
    index[0:, 0] = num_relative_distance - 2
    index[0, 0] = num_relative_distance - 1
    return index


def _mm_bias(table, index):
    """RelativePositionBias.forward: (heads, S, S)."""
    s = index.shape[0]
    return table[index.reshape(-1).long()].view(s, s, -1).permute(2, 0, 1).contiguous()


def _mm_attention(sd, pre, x, heads, rel_pos_bias):
    """BEiTAttention.forward ('qv_bias', or bias=True: qkv.bias)."""
    B, N, C = x.shape
    if pre + "q_bias" in sd:
        qkv_bias = torch.cat((sd[pre + "q_bias"], torch.zeros_like(sd[pre + "v_bias"]), sd[pre + "v_bias"]))
    else:
        qkv_bias = sd.get(pre + "qkv.bias")
    qkv = F.linear(x, sd[pre + "qkv.weight"], qkv_bias)
    qkv = qkv.reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * (C // heads) ** -0.5
    attn = q @ k.transpose(-2, -1)
    if pre + "relative_position_bias_table" in sd:
        attn = attn + _mm_bias(sd[pre + "relative_position_bias_table"], sd[pre + "relative_position_index"])[None]
    if rel_pos_bias is not None:
        attn = attn + rel_pos_bias
    x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C)
    return F.linear(x, sd[pre + "proj.weight"], sd[pre + "proj.bias"])


def _mm_layer(sd, pre, x, heads, rel_pos_bias):
    """BEiTTransformerEncoderLayer.forward: layer scale on the attention and the FFN (mmcv FFN,
    add_identity=False: Linear, GELU, Linear)."""
    D = x.shape[-1]

    def ln(name, t):
        return F.layer_norm(t, (D,), sd[pre + name + ".weight"], sd[pre + name + ".bias"], eps=1e-6)

    def ffn(t):
        t = F.gelu(F.linear(t, sd[pre + "ffn.layers.0.0.weight"], sd[pre + "ffn.layers.0.0.bias"]))
        return F.linear(t, sd[pre + "ffn.layers.1.weight"], sd[pre + "ffn.layers.1.bias"])

    g1, g2 = sd.get(pre + "gamma_1"), sd.get(pre + "gamma_2")
    a = _mm_attention(sd, pre + "attn.", ln("ln1", x), heads, rel_pos_bias)
    x = x + (a if g1 is None else g1 * a)
    f = ffn(ln("ln2", x))
    return x + (f if g2 is None else g2 * f)


def _mm_backbone(sd, imgs, mask, heads):
    """BEiTPretrainViT.forward(x, mask): the last layer's (B, 1 + L, D) after the final ln1."""
    w = sd["backbone.patch_embed.projection.weight"]
    x = F.conv2d(imgs, w, sd["backbone.patch_embed.projection.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    B, L, _ = x.shape
    mask_token = sd["backbone.mask_token"].expand(B, L, -1)
    wm = mask.flatten(1).unsqueeze(-1).type_as(mask_token)
    x = x * (1.0 - wm) + mask_token * wm
    x = torch.cat((sd["backbone.cls_token"].expand(B, -1, -1), x), dim=1)
    if "backbone.pos_embed" in sd:
        x = x + sd["backbone.pos_embed"]
    shared = None
    if "backbone.rel_pos_bias.relative_position_bias_table" in sd:
        shared = _mm_bias(sd["backbone.rel_pos_bias.relative_position_bias_table"],
                          sd["backbone.rel_pos_bias.relative_position_index"])
    i = 0
    while f"backbone.layers.{i}.ln1.weight" in sd:
        x = _mm_layer(sd, f"backbone.layers.{i}.", x, heads, shared)
        i += 1
    return F.layer_norm(x, (x.shape[-1],), sd["backbone.ln1.weight"], sd["backbone.ln1.bias"], eps=1e-6)


def _mm_dalle(sd, x, prefix="target_generator.blocks."):
    """DALLEEncoder.forward on CPU (float32 convs, 'same' padding; blocks id_path + res_path / n_layers^2)."""
    x = x.float()

    def conv(t, name):
        w = sd[prefix + name + ".w"].float()
        return F.conv2d(t, w, sd[prefix + name + ".b"].float(), padding=(w.shape[-1] - 1) // 2)

    groups = sorted({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix + "group_")})
    blocks = sorted({k[len(prefix):].split(".")[1] for k in sd if k.startswith(prefix + "group_1.")})
    post_gain = 1 / (len(groups) * len(blocks)) ** 2
    x = conv(x, "input")
    for g, group in enumerate(groups):
        for block in blocks:
            pre = f"{group}.{block}."
            idp = conv(x, pre + "id_path") if f"{prefix}{pre}id_path.w" in sd else x
            h = x
            for j in range(1, 5):
                h = conv(F.relu(h), f"{pre}res_path.conv_{j}")
            x = idp + post_gain * h
        if g < len(groups) - 1:
            x = F.max_pool2d(x, kernel_size=2)
    return conv(F.relu(x), "output.conv")


def _mm_beit_loss(sd, imgs, target_imgs, mask, heads):
    """BEiT.loss (v1): the backbone on the masked view, DALL-E on the target view, BEiTV1Head.loss."""
    feats = _mm_backbone(sd, imgs, mask, heads)
    target = _mm_dalle(sd, target_imgs)
    mask = mask.flatten(1).to(torch.bool)
    target = torch.argmax(target, dim=1).flatten(1)[mask]
    logits = F.linear(feats[:, 1:][mask], sd["head.cls_head.weight"], sd["head.cls_head.bias"])
    return F.cross_entropy(logits, target), logits, feats


def _inputs(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(batch, 3, GRID * P, GRID * P, generator=g, dtype=torch.float64)
    target_imgs = map_pixels(torch.rand(batch, 3, GRID * 8, GRID * 8, generator=g, dtype=torch.float64))
    mask = torch.zeros(batch, GRID * GRID, dtype=torch.bool)
    for b in range(batch):
        mask[b, torch.randperm(GRID * GRID, generator=g)[:6]] = True
    return imgs, target_imgs, mask


# --- the mapping


def test_round_trips_are_exact_and_keys_are_mmpretrains():
    model = _beit()
    sd = model.state_dict()
    mm = to_mmpretrain(sd)
    assert set(mm) == _mm_keys(KW["depth"])
    assert is_mmpretrain_state_dict(mm)
    _assert_same(from_mmpretrain(mm), sd)
    _assert_same(to_mmpretrain(from_mmpretrain(mm)), mm)
    # a DALL-E target generator and avg_featmap's ln2 are left out of the model's weights
    full = dict(_mm_sd(model, _dalle()), **{"backbone.ln2.weight": torch.ones(48),
                                             "backbone.ln2.bias": torch.zeros(48)})
    _assert_same(from_mmpretrain(full), sd)
    # a backbone on its own, with or without the prefix
    want = {k: v for k, v in sd.items() if not k.startswith("lm_head.")}
    enc = {k: v for k, v in mm.items() if k.startswith("backbone.")}
    _assert_same(from_mmpretrain(enc), want)
    _assert_same(from_mmpretrain({k.removeprefix("backbone."): v for k, v in enc.items()}), want)
    # the index buffers are written where a state_dict left them out (BEiTViT's fine-tuning pre-hook pops them)
    no_index = {k: v for k, v in sd.items() if not k.endswith("relative_position_index")}
    _assert_same(to_mmpretrain(no_index), mm)
    # the other layouts: per-block tables, absolute positions, no layer scale, no q/v biases
    other = _beit(use_rel_pos_bias=True, use_shared_rel_pos_bias=False, use_abs_pos_emb=True, init_values=0,
                  qkv_bias=False)
    mm = to_mmpretrain(other.state_dict())
    assert set(mm) == _mm_keys(KW["depth"], shared=False, per_block=True, abs_pos=True, layer_scale=False,
                               qv_bias=False)
    _assert_same(from_mmpretrain(mm), other.state_dict())


@pytest.mark.parametrize("window", [(4, 4), (14, 14), (3, 5)])
def test_relative_position_index_and_table_are_mmpretrains(window):
    """MMPretrain's index is mimfast's (unilm's), and the table's rows mean the same offsets: row
    (dy + Wh - 1)(2 Ww - 1) + dx + Ww - 1 for patch i -> j (dy, dx = i's row, column minus j's),
    then cls -> token, token -> cls, cls -> cls; heads are the columns."""
    wh, ww = window
    mm = _mm_rel_index(wh, ww)
    assert torch.equal(relative_position_index(window), mm)
    rows = (2 * wh - 1) * (2 * ww - 1) + 3
    y, x = torch.arange(wh * ww) // ww, torch.arange(wh * ww) % ww
    want = (y[:, None] - y[None, :] + wh - 1) * (2 * ww - 1) + (x[:, None] - x[None, :] + ww - 1)
    assert torch.equal(mm[1:, 1:], want)
    assert (mm[0, 1:] == rows - 3).all() and (mm[1:, 0] == rows - 2).all() and mm[0, 0] == rows - 1
    assert mm.max() == rows - 1 and len(mm.unique()) == rows  # every row used


def test_a_foreign_index_is_refused():
    mm = to_mmpretrain(_beit().state_dict())
    mm["backbone.rel_pos_bias.relative_position_index"] = mm["backbone.rel_pos_bias.relative_position_index"].T
    with pytest.raises(ValueError, match="not the relative position index"):
        from_mmpretrain(mm)


@pytest.mark.parametrize("variant", ["shared", "per_block_abs", "qkv_bias"])
def test_features_logits_and_loss_equal_mmpretrains_forward(variant):
    """MMPretrain's BEiT v1 forward, transcribed here and run on MMPretrain's keys, against
    mimfast's model rebuilt from the mapped weights and their config, in float64."""
    over = dict(use_rel_pos_bias=True, use_shared_rel_pos_bias=False, use_abs_pos_emb=True,
                init_values=0) if variant == "per_block_abs" else {}
    mm = {k: v.double() if v.is_floating_point() else v for k, v in _mm_sd(_beit(**over), _dalle()).items()}
    if variant == "qkv_bias":  # bias=True: a full qkv bias, its k third random (softmax-invariant)
        torch.manual_seed(4)
        for i in range(KW["depth"]):
            pre = f"backbone.layers.{i}.attn."
            q, v = mm.pop(pre + "q_bias"), mm.pop(pre + "v_bias")
            mm[pre + "qkv.bias"] = torch.cat((q, torch.randn_like(q), v))
    sd = from_mmpretrain(mm)
    cfg = mmpretrain_model_config(sd)
    model = build_model_from_config(cfg, kernels="eager").double().eval()
    model.load_state_dict(sd, strict=True)
    tokenizer = _dalle_encoder(dalle_from_mmpretrain(mm))
    imgs, target_imgs, mask = _inputs()
    with torch.no_grad():
        ref_loss, ref_logits, ref_feats = _mm_beit_loss(mm, imgs, target_imgs, mask, HEADS)
        feats = model.forward_features(imgs, mask)
        logits = model(imgs, mask)
        labels = tokenizer.tokenize(target_imgs.float()).flatten(1)
        loss = model(imgs, mask, labels)
    torch.testing.assert_close(feats, ref_feats, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss, ref_loss.float(), rtol=1e-6, atol=1e-6)  # mimfast's cross-entropy is float32
    assert logits.shape == (int(mask.sum()), VOCAB)
    # the check sees a swap: the attention's and the FFN's layer scale exchanged, or the table's rows reversed
    bad = dict(mm)
    if variant == "per_block_abs":
        key = "backbone.layers.0.attn.relative_position_bias_table"
        bad[key] = mm[key].flip(0)
    else:
        bad["backbone.layers.0.gamma_1"], bad["backbone.layers.0.gamma_2"] = (mm["backbone.layers.0.gamma_2"],
                                                                              mm["backbone.layers.0.gamma_1"])
    with torch.no_grad():
        assert not torch.allclose(_mm_backbone(bad, imgs, mask, HEADS), ref_feats, atol=1e-6)


# --- the architecture from the weights and the config text


def test_config_from_weights_and_config_text():
    sd = from_mmpretrain(to_mmpretrain(_beit(mlp_ratio=2).state_dict()))
    want = dict(embed_dim=48, depth=2, num_heads=3, in_chans=3, mlp_ratio=2, qkv_bias=True, init_values=0.1,
                use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True, vocab_size=64)
    bare = mmpretrain_model_config(sd)  # the weights say it all but the layer-scale init (BEiTPretrainViT's 0.1)
    assert bare == dict(method="beit", model="beit_tiny_patch16_224_8k_vocab", img_size=32, patch_size=8,
                        model_kwargs=want, norm_pix_loss=False, source="mmpretrain")
    text = CFG_TEXT.replace("layer_scale_init_value=0.1", "layer_scale_init_value=0.2")
    cfg = mmpretrain_model_config(sd, parse_config_text(text))
    assert cfg["model_kwargs"] == dict(want, init_values=0.2)
    assert (cfg["num_mask_patches"], cfg["drop_path"]) == (6, 0.1)
    built = build_model_from_config(cfg, kernels="eager", device="meta")
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    # per-block tables and absolute positions; no head (a backbone-only file): the config's vocabulary
    other = _beit(use_rel_pos_bias=True, use_shared_rel_pos_bias=False, use_abs_pos_emb=True, init_values=0)
    sd = from_mmpretrain({k: v for k, v in to_mmpretrain(other.state_dict()).items() if k.startswith("backbone.")})
    cfg = mmpretrain_model_config(sd, parse_config_text(CFG_TEXT.replace("num_embed=64", "num_embed=32")))
    mk = cfg["model_kwargs"]
    assert (mk["use_rel_pos_bias"], mk["use_shared_rel_pos_bias"], mk["use_abs_pos_emb"]) == (True, False, True)
    assert (mk["init_values"], mk["num_heads"], mk["vocab_size"], cfg["img_size"]) == (0.0, 3, 32, 32)


def test_base_size_gives_the_named_model():
    """BEiT-B/16 (MMPretrain's 'base' arch, 14 x 14 grid, 8192 tokens) is beit_base_patch16_224_8k_vocab
    (shapes only, on the meta device)."""
    with torch.device("meta"):
        base = create_model("beit_base_patch16_224_8k_vocab", kernels="eager")
    mm = to_mmpretrain(base.state_dict())
    assert mm["backbone.rel_pos_bias.relative_position_bias_table"].shape == (732, 12)
    text = CFG_TEXT.replace("arch=dict(embed_dims=48, feedforward_channels=192, num_heads=3, num_layers=2)",
                            "arch='base'").replace("num_masking_patches=6", "num_masking_patches=75")
    cfg = mmpretrain_model_config(from_mmpretrain(mm), parse_config_text(text))
    assert (cfg["model"], cfg["img_size"], cfg["patch_size"], cfg["num_mask_patches"]) == (
        "beit_base_patch16_224_8k_vocab", 224, 16, 75)
    assert cfg["model_kwargs"]["num_heads"] == 12 and cfg["model_kwargs"]["vocab_size"] == 8192
    built = build_model_from_config(cfg, kernels="eager", device="meta")
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}


# --- files as mmengine writes them


def test_mmengine_file_loads_without_mmengine(tmp_path, monkeypatch):
    model, dalle = _beit(), _dalle()
    mm = _mm_sd(model, dalle)
    path = _mmengine_file(tmp_path, monkeypatch, mm, name="beit_epoch_5.pth", cfg_text=CFG_TEXT)
    with pytest.raises(Exception):  # the plain safe unpickler refuses the logging state
        torch.load(path, weights_only=True)
    cfg = read_checkpoint_config(path)
    assert (cfg["method"], cfg["source"], cfg["num_mask_patches"], cfg["drop_path"]) == ("beit", "mmpretrain", 6, 0.1)
    loaded = load_pretrained_model(path, kernels="eager")  # no --model: the weights and the config text say it
    _assert_same(loaded.state_dict(), model.state_dict())
    sd = load_model_weights(path)  # --init-from
    fresh = create_model("beit_tiny_patch16_224_8k_vocab", **KW, kernels="eager")
    missing, unexpected = fresh.load_state_dict(sd, strict=False)
    assert not missing and not unexpected
    imgs, target_imgs, mask = _inputs(batch=2, seed=2)
    imgs, target_imgs = imgs.float(), target_imgs.float()
    with torch.no_grad():
        ref_loss = _mm_beit_loss(mm, imgs, target_imgs, mask, HEADS)[0]
        labels = _mm_dalle(mm, target_imgs).argmax(1).flatten(1)
        loss = loaded(imgs, mask, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    # to timm: BEiT's encoder
    summary = export_checkpoint(path, tmp_path / "timm", fmt="pth")
    assert summary["timm_class"] == "Beit" and summary["timm_kwargs"]["num_heads"] == HEADS


def test_export_mmpretrain_writes_beit(tmp_path, monkeypatch):
    """mimfast's BEiT (or one read from MMPretrain) written back under MMPretrain's BEiT keys."""
    model = _beit()
    path = tmp_path / "checkpoint-last.pth"
    cfg = {"method": "beit", "model": "beit_tiny_patch16_224_8k_vocab", "img_size": 32, "patch_size": 8,
           "model_kwargs": {k: v for k, v in KW.items() if k not in ("img_size", "patch_size")}}
    torch.save({"model": model.state_dict(), "config": cfg}, path)
    out = export_mmpretrain(path, tmp_path / "mm")
    got = torch.load(out["paths"][0], weights_only=True)["state_dict"]
    assert set(got) == _mm_keys(KW["depth"])
    _assert_same(from_mmpretrain(got), model.state_dict())
    again = _mmengine_file(tmp_path, monkeypatch, _mm_sd(model, _dalle()), cfg_text=CFG_TEXT)
    got = torch.load(export_mmpretrain(again, tmp_path / "again")["paths"][0], weights_only=True)["state_dict"]
    _assert_same(from_mmpretrain(got), model.state_dict())


# --- the DALL-E target generator


def test_dalle_weights_from_a_checkpoint_and_dalle_encoder_pth(tmp_path, monkeypatch, capsys):
    model, dalle = _beit(), _dalle()
    mm = _mm_sd(model, dalle)
    x = map_pixels(torch.rand(2, 3, 32, 32))
    with torch.no_grad():
        want = _mm_dalle(mm, x)
    # the checkpoint's target_generator.* are DalleEncoder's keys
    got = dalle_from_mmpretrain(mm)
    _assert_same(got, dalle.state_dict())
    torch.testing.assert_close(_dalle_encoder(got)(x), want, rtol=1e-6, atol=1e-6)
    # `mimfast tokenizer convert` of an mmengine BEiT file, then --tokenizer dalle:PATH
    path = _mmengine_file(tmp_path, monkeypatch, mm, name="beit_epoch_5.pth", cfg_text=CFG_TEXT)
    out = tmp_path / "dalle.safetensors"
    assert main(["tokenizer", "convert", str(path), str(out)]) == 0
    assert "target generator of an MMPretrain checkpoint" in capsys.readouterr().out
    tok = load_tokenizer(f"dalle:{out}")
    assert tok.vocab_size == VOCAB and torch.equal(tok(x), want.argmax(1))
    assert torch.equal(load_tokenizer(str(out))(x), want.argmax(1))  # the metadata names the kind
    # dalle_encoder.pth as MMPretrain's Pretrained init reads it: a bare state_dict, in {'state_dict': ...},
    # or with DDP's module. prefix
    bare = dalle.state_dict()
    for i, obj in enumerate([bare, {"state_dict": bare}, {"module." + k: v for k, v in bare.items()}]):
        src, dst = tmp_path / f"dalle_encoder_{i}.pth", tmp_path / f"dalle_{i}.safetensors"
        torch.save(obj, src)
        assert main(["tokenizer", "convert", str(src), str(dst)]) == 0
        torch.testing.assert_close(load_dalle_encoder(dst, precision="fp32")(x), want, rtol=1e-6, atol=1e-6)
    # full size: MMPretrain's DALLEEncoder names (group_count 4, 2 blocks, id_path where the width changes)
    with torch.device("meta"):
        full = DalleEncoder().state_dict()
    names = {"blocks.input.w", "blocks.input.b", "blocks.output.conv.w", "blocks.output.conv.b"}
    for g, (n_in, n_out) in enumerate([(256, 256), (256, 512), (512, 1024), (1024, 2048)], start=1):
        for i in (1, 2):
            pre = f"blocks.group_{g}.block_{i}."
            names |= {f"{pre}res_path.conv_{j}.{p}" for j in range(1, 5) for p in "wb"}
            if i == 1 and n_in != n_out:
                names |= {pre + "id_path.w", pre + "id_path.b"}
    assert set(full) == names
    assert full["blocks.output.conv.w"].shape == (8192, 2048, 1, 1)
    assert full["blocks.group_2.block_1.id_path.w"].shape == (512, 256, 1, 1)


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")
def test_official_encoder_pkl_still_converts(dall_e_modules, tmp_path, monkeypatch, capsys):
    ref = test_dalle.Encoder(n_hid=8, n_blk_per_group=1, vocab_size=24)
    pkl = tmp_path / "encoder.pkl"
    torch.save(ref, pkl)
    for name in ("dall_e", "dall_e.encoder", "dall_e.utils"):
        monkeypatch.delitem(sys.modules, name)
    out = tmp_path / "encoder.safetensors"
    assert main(["tokenizer", "convert", str(pkl), str(out)]) == 0
    assert "encoder.pkl" in capsys.readouterr().out
    x = map_pixels(torch.rand(1, 3, 16, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_dalle_encoder(out, precision="fp32")(x), ref.eval()(x), rtol=1e-6, atol=1e-6)


# --- refusals


@pytest.mark.parametrize("extra, match", [
    ({"neck.patch_aggregation.0.ln1.weight": 0, "target_generator.quantize.embedding.weight": 0}, "BEiT v2"),
    ({"target_generator.encoder.layers.0.ln1.weight": 0}, "BEiT v2"),
    ({"target_generator.clip.proj": 0}, "other than DALL-E"),
    ({"head.fc.weight": 0}, "not BEiTV1Head"),
    ({"backbone.layers.0.attn.q_norm.weight": 0}, "BEiTPretrainViT has not"),
    ({"backbone.layers.0.attn.qkv.bias": 0}, "both a qkv bias and q/v biases"),
])
def test_other_beit_style_models_are_refused(extra, match):
    sd = dict(_mm_sd(_beit(depth=1)), **{k: torch.zeros(1) for k in extra})
    with pytest.raises(ValueError, match=match):
        is_mmpretrain_state_dict(sd)


def test_refusals(tmp_path, monkeypatch):
    mm = _mm_sd(_beit(depth=1))
    # final_norm=False: mimfast's BEiT ends the encoder with the norm
    with pytest.raises(ValueError, match="final norm"):
        from_mmpretrain({k: v for k, v in mm.items() if not k.startswith("backbone.ln1.")})
    # a BEiT v2 config over v1-shaped weights, or another model type
    sd = from_mmpretrain(mm)
    v2 = CFG_TEXT.replace("type='BEiTV1Head'", "type='BEiTV2Head'")
    with pytest.raises(ValueError, match="BEiT v2"):
        mmpretrain_model_config(sd, parse_config_text(v2))
    with pytest.raises(ValueError, match="'CAE'"):
        mmpretrain_model_config(sd, parse_config_text(CFG_TEXT.replace("type='BEiT')", "type='CAE')")))
    # the pixel model has no MMPretrain BEiT head
    pixel = create_model("beit_tiny_patch16_224_pixel", img_size=32, patch_size=8, embed_dim=48, depth=1,
                         num_heads=3, kernels="eager")
    with pytest.raises(ValueError, match="BEiT-encoder model with a pixel head"):
        to_mmpretrain(pixel.state_dict())
    # DALL-E weights: none, or BEiT v2's VQKD
    with pytest.raises(ValueError, match="no DALL-E encoder weights"):
        dalle_from_mmpretrain(mm)
    with pytest.raises(ValueError, match="VQKD"):
        dalle_from_mmpretrain({"target_generator.quantize.embedding.weight": torch.zeros(2)})
    src = tmp_path / "no_dalle.pth"
    torch.save({"state_dict": mm}, src)
    with pytest.raises(SystemExit, match="no DALL-E encoder weights"):
        main(["tokenizer", "convert", str(src), str(tmp_path / "x.safetensors")])
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(SystemExit, match="nor a pickled DALL-E encoder"):
        main(["tokenizer", "convert", str(junk), str(tmp_path / "x.safetensors")])
    with pytest.raises(SystemExit, match="do not exist"):
        main(["tokenizer", "convert", str(tmp_path / "missing.pth"), str(tmp_path / "x.safetensors")])
