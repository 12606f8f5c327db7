"""MAE pretraining against facebookresearch/mae, piece by piece: the same initial weights at
the same seed, the sin-cos formula, the augmentation, the training loop of
``engine_pretrain.py`` (per-iteration LR, accumulation, AdamW, weight-decay groups), the
command-line spellings of ``main_pretrain.py``, and official checkpoints.

The references below are written from the official code's published behaviour (timm ``Block``
and ``PatchEmbed`` stand in for timm 0.3.2's, which build the same modules in the same order)."""

from __future__ import annotations

import argparse
import json
import math
from functools import partial

import pytest
import torch
from torch import nn

from mimfast.cli import build_parser
from mimfast.models import create_model, mae_vit_tiny_patch16
from mimfast.train.checkpoint import load_checkpoint
from mimfast.train.config import PretrainConfig, config_from_args
from mimfast.train.pretrain import MAETask, _model_kwargs, pretrain
from mimfast.train.schedule import param_groups_weight_decay
from test_pretrain import TINY  # the same tiny run


def _cfg(tmp_path, **kw) -> PretrainConfig:
    return PretrainConfig(**dict(TINY, output_dir=str(tmp_path), **kw))


# --- the model at initialisation


class _OfficialInitMAE(nn.Module):
    """The modules of models_mae.MaskedAutoencoderViT, built in its order, with its
    initialize_weights (sin-cos positions from the formula in _official_sincos)."""

    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, dec_dim, dec_depth, dec_heads):
        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block

        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, 4.0, qkv_bias=True, norm_layer=norm)
                                     for _ in range(depth)])
        self.norm = norm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, dec_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, dec_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(dec_dim, dec_heads, 4.0, qkv_bias=True, norm_layer=norm)
                                             for _ in range(dec_depth)])
        self.decoder_norm = norm(dec_dim)
        self.decoder_pred = nn.Linear(dec_dim, patch_size**2 * 3, bias=True)
        # initialize_weights, in its order (each draw moves the RNG)
        side = int(n**0.5)
        self.pos_embed.data.copy_(_official_sincos(embed_dim, side).unsqueeze(0))
        self.decoder_pos_embed.data.copy_(_official_sincos(dec_dim, side).unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)


def _official_sincos(dim: int, side: int) -> torch.Tensor:
    """util/pos_embed.py's table, row by row in float64, then float32: row 1 + h * side + w is
    [sin(w om), cos(w om), sin(h om), cos(h om)], om_k = 10000^(-k / (dim / 4)); row 0 (cls) zeros.
    (The half the official code names emb_h comes from meshgrid(w, h)[0]: the width index.)"""
    quarter = dim // 4
    rows = [[0.0] * dim]
    for h in range(side):
        for w in range(side):
            om = [1.0 / 10000 ** (k / quarter) for k in range(quarter)]
            rows.append([math.sin(w * o) for o in om] + [math.cos(w * o) for o in om]
                        + [math.sin(h * o) for o in om] + [math.cos(h * o) for o in om])
    return torch.tensor(rows, dtype=torch.float64).float()


def test_same_seed_gives_the_official_initial_weights():
    """Same seed, same draws in the same order: every tensor of the state_dict is bit-equal."""
    torch.manual_seed(0)
    ours = mae_vit_tiny_patch16(img_size=64, depth=2, kernels="eager")
    torch.manual_seed(0)
    ref = _OfficialInitMAE(64, 16, 192, 2, 3, 128, 2, 4)
    a, b = ours.state_dict(), ref.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("dim,side", [(768, 14), (1024, 14), (1280, 16), (512, 14), (192, 4)])
def test_sincos_table_is_the_official_formula(dim, side):
    from mimfast.models.pos_embed import get_2d_sincos_pos_embed

    got = torch.from_numpy(get_2d_sincos_pos_embed(dim, side, cls_token=True)).float()
    torch.testing.assert_close(got, _official_sincos(dim, side), rtol=0, atol=2e-7)


def test_pretrain_builds_the_model_from_the_seed_as_main_pretrain_does(tmp_path, monkeypatch):
    """main_pretrain.py seeds torch with args.seed (rank 0) and then builds the model: a run's
    initial weights are the factory's at that seed."""
    seen = []
    real = MAETask.build_model

    def spy(self):
        model = real(self)
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(MAETask, "build_model", spy)
    cfg = _cfg(tmp_path, max_steps=1)
    pretrain(cfg)
    torch.manual_seed(cfg.seed)
    want = create_model(cfg.model, **_model_kwargs(cfg)).state_dict()
    for k in want:
        assert torch.equal(seen[0][k], want[k]), k


# --- augmentation


def test_transform_is_main_pretrains():
    """RandomResizedCrop(scale (0.2, 1), bicubic) + flip + ToTensor + Normalize on a PIL image, as
    main_pretrain.py builds it, against mae_transform on the same image as a uint8 tensor: the
    same crops and flips from the same RNG, pixels within PIL's uint8 rounding (2 levels)."""
    import numpy as np
    from PIL import Image
    import torchvision.transforms as T

    from mimfast.data.datasets import IMAGENET_MEAN, IMAGENET_STD
    from mimfast.train.pretrain import mae_transform

    official = T.Compose([
        T.RandomResizedCrop(48, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    ours = mae_transform(48)
    rng = np.random.default_rng(0)
    small = Image.fromarray((rng.random((15, 20, 3)) * 255).astype(np.uint8))
    pil = small.resize((120, 90), Image.BICUBIC)  # smooth: resampling differences stay small
    tensor = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).contiguous()
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert tuple(IMAGENET_MEAN) == (0.485, 0.456, 0.406) and tuple(IMAGENET_STD) == (0.229, 0.224, 0.225)
    for seed in range(6):
        torch.manual_seed(seed)
        want = official(pil)
        torch.manual_seed(seed)
        got = ours(tensor)
        assert got.shape == want.shape == (3, 48, 48) and got.dtype == torch.float32
        assert ((got - want).abs() * std * 255).max() <= 2.01, seed


# --- the training loop


def _official_groups(model, weight_decay):
    """timm 0.3.2 add_weight_decay(model, wd) as main_pretrain.py calls it (no skip list):
    no decay for 1-D tensors and biases, decay for the rest (cls and mask tokens included)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(name)
    return no_decay, decay


def test_weight_decay_groups_are_the_officials():
    """timm 0.3.2's add_weight_decay as main_pretrain.py calls it (the official model has no
    no_weight_decay()): the same two groups, cls_token and mask_token decayed."""
    model = mae_vit_tiny_patch16(img_size=32, patch_size=8, depth=1)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups_weight_decay(model, 0.05)
    ours_no_decay = {names[id(p)] for p in groups[0]["params"]}
    ours_decay = {names[id(p)] for p in groups[1]["params"]}
    off_no_decay, off_decay = _official_groups(model, 0.05)
    assert ours_no_decay == set(off_no_decay) and ours_decay == set(off_decay)
    assert {"cls_token", "mask_token"} <= ours_decay
    assert groups[0]["weight_decay"] == 0.0 and groups[1]["weight_decay"] == 0.05


def _official_lr(epoch: float, cfg: PretrainConfig, lr: float) -> float:
    """util/lr_sched.adjust_learning_rate."""
    if epoch < cfg.warmup_epochs:
        return lr * epoch / cfg.warmup_epochs
    return cfg.min_lr + (lr - cfg.min_lr) * 0.5 * (
        1.0 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / (cfg.epochs - cfg.warmup_epochs)))


def test_training_loop_is_engine_pretrains(tmp_path, monkeypatch):
    """pretrain() against engine_pretrain.train_one_epoch replayed on the same batches and mask
    noise: lr = blr * eff_batch / 256, set every accum_iter micro-batches from
    data_iter_step / len(data_loader) + epoch, loss / accum_iter, AdamW (0.9, 0.95) with the
    weight-decay groups, no clipping. 40 images, batch 8: 5 micro-batches an epoch, 2 steps with
    accum_iter 2; the 5th micro-batch makes no step (the official loop zeroes its gradients
    when the next epoch starts), but len(data_loader) = 5 in the LR's epoch fraction."""
    batches = []
    real_loss = MAETask.loss

    def record(self, model, batch):
        (imgs, noise), _ = batch
        batches.append((imgs.clone(), noise.clone()))
        return real_loss(self, model, batch)

    monkeypatch.setattr(MAETask, "loss", record)
    # on the CPU in fp32, like the replay below: the audit is about the loop, and on a GPU machine
    # the device would default to cuda with bf16 autocast (the H200 run compared that with fp32)
    cfg = _cfg(tmp_path, builtin_size=40, accum_iter=2, epochs=3, warmup_epochs=1.5, min_lr=1e-3, blr=2e-2,
               weight_decay=0.05, norm_pix_loss=True, device="cpu", precision="fp32")
    summary = pretrain(cfg)
    assert summary["steps"] == 6 and len(batches) == 12
    got = load_checkpoint(tmp_path / "checkpoint-last.pth")["model"]
    logged_lr = {r["step"]: r["lr"] for r in map(json.loads, open(tmp_path / "log.jsonl"))}

    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, **_model_kwargs(cfg))
    named = dict(model.named_parameters())
    no_decay, decay = _official_groups(model, cfg.weight_decay)
    optimizer = torch.optim.AdamW([{"params": [named[n] for n in no_decay], "weight_decay": 0.0},
                                   {"params": [named[n] for n in decay], "weight_decay": cfg.weight_decay}],
                                  lr=cfg.blr * cfg.batch_size * cfg.accum_iter / 256, betas=(0.9, 0.95))
    lr = optimizer.param_groups[0]["lr"]
    len_loader, accum = 5, cfg.accum_iter
    it = iter(batches)
    step = 0
    for epoch in range(cfg.epochs):
        optimizer.zero_grad()
        for data_iter_step in range(len_loader - 1):  # the 5th would be zeroed unused
            if data_iter_step % accum == 0:
                for g in optimizer.param_groups:
                    g["lr"] = _official_lr(data_iter_step / len_loader + epoch, cfg, lr)
            imgs, noise = next(it)
            loss, _, _ = model(imgs, mask_ratio=cfg.mask_ratio, noise=noise)
            (loss / accum).backward()
            if (data_iter_step + 1) % accum == 0:
                optimizer.step()
                optimizer.zero_grad()
                step += 1
                assert logged_lr[step] == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12), step
    want = model.state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


# --- the command line


def _parse(argv):
    return config_from_args(build_parser().parse_args(["pretrain"] + argv))


def test_main_pretrain_spellings_are_accepted(tmp_path):
    """PRETRAIN.md's command line (less submitit's own flags), plus the other settings of
    main_pretrain.py with a counterpart here."""
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    cfg = _parse(["--batch_size", "64", "--model", "mae_vit_large_patch16", "--norm_pix_loss",
                  "--mask_ratio", "0.6", "--epochs", "800", "--warmup_epochs", "40", "--blr", "1.5e-4",
                  "--weight_decay", "0.03", "--data_path", str(tmp_path / "imagenet"), "--accum_iter", "4",
                  "--input_size", "192", "--min_lr", "1e-6", "--output_dir", str(tmp_path / "out"),
                  "--num_workers", "3", "--seed", "7", "--device", "cpu"])
    assert (cfg.batch_size, cfg.model, cfg.norm_pix_loss, cfg.mask_ratio, cfg.epochs, cfg.warmup_epochs) == (
        64, "mae_vit_large_patch16", True, 0.6, 800, 40)
    assert (cfg.blr, cfg.weight_decay, cfg.accum_iter, cfg.img_size, cfg.min_lr) == (1.5e-4, 0.03, 4, 192, 1e-6)
    assert cfg.data == str(tmp_path / "imagenet" / "train")  # main_pretrain.py reads DATA_PATH/train
    assert (cfg.output_dir, cfg.num_workers, cfg.seed, cfg.device) == (str(tmp_path / "out"), 3, 7, "cpu")
    assert _parse(["--lr", "2e-3", "--input-size", "96"]).lr == 2e-3
    assert not _parse(["--norm-pix-loss", "--no-norm-pix-loss"]).norm_pix_loss  # our spellings still work
    # torch.distributed.launch appends --local-rank (its value also sits in LOCAL_RANK): accepted, not a setting
    assert _parse(["--local-rank=1", "--blr", "1e-3"]).blr == _parse(["--local_rank", "0", "--blr", "1e-3"]).blr == 1e-3
    with pytest.raises(SystemExit, match="not both"):
        _parse(["--data", str(tmp_path), "--data_path", str(tmp_path / "imagenet")])
    with pytest.raises(SystemExit, match="does not exist"):  # no train/ under it
        _parse(["--data_path", str(tmp_path / "out")])


# --- official checkpoints


def _official_checkpoint(path, model) -> None:
    """What util/misc.save_model writes: model, optimizer, epoch, scaler and the argparse args."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 19,
                "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
                "args": argparse.Namespace(model="mae_vit_tiny_patch16", blr=1e-3, output_dir="./output_dir")},
               path)


def test_official_checkpoint_starts_a_run_and_is_refused_by_resume(tmp_path, capsys):
    cfg = _cfg(tmp_path / "run", max_steps=1, lr=0.0)  # lr 0: the weights stay as loaded
    torch.manual_seed(123)  # other weights than the run's own seed gives
    official = create_model(cfg.model, **_model_kwargs(cfg))
    ckpt = tmp_path / "checkpoint-19.pth"
    _official_checkpoint(ckpt, official)
    pretrain(_cfg(tmp_path / "run", max_steps=1, lr=0.0, init_from=str(ckpt)))
    assert "missing 0, unexpected 0" in capsys.readouterr().out
    after = load_checkpoint(tmp_path / "run" / "checkpoint-last.pth")["model"]
    for k, v in official.state_dict().items():
        assert torch.equal(after[k], v), k
    # --resume wants a mimfast checkpoint (sampler position, RNG states): a clear pointer instead
    # of the safe unpickler's error about argparse.Namespace or a KeyError
    with pytest.raises(SystemExit, match="--init-from"):
        pretrain(_cfg(tmp_path / "again", resume=str(ckpt)))
    torch.save({"model": official.state_dict()}, tmp_path / "weights.pth")
    with pytest.raises(SystemExit, match="no optimizer, scaler, epoch, step"):
        pretrain(_cfg(tmp_path / "again", resume=str(tmp_path / "weights.pth")))


def test_naming_a_dataset_gets_the_recipe_not_the_quickstart_preset(tmp_path, monkeypatch):
    """`mimfast pretrain` alone is the quickstart (a small preset on the built-in data); with a
    dataset named, as a main_pretrain.py user would, it is the MAE recipe at 224 px."""
    import mimfast.cli as cli
    import mimfast.train.pretrain as tp

    seen = []
    monkeypatch.setattr(tp, "pretrain", lambda cfg: seen.append(cfg) or {"status": "done"})
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    assert cli.main(["pretrain"]) == 0
    assert seen[-1].preset in ("tiny", "small") and seen[-1].data == "builtin"
    for argv in (["--data", str(tmp_path / "imagenet" / "train")], ["--data_path", str(tmp_path / "imagenet")]):
        assert cli.main(["pretrain", *argv]) == 0
        cfg = seen[-1]
        assert cfg.preset is None and cfg.model == "mae_vit_base_patch16"
        assert cfg.img_size is None  # the model's own, 224
        assert cfg.data == str(tmp_path / "imagenet" / "train")
