"""``mimfast export`` (encoder -> timm state_dict, .pth + safetensors) and ``mimfast linprobe``.

Everything here runs the eager path (``kernels="eager"``): these tests are about keys, layouts
and the probe's training loop, not kernels, and the interpreter would only make them slow.
"""

import argparse
import json

import pytest
import torch

from mimfast.cli import build_parser, main
from mimfast.models import create_model
from mimfast.train.export import encoder_state_dict, export_checkpoint, timm_model_spec
from mimfast.train.pretrained import load_pretrained_model
from mimfast.train.linprobe import (
    LARS,
    LinprobeConfig,
    build_probe_datasets,
    extract_features,
    linprobe,
    train_linear_probe,
)

# odd-ish sizes: 48 wide, 3 heads of 16, a 4 x 4 grid of 8-pixel patches
TINY_CFG = {"model": "mae_vit_tiny_patch16", "img_size": 32, "patch_size": 8, "method": "mae",
            "model_kwargs": {"embed_dim": 48, "depth": 2, "num_heads": 3, "decoder_embed_dim": 32,
                             "decoder_depth": 1, "decoder_num_heads": 2}}


def _perturbed(model):
    """Move every weight off its init (LayerNorms at 1/0 would hide a norm/fc_norm mix-up)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _tiny_mae():
    kw = {**TINY_CFG["model_kwargs"], "img_size": 32, "patch_size": 8, "kernels": "eager"}
    return _perturbed(create_model("mae_vit_tiny_patch16", **kw))


def _tiny_vit(**kw):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=4.0,
                             qkv_bias=True, num_classes=5, **kw).eval()


def _save_mimfast_checkpoint(model, path, config=TINY_CFG):
    torch.save({"model": model.state_dict(), "epoch": 1, "step": 10, "config": config}, path)
    return path


# --------------------------------------------------------------------------- export: MAE


def test_export_tiny_mae_loads_into_timm_vit_with_same_features():
    mae = _tiny_mae()
    enc = encoder_state_dict(mae)
    assert not any(k.startswith(("decoder_", "mask_token")) for k in enc)
    assert enc["pos_embed"].shape == (1, 17, 48)  # with the cls row
    vit = _tiny_vit()
    missing, unexpected = vit.load_state_dict(enc, strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and unexpected == []
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(x), mae.forward_features(x), atol=1e-5, rtol=1e-5)
    name, kw = timm_model_spec(enc, num_heads=3)
    assert name == "VisionTransformer"
    assert kw == dict(img_size=32, patch_size=8, in_chans=3, embed_dim=48, depth=2, num_heads=3, mlp_ratio=4.0,
                      qkv_bias=True, global_pool="token", fc_norm=False)


def test_export_global_pool_writes_fc_norm_from_norm():
    mae = _tiny_mae()
    enc = encoder_state_dict(mae, global_pool=True)
    assert "norm.weight" not in enc
    torch.testing.assert_close(enc["fc_norm.weight"], mae.norm.weight.detach())
    vit = _tiny_vit(global_pool="avg")
    missing, unexpected = vit.load_state_dict(enc, strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and unexpected == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = vit.forward_head(vit.forward_features(x), pre_logits=True)  # fc_norm(mean of patch tokens)
        norm, mae.norm = mae.norm, torch.nn.Identity()
        tokens = mae.forward_features(x)  # (N, 1 + L, D) before the final norm
        mae.norm = norm
        expected = norm(tokens[:, 1:].mean(dim=1))
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)


def test_export_base_key_set_loads_into_timm_vit_base():
    import timm

    with torch.device("meta"):  # keys and shapes only: no memory, no init time
        mae = create_model("mae_vit_base_patch16")
        vit = timm.create_model("vit_base_patch16_224", pretrained=False)
        vit_avg = timm.create_model("vit_base_patch16_224", pretrained=False, global_pool="avg")
    missing, unexpected = vit.load_state_dict(encoder_state_dict(mae), strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and unexpected == []
    missing, unexpected = vit_avg.load_state_dict(encoder_state_dict(mae, global_pool=True), strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and unexpected == []
    name, kw = timm_model_spec(encoder_state_dict(mae))
    assert (name, kw["img_size"], kw["patch_size"], kw["embed_dim"], kw["depth"], kw["num_heads"]) == (
        "VisionTransformer", 224, 16, 768, 12, 12)


def test_export_checkpoint_pth_and_safetensors_round_trip(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    mae = _tiny_mae()
    ckpt = _save_mimfast_checkpoint(mae, tmp_path / "checkpoint-last.pth")
    summary = export_checkpoint(ckpt, tmp_path / "out" / "encoder.pth")  # the suffix is replaced
    assert sorted(summary["paths"]) == [str(tmp_path / "out" / "encoder.pth"),
                                        str(tmp_path / "out" / "encoder.safetensors")]
    enc = encoder_state_dict(mae)
    from_pth = torch.load(tmp_path / "out" / "encoder.pth", weights_only=True)
    from_st = load_file(tmp_path / "out" / "encoder.safetensors")
    for loaded in (from_pth, from_st):
        assert loaded.keys() == enc.keys()
        for k in enc:
            assert torch.equal(loaded[k], enc[k]), k
    with safe_open(tmp_path / "out" / "encoder.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["timm_class"] == "VisionTransformer"
    assert json.loads(meta["timm_kwargs"])["num_heads"] == 3  # from the checkpoint's config


def test_export_official_style_checkpoints(tmp_path):
    """facebookresearch/mae checkpoints: {'model': ..., 'args': Namespace}, no config; the
    released ones hold the encoder only; DDP runs may leave 'module.' prefixes."""
    mae = _tiny_mae()
    enc = encoder_state_dict(mae)
    encoder_only = {"module." + k: v for k, v in mae.state_dict().items() if not k.startswith(("decoder", "mask"))}
    torch.save({"model": encoder_only, "args": argparse.Namespace(model="mae_vit_tiny")}, tmp_path / "official.pth")
    summary = export_checkpoint(tmp_path / "official.pth", tmp_path / "enc", fmt="pth")
    loaded = torch.load(tmp_path / "enc.pth", weights_only=True)
    assert loaded.keys() == enc.keys() and all(torch.equal(loaded[k], enc[k]) for k in enc)
    assert summary["timm_class"] == "VisionTransformer" and summary["timm_kwargs"]["embed_dim"] == 48


def test_export_and_load_refuse_what_does_not_fit(tmp_path):
    mae = _tiny_mae()
    ckpt = tmp_path / "bare.pth"
    torch.save(mae.state_dict(), ckpt)  # no config: the model must be named
    with pytest.raises(ValueError, match="does not match model 'mae_vit_base_patch16'"):
        export_checkpoint(ckpt, tmp_path / "x", model_name="mae_vit_base_patch16")
    with pytest.raises(ValueError, match="give the model name"):
        load_pretrained_model(ckpt)
    with pytest.raises(ValueError, match="does not fit model 'mae_vit_tiny_patch16'"):
        load_pretrained_model(ckpt, "mae_vit_tiny_patch16")  # default sizes: 192 wide
    with pytest.raises(ValueError, match="unknown model"):
        load_pretrained_model(ckpt, "vit_nonexistent")
    with pytest.raises(ValueError, match="missing"):
        encoder_state_dict({"cls_token": torch.zeros(1, 1, 4)})
    with pytest.raises(TypeError, match="source"):
        encoder_state_dict([1, 2])


# --------------------------------------------------------------------------- export: BEiT


def test_export_tiny_beit_loads_into_timm_beit_with_same_features():
    from timm.models.beit import Beit

    beit = _perturbed(create_model("beit_tiny_patch16_224_8k_vocab", img_size=32, patch_size=8, embed_dim=48,
                                   depth=2, num_heads=3, vocab_size=64, kernels="eager"))
    enc = encoder_state_dict(beit)
    assert not any(k.startswith(("lm_head", "mask_token", "rel_pos_bias")) for k in enc)
    for i in range(2):  # the shared table, copied into every block
        assert torch.equal(enc[f"blocks.{i}.attn.relative_position_bias_table"],
                           beit.rel_pos_bias.relative_position_bias_table.detach())
    name, kw = timm_model_spec(enc, num_heads=3)
    assert name == "Beit"
    timm_beit = Beit(**kw, num_classes=5).eval()
    missing, unexpected = timm_beit.load_state_dict(enc, strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and unexpected == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = beit.forward_features(x, torch.zeros(2, 16, dtype=torch.bool))
        torch.testing.assert_close(timm_beit.forward_features(x), expected, atol=1e-5, rtol=1e-5)


def _older_timm_beit():
    """timm's Beit behind the constructor it had before ``use_fc_norm`` (timm 0.9 to early 1.0,
    e.g. the GPU image's): those arguments only, no ``**kwargs``; the norm goes after the pooling
    exactly when ``global_pool == 'avg'``, as the newer Beit does with ``use_fc_norm=None``."""
    from timm.layers import LayerNorm
    from timm.models.beit import Beit

    class OlderBeit(Beit):
        def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, global_pool="avg",
                     embed_dim=768, depth=12, num_heads=12, qkv_bias=True, mlp_ratio=4.0, swiglu_mlp=False,
                     scale_mlp=False, drop_rate=0.0, pos_drop_rate=0.0, proj_drop_rate=0.0, attn_drop_rate=0.0,
                     drop_path_rate=0.0, norm_layer=LayerNorm, init_values=None, use_abs_pos_emb=True,
                     use_rel_pos_bias=False, use_shared_rel_pos_bias=False, head_init_scale=0.001):
            args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
            super().__init__(**args)

    return OlderBeit


@pytest.mark.parametrize("global_pool", [False, True])
@pytest.mark.parametrize("rel_pos", [True, False])
def test_beit_spec_fits_an_older_timm_beit(global_pool, rel_pos):
    """The Beit arguments bind to the older constructor (the H200 run's timm refused
    ``use_fc_norm``) and give the encoder's layout: fc_norm after the pooling with global_pool,
    the final norm without; every tensor loads strictly; the same features as the newer Beit."""
    from timm.models.beit import Beit

    beit = _perturbed(create_model("beit_tiny_patch16_224_8k_vocab", img_size=32, patch_size=8, embed_dim=48,
                                   depth=2, num_heads=3, vocab_size=64, kernels="eager"))
    enc = encoder_state_dict(beit, global_pool=global_pool)
    if not rel_pos:  # the layout of a pixel model exported from HF: absolute position embeddings only
        enc = {k: v for k, v in enc.items() if "relative_position" not in k}
        enc["pos_embed"] = 0.02 * torch.randn(1, 17, 48)
    name, kw = timm_model_spec(enc, num_heads=3)
    assert name == "Beit" and kw["global_pool"] == ("avg" if global_pool else "token")
    older = _older_timm_beit()(**kw, num_classes=0).eval()
    assert isinstance(older.fc_norm, torch.nn.LayerNorm) == global_pool
    assert isinstance(older.norm, torch.nn.LayerNorm) == (not global_pool)
    older.load_state_dict(enc, strict=True)
    newer = Beit(**kw, num_classes=0).eval()
    newer.load_state_dict(enc, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(older(x), newer(x), rtol=0, atol=0)


def test_export_base_beit_key_set_loads_into_timm_beit_base():
    import timm

    with torch.device("meta"):
        beit = create_model("beit_base_patch16_224_8k_vocab")
        default = timm.create_model("beit_base_patch16_224", pretrained=False)  # global_pool='avg', fc_norm
        token = timm.create_model("beit_base_patch16_224", pretrained=False, global_pool="token")
    for model, gp in ((default, True), (token, False)):
        missing, unexpected = model.load_state_dict(encoder_state_dict(beit, global_pool=gp), strict=False)
        assert sorted(missing) == ["head.bias", "head.weight"] and unexpected == []


# --------------------------------------------------------------------------- linear probe


def test_lars_step_matches_the_reference_formula():
    w = torch.randn(4, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    w0, b0 = w.detach().clone(), b.detach().clone()
    gw, gb = torch.randn(4, 3), torch.randn(4)
    opt = LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    for step in range(2):
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
    # by hand: weight matrices get wd and the trust ratio; 1-D params neither
    mu_w = torch.zeros_like(w0)
    p = w0.clone()
    for _ in range(2):
        d = gw + 0.1 * p
        mu_w = 0.9 * mu_w + d * (0.001 * p.norm() / d.norm())
        p = p - 0.5 * mu_w
    torch.testing.assert_close(w.detach(), p)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb - 0.5 * (0.9 * gb + gb))
    with pytest.raises(ValueError, match="momentum"):
        LARS([w], lr=0.1, momentum=1.5)


@pytest.mark.parametrize("optimizer, blr", [("sgd", 0.1), ("lars", 20.0)])
def test_train_linear_probe_separates_separable_features(optimizer, blr):
    gen = torch.Generator().manual_seed(1)
    centres = torch.randn(4, 16, generator=gen) * 3 + 5  # off-centre: the BatchNorm must handle it
    def draw(n):
        y = torch.randint(0, 4, (n,), generator=gen)
        return centres[y] + torch.randn(n, 16, generator=gen), y
    (xt, yt), (xv, yv) = draw(512), draw(256)
    cfg = LinprobeConfig(epochs=15, warmup_epochs=2, batch_size=64, optimizer=optimizer, blr=blr)
    r = train_linear_probe(xt, yt, xv, yv, 4, cfg)
    assert r["top1"] > 0.95 and r["train_top1"] > 0.95
    bn, linear = r["head"]
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert linear.out_features == 4
    with pytest.raises(ValueError, match="labels"):
        train_linear_probe(xt, yt + 4, xv, yv, 4, cfg)


def test_linprobe_end_to_end_on_builtin_through_the_cli(tmp_path, capsys):
    ckpt = _save_mimfast_checkpoint(_tiny_mae(), tmp_path / "checkpoint-last.pth")
    out = tmp_path / "probe.json"
    rc = main(["linprobe", str(ckpt), "--data", "builtin", "--builtin-train", "256", "--builtin-val", "128",
               "--epochs", "4", "--warmup-epochs", "1", "--batch-size", "64", "--kernels", "eager",
               "--device", "cpu", "--num-workers", "0", "--output-json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert 0.0 <= result["top1"] <= 1.0 and 0.0 <= result["top5"] <= 1.0
    assert (result["num_train"], result["num_val"], result["num_classes"], result["feature_dim"]) == (256, 128, 8, 48)
    assert result["steps"] == 4 * (256 // 64)
    assert "top-1" in capsys.readouterr().out


def test_linprobe_mean_pool_on_a_beit_model_and_features():
    beit = create_model("beit_tiny_patch16_224_8k_vocab", img_size=32, patch_size=8, embed_dim=48, depth=1,
                        num_heads=3, vocab_size=64, kernels="eager")
    cfg = LinprobeConfig(pool="mean", builtin_train=64, builtin_val=32, epochs=2, warmup_epochs=0, batch_size=32,
                         num_workers=0, device="cpu")
    r = linprobe(beit, cfg, verbose=False)
    assert 0.0 <= r["top1"] <= 1.0 and r["feature_dim"] == 48
    # builtin: held-out images are not the training images
    train, val, num_classes = build_probe_datasets(LinprobeConfig(builtin_train=4, builtin_val=4), 32)
    assert num_classes == 8 and not torch.equal(train[0][0], val[0][0])
    mae = _tiny_mae()
    feats, labels = extract_features(mae, torch.utils.data.Subset(train, range(3)), pool="mean", batch_size=2)
    with torch.no_grad():
        x = torch.stack([train[i][0] for i in range(3)])
        torch.testing.assert_close(feats, mae.forward_features(x)[:, 1:].mean(dim=1))
    assert labels.tolist() == [train[i][1] for i in range(3)]


def test_linprobe_folder_data(tmp_path):
    import numpy as np
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        for i in range(5):
            arr = np.full((20, 24, 3), 30 * i + (100 if cls == "dog" else 0), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "tree" / cls / f"{i}.png")
    train, val, num_classes = build_probe_datasets(LinprobeConfig(data=str(tmp_path / "tree"), val_fraction=0.3), 16)
    assert num_classes == 2 and (len(train), len(val)) == (7, 3)
    img, label = train[0]
    assert img.shape == (3, 16, 16) and img.dtype == torch.float32 and label in (0, 1)
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match="class sub-folders"):
        build_probe_datasets(LinprobeConfig(data=str(tmp_path / "flat")), 16)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LinprobeConfig(data=str(tmp_path / "missing")).check()


# --------------------------------------------------------------------------- CLI


def test_cli_parsing_and_errors(tmp_path, capsys):
    parser = build_parser()
    a = parser.parse_args(["export", "ck.pth", "--out", "enc", "--global-pool"])
    assert (a.command, a.checkpoint, a.out, a.model, a.global_pool, a.fmt) == ("export", "ck.pth", "enc", None,
                                                                               True, "both")
    a = parser.parse_args(["linprobe", "ck.pth", "--model", "mae_vit_base_patch16", "--pool", "mean",
                           "--epochs", "3", "--batch-size", "128", "--data", "/some/folder", "--optimizer", "sgd"])
    assert (a.command, a.model, a.pool, a.epochs, a.batch_size, a.data, a.optimizer) == (
        "linprobe", "mae_vit_base_patch16", "mean", 3, 128, "/some/folder", "sgd")
    assert "blr" not in vars(a)  # unset flags fall back to LinprobeConfig's defaults
    for bad in (["export", "ck.pth"], ["linprobe", "ck.pth", "--pool", "max"], ["linprobe"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    with pytest.raises(SystemExit, match="does not exist"):
        main(["export", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "enc")])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["linprobe", str(tmp_path / "nope.pth")])
    ckpt = _save_mimfast_checkpoint(_tiny_mae(), tmp_path / "ck.pth")
    assert main(["export", str(ckpt), "--out", str(tmp_path / "enc"), "--format", "safetensors"]) == 0
    assert (tmp_path / "enc.safetensors").is_file() and not (tmp_path / "enc.pth").exists()
    assert "only head.* missing" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="epochs must be positive"):
        main(["linprobe", str(ckpt), "--epochs", "0"])


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_loaded_mae_computes_the_loss_it_was_trained_with(tmp_path, norm_pix_loss):
    """The trainer passes norm_pix_loss beside model_kwargs; the rebuilt model takes it from the
    checkpoint's config (the model's own default is off), so its loss is the run's loss."""
    mae = _tiny_mae()
    mae.norm_pix_loss = norm_pix_loss
    config = {**TINY_CFG, "method": "mae", "norm_pix_loss": norm_pix_loss}
    loaded = load_pretrained_model(_save_mimfast_checkpoint(mae, tmp_path / "ck.pth", config), kernels="eager")
    assert loaded.norm_pix_loss is norm_pix_loss
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    torch.testing.assert_close(loaded(imgs, noise=noise)[0], mae(imgs, noise=noise)[0], rtol=0, atol=0)


def test_loaded_beit_pixel_model_keeps_the_runs_loss(tmp_path):
    """The pixel variant's norm_pix_loss and pixel_loss come from the run's config, as the trainer
    passes them (model_kwargs first)."""
    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 1, "num_heads": 3}
    model = create_model("beit_tiny_patch16_224_pixel", **kw, kernels="eager", norm_pix_loss=True, loss="mse")
    config = {"method": "beit", "model": "beit_tiny_patch16_224_pixel", "img_size": 32, "patch_size": 8,
              "model_kwargs": {"embed_dim": 48, "depth": 1, "num_heads": 3}, "norm_pix_loss": True,
              "pixel_loss": "mse"}
    loaded = load_pretrained_model(_save_mimfast_checkpoint(model, tmp_path / "px.pth", config), kernels="eager")
    assert (loaded.norm_pix_loss, loaded.loss_type) == (True, "mse")
    config["model_kwargs"]["loss"] = "l1"  # model_kwargs win, as in the trainer
    loaded = load_pretrained_model(_save_mimfast_checkpoint(model, tmp_path / "px2.pth", config), kernels="eager")
    assert loaded.loss_type == "l1"


def test_beit_checkpoint_export_and_load(tmp_path):
    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 1, "num_heads": 3, "vocab_size": 64}
    beit = _perturbed(create_model("beit_tiny_patch16_224_8k_vocab", **kw, kernels="eager"))
    # as the trainer saves it: the vocabulary came from the tokenizer and is not in the config
    config = {"method": "beit", "model": "beit_tiny_patch16_224_8k_vocab", "img_size": 32, "patch_size": 8,
              "model_kwargs": {k: v for k, v in kw.items() if k not in ("img_size", "patch_size", "vocab_size")}}
    ckpt = _save_mimfast_checkpoint(beit, tmp_path / "beit.pth", config)
    summary = export_checkpoint(ckpt, tmp_path / "enc", global_pool=True)
    assert summary["timm_class"] == "Beit" and summary["timm_kwargs"]["num_heads"] == 3
    assert summary["timm_kwargs"]["global_pool"] == "avg"
    loaded = load_pretrained_model(ckpt, kernels="eager")
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, beit.blocks[0].attn.qkv.weight)
    assert torch.equal(loaded.lm_head.weight, beit.lm_head.weight)  # the 64-word head, not a fresh 8192 one
