"""``mimfast tokenizer train``: train a VQ tokenizer (:class:`mimfast.models.tokenizer.VQTokenizer`)
for BEiT on the built-in dataset or an image folder, with progress, resumable checkpoints,
a codebook-usage report and a reconstruction picture; ``mimfast tokenizer convert``: DALL-E's
encoder weights (the official ``encoder.pkl``, MMPretrain's ``dalle_encoder.pth``, or the target
generator inside an MMPretrain BEiT v1 checkpoint) to safetensors (:func:`convert_dalle_weights`).

Train at the resolution of BEiT's tokenizer view: the model's patch grid times the
tokenizer's downsampling (112 for 224-px BEiT with patch 16 and downsample 8; 64 for the
``beit-tiny`` preset: 64 px, patch 8). Outputs in ``--output-dir``: ``tokenizer.safetensors``
(use it as ``mimfast pretrain --method beit --tokenizer vq:PATH``), ``checkpoint-last.pth``,
``usage.json``, ``reconstruction.png``, ``log.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from mimfast.data.datasets import build_dataset
from mimfast.data.sampler import ResumableSampler
from mimfast.models.dalle import map_pixels, unmap_pixels
from mimfast.models.tokenizer import VQTokenizer, save_vq_tokenizer
from mimfast.train.checkpoint import (dataset_change_notice, load_checkpoint, read_foreign_checkpoint, resolve_resume,
                                      save_checkpoint)
from mimfast.train.progress import Progress
from mimfast.train.visualize import save_png

__all__ = ["TokenizerTrainConfig", "train_tokenizer", "codebook_usage", "token_colors", "build_train_parser",
           "config_from_args", "add_tokenizer_command", "convert_dalle_weights"]


@dataclass
class TokenizerTrainConfig:
    # data
    data: str = "builtin"  # builtin or a folder (ImageFolder tree or flat folder)
    builtin_size: int = 4096
    builtin_resolution: int | None = None  # drawing resolution of the built-in images (default img_size)
    img_size: int = 112  # tokenizer view side: BEiT's patch grid x downsample
    min_crop_scale: float = 0.08  # RandomResizedCrop scale (min, 1), as BEiT's views
    num_workers: int | None = None
    # model
    vocab_size: int = 1024
    embed_dim: int = 32
    hidden: int = 128
    downsample: int = 8
    beta: float = 0.25
    decay: float = 0.99
    # optimisation
    batch_size: int = 64
    steps: int = 5000
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    # bookkeeping
    output_dir: str = "output/tokenizer"
    save_every: int = 1000  # steps between checkpoints (and usage reports)
    log_every: int = 20
    eval_images: int = 512  # fixed images (the dataset's last, not augmented) for the usage report
    resume: str | None = None  # a checkpoint path or "auto"
    seed: int = 0
    device: str = "auto"  # auto | cuda | cpu


_CHOICES = {"precision": ("auto", "bf16", "fp32"), "device": ("auto", "cuda", "cpu")}


def build_train_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="mimfast tokenizer train")
    for f in dataclasses.fields(TokenizerTrainConfig):
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=f"(default {f.default})")
        if f.name in _CHOICES:
            kw["choices"] = _CHOICES[f.name]
        typ = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
        parser.add_argument("--" + f.name.replace("_", "-"), type=typ, **kw)
    return parser


def config_from_args(args: argparse.Namespace) -> TokenizerTrainConfig:
    known = {f.name for f in dataclasses.fields(TokenizerTrainConfig)}
    cfg = TokenizerTrainConfig(**{k: v for k, v in vars(args).items() if k in known})
    validate(cfg)
    return cfg


def validate(cfg: TokenizerTrainConfig) -> None:
    problems = []
    for name in ("img_size", "vocab_size", "embed_dim", "hidden", "batch_size", "steps", "eval_images"):
        if getattr(cfg, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.downsample not in (2, 4, 8, 16):
        problems.append(f"--downsample must be 2, 4, 8 or 16, got {cfg.downsample}")
    elif cfg.img_size % cfg.downsample:
        problems.append(f"--img-size {cfg.img_size} is not a multiple of --downsample {cfg.downsample}")
    if not 0 < cfg.min_crop_scale <= 1:
        problems.append(f"--min-crop-scale must be in (0, 1], got {cfg.min_crop_scale}")
    if cfg.data != "builtin" and not Path(cfg.data).is_dir():
        problems.append(f"--data folder {cfg.data!r} does not exist (or use --data builtin)")
    if cfg.save_every < 0:
        problems.append(f"--save-every must be >= 0, got {cfg.save_every}")
    if problems:
        raise SystemExit("invalid tokenizer configuration:\n  " + "\n  ".join(problems))


def _train_transform(img_size: int, min_scale: float):
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomResizedCrop(img_size, scale=(min_scale, 1.0), interpolation=v2.InterpolationMode.BICUBIC,
                             antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        _map_pixels,
    ])


def _map_pixels(x: torch.Tensor) -> torch.Tensor:
    return map_pixels(x.clamp(0, 1))


def _eval_transform(img_size: int):
    from torchvision.transforms import v2

    return v2.Compose([
        v2.Resize(img_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(img_size),
        v2.ToDtype(torch.float32, scale=True),
        _map_pixels,
    ])


def _lr_at(step: int, cfg: TokenizerTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def codebook_usage(model, images: torch.Tensor, batch_size: int = 64) -> dict:
    """Token statistics over ``images`` (M, 3, S, S) in map_pixels range: codes used, perplexity
    of the token distribution, the most used code's share, and the reconstruction MSE."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(model.vocab_size, dtype=torch.float64)
    sq_err, n = 0.0, 0
    try:
        for i in range(0, images.shape[0], batch_size):
            x = images[i:i + batch_size]
            out = model(x)
            counts += torch.bincount(out["ids"].flatten().cpu(), minlength=model.vocab_size).double()
            sq_err += out["rec_loss"].item() * x.shape[0]
            n += x.shape[0]
    finally:
        model.train(was_training)
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {"codes_used": int((counts > 0).sum()), "vocab_size": model.vocab_size,
            "perplexity": round(math.exp(entropy), 2), "top_code_share": round(p.max().item(), 4),
            "rec_mse": sq_err / max(n, 1), "images": n}


def token_colors(ids: torch.Tensor, size: int) -> torch.Tensor:
    """(N, h, w) ids -> (N, 3, size, size) uint8 picture, one fixed pseudo-random colour per id."""
    h = (ids.long().cpu() * 2654435761) % (2**32)  # Knuth's multiplicative hash
    rgb = torch.stack([(h >> 8) & 255, (h >> 16) & 255, (h >> 24) & 255], dim=1)  # (N, 3, h, w)
    img = (40 + rgb * 215 // 255).float()
    return torch.nn.functional.interpolate(img, size=(size, size), mode="nearest").byte()


@torch.no_grad()
def _reconstruction_png(model, images: torch.Tensor, path: Path, gap: int = 2) -> Path:
    """Rows: original | reconstruction | token map."""
    was_training = model.training
    model.eval()
    try:
        out = model(images)
    finally:
        model.train(was_training)
    S = images.shape[-1]
    to_u8 = lambda x: (unmap_pixels(x.float()).cpu() * 255).round().byte()  # noqa: E731
    panels = [to_u8(images), to_u8(out["recon"]), token_colors(out["ids"], S)]
    N = images.shape[0]
    grid = np.full((N * (S + gap) - gap, len(panels) * (S + gap) - gap, 3), 255, np.uint8)
    for n in range(N):
        for j, panel in enumerate(panels):
            grid[n * (S + gap): n * (S + gap) + S, j * (S + gap): j * (S + gap) + S] = \
                panel[n].permute(1, 2, 0).numpy()
    return save_png(grid, path, scale=max(1, 96 // S))


def _report(usage: dict, step: int) -> str:
    return (f"codebook at step {step}: {usage['codes_used']}/{usage['vocab_size']} codes used on "
            f"{usage['images']} fixed images, perplexity {usage['perplexity']:.1f}, most used code "
            f"{100 * usage['top_code_share']:.1f}% of tokens; reconstruction MSE {usage['rec_mse']:.5f}")


def train_tokenizer(cfg: TokenizerTrainConfig) -> dict:
    """Train a VQ tokenizer; returns a summary (steps, usage, reconstruction error before/after)."""
    validate(cfg)
    use_cuda = torch.cuda.is_available() if cfg.device == "auto" else cfg.device == "cuda"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if use_cuda else "cpu")
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if use_cuda else "fp32")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))

    torch.manual_seed(cfg.seed)
    model = VQTokenizer(vocab_size=cfg.vocab_size, embed_dim=cfg.embed_dim, hidden=cfg.hidden,
                        downsample=cfg.downsample, beta=cfg.beta, decay=cfg.decay).to(device)
    dataset = build_dataset(cfg.data, cfg.img_size, _train_transform(cfg.img_size, cfg.min_crop_scale), seed=cfg.seed,
                            builtin_size=cfg.builtin_size, builtin_resolution=cfg.builtin_resolution)
    if len(dataset) < cfg.batch_size:
        raise SystemExit(f"the dataset has {len(dataset)} images, fewer than one batch ({cfg.batch_size})")
    # fixed images for the report: the dataset's last ones, without augmentation
    eval_tf = _eval_transform(cfg.img_size)
    n_eval = min(cfg.eval_images, len(dataset))
    eval_imgs = torch.stack([eval_tf(dataset.dataset[len(dataset) - 1 - i][0]) for i in range(n_eval)]).to(device)

    sampler = ResumableSampler(len(dataset), seed=cfg.seed, with_epoch=True)
    workers = cfg.num_workers if cfg.num_workers is not None else min(8, max(1, (os.cpu_count() or 2) // 2))
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, num_workers=workers,
                        pin_memory=use_cuda, persistent_workers=workers > 0)
    iters_per_epoch = len(dataset) // cfg.batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    step, epoch, start_in_epoch = 0, 0, 0
    resume = resolve_resume(cfg.resume, out)
    if resume:
        ckpt = load_checkpoint(resume, map_location="cpu")  # the RNG states must stay CPU tensors
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, epoch, start_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["sample_in_epoch"]
        if "global_sample_in_epoch" in ckpt and ckpt.get("batch_size") != cfg.batch_size:
            # another batch size: the same epoch position, rounded down to a batch (one process,
            # so the global position is this process's); the schedule and the end go by step
            position = ckpt["global_sample_in_epoch"]
            start_in_epoch = sampler.start_for(position, multiple=cfg.batch_size)
            again = position - start_in_epoch
            if start_in_epoch // cfg.batch_size >= iters_per_epoch:  # the rest holds no whole batch
                epoch, start_in_epoch, again = epoch + 1, 0, 0
            print(f"resume: the checkpoint was saved with batch {ckpt['batch_size']} and this run has batch "
                  f"{cfg.batch_size}: the epoch position is kept ({position} samples consumed), so the resume is "
                  f"position-exact but not bit-exact (batches are composed differently); it starts epoch {epoch} "
                  f"at sample {start_in_epoch}" + (f", rounded down to a batch: {again} samples are seen again"
                                                   if again else ""))
        torch.random.set_rng_state(ckpt["rng"]["torch"])
        if use_cuda and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        changed = dataset_change_notice(ckpt, len(dataset))
        if changed:
            print(changed)
        print(f"resumed from {resume} at step {step}")
    usage_start = codebook_usage(model, eval_imgs)

    def save(sample_in_epoch: int, ep: int) -> dict:
        rng = {"torch": torch.random.get_rng_state()}
        if use_cuda:
            rng["cuda"] = torch.cuda.get_rng_state()
        state = {"model": model.state_dict(), "model_config": model.config, "optimizer": optimizer.state_dict(),
                 "step": step, "epoch": ep, "sample_in_epoch": sample_in_epoch,
                 "global_sample_in_epoch": sampler.position(sample_in_epoch), "world_size": 1,
                 "batch_size": cfg.batch_size, "rng": rng, "dataset_size": len(dataset),
                 "config": dataclasses.asdict(cfg)}
        save_checkpoint(state, out / "checkpoint-last.pth")
        save_vq_tokenizer(model, out / "tokenizer.safetensors")
        usage = codebook_usage(model, eval_imgs)
        (out / "usage.json").write_text(json.dumps({"step": step, **usage}, indent=1))
        _reconstruction_png(model, eval_imgs[:8], out / "reconstruction.png")
        print(_report(usage, step))
        return usage

    print(f"mimfast tokenizer train: VQ {cfg.vocab_size} codes x {cfg.embed_dim}, {cfg.img_size}px -> "
          f"{cfg.img_size // cfg.downsample}x{cfg.img_size // cfg.downsample} tokens, data {cfg.data} "
          f"({len(dataset)} images), device {device}, {precision}, {cfg.steps} steps; {_report(usage_start, step)}")
    log_file = open(out / "log.jsonl", "a")
    progress = Progress(cfg.steps, start_step=step, every=cfg.log_every)
    t_start = time.time()
    first_rec = last_rec = None
    usage = usage_start
    model.train()
    while step < cfg.steps:
        sampler.set_epoch(epoch, start_in_epoch)
        data_iter = start_in_epoch // cfg.batch_size
        for x, _ in loader:
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, cfg)
            x = x.to(device, non_blocking=True)
            with autocast():
                res = model(x)
            optimizer.zero_grad(set_to_none=True)
            res["loss"].backward()
            optimizer.step()
            step += 1
            data_iter += 1
            rec = res["rec_loss"].item()
            first_rec = rec if first_rec is None else first_rec
            last_rec = rec
            if step % cfg.log_every == 0 or step == cfg.steps:
                batch_codes = int(res["ids"].unique().numel())
                imgs_s = (step - progress.start_step) * cfg.batch_size / max(time.time() - t_start, 1e-9)
                progress.update(step, rec=rec, commit=res["commit_loss"].item(), codes=batch_codes,
                                lr=optimizer.param_groups[0]["lr"], img_s=round(imgs_s, 1))
                log_file.write(json.dumps({"step": step, "rec_loss": rec, "commit_loss": res["commit_loss"].item(),
                                           "batch_codes": batch_codes, "lr": optimizer.param_groups[0]["lr"],
                                           "images_per_s": imgs_s}) + "\n")
                log_file.flush()
            ended = data_iter >= iters_per_epoch
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                usage = save(0 if ended else data_iter * cfg.batch_size, epoch + 1 if ended else epoch)
            if step >= cfg.steps or ended:
                break
        if data_iter >= iters_per_epoch:
            epoch, start_in_epoch = epoch + 1, 0
        else:
            start_in_epoch = data_iter * cfg.batch_size
    progress.close()
    log_file.close()
    usage = save(start_in_epoch, epoch)
    summary = {"steps": step, "first_rec_loss": first_rec, "last_rec_loss": last_rec,
               "eval_rec_mse_start": usage_start["rec_mse"], "eval_rec_mse_end": usage["rec_mse"],
               "codes_used": usage["codes_used"], "perplexity": usage["perplexity"],
               "seconds": round(time.time() - t_start, 1), "tokenizer": str(out / "tokenizer.safetensors")}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"done: {step} steps in {summary['seconds']}s; use it with "
          f"`mimfast pretrain --method beit --tokenizer vq:{out / 'tokenizer.safetensors'}`")
    return summary


def _cmd_train(args: argparse.Namespace) -> int:
    train_tokenizer(config_from_args(args))
    return 0


def convert_dalle_weights(src: str | os.PathLike, out: str | os.PathLike) -> tuple[dict, str]:
    """Write a DALL-E encoder's weights as the safetensors ``--tokenizer dalle:PATH`` reads;
    returns (DalleEncoder config, what ``src`` was). ``src``:

    * openai/DALL-E's ``encoder.pkl`` (a pickled module, which ``weights_only`` refuses: read
      through :func:`mimfast.models.dalle.convert_dalle_pickle`'s restricted unpickler);
    * MMPretrain's ``dalle_encoder.pth`` (its ``DALLEEncoder``'s state_dict, bare or in
      ``{'state_dict': ...}``) or an MMPretrain BEiT v1 checkpoint (mmengine's file: the
      ``target_generator.*`` weights), both read with ``weights_only=True``
      (:func:`mimfast.train.checkpoint.read_foreign_checkpoint`) and mapped by
      :func:`mimfast.models.mmpretrain.dalle_from_mmpretrain` (the names are DALL-E's)."""
    from safetensors.torch import save_file

    from mimfast.models.dalle import DalleEncoder, convert_dalle_pickle, dalle_config_from_state_dict
    from mimfast.models.mmpretrain import dalle_from_mmpretrain

    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"DALL-E encoder weights {str(src)!r} do not exist")
    try:
        obj = read_foreign_checkpoint(src)
    except Exception as e:  # a pickled module (the official encoder.pkl): only the restricted unpickler reads it
        try:
            return convert_dalle_pickle(src, out), "openai/DALL-E encoder.pkl"
        except (ValueError, pickle.UnpicklingError) as e_pickle:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"{src}: neither a weights file torch.load(weights_only=True) reads ({first}) nor a "
                             f"pickled DALL-E encoder ({e_pickle})") from None
    what = "a DALL-E encoder state_dict"
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{src}: neither a pickled DALL-E encoder nor a state_dict (or a checkpoint with one)")
    if any(k.startswith("target_generator.") for k in obj):
        what = "the DALL-E target generator of an MMPretrain checkpoint"
    try:
        state_dict = dalle_from_mmpretrain(obj)
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None
    config = dalle_config_from_state_dict(state_dict)
    DalleEncoder(**config).load_state_dict(state_dict, strict=True)  # proves the keys and shapes
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous().clone() for k, v in state_dict.items()}, str(out),
              metadata={"format": "pt", "mimfast_tokenizer": "dalle"})
    return config, what


def _cmd_convert(args: argparse.Namespace) -> int:
    try:
        config, what = convert_dalle_weights(args.pickle, args.out)
    except (ValueError, FileNotFoundError, RuntimeError, pickle.UnpicklingError) as e:
        raise SystemExit(f"mimfast tokenizer convert: {e}") from None
    print(f"wrote {args.out}: DALL-E encoder ({what}), {config['vocab_size']} tokens, width {config['n_hid']}, "
          f"{config['group_count']} groups x {config['n_blk_per_group']} blocks; use it with "
          f"`mimfast pretrain --method beit --tokenizer dalle:{args.out}`")
    return 0


def add_tokenizer_command(sub) -> None:
    """``mimfast tokenizer {train,convert}`` on the main parser's subcommands."""
    p = sub.add_parser("tokenizer", help="BEiT visual tokenizers: train a VQ tokenizer, convert DALL-E weights")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a VQ tokenizer on the built-in dataset or an image folder",
                        argument_default=argparse.SUPPRESS)
    build_train_parser(t)
    t.set_defaults(func=_cmd_train)
    c = tsub.add_parser("convert", help="DALL-E encoder weights -> safetensors: the official encoder.pkl (read "
                                        "once, restricted), MMPretrain's dalle_encoder.pth or BEiT v1 checkpoint")
    c.add_argument("pickle", metavar="weights", help="the official encoder.pkl, MMPretrain's dalle_encoder.pth, or an "
                   "MMPretrain BEiT v1 checkpoint (its DALL-E target generator)")
    c.add_argument("out", help="output .safetensors path")
    c.set_defaults(func=_cmd_convert)
