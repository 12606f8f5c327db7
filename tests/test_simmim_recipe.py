"""``mimfast pretrain --recipe simmim``: microsoft/SimMIM's ViT-B/16 800-epoch run
(``configs/vit_base__800ep/simmim_pretrain__vit_base__img224__800ep.yaml``, ``config.py``,
``lr_scheduler.py``, ``optimizer.py``, ``data/data_simmim.py``) as one recipe.

- Schedule: warm-up from WARMUP_LR, then SimMIM's ``MultiStepLRScheduler`` (transcribed below,
  in iterations as SimMIM steps it) against ``lr_at`` at the fractional epoch; MAE's cosine is
  unchanged, bit for bit; bad schedules are refused at start.
- Recipe: ``--recipe simmim`` and ``--preset simmim-tiny`` resolve to SimMIM's settings, flags
  and YAML override them, mixing recipes is refused; SimMIM's weight-decay groups are ours.
- Augmentation: ``--crop-interpolation bilinear`` reaches the CPU transforms (SimMIM's PIL
  pipeline within uint8 rounding), the tokenizer BEiT's patch view and the GPU pipeline's.
- A short CPU run of the preset: finite losses, the logged lr on the schedule, and the
  checkpoint's config rebuilds the model through ``load_pretrained_model``.
"""

from __future__ import annotations

import bisect
import json
import math

import numpy as np
import pytest
import torch

from mimfast.cli import main
from mimfast.train.config import PRESETS, RECIPES, build_parser, config_from_args
from mimfast.train.schedule import lr_at, param_groups_weight_decay


def _parse(*argv):
    return config_from_args(build_parser().parse_args(list(argv)))


# --------------------------------------------------------------------------------------------
# SimMIM's schedule, transcribed (lr_scheduler.py build_scheduler + MultiStepLRScheduler)


def _simmim_multistep(t: int, base_lr: float, warmup_lr: float, warmup_epochs: float, milestones, gamma: float,
                      n_iter_per_epoch: int) -> float:
    """The lr MultiStepLRScheduler gives at update ``t`` (``t_in_epochs=False``: iterations)."""
    warmup_t = int(warmup_epochs * n_iter_per_epoch)
    multi_steps = [m * n_iter_per_epoch for m in milestones]
    assert warmup_t <= min(multi_steps)
    if t < warmup_t:
        return warmup_lr + t * (base_lr - warmup_lr) / warmup_t
    return base_lr * gamma ** bisect.bisect_right(multi_steps, t)


def test_multistep_schedule_is_simmims():
    """SimMIM's 800-epoch schedule at 2048 images (its lrs x 2048 / 512), 50 iterations an epoch."""
    n, lr, warmup_lr = 50, 1e-4 * 4, 5e-7 * 4
    kw = dict(schedule="multistep", milestones=(700,), gamma=0.1, warmup_lr=warmup_lr)
    for t in [0, 1, 7, 249, 499, 500, 501, 17_000, 34_999, 35_000, 35_001, 39_999]:
        want = _simmim_multistep(t, lr, warmup_lr, 10, [700], 0.1, n)
        got = lr_at(t / n, lr, 123.0, 10, 800, **kw)  # min_lr plays no part
        assert got == pytest.approx(want, rel=1e-12, abs=0), t
    # two milestones, a gamma that is not 0.1, a warm-up from zero
    for t in range(0, 600, 7):
        want = _simmim_multistep(t, 1.0, 0.0, 2, [4, 9], 0.5, 50)
        assert lr_at(t / 50, 1.0, 0.0, 2, 12, schedule="multistep", milestones=(4, 9), gamma=0.5) == pytest.approx(
            want, rel=1e-12, abs=1e-15), t


def test_cosine_schedule_is_unchanged():
    """MAE's lr_sched.adjust_learning_rate, in the same operations: the same floats, not only close."""
    lr, min_lr, warm, epochs = 1.5e-4 * 16, 1e-6, 40, 800
    for epoch in [0, 0.001, 3.7, 39.999, 40, 40.5, 123.4, 799.99, 800, 900]:
        if epoch < warm:
            want = lr * epoch / warm
        else:
            want = min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (epoch - warm) / (epochs - warm))))
        assert lr_at(epoch, lr, min_lr, warm, epochs) == want
        assert lr_at(epoch, lr, min_lr, warm, epochs, schedule="cosine", milestones=(5,), warmup_lr=0.0) == want
    # a warm-up start changes the warm-up only (timm's warmup_lr_init rule)
    assert lr_at(10, lr, min_lr, warm, epochs, warmup_lr=1e-6) == pytest.approx(1e-6 + (lr - 1e-6) * 10 / 40)
    assert lr_at(100, lr, min_lr, warm, epochs, warmup_lr=1e-6) == lr_at(100, lr, min_lr, warm, epochs)
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_at(1, lr, min_lr, warm, epochs, schedule="step")


@pytest.mark.parametrize("argv,match", [
    (["--lr-milestones"], "needs --lr-milestones"),
    (["--lr-milestones", "700", "600"], "increasing"),
    (["--lr-milestones", "5"], "after the warm-up"),
    (["--lr-milestones", "900"], "within the run's 800 epochs"),
    (["--epochs", "100"], "87.5 of 100"),
    (["--lr-gamma", "0"], "lr-gamma"),
    (["--lr-gamma", "1.5"], "lr-gamma"),
    (["--warmup-lr=-1e-6"], "warmup-lr"),
])
def test_bad_schedules_fail_at_start(argv, match):
    with pytest.raises(SystemExit, match=match):
        _parse("--recipe", "simmim", *argv)


def test_milestones_without_multistep_are_refused():
    with pytest.raises(SystemExit, match="apply to --lr-schedule multistep"):
        _parse("--lr-milestones", "30")
    # the recipe's milestones stay behind quietly when a flag picks the cosine
    cfg = _parse("--recipe", "simmim", "--lr-schedule", "cosine")
    assert cfg.lr_schedule == "cosine" and cfg.lr_milestones == (700,)


# --------------------------------------------------------------------------------------------
# the recipe


def test_recipe_is_simmims_vit_base_800ep():
    cfg = _parse("--recipe", "simmim")
    assert (cfg.recipe, cfg.method, cfg.model) == ("simmim", "beit", "beit_base_patch16_224_pixel")
    assert (cfg.pixel_masks, cfg.mask_patch_size, cfg.simmim_mask_ratio) == ("simmim", 32, 0.6)
    assert (cfg.pixel_loss, cfg.norm_pix_loss, cfg.drop_path) == ("l1", False, 0.1)
    assert (cfg.betas, cfg.weight_decay, cfg.clip_grad) == ((0.9, 0.999), 0.05, 5.0)
    assert (cfg.lr_schedule, cfg.lr_milestones, cfg.lr_gamma, cfg.warmup_epochs, cfg.epochs) == (
        "multistep", (700,), 0.1, 10, 800)
    assert (cfg.min_crop_scale, cfg.crop_interpolation) == (0.67, "bilinear")
    assert cfg.lr is None and cfg.batch_size == 128
    # SimMIM: BASE_LR, WARMUP_LR and MIN_LR x total batch / 512; here lr = blr x batch / 256 and
    # warmup_lr, min_lr absolute, set for the paper's 2048 (128 x 16 GPUs)
    batch = 128 * 16
    assert cfg.blr * batch / 256 == pytest.approx(1e-4 * batch / 512, rel=1e-12)
    assert cfg.warmup_lr == pytest.approx(5e-7 * batch / 512) and cfg.min_lr == pytest.approx(5e-6 * batch / 512)
    assert RECIPES["simmim"]["method"] == "beit" and PRESETS["simmim-tiny"]["recipe"] == "simmim"


def test_flags_and_yaml_override_the_recipe(tmp_path):
    cfg = _parse("--recipe", "simmim", "--blr", "1e-4", "--lr-schedule", "cosine", "--crop-interpolation", "bicubic",
                 "--lr-milestones", "600", "--lr-schedule", "multistep", "--warmup-lr", "0")
    assert (cfg.blr, cfg.lr_schedule, cfg.lr_milestones, cfg.crop_interpolation, cfg.warmup_lr) == (
        1e-4, "multistep", (600.0,), "bicubic", 0.0)
    yml = tmp_path / "run.yaml"
    yml.write_text("recipe: simmim\nlr_milestones: [300, 700]\nlr-gamma: 0.5\nbatch_size: 32\n")
    cfg = _parse("--config", str(yml), "--batch-size", "64")
    assert (cfg.recipe, cfg.model, cfg.lr_milestones, cfg.lr_gamma, cfg.batch_size) == (
        "simmim", "beit_base_patch16_224_pixel", (300, 700), 0.5, 64)
    yml.write_text("preset: simmim-tiny\nlr_milestones: 6\n")  # one number is a one-milestone list
    cfg = _parse("--config", str(yml))
    assert (cfg.recipe, cfg.model, cfg.lr_milestones, cfg.img_size) == ("simmim", "beit_tiny_patch16_224_pixel",
                                                                        (6,), 64)
    # the method's recipe is still the default
    assert _parse("--method", "beit").recipe == "beit" and _parse().recipe == "mae"
    assert _parse("--method", "beit").crop_interpolation == "bicubic"


def test_tiny_preset():
    """simmim-tiny: 64 px, patch 8, 16 px cells (2x2 patches each as SimMIM's 32 over 16): 4x4
    cells, 10 masked; the schedule at 1/100 of the length."""
    from mimfast.train.beit_task import BEiTTask

    cfg = _parse("--preset", "simmim-tiny")
    assert (cfg.recipe, cfg.method, cfg.img_size, cfg.patch_size, cfg.mask_patch_size) == (
        "simmim", "beit", 64, 8, 16)
    assert (cfg.lr_schedule, cfg.lr_milestones, cfg.epochs, cfg.warmup_epochs) == ("multistep", (7,), 8, 1)
    gen = BEiTTask(cfg, torch.device("cpu")).mask_generator(64)
    assert (gen.rand_size, gen.scale, gen.mask_count, gen.get_shape()) == ((4, 4), 2, 10, (8, 8))


@pytest.mark.parametrize("argv,match", [
    (["--recipe", "simmim", "--method", "mae"], "--recipe simmim trains --method beit"),
    (["--recipe", "simmim", "--preset", "tiny"], "its presets: simmim-tiny"),
    (["--recipe", "beit", "--preset", "simmim-tiny"], "size of the simmim recipe"),
    (["--method", "beit", "--preset", "tiny"], "--preset tiny trains --method mae"),
])
def test_mixed_recipes_are_refused(argv, match):
    with pytest.raises(SystemExit, match=match):
        _parse(*argv)


def test_weight_decay_groups_are_simmims():
    """optimizer.py get_pretrain_param_groups with SimMIM.no_weight_decay() (the encoder's pos_embed
    and cls_token) and no keywords (its ViT has none): no decay on 1-D tensors, *.bias and those
    names; SimMIM decays the mask token and the shared relative position bias table, as we do."""
    from mimfast.models import beit_tiny_patch16_224_pixel

    model = beit_tiny_patch16_224_pixel(img_size=32, patch_size=8, depth=2)
    skip = {"pos_embed", "cls_token"}
    names = {id(p): n for n, p in model.named_parameters()}
    want_no_decay = {n for n, p in model.named_parameters() if p.ndim == 1 or n.endswith(".bias") or n in skip}
    no_decay, decay = param_groups_weight_decay(model, 0.05)
    assert {names[id(p)] for p in no_decay["params"]} == want_no_decay
    assert {names[id(p)] for p in decay["params"]} == set(names.values()) - want_no_decay
    assert {"mask_token", "rel_pos_bias.relative_position_bias_table"} <= {names[id(p)] for p in decay["params"]}
    assert "cls_token" in want_no_decay and decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


# --------------------------------------------------------------------------------------------
# the crop's interpolation


def _simmim_transform(size: int):
    """data/data_simmim.py SimMIMTransform's image part, as SimMIM builds it (on PIL images)."""
    import torchvision.transforms as T

    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.67, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])


def _picture():
    from PIL import Image

    rng = np.random.default_rng(0)
    small = Image.fromarray((rng.random((15, 20, 3)) * 255).astype(np.uint8))
    pil = small.resize((120, 90), Image.BICUBIC)  # smooth: resampling differences stay small
    return pil, torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).contiguous()


def test_transform_is_simmims():
    """The recipe's CPU transform (the BEiT pixel task's patch view) against SimMIM's on the same
    picture as a PIL image: the same crops and flips from the same RNG, pixels within PIL's uint8
    rounding (2 levels); the bicubic transform on the same draws is further off, and torchvision's
    own bilinear crop on the tensor is matched exactly."""
    from torchvision.transforms import v2

    from mimfast.data.datasets import IMAGENET_MEAN, IMAGENET_STD
    from mimfast.train.beit_task import BEiTTask
    from mimfast.train.pretrain import mae_transform

    cfg = _parse("--preset", "simmim-tiny", "--img-size", "48", "--mask-patch-size", "16")
    ours = BEiTTask(cfg, torch.device("cpu")).transform(48).patch_transform
    bicubic = mae_transform(48, 0.67, "bicubic")
    exact = v2.Compose([v2.RandomResizedCrop(48, scale=(0.67, 1.0), interpolation=v2.InterpolationMode.BILINEAR),
                        v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    official = _simmim_transform(48)
    pil, tensor = _picture()
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    worst_bicubic = 0.0
    for seed in range(6):
        outs = []
        for t, img in ((official, pil), (ours, tensor), (bicubic, tensor), (exact, tensor)):
            torch.manual_seed(seed)
            outs.append(t(img))
        want, got, cubic, same = outs
        assert got.shape == want.shape == (3, 48, 48) and got.dtype == torch.float32
        assert ((got - want).abs() * std * 255).max() <= 2.01, seed
        assert torch.equal(got, same), seed
        worst_bicubic = max(worst_bicubic, ((cubic - want).abs() * std * 255).max().item())
    assert worst_bicubic > 2.01


def test_interpolation_reaches_every_pipeline(tmp_path):
    """MAE's transform, the tokenizer BEiT's patch view (its tokenizer view stays Lanczos) and the
    --gpu-pipeline augmentations (built on the CPU here: only their settings are read)."""
    from torchvision.transforms import v2

    from mimfast.models.tokenizer import VQTokenizer, save_vq_tokenizer
    from mimfast.train.beit_task import BEiTTask
    from mimfast.train.pretrain import MAETask

    cpu = torch.device("cpu")
    for mode, want in (("bilinear", v2.InterpolationMode.BILINEAR), ("bicubic", v2.InterpolationMode.BICUBIC)):
        mae = MAETask(_parse("--preset", "tiny", "--crop-interpolation", mode), cpu)
        mae.patch_size = 8
        crop = mae.transform(64).transform.transforms[0]
        assert crop.interpolation == want and crop.scale == (0.2, 1.0)
        assert mae.gpu_augment(64).kwargs["interpolation"] == mode
    with pytest.raises(ValueError, match="interpolation must be one of"):
        from mimfast.train.pretrain import mae_transform

        mae_transform(32, interpolation="lanczos")

    task = BEiTTask(_parse("--preset", "simmim-tiny"), cpu)
    crop = task.transform(64).patch_transform.transforms[0]
    assert crop.interpolation == v2.InterpolationMode.BILINEAR and crop.scale == (0.67, 1.0)
    assert task.gpu_augment(64).kwargs["interpolation"] == "bilinear"
    # the GPU pipeline's augmentation (its reference path on CPU tensors): the same boxes, resized otherwise
    imgs = [torch.randint(0, 256, (3, 80, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
            for i in range(3)]
    linear = task.gpu_augment(64)(imgs, [0, 0, 0], [0, 1, 2])
    task.cfg.crop_interpolation = "bicubic"
    cubic = task.gpu_augment(64)(imgs, [0, 0, 0], [0, 1, 2])
    assert linear.shape == cubic.shape == (3, 3, 64, 64) and not torch.allclose(linear, cubic, atol=0.1)

    vq = tmp_path / "vq.safetensors"
    save_vq_tokenizer(VQTokenizer(vocab_size=16, embed_dim=4, hidden=4, downsample=4), vq)
    task = BEiTTask(_parse("--preset", "beit-tiny", "--tokenizer", f"vq:{vq}", "--crop-interpolation", "bilinear"),
                    cpu)
    views = task.transform(64).patch_transform
    assert (views.interpolation, views.tokenizer_interpolation) == ("bilinear", "lanczos")
    gpu = task.gpu_augment(64).kwargs
    assert (gpu["interpolation"], gpu["second_interpolation"]) == ("bilinear", "bicubic")


# --------------------------------------------------------------------------------------------
# end to end


def test_tiny_preset_trains_and_its_checkpoint_rebuilds(tmp_path):
    """simmim-tiny shrunk (32 px, patch 4, 8 px cells, one narrow block, 16 images of batch 4: 4
    steps an epoch) for 3 epochs with the milestone at 2: finite losses, the lr of each logged
    step is lr_at's, and load_pretrained_model rebuilds the pixel model with the weights."""
    from mimfast.train.checkpoint import load_checkpoint
    from mimfast.train.pretrained import load_pretrained_model

    yml = tmp_path / "small.yaml"
    yml.write_text("model_kwargs: {depth: 1, embed_dim: 32, num_heads: 2}\n")
    out = tmp_path / "run"
    argv = ["pretrain", "--preset", "simmim-tiny", "--config", str(yml), "--img-size", "32", "--patch-size", "4",
            "--mask-patch-size", "8", "--builtin-size", "16", "--batch-size", "4", "--num-workers", "0",
            "--kernels", "eager", "--log-every", "1", "--no-tensorboard", "--vis-every", "0", "--epochs", "3",
            "--lr-milestones", "2", "--output-dir", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "done" and summary["steps"] == 12
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(records) == 12 and all(math.isfinite(r["loss"]) for r in records)
    cfg = json.loads((out / "config.json").read_text())
    lr = cfg["blr"] * 4 / 256
    for r in records:  # the lr is set before step r["step"], at its fractional epoch
        want = lr_at((r["step"] - 1) / 4, lr, cfg["min_lr"], 1, 3, schedule="multistep", milestones=(2,),
                     gamma=0.1, warmup_lr=cfg["warmup_lr"])
        assert r["lr"] == pytest.approx(want, rel=1e-12), r
    assert records[-1]["lr"] == pytest.approx(lr * 0.1)

    ckpt = load_checkpoint(out / "checkpoint-last.pth")
    assert (ckpt["config"]["recipe"], ckpt["config"]["method"], ckpt["config"]["lr_milestones"]) == (
        "simmim", "beit", [2.0])
    model = load_pretrained_model(out / "checkpoint-last.pth", kernels="eager")
    assert type(model).__name__ == "VisionTransformerForMaskedPixelModeling"
    assert (model.img_size, model.patch_size, len(model.blocks)) == (32, 4, 1)
    assert (model.loss_type, model.norm_pix_loss) == ("l1", False)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in ckpt["model"].items())


def test_quickstart_with_a_recipe_gets_its_cpu_preset(monkeypatch):
    """`mimfast pretrain --recipe simmim` (or --method beit) with nothing else named is that
    recipe's small preset on the built-in data, as `mimfast pretrain` alone is MAE's."""
    import mimfast.cli as cli
    import mimfast.train.pretrain as tp

    seen = []
    monkeypatch.setattr(tp, "pretrain", lambda cfg: seen.append(cfg) or {"status": "done"})
    assert cli.main(["pretrain", "--recipe", "simmim"]) == 0
    assert (seen[-1].preset, seen[-1].recipe, seen[-1].data) == ("simmim-tiny", "simmim", "builtin")
    assert seen[-1].pixel_masks == "simmim" and seen[-1].lr_schedule == "multistep"
    assert cli.main(["pretrain", "--method", "beit"]) == 0
    assert seen[-1].preset == "beit-tiny"
