"""``mimfast linprobe``: linear probing of a pretrained MAE (or BEiT) encoder on frozen features.

The protocol of facebookresearch/mae ``main_linprobe.py``: the encoder is frozen; a
``BatchNorm1d(D, affine=False, eps=1e-6)`` then ``Linear(D, num_classes)`` (weight
``trunc_normal(std=0.01)``, bias 0) is trained with cross-entropy, no weight decay, lr = blr
(0.1) x batch / 256 with a linear warm-up and a half-cycle cosine per iteration, 90 epochs.

Optimizer. The paper uses LARS (``optimizer="lars"``, :class:`LARS`, momentum 0.9, trust
coefficient 0.001) at batch 16384, i.e. lr 6.4. The default here is SGD with momentum 0.9 at the
same blr, because the probes this tool is mostly run on are small (thousands of images, batch
256): LARS changes a weight matrix by at most ~lr x 1e-3 of its norm per step, which at lr 0.1
and a few hundred steps barely moves the head (measured on the built-in data: LARS 13% top-1,
near chance, where SGD reaches 21% on the same features; with blr 50 LARS catches up). For the
paper's protocol pass ``--optimizer lars --batch-size 16384``.

Differences from the paper's recipe, to make it fast (a CPU handles the small presets):
- Features are computed once, with no augmentation (the paper re-augments with
  RandomResizedCrop + flip every epoch), so the encoder runs once per image, not per epoch.
- ``pool="mean"`` averages the patch tokens of ``forward_features`` (after MAE's final norm);
  MAE's global-pool probe averages the tokens before the norm and then applies a fresh
  LayerNorm. The BatchNorm that follows absorbs most of the difference. ``pool="cls"`` (the
  default, as in MAE) is exactly the paper's.
- BEiT encoders are probed the same way, on the last block's output after the final norm; the
  BEiT paper probes an intermediate block (the 9th of ViT-B) with mean pooling, which gives it
  a higher number.

Data: ``"builtin"`` (:class:`mimfast.data.builtin.ShapesDataset`, 8 classes) trains on images
``[0, num_train)`` and reports top-1 on images ``[1_000_000, 1_000_000 + num_val)`` of the same
seed, which no pretraining run on fewer than a million built-in images has seen. A folder is
either ``FOLDER/train`` + ``FOLDER/val`` ImageFolder trees, or one ImageFolder tree split at
random (``val_fraction``, seeded). Images are resized (bicubic) to img_size x 256/224 and
centre-cropped, as the paper's evaluation transform, then normalised with ImageNet's mean/std.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from mimfast.data.builtin import ShapesDataset
from mimfast.data.datasets import IMAGENET_MEAN, IMAGENET_STD, ImageFiles
from mimfast.train.schedule import lr_at

__all__ = ["LARS", "LinprobeConfig", "extract_features", "train_linear_probe", "build_probe_datasets",
           "linprobe"]

BUILTIN_VAL_OFFSET = 1_000_000


class LARS(torch.optim.Optimizer):
    """LARS as in facebookresearch/mae ``util/lars.py`` (after SimCLR/MoCo v3): for weight
    matrices (ndim > 1) the update ``g + wd * p`` is rescaled to ``trust_coefficient *
    ||p|| / ||g + wd * p||`` of its norm (1 where either norm is 0); biases and other 1-D
    parameters get neither weight decay nor rescaling. Then heavy-ball momentum
    ``mu = momentum * mu + update; p -= lr * mu``."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(f"LARS: bad hyper-parameters lr={lr}, weight_decay={weight_decay}, "
                             f"momentum={momentum}, trust_coefficient={trust_coefficient}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, g["trust_coefficient"] * param_norm / update_norm,
                                                one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])
        return loss


@dataclass
class LinprobeConfig:
    data: str = "builtin"  # builtin or a folder
    pool: str = "cls"  # cls | mean
    epochs: int = 90
    warmup_epochs: float = 10
    batch_size: int = 256
    optimizer: str = "sgd"  # sgd | lars (the paper's, for batch 16384)
    blr: float = 0.1  # lr = blr * batch_size / 256
    lr: float | None = None  # absolute lr; overrides blr
    min_lr: float = 0.0
    weight_decay: float = 0.0
    builtin_train: int = 4096
    builtin_val: int = 1024
    val_fraction: float = 0.2  # for a single ImageFolder tree
    feature_batch_size: int = 128
    num_workers: int | None = None
    seed: int = 0
    device: str = "auto"  # auto | cuda | cpu
    kernels: str = "auto"
    output_json: str | None = None

    def check(self) -> None:
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
        if self.optimizer not in ("lars", "sgd"):
            raise ValueError(f"optimizer must be 'lars' or 'sgd', got {self.optimizer!r}")
        for name in ("epochs", "batch_size", "builtin_train", "builtin_val", "feature_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {self.device!r}")
        if self.data != "builtin" and not Path(self.data).is_dir():
            raise FileNotFoundError(f"data folder {self.data!r} does not exist")


def eval_transform(img_size: int, resize: bool = True):
    """The paper's evaluation transform: resize to img_size x 256/224 (bicubic), centre crop,
    ImageNet normalisation. Input (3, H, W) uint8, output (3, img_size, img_size) float32."""
    from torchvision.transforms import v2

    steps = []
    if resize:
        steps += [v2.Resize(int(round(img_size * 256 / 224)), interpolation=v2.InterpolationMode.BICUBIC,
                            antialias=True), v2.CenterCrop(img_size)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


class _Transformed(Dataset):
    def __init__(self, dataset: Dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        img, label = self.dataset[index]
        return self.transform(img), label


def build_probe_datasets(cfg: LinprobeConfig, img_size: int) -> tuple[Dataset, Dataset, int]:
    """(train, val, num_classes) with the evaluation transform applied."""
    if cfg.data == "builtin":
        tf = eval_transform(img_size, resize=False)  # drawn at the model's size
        train = ShapesDataset(cfg.builtin_train, img_size=img_size, seed=cfg.seed, transform=tf)
        val_all = ShapesDataset(BUILTIN_VAL_OFFSET + cfg.builtin_val, img_size=img_size, seed=cfg.seed, transform=tf)
        val = Subset(val_all, range(BUILTIN_VAL_OFFSET, BUILTIN_VAL_OFFSET + cfg.builtin_val))
        return train, val, len(ShapesDataset.classes)
    tf = eval_transform(img_size)
    root = Path(cfg.data)
    if (root / "train").is_dir() and (root / "val").is_dir():
        train, val = ImageFiles(root / "train"), ImageFiles(root / "val")
        if train.classes != val.classes:
            raise ValueError(f"{root}/train and {root}/val have different class folders")
    else:
        train = val = ImageFiles(root)
    if not train.classes:
        raise ValueError(f"{root}: a linear probe needs labels, i.e. class sub-folders (ImageFolder layout)")
    if train is val:  # one tree: a seeded random split
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        n_val = max(1, int(round(len(order) * cfg.val_fraction)))
        if n_val >= len(order):
            raise ValueError(f"{root}: {len(order)} images are too few to hold out {cfg.val_fraction:.0%}")
        train, val = Subset(train, order[n_val:]), Subset(val, order[:n_val])
        num_classes = len(train.dataset.classes)
    else:
        num_classes = len(train.classes)
    return _Transformed(train, tf), _Transformed(val, tf), num_classes


@torch.no_grad()
def extract_features(model: nn.Module, dataset: Dataset, pool: str = "cls", batch_size: int = 128,
                     device: torch.device | str = "cpu", num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features of every image: (N, D) float32 on the CPU, labels (N,) int64.

    ``model.forward_features(imgs)`` gives (N, 1 + L, D) after the final norm (BEiT's is called
    with nothing masked); ``pool="cls"`` takes row 0, ``"mean"`` averages rows 1..L. bf16
    autocast on CUDA."""
    if pool not in ("cls", "mean"):
        raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    beit = "bool_masked_pos" in inspect.signature(model.forward_features).parameters
    feats, labels = [], []
    for imgs, y in loader:
        imgs = imgs.to(device, non_blocking=True)
        with autocast:
            if beit:  # BEiT's encoder takes a mask: nothing masked
                no_mask = torch.zeros(imgs.shape[0], model.patch_embed.num_patches, dtype=torch.bool, device=device)
                x = model.forward_features(imgs, no_mask)  # (B, 1 + L, D)
            else:
                x = model.forward_features(imgs)  # (B, 1 + L, D)
        f = x[:, 0] if pool == "cls" else x[:, 1:].mean(dim=1)  # (B, D)
        feats.append(f.float().cpu())
        labels.append(torch.as_tensor(y, dtype=torch.int64))
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices  # (N, k)
    return (top == labels[:, None]).any(dim=1).float().mean().item()


def train_linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                       val_labels: torch.Tensor, num_classes: int, cfg: LinprobeConfig | None = None,
                       device: torch.device | str = "cpu") -> dict:
    """Train BatchNorm1d(affine=False) + Linear on (N, D) features; returns top-1/top-5 on
    the validation features, train top-1, the lr used and the trained head."""
    cfg = cfg or LinprobeConfig()
    if train_feats.dim() != 2 or val_feats.dim() != 2 or train_feats.shape[1] != val_feats.shape[1]:
        raise ValueError(f"features must be (N, D) with one D, got {tuple(train_feats.shape)} and "
                         f"{tuple(val_feats.shape)}")
    if train_feats.shape[0] < 2:
        raise ValueError(f"need at least 2 training samples, got {train_feats.shape[0]}")
    labels_seen = torch.cat([train_labels, val_labels])
    if labels_seen.min() < 0 or labels_seen.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), got [{labels_seen.min()}, {labels_seen.max()}]")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    n, dim = train_feats.shape
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    with torch.no_grad():
        w = torch.empty(num_classes, dim)
        nn.init.trunc_normal_(w, std=0.01, generator=gen)
        head[1].weight.copy_(w)
        head[1].bias.zero_()
    head.to(device)
    batch = min(cfg.batch_size, n)
    lr = cfg.lr if cfg.lr is not None else cfg.blr * batch / 256
    if cfg.optimizer == "lars":
        optimizer = LARS(head.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)
    steps_per_epoch = n // batch  # the last partial batch is dropped (BatchNorm wants > 1 sample)
    xs, ys = train_feats.to(device), train_labels.to(device)
    criterion = nn.CrossEntropyLoss()
    head.train()
    loss = torch.zeros(())
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=gen).to(device)
        for i in range(steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch + i / steps_per_epoch, lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
            idx = order[i * batch:(i + 1) * batch]
            loss = criterion(head(xs[idx]), ys[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    head.eval()
    with torch.no_grad():
        train_logits = head(xs)
        val_logits = head(val_feats.to(device))
    vy = val_labels.to(device)
    return {
        "top1": _accuracy(val_logits, vy, 1),
        "top5": _accuracy(val_logits, vy, 5),
        "train_top1": _accuracy(train_logits, ys, 1),
        "final_loss": float(loss.detach()),
        "lr": lr,
        "steps": steps_per_epoch * cfg.epochs,
        "head": head.cpu(),
    }


def _device(pref: str) -> torch.device:
    if pref == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    use_cuda = torch.cuda.is_available() if pref == "auto" else pref == "cuda"
    return torch.device("cuda" if use_cuda else "cpu")


def linprobe(source: nn.Module | str | os.PathLike, cfg: LinprobeConfig | None = None,
             model_name: str | None = None, verbose: bool = True) -> dict:
    """Linear-probe an MAE: ``source`` is a model or a checkpoint path (mimfast or official;
    the model comes from the checkpoint's config, else ``model_name``). Returns the result
    (top-1 on the held-out split and the settings), written to ``cfg.output_json`` if set."""
    from mimfast.train.pretrained import load_pretrained_model

    cfg = cfg or LinprobeConfig()
    cfg.check()
    device = _device(cfg.device)
    if isinstance(source, nn.Module):
        model = source.to(device)
    else:
        model = load_pretrained_model(source, model_name, kernels=cfg.kernels, device=device)
    img_size = model.patch_embed.img_size[0]
    train_set, val_set, num_classes = build_probe_datasets(cfg, img_size)
    workers = cfg.num_workers if cfg.num_workers is not None else min(8, max(0, (os.cpu_count() or 2) // 2))

    t0 = time.time()
    kw = dict(pool=cfg.pool, batch_size=cfg.feature_batch_size, device=device, num_workers=workers)
    train_feats, train_labels = extract_features(model, train_set, **kw)
    val_feats, val_labels = extract_features(model, val_set, **kw)
    t_features = time.time() - t0
    if verbose:
        print(f"features: {len(train_feats)} train, {len(val_feats)} val, dim {train_feats.shape[1]}, "
              f"pool {cfg.pool} ({t_features:.1f} s)")
    t0 = time.time()
    result = train_linear_probe(train_feats, train_labels, val_feats, val_labels, num_classes, cfg, device)
    head = result.pop("head")
    result.update(num_train=len(train_feats), num_val=len(val_feats), num_classes=num_classes,
                  feature_dim=int(train_feats.shape[1]), time_features_s=t_features,
                  time_train_s=time.time() - t0, source=str(source) if not isinstance(source, nn.Module) else None,
                  config=asdict(cfg))
    if verbose:
        print(f"linear probe ({cfg.optimizer}, lr {result['lr']:.4g}, {result['steps']} steps): "
              f"top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  "
              f"(train top-1 {100 * result['train_top1']:.2f}%)")
    if cfg.output_json:
        path = Path(cfg.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    result["head"] = head
    return result


def add_linprobe_command(sub) -> None:
    """``mimfast linprobe CHECKPOINT [--model NAME] [--data builtin|FOLDER] [--pool cls|mean] ...``."""
    import argparse
    import dataclasses

    p = sub.add_parser("linprobe", help="linear probe (BatchNorm + Linear on frozen features) of a pretrained "
                                        "MAE encoder; reports top-1",
                       argument_default=argparse.SUPPRESS)
    p.add_argument("checkpoint", help="mimfast, official MAE / BEiT, SimMIM or MMPretrain checkpoint, .safetensors, "
                                      "or a Hugging Face model folder (ViTMAE / BEiT with --model; ViT-MIM as it is)")
    p.add_argument("--model", default=None, help="model name (default: the checkpoint's config)")
    choices = {"pool": ("cls", "mean"), "optimizer": ("lars", "sgd"), "device": ("auto", "cuda", "cpu"),
               "kernels": ("auto", "eager", "triton")}
    types = {"int": int, "float": float, "int | None": int, "float | None": float}
    for f in dataclasses.fields(LinprobeConfig):
        kw = dict(dest=f.name, type=types.get(str(f.type), str), help=f"default: {f.default}")
        if f.name in choices:
            kw["choices"] = choices[f.name]
        p.add_argument("--" + f.name.replace("_", "-"), **kw)
    p.set_defaults(func=_cmd_linprobe)


def _cmd_linprobe(args) -> int:
    import dataclasses

    names = {f.name for f in dataclasses.fields(LinprobeConfig)}
    cfg = LinprobeConfig(**{k: v for k, v in vars(args).items() if k in names})
    if not Path(args.checkpoint).exists():  # a file, or a Hugging Face model folder
        raise SystemExit(f"checkpoint {args.checkpoint!r} does not exist")
    try:
        cfg.check()
        linprobe(args.checkpoint, cfg, model_name=args.model)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"mimfast linprobe: {e}")
    return 0
