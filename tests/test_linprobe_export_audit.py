"""``mimfast linprobe`` and ``mimfast export`` against facebookresearch/mae's evaluation code:
``main_linprobe.py``'s head, optimizer and schedule replayed on the same features,
``util/lars.py``, the evaluation transform, ``util/pos_embed.py``'s ``interpolate_pos_embed``
for another image size, and the exported keys in timm's ViT-B/16 (cls-token and global-pool).

The references are written here from the official code's published behaviour. Everything runs
the eager path (``kernels="eager"``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mimfast.cli import main
from mimfast.models import create_model
from mimfast.train.export import encoder_state_dict, export_checkpoint, interpolate_pos_embed, timm_model_spec
from mimfast.train.linprobe import LinprobeConfig, eval_transform, train_linear_probe
from test_export_linprobe import _perturbed, _save_mimfast_checkpoint, _tiny_mae

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# --------------------------------------------------------------------------- references


def _official_lars_step(params, lr, wd, momentum=0.9, trust=0.001, state=None):
    """util/lars.py: 1-D parameters get neither weight decay nor the trust ratio."""
    for p in params:
        d = p.grad
        if p.ndim > 1:
            d = d + wd * p
            pn, un = p.norm(), d.norm()
            q = trust * pn / un if (pn > 0 and un > 0) else 1.0
            d = d * q
        mu = state.setdefault(id(p), torch.zeros_like(p))
        mu.mul_(momentum).add_(d)
        p.data.add_(mu, alpha=-lr)


def _official_lr(epoch, lr, min_lr, warmup, epochs):
    """util/lr_sched.py adjust_learning_rate."""
    if epoch < warmup:
        return lr * epoch / warmup
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


def _official_interpolate(pos_embed, new_grid):
    """util/pos_embed.py interpolate_pos_embed: the cls row kept, the patch rows resized as a
    (D, g, g) image, bicubic, align_corners=False."""
    dim = pos_embed.shape[-1]
    old = int((pos_embed.shape[-2] - 1) ** 0.5)
    tokens = pos_embed[:, 1:].reshape(-1, old, old, dim).permute(0, 3, 1, 2)
    tokens = torch.nn.functional.interpolate(tokens, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return torch.cat((pos_embed[:, :1], tokens.permute(0, 2, 3, 1).flatten(1, 2)), dim=1)


# --------------------------------------------------------------------------- linear probe (already right)


def test_probe_replays_main_linprobe_loop_with_lars():
    """main_linprobe.py + engine_finetune.train_one_epoch on fixed features: BatchNorm1d(D,
    affine=False, eps=1e-6) + Linear (weight trunc_normal std 0.01, bias 0), LARS (wd 0, 1-D
    params not adapted), lr = blr x batch / 256, per-iteration warm-up + cosine, drop_last,
    BatchNorm's running statistics at evaluation. Same draws (init, then one permutation per
    epoch, from one generator seeded with cfg.seed)."""
    gen = torch.Generator().manual_seed(3)
    n, dim, classes = 200, 12, 5
    feats = torch.randn(n, dim, generator=gen) * 2 + 1
    labels = torch.randint(0, classes, (n,), generator=gen)
    val = torch.randn(64, dim, generator=gen) * 2 + 1
    val_labels = torch.randint(0, classes, (64,), generator=gen)
    cfg = LinprobeConfig(epochs=6, warmup_epochs=2, batch_size=48, optimizer="lars", blr=4.0, seed=7)
    got = train_linear_probe(feats, labels, val, val_labels, classes, cfg)

    g = torch.Generator().manual_seed(7)
    bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
    fc = nn.Linear(dim, classes)
    with torch.no_grad():
        w = torch.empty(classes, dim)
        nn.init.trunc_normal_(w, std=0.01, generator=g)
        fc.weight.copy_(w)
        fc.bias.zero_()
    lr = 4.0 * 48 / 256
    steps = n // 48  # drop_last=True
    state = {}
    for epoch in range(6):
        order = torch.randperm(n, generator=g)
        for i in range(steps):
            step_lr = _official_lr(epoch + i / steps, lr, 0.0, 2, 6)
            idx = order[i * 48:(i + 1) * 48]
            fc.zero_grad()
            nn.functional.cross_entropy(fc(bn(feats[idx])), labels[idx]).backward()
            with torch.no_grad():
                _official_lars_step([fc.weight, fc.bias], step_lr, 0.0, state=state)
    bn.eval()
    head_bn, head_fc = got["head"]
    assert isinstance(head_bn, nn.BatchNorm1d) and not head_bn.affine and head_bn.eps == 1e-6
    torch.testing.assert_close(head_bn.running_mean, bn.running_mean)
    torch.testing.assert_close(head_bn.running_var, bn.running_var)
    torch.testing.assert_close(head_fc.weight, fc.weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(head_fc.bias, fc.bias, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        logits = fc(bn(val))
    top1 = (logits.argmax(1) == val_labels).float().mean().item()
    top5 = (logits.topk(5, 1).indices == val_labels[:, None]).any(1).float().mean().item()
    assert got["top1"] == pytest.approx(top1) and got["top5"] == pytest.approx(top5)
    assert got["lr"] == lr and got["steps"] == 6 * steps


def test_probe_defaults_are_main_linprobe_defaults():
    cfg = LinprobeConfig()
    assert (cfg.epochs, cfg.warmup_epochs, cfg.blr, cfg.min_lr, cfg.weight_decay, cfg.pool, cfg.lr) == (
        90, 10, 0.1, 0.0, 0.0, "cls", None)  # --cls_token, as the MAE README's probe command


def test_eval_transform_is_resize_256_bicubic_center_crop_224():
    """transforms.Resize(256, interpolation=3) + CenterCrop(224) on a PIL image, ToTensor,
    Normalize: the tensor path agrees to within two 8-bit levels (torchvision's antialiased
    uint8 bicubic vs PIL's rounding)."""
    import numpy as np
    from PIL import Image
    from torchvision import transforms as T

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
    ref_tf = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                        T.Normalize(MEAN, STD)])
    for size in ((500, 375), (300, 400)):
        im = photo.resize(size, Image.BILINEAR)
        ref = ref_tf(im)
        got = eval_transform(224)(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).contiguous())
        assert got.shape == ref.shape == (3, 224, 224)
        levels = (got - ref).abs() * torch.tensor(STD)[:, None, None] * 255
        assert levels.max() < 2.5 and levels.mean() < 0.05


# --------------------------------------------------------------------------- export into timm (already right)


def test_export_loads_strictly_into_timm_vit_base_both_pool_variants():
    """timm vit_base_patch16_224 with num_classes=0 (no head) takes the export with strict=True:
    norm.* for the cls-token model, fc_norm.* (and no norm.*) for global_pool='avg'."""
    import timm

    with torch.device("meta"):
        mae = create_model("mae_vit_base_patch16")
        token = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
        avg = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, global_pool="avg")
    token.load_state_dict(encoder_state_dict(mae), strict=True)
    avg.load_state_dict(encoder_state_dict(mae, global_pool=True), strict=True)
    # timm's checkpoint filter would read a mask_token as DINOv2's layout: none is written
    assert not any(k.startswith(("mask_token", "decoder")) for k in encoder_state_dict(mae))


# --------------------------------------------------------------------------- export at another image size (fixed)


def test_export_img_size_interpolates_pos_embed_as_main_finetune():
    """Fine-tuning at another size: pos_embed written for the new grid as interpolate_pos_embed
    does (bicubic, align_corners=False, cls row kept), so a timm ViT of that size loads it with
    only head.* missing and timm_model_spec names that size."""
    from timm.models.vision_transformer import VisionTransformer

    mae = _tiny_mae()  # 32 px, 8-px patches: a 4 x 4 grid
    pos = mae.pos_embed.detach()
    enc = encoder_state_dict(mae, img_size=48)  # 6 x 6
    assert enc["pos_embed"].shape == (1, 37, 48)
    torch.testing.assert_close(enc["pos_embed"], _official_interpolate(pos, 6), rtol=0, atol=1e-6)
    torch.testing.assert_close(enc["pos_embed"][:, 0], pos[:, 0], rtol=0, atol=0)
    name, kw = timm_model_spec(enc, num_heads=3)
    assert (name, kw["img_size"]) == ("VisionTransformer", 48)
    vit = VisionTransformer(**kw, num_classes=4).eval()
    missing, unexpected = vit.load_state_dict(enc, strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and unexpected == []
    with torch.no_grad():
        assert vit(torch.randn(2, 3, 48, 48)).shape == (2, 4)
    # the pretraining size: unchanged; other tensors untouched; global_pool composes
    same = encoder_state_dict(mae, img_size=32)
    assert torch.equal(same["pos_embed"], pos)
    both = encoder_state_dict(mae, global_pool=True, img_size=48)
    assert torch.equal(both["pos_embed"], enc["pos_embed"]) and "fc_norm.weight" in both
    # downsampling too, and the helper on its own (bf16 in, bf16 out)
    torch.testing.assert_close(interpolate_pos_embed(pos, 2), _official_interpolate(pos, 2), rtol=0, atol=1e-6)
    assert interpolate_pos_embed(pos.bfloat16(), 6).dtype == torch.bfloat16


def test_export_img_size_through_export_checkpoint_and_cli(tmp_path, capsys):
    from safetensors.torch import load_file

    mae = _tiny_mae()
    ckpt = _save_mimfast_checkpoint(mae, tmp_path / "ck.pth")
    summary = export_checkpoint(ckpt, tmp_path / "a", fmt="safetensors", img_size=64)
    assert summary["timm_kwargs"]["img_size"] == 64
    assert load_file(tmp_path / "a.safetensors")["pos_embed"].shape == (1, 65, 48)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "b"), "--format", "pth", "--img-size", "48"]) == 0
    loaded = torch.load(tmp_path / "b.pth", weights_only=True)
    torch.testing.assert_close(loaded["pos_embed"], _official_interpolate(mae.pos_embed.detach(), 6),
                               rtol=0, atol=1e-6)
    assert "img_size=48" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="multiple of the patch size"):
        main(["export", str(ckpt), "--out", str(tmp_path / "c"), "--img-size", "50"])
    with pytest.raises(SystemExit, match="do not apply to --format hf"):
        main(["export", str(ckpt), "--out", str(tmp_path / "d"), "--format", "hf", "--img-size", "48"])


def test_export_img_size_refused_for_beit():
    beit = _perturbed(create_model("beit_tiny_patch16_224_8k_vocab", img_size=32, patch_size=8, embed_dim=48,
                                   depth=1, num_heads=3, vocab_size=64, kernels="eager"))
    with pytest.raises(ValueError, match="relative position bias"):
        encoder_state_dict(beit, img_size=48)
    assert encoder_state_dict(beit, img_size=None).keys() == encoder_state_dict(beit).keys()


# ------------------------------------------------------------------- linprobe CLI on a Hugging Face folder (fixed)


def test_linprobe_cli_takes_a_hugging_face_folder(tmp_path):
    """load_model_weights reads HF model folders (and export takes them); the linprobe command
    refused them as "does not exist" because it asked for a file."""
    import json

    from mimfast.train.export import export_hf

    mae = _perturbed(create_model("mae_vit_tiny_patch16", kernels="eager"))  # the named size: --model rebuilds it
    ckpt = _save_mimfast_checkpoint(mae, tmp_path / "ck.pth", {"model": "mae_vit_tiny_patch16", "method": "mae"})
    export_hf(ckpt, tmp_path / "hf")
    out = tmp_path / "probe.json"
    rc = main(["linprobe", str(tmp_path / "hf"), "--model", "mae_vit_tiny_patch16", "--builtin-train", "16",
               "--builtin-val", "8", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "8",
               "--kernels", "eager", "--device", "cpu", "--num-workers", "0", "--feature-batch-size", "8",
               "--output-json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert (result["num_train"], result["num_val"], result["feature_dim"]) == (16, 8, 192)
