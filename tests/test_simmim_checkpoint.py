"""microsoft/SimMIM ViT checkpoints in and out (:mod:`mimfast.models.simmim`).

- The key mapping: SimMIM's ``decoder.0`` (1x1 conv + PixelShuffle) written by ``to_simmim`` is the
  decoder test_simmim_audit.py transcribes from SimMIM, so SimMIM's reconstruction and loss on
  the converted weights are the pixel model's; ``from_simmim`` inverts it exactly.
- Files as SimMIM's ``main_simmim.py`` writes them (``{'model', 'optimizer', 'lr_scheduler',
  'epoch', 'config': yacs CfgNode, 'amp'}``): made here with a stand-in ``yacs.config.CfgNode``
  that pickles as yacs' does (a dict subclass with its flags in ``__dict__``), read back with yacs
  absent through ``weights_only=True`` and an allow-list. The model is rebuilt from the weights
  alone (width, depth, heads, grid, position terms) with the masking settings from the config,
  and gives the same loss; ``--init-from`` and ``mimfast export`` (timm and back to SimMIM) take
  the file as it is. Swin and mean-pooling encoders are refused with a clear error.
"""

from __future__ import annotations

import collections
import sys
import types

import pytest
import torch
from test_simmim_audit import SMALL, _model_and_batch, _simmim_decoder

from mimfast.models.beit import beit_tiny_patch16_224_pixel
from mimfast.models.simmim import from_simmim, is_simmim_state_dict, simmim_model_config, to_simmim
from mimfast.train.checkpoint import load_model_weights
from mimfast.train.export import export_checkpoint, export_simmim
from mimfast.train.pretrained import load_pretrained_model, read_checkpoint_config


class _FakeCfgNode(dict):
    """Pickles like yacs' CfgNode: a dict subclass whose flags live in ``__dict__``."""

    def __init__(self, init=None):
        super().__init__()
        for k, v in (init or {}).items():
            self[k] = _FakeCfgNode(v) if isinstance(v, dict) else v
        self.__dict__["__immutable__"] = True
        self.__dict__["__deprecated_keys__"] = set()
        self.__dict__["__renamed_keys__"] = {}
        self.__dict__["__new_allowed__"] = False


def _save_with_yacs(obj_fn, path, monkeypatch):
    """torch.save(obj_fn()) with _FakeCfgNode registered as yacs.config.CfgNode, then yacs removed."""
    yacs, config = types.ModuleType("yacs"), types.ModuleType("yacs.config")
    _FakeCfgNode.__module__, _FakeCfgNode.__qualname__ = "yacs.config", "CfgNode"
    config.CfgNode = _FakeCfgNode
    yacs.config = config
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "yacs", yacs)
        m.setitem(sys.modules, "yacs.config", config)
        torch.save(obj_fn(), path)
    assert "yacs.config" not in sys.modules


SIMMIM_CFG = {"MODEL": {"TYPE": "vit", "DROP_PATH_RATE": 0.1,
                        "VIT": {"PATCH_SIZE": 8, "EMBED_DIM": 48, "DEPTH": 2, "NUM_HEADS": 3, "INIT_VALUES": 0.1,
                                "USE_APE": False, "USE_RPB": False, "USE_SHARED_RPB": True, "USE_MEAN_POOLING": False}},
              "DATA": {"IMG_SIZE": 64, "MASK_PATCH_SIZE": 16, "MASK_RATIO": 0.6}, "TRAIN": {"BASE_LR": 1e-4}}


def _simmim_file(tmp_path, monkeypatch, model, name="ckpt_epoch_5.pth", cfg=SIMMIM_CFG):
    sd = to_simmim({k: v.float() for k, v in model.state_dict().items()})
    path = tmp_path / name
    _save_with_yacs(lambda: {"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
                             "lr_scheduler": {"base_values": [1e-4]}, "max_accuracy": 0.0, "epoch": 5,
                             "config": _FakeCfgNode(cfg), "amp": {"loss_scaler0": {"loss_scale": 65536.0}}},
                    path, monkeypatch)
    return path


# the mapping


def test_to_simmim_decoder_is_simmims_and_round_trips():
    model, imgs, masks = _model_and_batch()
    sd = model.state_dict()
    simmim = to_simmim(sd)
    assert is_simmim_state_dict(simmim)
    assert set(simmim) == {"encoder." + k for k in sd if not k.startswith("pixel_head.")} | {"decoder.0.weight",
                                                                                            "decoder.0.bias"}
    ref = _simmim_decoder(model.pixel_head, model.patch_size, 3)  # transcribed from SimMIM in the audit
    torch.testing.assert_close(simmim["decoder.0.weight"], ref[0].weight, rtol=0, atol=0)
    torch.testing.assert_close(simmim["decoder.0.bias"], ref[0].bias, rtol=0, atol=0)
    back = from_simmim(simmim)
    assert set(back) == set(sd)
    for k in sd:
        torch.testing.assert_close(back[k], sd[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("p", [8, 16])
def test_from_simmim_permutes_a_given_decoder(p):
    """A decoder given as SimMIM would hold it: pixel (c, i, j) of a patch comes from conv channel
    c*p*p + i*p + j; the head's row for it is (i*p + j)*3 + c."""
    D = 5
    w = torch.randn(3 * p * p, D, 1, 1, dtype=torch.float64)
    b = torch.randn(3 * p * p, dtype=torch.float64)
    head = from_simmim({"encoder.patch_embed.proj.weight": torch.zeros(D, 3, p, p), "decoder.0.weight": w,
                        "decoder.0.bias": b})
    z = torch.randn(2, D, 1, 1, dtype=torch.float64)  # one patch
    x_rec = torch.nn.functional.pixel_shuffle(torch.nn.functional.conv2d(z, w, b), p)  # (2, 3, p, p)
    pred = z.flatten(1) @ head["pixel_head.weight"].T + head["pixel_head.bias"]  # (2, p*p*3) in (i, j, c)
    torch.testing.assert_close(pred.view(2, p, p, 3).permute(0, 3, 1, 2), x_rec, rtol=1e-12, atol=1e-12)


def test_refuses_swin_mean_pooling_and_odd_decoders():
    with pytest.raises(ValueError, match="Swin"):
        is_simmim_state_dict({"encoder.patch_embed.proj.weight": torch.zeros(1),
                              "encoder.layers.0.blocks.0.norm1.weight": torch.zeros(1)})
    assert not is_simmim_state_dict({"patch_embed.proj.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="stride"):
        from_simmim({"encoder.patch_embed.proj.weight": torch.zeros(4, 3, 2, 2),
                     "decoder.0.weight": torch.zeros(10, 4, 1, 1)})
    with pytest.raises(ValueError, match="1x1 conv"):
        from_simmim({"encoder.patch_embed.proj.weight": torch.zeros(4, 3, 2, 2),
                     "decoder.0.weight": torch.zeros(12, 4, 3, 3)})
    model, _, _ = _model_and_batch(torch.float32)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("norm.")}
    with pytest.raises(ValueError, match="USE_MEAN_POOLING"):
        simmim_model_config(sd)
    with pytest.raises(ValueError, match="MODEL.TYPE"):
        simmim_model_config(model.state_dict(), {"MODEL": {"TYPE": "swin"}})


@pytest.mark.parametrize("variant", ["shared", "per_block", "abs_only"])
def test_architecture_is_read_from_the_weights(variant):
    kw = dict(SMALL, depth=3, mlp_ratio=2)
    if variant == "per_block":
        kw.update(use_rel_pos_bias=True, use_shared_rel_pos_bias=False)
    if variant == "abs_only":
        kw.update(use_abs_pos_emb=True, use_shared_rel_pos_bias=False, embed_dim=192, num_heads=3, init_values=None)
    model = beit_tiny_patch16_224_pixel(**kw)
    cfg = simmim_model_config(from_simmim(to_simmim(model.state_dict())))
    mk = cfg["model_kwargs"]
    assert (cfg["img_size"], cfg["patch_size"], mk["depth"], mk["mlp_ratio"]) == (64, 8, 3, 2)
    assert (mk["embed_dim"], mk["num_heads"]) == (kw["embed_dim"], kw["num_heads"])
    assert mk["use_abs_pos_emb"] == (variant == "abs_only")
    assert mk["use_rel_pos_bias"] == (variant == "per_block")
    assert mk["use_shared_rel_pos_bias"] == (variant == "shared")
    assert (mk["init_values"] is None) == (variant == "abs_only")
    assert (cfg["method"], cfg["pixel_masks"], cfg["pixel_loss"], cfg["norm_pix_loss"]) == ("beit", "simmim", "l1",
                                                                                           False)


# files as main_simmim.py writes them


def test_simmim_file_loads_without_yacs_and_gives_the_same_loss(tmp_path, monkeypatch):
    model, imgs, masks = _model_and_batch(torch.float32)
    path = _simmim_file(tmp_path, monkeypatch, model)
    with pytest.raises(Exception):  # the plain safe unpickler refuses the pickled config
        torch.load(path, weights_only=True)
    cfg = read_checkpoint_config(path)
    assert (cfg["mask_patch_size"], cfg["simmim_mask_ratio"], cfg["drop_path"]) == (16, 0.6, 0.1)
    assert cfg["model_kwargs"]["init_values"] == 0.1
    loaded = load_pretrained_model(path, kernels="eager")  # no --model: the weights say it
    assert type(loaded) is type(model) and loaded.loss_type == "l1" and not loaded.norm_pix_loss
    sd, got = model.state_dict(), loaded.state_dict()
    assert set(sd) == set(got)
    for k in sd:
        torch.testing.assert_close(got[k], sd[k], rtol=0, atol=0, msg=k)
    with torch.no_grad():
        torch.testing.assert_close(loaded(imgs, masks)[0], model(imgs, masks)[0], rtol=0, atol=0)


def test_simmim_file_through_init_from_and_exports(tmp_path, monkeypatch):
    model, imgs, masks = _model_and_batch(torch.float32)
    path = _simmim_file(tmp_path, monkeypatch, model, cfg={"MODEL": {"TYPE": "vit"}})
    # --init-from reads the same weights under mimfast's keys (DDP's module. prefix too)
    sd = load_model_weights(path)
    fresh = beit_tiny_patch16_224_pixel(**SMALL)
    missing, unexpected = fresh.load_state_dict(sd, strict=False)
    assert not missing and not unexpected
    wrapped = tmp_path / "ddp.pth"
    torch.save({"model": {"module." + k: v for k, v in to_simmim(model.state_dict()).items()}}, wrapped)
    assert set(load_model_weights(wrapped)) == set(sd)
    # to timm: the encoder, per-block relative position tables
    summary = export_checkpoint(path, tmp_path / "timm", fmt="safetensors")
    assert summary["timm_class"] == "Beit"
    # back to SimMIM: the same file contents
    out = export_simmim(path, tmp_path / "again")
    assert out["decoder"] and out["paths"][0].endswith("again.pth")
    again = torch.load(out["paths"][0], weights_only=True)["model"]
    original = to_simmim({k: v.float() for k, v in model.state_dict().items()})
    assert set(again) == set(original)
    for k in original:
        torch.testing.assert_close(again[k], original[k], rtol=0, atol=0, msg=k)


def test_bare_simmim_state_dict_needs_no_config(tmp_path):
    model, _, _ = _model_and_batch(torch.float32)
    path = tmp_path / "simmim_pretrain.pth"
    torch.save({"model": to_simmim(model.state_dict())}, path)  # a released file: weights only
    cfg = read_checkpoint_config(path)
    assert (cfg["mask_patch_size"], cfg["simmim_mask_ratio"]) == (32, 0.6)  # SimMIM's defaults
    loaded = load_pretrained_model(path, kernels="eager")
    torch.testing.assert_close(loaded.pixel_head.weight, model.pixel_head.weight.float(), rtol=0, atol=0)


def test_export_simmim_of_mimfast_checkpoints(tmp_path):
    """A mimfast pixel-model checkpoint to SimMIM's layout; an MAE checkpoint is refused; a
    config that does not fit the weights is an error naming the keys."""
    model, _, _ = _model_and_batch(torch.float32)
    cfg = {"method": "beit", "model": "beit_tiny_patch16_224_pixel", "img_size": 64, "patch_size": 8,
           "model_kwargs": {"embed_dim": 48, "depth": 2, "num_heads": 3}}
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": model.state_dict(), "config": cfg}, path)
    out = export_simmim(path, tmp_path / "simmim.pth")
    got = torch.load(out["paths"][0], weights_only=True)["model"]
    assert isinstance(got, (dict, collections.OrderedDict)) and is_simmim_state_dict(got)
    torch.testing.assert_close(from_simmim(got)["pixel_head.weight"], model.pixel_head.weight, rtol=0, atol=0)
    bad = tmp_path / "bad.pth"
    torch.save({"model": model.state_dict(), "config": dict(cfg, model_kwargs={"embed_dim": 48, "depth": 3,
                                                                                "num_heads": 3})}, bad)
    with pytest.raises(ValueError, match="missing"):
        export_simmim(bad, tmp_path / "x")
    from mimfast.models import create_model

    mae = tmp_path / "mae.pth"
    torch.save({"model": create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=1,
                                      decoder_depth=1, kernels="eager").state_dict()}, mae)
    with pytest.raises(ValueError, match="BEiT-encoder"):
        export_simmim(mae, tmp_path / "y")
