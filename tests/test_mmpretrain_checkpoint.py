"""open-mmlab/mmpretrain MAE checkpoints in and out (:mod:`mimfast.models.mmpretrain`).

- The mapping: round trips both ways are exact, and its meaning is checked independently: an
  eager transcription (written here from MMPretrain's source) of MMPretrain's MAE forward -- mmcv
  PatchEmbed, ``TransformerEncoderLayer`` (ln1 / attn.qkv / attn.proj / ln2 /
  ffn.layers.0.0 / ffn.layers.1), the final ``ln1``, ``MAEPretrainDecoder`` (mask token, decoder
  ``ln1``, ``decoder_pred``) and ``MAEPretrainHead`` with ``PixelReconstructionLoss`` -- run on
  MMPretrain's keys gives the loss mimfast's model gives on the converted ones, with the same
  noise.
- Position embeddings: MMPretrain's sin-cos table is the official one with x and y swapped; the
  mapping carries the stored table, so the loaded model computes what MMPretrain computes.
- Files as mmengine's ``Runner.save_checkpoint`` writes them (``meta`` with the config text,
  ``state_dict``, ``message_hub`` with ``HistoryBuffer``s of numpy arrays, ``optimizer``,
  ``param_schedulers``), made with a stand-in ``HistoryBuffer`` registered under mmengine's
  module name while saving and removed before loading: read with ``weights_only=True``, the
  model rebuilt from the weights and the config text, through ``--init-from``, export (timm and
  back to MMPretrain) and the CLI.
- Other MMPretrain models (MixMIM, CAE, BEiT v2, MoCo v3, EVA, classifiers, layer scale) are
  refused with what was found (BEiT v1 maps: tests/test_mmpretrain_beit.py).
"""

from __future__ import annotations

import collections
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mimfast.cli import main
from mimfast.models import create_model
from mimfast.models.mmpretrain import (from_mmpretrain, is_mmpretrain_state_dict, mmpretrain_model_config,
                                       mmpretrain_sincos_pos_embed, parse_config_text, pos_embed_layout,
                                       to_mmpretrain)
from mimfast.models.pos_embed import get_2d_sincos_pos_embed
from mimfast.train.checkpoint import load_model_weights
from mimfast.train.export import export_checkpoint, export_mmpretrain
from mimfast.train.pretrained import build_model_from_config, load_pretrained_model, read_checkpoint_config

# 48 wide, 3 heads of 16, 2 blocks; a 32-wide decoder of 1 block, 4 heads; 4 x 4 patches of 8 px
KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, decoder_embed_dim=32, decoder_depth=1,
          decoder_num_heads=4)
HEADS, DEC_HEADS, P = 3, 4, 8

# the model part of Config.pretty_text for such a model, in MMPretrain's config vocabulary
CFG_TEXT = """auto_scale_lr = dict(base_batch_size=4096)
default_scope = 'mmpretrain'
model = dict(
    backbone=dict(
        arch=dict(
            embed_dims=48, feedforward_channels=192, num_heads=3,
            num_layers=2),
        img_size=32,
        mask_ratio=0.6,
        patch_size=8,
        type='MAEViT'),
    head=dict(
        loss=dict(criterion='L2', type='PixelReconstructionLoss'),
        norm_pix=True,
        patch_size=8,
        type='MAEPretrainHead'),
    init_cfg=[
        dict(distribution='uniform', layer='Linear', type='Xavier'),
        dict(bias=0.0, layer='LayerNorm', type='Constant', val=1.0),
    ],
    neck=dict(
        decoder_depth=1,
        decoder_embed_dim=32,
        decoder_num_heads=4,
        embed_dim=48,
        in_chans=3,
        mlp_ratio=4.0,
        num_patches=16,
        patch_size=8,
        type='MAEPretrainDecoder'),
    type='MAE')
optim_wrapper = dict(
    optimizer=dict(
        betas=(0.9, 0.95), lr=1.5e-4 * 4096 / 256, type='AdamW', weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'ln': dict(decay_mult=0.0), 'bias': dict(decay_mult=0.0)}),
    type='AmpOptimWrapper')
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(backend='pillow', crop_ratio_range=(0.2, 1.0), interpolation='bicubic', scale=32,
         type='RandomResizedCrop'),
    dict(prob=0.5, type='RandomFlip'),
    dict(type='PackInputs'),
]
work_dir = './work_dirs/mae_vit-tiny'
"""


def _perturbed(model):
    """Every weight off its init (LayerNorms at 1/0 and zero biases would hide swapped keys)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _mae(**over):
    return _perturbed(create_model("mae_vit_tiny_patch16", **{**KW, **over}, kernels="eager"))


def _mmpretrain_sd(model):
    """The model's weights as MMPretrain's MAE would hold them, with MMPretrain's own sin-cos tables
    (what MAEViT / MAEPretrainDecoder.init_weights write)."""
    sd = to_mmpretrain({k: v.detach().clone() for k, v in model.state_dict().items()})
    grid = model.patch_embed.grid_size[0]
    sd["backbone.pos_embed"] = _mm_sincos(sd["backbone.pos_embed"].shape[-1], grid).to(sd["backbone.pos_embed"])
    sd["neck.decoder_pos_embed"] = _mm_sincos(sd["neck.decoder_pos_embed"].shape[-1], grid).to(
        sd["neck.decoder_pos_embed"])
    return sd


# --- an eager transcription of MMPretrain's pieces, on MMPretrain's keys


def _mm_sincos(dims, grid, temperature=10000.0):
    """build_2d_sincos_position_embedding(grid, dims, cls_token=True) as MMPretrain writes it: a
    (w, h) meshgrid with 'ij' indexing, [sin(w), cos(w), sin(h), cos(h)], a zero cls row."""
    h = w = grid
    grid_w, grid_h = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
                                    indexing="ij")
    pos_dim = dims // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    table = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)[None]
    return torch.cat([torch.zeros(1, 1, dims), table], dim=1)


def _mm_layer(sd, pre, x, heads):
    """TransformerEncoderLayer: x + attn(ln1(x)), then FFN(ln2(x), identity=x)."""
    B, N, D = x.shape
    h = F.layer_norm(x, (D,), sd[pre + "ln1.weight"], sd[pre + "ln1.bias"], eps=1e-6)
    qkv = F.linear(h, sd[pre + "attn.qkv.weight"], sd[pre + "attn.qkv.bias"])
    q, k, v = qkv.reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)  # each (B, heads, N, D/heads)
    attn = ((q @ k.transpose(-2, -1)) * (D // heads) ** -0.5).softmax(dim=-1)
    x = x + F.linear((attn @ v).transpose(1, 2).reshape(B, N, D), sd[pre + "attn.proj.weight"],
                     sd[pre + "attn.proj.bias"])
    h = F.layer_norm(x, (D,), sd[pre + "ln2.weight"], sd[pre + "ln2.bias"], eps=1e-6)
    h = F.gelu(F.linear(h, sd[pre + "ffn.layers.0.0.weight"], sd[pre + "ffn.layers.0.0.bias"]))
    return x + F.linear(h, sd[pre + "ffn.layers.1.weight"], sd[pre + "ffn.layers.1.bias"])


def _mm_mae_loss(sd, imgs, noise, mask_ratio, heads, dec_heads, norm_pix=True):
    """MAE.loss: MAEViT.forward(mask=True) -> MAEPretrainDecoder -> MAEPretrainHead.loss."""
    B = imgs.shape[0]
    w = sd["backbone.patch_embed.projection.weight"]
    p = w.shape[-1]
    x = F.conv2d(imgs, w, sd["backbone.patch_embed.projection.bias"], stride=p).flatten(2).transpose(1, 2)
    x = x + sd["backbone.pos_embed"][:, 1:, :]
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :len_keep].unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones(N, L, dtype=imgs.dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    cls = (sd["backbone.cls_token"] + sd["backbone.pos_embed"][:, :1, :]).expand(B, -1, -1)
    x = torch.cat((cls, x), dim=1)
    i = 0
    while f"backbone.layers.{i}.ln1.weight" in sd:
        x = _mm_layer(sd, f"backbone.layers.{i}.", x, heads)
        i += 1
    x = F.layer_norm(x, (D,), sd["backbone.ln1.weight"], sd["backbone.ln1.bias"], eps=1e-6)
    # neck
    x = F.linear(x, sd["neck.decoder_embed.weight"], sd["neck.decoder_embed.bias"])
    tokens = sd["neck.mask_token"].repeat(B, ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1) + sd["neck.decoder_pos_embed"]
    i = 0
    while f"neck.decoder_blocks.{i}.ln1.weight" in sd:
        x = _mm_layer(sd, f"neck.decoder_blocks.{i}.", x, dec_heads)
        i += 1
    x = F.layer_norm(x, (x.shape[-1],), sd["neck.ln1.weight"], sd["neck.ln1.bias"], eps=1e-6)
    pred = F.linear(x, sd["neck.decoder_pred.weight"], sd["neck.decoder_pred.bias"])[:, 1:, :]
    # head: patchify in (p, q, c), norm_pix, PixelReconstructionLoss('L2') with the mask
    g = imgs.shape[2] // p
    target = torch.einsum("nchpwq->nhwpqc", imgs.reshape(B, 3, g, p, g, p)).reshape(B, g * g, p * p * 3)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    loss = F.mse_loss(pred, target, reduction="none").mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


# --- files as mmengine writes them


class _FakeHistoryBuffer:
    """Pickles as mmengine's HistoryBuffer does: a plain object holding numpy arrays."""

    def __init__(self, log_history=(), count_history=(), max_length=1000000):
        self.max_length = max_length
        self._log_history = np.array(log_history)
        self._count_history = np.array(count_history)


def _save_with_mmengine(obj_fn, path, monkeypatch):
    """torch.save(obj_fn()) with _FakeHistoryBuffer registered as mmengine's HistoryBuffer, then
    mmengine removed again."""
    names = ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer")
    mods = {n: types.ModuleType(n) for n in names}
    _FakeHistoryBuffer.__module__, _FakeHistoryBuffer.__qualname__ = names[-1], "HistoryBuffer"
    mods[names[-1]].HistoryBuffer = _FakeHistoryBuffer
    with monkeypatch.context() as m:
        for n, mod in mods.items():
            m.setitem(sys.modules, n, mod)
        torch.save(obj_fn(), path)
    assert not any(n in sys.modules for n in names)


def _mmengine_file(tmp_path, monkeypatch, sd, name="epoch_5.pth", cfg_text=CFG_TEXT):
    """{'meta', 'state_dict', 'message_hub', 'optimizer', 'param_schedulers'} as Runner.save_checkpoint
    writes them (the state_dict an OrderedDict with _metadata, as weights_to_cpu keeps it)."""
    state_dict = collections.OrderedDict((k, v.float()) for k, v in sd.items())
    state_dict._metadata = collections.OrderedDict({"": {"version": 1}, "backbone": {"version": 1}})
    params = [torch.nn.Parameter(v.clone().float()) for k, v in sd.items() if "pos_embed" not in k]
    opt = torch.optim.AdamW(params, lr=1e-4)
    sum(p.sum() for p in params).backward()
    opt.step()
    path = tmp_path / name

    def build():
        return {
            "meta": {"epoch": 5, "iter": 100, "cfg": cfg_text, "seed": 0, "experiment_name": "mae_20260101_000000",
                     "time": "20260101_010203", "mmengine_version": "0.10.4", "dataset_meta": {"classes": ("a", "b")}},
            "state_dict": state_dict,
            "message_hub": {
                "log_scalars": collections.OrderedDict(
                    {"train/loss": _FakeHistoryBuffer([0.9, 0.8], [1, 1]),
                     "train/lr": _FakeHistoryBuffer([1e-4, 2e-4], [1, 1])}),
                "runtime_info": collections.OrderedDict(
                    {"epoch": 5, "iter": 100, "max_epochs": 400, "max_iters": 8000, "eta": np.float64(12.5),
                     "loss_scale": np.float32(65536.0), "last_ckpt": "work_dirs/epoch_4.pth"}),
                "resumed_keys": collections.OrderedDict({"train/loss": True, "epoch": True}),
            },
            "optimizer": {**opt.state_dict(), "loss_scaler": {"scale": 65536.0, "growth_factor": 2.0,
                                                              "_growth_tracker": 3}},
            "param_schedulers": [{"by_epoch": False, "begin": 0, "end": 100, "last_step": 99, "_global_step": 100,
                                  "base_values": [1e-4], "_last_value": [1e-4], "start_factor": 1e-4}],
        }

    _save_with_mmengine(build, path, monkeypatch)
    return path


def _assert_same(got, want):
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


# --- the mapping


def test_round_trips_are_exact_and_keys_are_mmpretrains():
    model = _mae()
    sd = model.state_dict()
    mm = to_mmpretrain(sd)
    assert is_mmpretrain_state_dict(mm)
    assert {k.split(".")[0] for k in mm} == {"backbone", "neck"}
    for key in ("backbone.patch_embed.projection.weight", "backbone.layers.1.ffn.layers.0.0.weight",
                "backbone.layers.1.ffn.layers.1.bias", "backbone.layers.0.attn.qkv.weight", "backbone.ln1.weight",
                "neck.mask_token", "neck.decoder_blocks.0.ln2.bias", "neck.ln1.weight", "neck.decoder_pred.bias"):
        assert key in mm, key
    _assert_same(from_mmpretrain(mm), sd)
    mm_native = _mmpretrain_sd(model)
    _assert_same(to_mmpretrain(from_mmpretrain(mm_native)), mm_native)
    # a backbone on its own, with or without the prefix (backbone-extraction tools drop it)
    enc = {k: v for k, v in mm.items() if k.startswith("backbone.")}
    bare = {k.removeprefix("backbone."): v for k, v in enc.items()}
    want = {k: v for k, v in sd.items() if not k.startswith(("decoder_", "mask_token"))}
    _assert_same(from_mmpretrain(enc), want)
    _assert_same(from_mmpretrain(bare), want)


def test_mapped_weights_play_the_same_roles():
    """ffn.layers.0.0 is fc1 (D -> 4D), ffn.layers.1 is fc2 (4D -> D), qkv rows stay q, k, v."""
    mm = to_mmpretrain(_mae().state_dict())
    D = KW["embed_dim"]
    assert mm["backbone.layers.0.ffn.layers.0.0.weight"].shape == (4 * D, D)
    assert mm["backbone.layers.0.ffn.layers.1.weight"].shape == (D, 4 * D)
    assert mm["backbone.layers.0.attn.qkv.weight"].shape == (3 * D, D)
    assert mm["neck.decoder_pred.weight"].shape == (P * P * 3, KW["decoder_embed_dim"])
    assert mm["backbone.pos_embed"].shape == (1, 17, D)  # the cls row included, as in MMPretrain


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_equals_mmpretrains_forward_with_the_same_noise(norm_pix):
    """MMPretrain's MAE forward, transcribed here and run on MMPretrain's keys (with MMPretrain's
    own sin-cos tables), against mimfast's model loaded from the converted weights."""
    model = _mae(norm_pix_loss=norm_pix).double()
    mm = {k: v.double() for k, v in _mmpretrain_sd(model).items()}
    model.load_state_dict(from_mmpretrain(mm))
    torch.manual_seed(1)
    imgs = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    noise = torch.rand(3, 16, dtype=torch.float64)
    with torch.no_grad():
        loss, _, mask = model(imgs, mask_ratio=0.75, noise=noise)
        ref = _mm_mae_loss(mm, imgs, noise, 0.75, HEADS, DEC_HEADS, norm_pix=norm_pix)
    assert int(mask.sum()) == 3 * 12
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    # the check sees a swapped pair: ln1 and ln2 of a block exchanged give another loss
    bad = dict(mm)
    bad["backbone.layers.0.ln1.weight"], bad["backbone.layers.0.ln2.weight"] = (mm["backbone.layers.0.ln2.weight"],
                                                                                mm["backbone.layers.0.ln1.weight"])
    with torch.no_grad():
        assert not torch.isclose(_mm_mae_loss(bad, imgs, noise, 0.75, HEADS, DEC_HEADS, norm_pix), ref)


def test_mmpretrain_sincos_is_the_official_table_transposed():
    dims, grid = 48, 5
    mm = _mm_sincos(dims, grid)
    torch.testing.assert_close(mmpretrain_sincos_pos_embed(dims, grid), mm, rtol=0, atol=0)
    official = torch.from_numpy(get_2d_sincos_pos_embed(dims, grid, cls_token=True)).float()[None]
    assert not torch.allclose(mm, official, atol=1e-3)  # the layouts differ...
    patches = official[0, 1:].reshape(grid, grid, dims).transpose(0, 1).reshape(grid * grid, dims)
    torch.testing.assert_close(mm[0, 1:], patches, rtol=0, atol=1e-6)  # ...by x <-> y
    torch.testing.assert_close(mm[0, 1:], torch.cat([official[0, 1:, dims // 2:], official[0, 1:, :dims // 2]], 1),
                               rtol=0, atol=1e-6)  # i.e. the two halves swapped
    assert (pos_embed_layout(official), pos_embed_layout(mm)) == ("official", "mmpretrain")
    assert pos_embed_layout(torch.randn(1, 26, dims)) == "other"


def test_loaded_model_keeps_mmpretrains_table(tmp_path):
    """The stored table travels: the converted model uses MMPretrain's layout, and a model written
    back keeps mimfast's, so each side computes what it was trained with."""
    model = _mae()
    mm = _mmpretrain_sd(model)
    path = tmp_path / "mae.pth"
    torch.save({"state_dict": mm}, path)
    loaded = load_pretrained_model(path, kernels="eager")
    torch.testing.assert_close(loaded.pos_embed.data, mm["backbone.pos_embed"], rtol=0, atol=0)
    torch.testing.assert_close(loaded.decoder_pos_embed.data, mm["neck.decoder_pos_embed"], rtol=0, atol=0)
    assert read_checkpoint_config(path)["pos_embed_layout"] == "mmpretrain"
    fresh = create_model("mae_vit_tiny_patch16", **KW, kernels="eager")  # mimfast's own table, as initialised
    assert pos_embed_layout(to_mmpretrain(fresh.state_dict())["backbone.pos_embed"]) == "official"


# --- the architecture from the weights


def test_architecture_from_weights_and_config_text():
    model = _mae(mlp_ratio=2)
    sd = from_mmpretrain(to_mmpretrain(model.state_dict()))
    bare = mmpretrain_model_config(sd)  # weights only: MMPretrain's defaults for what they cannot say
    mk = bare["model_kwargs"]
    assert (bare["img_size"], bare["patch_size"], bare["method"], bare["model"]) == (32, 8, "mae",
                                                                                    "mae_vit_tiny_patch16")
    assert (mk["embed_dim"], mk["depth"], mk["mlp_ratio"], mk["in_chans"]) == (48, 2, 2, 3)
    assert (mk["decoder_embed_dim"], mk["decoder_depth"]) == (32, 1)
    assert mk["num_heads"] == 1 and mk["decoder_num_heads"] == 16  # 48 // 64 -> 1; MAEPretrainDecoder's 16
    assert (bare["norm_pix_loss"], bare["mask_ratio"]) == (True, 0.75)
    cfg = mmpretrain_model_config(sd, parse_config_text(CFG_TEXT))
    assert (cfg["model_kwargs"]["num_heads"], cfg["model_kwargs"]["decoder_num_heads"]) == (3, 4)
    assert (cfg["norm_pix_loss"], cfg["mask_ratio"]) == (True, 0.6)
    built = build_model_from_config(cfg, kernels="eager", device="meta")
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    l1 = parse_config_text(CFG_TEXT.replace("criterion='L2'", "criterion='L1'").replace("norm_pix=True",
                                                                                        "norm_pix=False"))
    cfg = mmpretrain_model_config(sd, l1)
    assert cfg["model_kwargs"]["loss"] == "l1" and cfg["norm_pix_loss"] is False


def test_standard_sizes_give_the_named_models():
    """ViT-B/16 with MMPretrain's 512-wide, 8-block decoder is mae_vit_base_patch16 (shapes only)."""
    e = torch.empty
    sd = {"patch_embed.proj.weight": e(768, 3, 16, 16), "pos_embed": e(1, 197, 768), "norm.weight": e(768),
          "blocks.0.mlp.fc1.weight": e(3072, 768), "decoder_embed.weight": e(512, 768),
          "decoder_blocks.0.mlp.fc1.weight": e(2048, 512)}
    sd.update({f"blocks.{i}.norm1.weight": e(768) for i in range(12)})
    sd.update({f"decoder_blocks.{i}.norm1.weight": e(512) for i in range(8)})
    cfg = mmpretrain_model_config(sd, {"model": {"type": "MAE", "backbone": {"type": "MAEViT", "arch": "b"}}})
    assert (cfg["model"], cfg["model_kwargs"], cfg["patch_size"], cfg["img_size"]) == ("mae_vit_base_patch16", {},
                                                                                        None, 224)
    built = build_model_from_config(cfg, kernels="eager", device="meta")
    assert built.blocks[0].attn.num_heads == 12 and built.decoder_blocks[0].attn.num_heads == 16


def test_parse_config_text_reads_literals_only():
    cfg = parse_config_text(CFG_TEXT)
    assert cfg["model"]["backbone"]["arch"]["num_heads"] == 3
    assert cfg["model"]["init_cfg"][1] == {"bias": 0.0, "layer": "LayerNorm", "type": "Constant", "val": 1.0}
    assert cfg["optim_wrapper"]["optimizer"]["lr"] == pytest.approx(2.4e-3)
    assert cfg["optim_wrapper"]["paramwise_cfg"]["custom_keys"]["ln"] == {"decay_mult": 0.0}
    assert cfg["train_pipeline"][1]["crop_ratio_range"] == (0.2, 1.0)
    calls = parse_config_text("a = __import__('os').system('false')\nb = dict(x=open('f'), y=mmpretrain.models.MAE)")
    assert calls == {"a": None, "b": {"x": None, "y": "mmpretrain.models.MAE"}}
    assert parse_config_text("model = dict(") == {}


# --- files as mmengine writes them


def test_mmengine_file_loads_without_mmengine_and_gives_the_same_loss(tmp_path, monkeypatch):
    model = _mae()
    mm = _mmpretrain_sd(model)
    path = _mmengine_file(tmp_path, monkeypatch, mm)
    with pytest.raises(Exception):  # the plain safe unpickler refuses the logging state
        torch.load(path, weights_only=True)
    cfg = read_checkpoint_config(path)
    assert (cfg["source"], cfg["mask_ratio"], cfg["norm_pix_loss"]) == ("mmpretrain", 0.6, True)
    loaded = load_pretrained_model(path, kernels="eager")  # no --model: the weights and the config text say it
    assert (loaded.blocks[0].attn.num_heads, loaded.decoder_blocks[0].attn.num_heads) == (HEADS, DEC_HEADS)
    _assert_same(loaded.state_dict(), from_mmpretrain(mm))
    torch.manual_seed(2)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        loss = loaded(imgs, mask_ratio=cfg["mask_ratio"], noise=noise)[0]
        ref = _mm_mae_loss(mm, imgs, noise, cfg["mask_ratio"], HEADS, DEC_HEADS)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_mmengine_file_through_init_from_and_exports(tmp_path, monkeypatch, capsys):
    model = _mae()
    mm = _mmpretrain_sd(model)
    path = _mmengine_file(tmp_path, monkeypatch, mm)
    # --init-from reads it under mimfast's keys
    sd = load_model_weights(path)
    fresh = create_model("mae_vit_tiny_patch16", **KW, kernels="eager")
    missing, unexpected = fresh.load_state_dict(sd, strict=False)
    assert not missing and not unexpected
    # to timm: the encoder
    summary = export_checkpoint(path, tmp_path / "timm", fmt="pth")
    assert summary["timm_class"] == "VisionTransformer" and summary["timm_kwargs"]["num_heads"] == HEADS
    # back to MMPretrain: the same weights, in MMPretrain's {'state_dict': ...}
    out = export_mmpretrain(path, tmp_path / "again")
    assert out["decoder"] and out["paths"][0].endswith("again.pth")
    again = torch.load(out["paths"][0], weights_only=True)
    assert set(again) == {"state_dict"}
    _assert_same(again["state_dict"], {k: v.float() for k, v in mm.items()})
    # the CLI
    assert main(["export", str(path), "--out", str(tmp_path / "cli"), "--format", "mmpretrain"]) == 0
    printed = capsys.readouterr().out
    assert "prefix='backbone.'" in printed and "encoder and pretraining head" in printed
    _assert_same(torch.load(tmp_path / "cli.pth", weights_only=True)["state_dict"], again["state_dict"])
    with pytest.raises(SystemExit, match="do not apply"):
        main(["export", str(path), "--out", str(tmp_path / "x"), "--format", "mmpretrain", "--global-pool"])


def test_export_mmpretrain_of_mimfast_and_encoder_only_checkpoints(tmp_path):
    model = _mae()
    cfg = {"method": "mae", "model": "mae_vit_tiny_patch16", "img_size": 32, "patch_size": 8,
           "model_kwargs": {k: v for k, v in KW.items() if k not in ("img_size", "patch_size")}}
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": model.state_dict(), "config": cfg}, path)
    got = torch.load(export_mmpretrain(path, tmp_path / "mm.pth")["paths"][0], weights_only=True)["state_dict"]
    _assert_same(from_mmpretrain(got), model.state_dict())
    # an official encoder-only release: backbone.* only, which fine-tuning's prefix='backbone.' reads
    enc = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": {k: v for k, v in model.state_dict().items()
                          if not k.startswith(("decoder_", "mask_token"))}}, enc)
    out = export_mmpretrain(enc, tmp_path / "enc")
    got = torch.load(out["paths"][0], weights_only=True)["state_dict"]
    assert not out["decoder"] and all(k.startswith("backbone.") for k in got)
    bad = tmp_path / "bad.pth"
    torch.save({"model": model.state_dict(), "config": dict(cfg, model_kwargs=dict(cfg["model_kwargs"], depth=3))},
               bad)
    with pytest.raises(ValueError, match="missing"):
        export_mmpretrain(bad, tmp_path / "y")
    beit = tmp_path / "beit.pth"
    torch.save({"model": create_model("beit_tiny_patch16_224_pixel", img_size=32, patch_size=8, embed_dim=48,
                                      depth=1, num_heads=3, kernels="eager").state_dict()}, beit)
    with pytest.raises(ValueError, match="BEiT-encoder"):
        export_mmpretrain(beit, tmp_path / "z")


# --- other MMPretrain models


def _vit_keys(prefix="backbone."):
    mm = to_mmpretrain(_mae(depth=1).state_dict())
    return {k: v for k, v in mm.items() if k.startswith(prefix)}


@pytest.mark.parametrize("extra, match", [
    ({"backbone.layers.0.blocks.0.norm1.weight": 0, "neck.decoder_blocks.0.ln1.weight": 0}, "MixMIM"),
    ({"teacher.layers.0.ln1.weight": 0}, "CAE"),
    ({"backbone.layers.0.attn.q_bias": 0, "neck.patch_aggregation.0.ln1.weight": 0,
      "target_generator.quantize.embedding.weight": 0}, "BEiT v2"),  # BEiT v1: tests/test_mmpretrain_beit.py
    ({"backbone.layers.0.gamma_1": 0, "head.fc.weight": 0}, "not BEiTV1Head"),
    ({"backbone.blocks.0.norm1.weight": 0}, "HiViT"),
    ({"backbone.proj_weights": 0}, "MFF"),
    ({"target_generator.tokenizer.weight": 0, "neck.decoder_blocks.0.ln1.weight": 0}, "target generator"),
    ({"momentum_encoder.layers.0.ln1.weight": 0, "neck.mlp.0.weight": 0}, "another neck"),
    ({"head.layers.head.weight": 0}, "fine-tuned classifier"),
    ({"backbone.layers.0.attn.gamma1.weight": 0}, "layer scale"),
    ({"backbone.pre_norm.weight": 0}, "pre_norm"),
])
def test_other_mmpretrain_models_are_refused_naming_what_was_found(extra, match):
    sd = dict(_vit_keys(), **{k: torch.zeros(1) for k in extra})
    if "HiViT" in match:
        sd = {k: v for k, v in sd.items() if not k.startswith("backbone.patch_embed.")}
    with pytest.raises(ValueError, match=match):
        is_mmpretrain_state_dict(sd)


def test_refusals_through_the_loaders(tmp_path, monkeypatch):
    # a CAE file, read as --init-from would: the error names the file and what it holds
    path = tmp_path / "cae.pth"
    torch.save({"state_dict": dict(_vit_keys(), **{"teacher.ln1.weight": torch.zeros(3)})}, path)
    with pytest.raises(ValueError, match="cae.pth.*CAE"):
        load_model_weights(path)
    # EVA / MILAN: an MAE-shaped decoder that predicts features, not pixels
    mm = to_mmpretrain(_mae().state_dict())
    mm["neck.decoder_pred.weight"] = torch.zeros(512, KW["decoder_embed_dim"])
    mm["neck.decoder_pred.bias"] = torch.zeros(512)
    with pytest.raises(ValueError, match="feature-target"):
        from_mmpretrain(mm)
    # a config that builds another model type, on MAE-shaped weights
    mix = _mmengine_file(tmp_path, monkeypatch, _mmpretrain_sd(_mae()), name="mixmim.pth",
                         cfg_text=CFG_TEXT.replace("type='MAE')", "type='MixMIM')"))
    with pytest.raises(ValueError, match="'MixMIM'"):
        read_checkpoint_config(mix)
    # no final norm (final_norm=False): mimfast's MAE needs it
    no_norm = {k: v for k, v in _vit_keys().items() if not k.startswith("backbone.ln1.")}
    with pytest.raises(ValueError, match="final norm"):
        from_mmpretrain(no_norm)
    # an out_type='avg_featmap' backbone's unused ln2 is dropped
    avg = dict(_vit_keys(), **{"backbone.ln2.weight": torch.ones(48), "backbone.ln2.bias": torch.zeros(48)})
    assert "norm.weight" in from_mmpretrain(avg) and not any("ln2" in k for k in from_mmpretrain(avg))
    # keys neither mimfast's MAE nor its BEiT has (BEiT's gamma_1 maps: tests/test_mmpretrain_beit.py)
    with pytest.raises(ValueError, match="no MMPretrain MAE counterpart"):
        to_mmpretrain({"blocks.0.ls1.gamma": torch.zeros(3)})
    # not an OpenMMLab layout: mimfast's, and a timm classifier's (head.* but no backbone.*)
    assert not is_mmpretrain_state_dict(_mae().state_dict())
    from timm.models.vision_transformer import VisionTransformer

    timm_sd = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3).state_dict()
    assert not is_mmpretrain_state_dict(timm_sd)
