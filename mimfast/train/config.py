"""Pretraining configuration: the papers' recipes as defaults, a small-data preset, the model an
``--init-from`` file holds (when the run names none), a YAML file, and command-line flags,
applied in that order (later wins).

A recipe is one paper's official run: ``mae`` (facebookresearch/mae ``main_pretrain.py``),
``beit`` (microsoft/unilm BEiT) and ``simmim`` (microsoft/SimMIM's ViT-B/16 800-epoch config,
trained as the BEiT pixel variant: ``--recipe simmim`` sets ``method="beit"``, the
``beit_base_patch16_224_pixel`` model, SimMIM's masks and loss, its warm-up + multistep
schedule and its bilinear crop). The recipe is ``--recipe``, else the preset's, else the
method's (``--method beit`` is ``--recipe beit``), else the --init-from file's."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = ["PretrainConfig", "PRESETS", "RECIPES", "build_parser", "config_from_args"]


@dataclass
class PretrainConfig:
    # what to train
    recipe: str | None = None  # mae | beit | simmim: the official run's settings (None: the method's)
    method: str = "mae"  # mae | beit
    model: str = "mae_vit_base_patch16"
    img_size: int | None = None  # None: the model's default
    patch_size: int | None = None
    model_kwargs: dict = field(default_factory=dict)  # extra constructor arguments (YAML only)
    kernels: str = "auto"  # auto | eager | triton
    # with Triton kernels, fuse each residual add into the LayerNorm after it; None: the model's own
    # default (on for MAE and BEiT: what the H200 step benchmark measured faster)
    fused_norm: bool | None = None
    fused_mlp: bool = True  # MLPs keep only the GELU input for the backward (mimfast.ops.mlp)
    # activation checkpointing of every block: each keeps only its inputs and runs its forward again
    # in the backward (memory for compute: larger batches or models; not with --cuda-graph)
    grad_checkpointing: bool = False
    # with Triton kernels and no --fused-norm / --no-fused-norm: time this many steps with the blocks
    # fused and as many unfused (after a warm-up) and keep the faster; 0: the model's default form
    fusion_trial_steps: int = 3
    # data
    data: str = "builtin"  # builtin or a folder (ImageFolder tree or flat folder)
    builtin_size: int = 4096  # images in the built-in dataset
    builtin_resolution: int | None = None  # drawing resolution of the built-in images
    min_crop_scale: float = 0.2  # RandomResizedCrop scale (min_crop_scale, 1)
    crop_interpolation: str = "bicubic"  # its resize: bicubic (MAE, BEiT) | bilinear (SimMIM)
    num_workers: int | None = None  # None: min(8, cores // 2)
    # optimisation (MAE recipe: AdamW (0.9, 0.95), wd 0.05, blr 1.5e-4, 40 warm-up epochs)
    batch_size: int = 64  # per GPU / process
    accum_iter: int = 1
    epochs: int = 800
    max_steps: int | None = None  # stop after this many optimizer steps
    blr: float = 1.5e-4  # lr = blr * effective batch / 256
    lr: float | None = None  # absolute lr; overrides blr
    min_lr: float = 0.0  # absolute; the cosine's floor
    warmup_epochs: float = 40
    warmup_lr: float = 0.0  # absolute; the warm-up's start (SimMIM's WARMUP_LR; MAE, BEiT: 0)
    lr_schedule: str = "cosine"  # after the warm-up: cosine (MAE's half cycle to min_lr) | multistep
    lr_milestones: tuple = ()  # multistep: epochs where the lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.95)
    clip_grad: float | None = None
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    drop_path: float = 0.0
    # BEiT: the visual tokenizer ("dalle:PATH" or "vq:PATH", see `mimfast tokenizer`) and mask size
    tokenizer: str | None = None
    num_mask_patches: int = 75
    # BEiT's pixel variant (--model beit_*_pixel): BEiT's blockwise masks, or SimMIM's random
    # mask_patch_size-px cells at simmim_mask_ratio; its loss (SimMIM: l1 on normalised pixels)
    pixel_masks: str = "blockwise"  # blockwise | simmim
    mask_patch_size: int = 32
    simmim_mask_ratio: float = 0.6
    pixel_loss: str = "l1"  # l1 | mse; --norm-pix-loss normalises its targets per patch
    # precision
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    max_nonfinite: int = 10  # stop after this many non-finite losses in a row
    # bookkeeping
    output_dir: str = "output/pretrain"
    save_every: int = 0  # optimizer steps between checkpoints (0: at each epoch's end only)
    keep_checkpoints: int = 2  # numbered checkpoints kept besides checkpoint-last.pth
    vis_every: int = 1  # epochs between reconstruction pictures (0: only at the end)
    log_every: int = 10
    resume: str | None = None  # a checkpoint path, or "auto" (the output folder's last)
    init_from: str | None = None  # start from these weights (e.g. an official MAE checkpoint)
    seed: int = 0
    preset: str | None = None
    device: str = "auto"  # auto | cuda | cpu
    gpu_pipeline: bool = False
    # with --gpu-pipeline: the share of images the DataLoader workers decode themselves (libjpeg-turbo,
    # a fixed subset by index) while nvjpeg decodes the rest, so idle CPU cores add to the GPU decoder
    gpu_pipeline_cpu_decode: float = 0.0
    # with --gpu-pipeline: adjust that share as training runs (mimfast.data.gpu_pipeline.DecodeShare),
    # from --gpu-pipeline-cpu-decode (0: from 1, all on the workers: nvjpeg's decoding takes GPU time
    # from the step, 10-20% of an MAE ViT-B step on the H200) down to what the workers sustain
    gpu_pipeline_adaptive_decode: bool = False
    compile: bool = False  # torch.compile the model (the ops are custom ops: no graph breaks)
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune
    # capture the training step into a CUDA graph once and replay it (no torch.compile; one process,
    # --accum-iter 1, not fp16, not with --compile); off CUDA the step runs eagerly the same way.
    # None: on where the run allows it on a CUDA device (the H200 run: MAE ViT-B/16 45.1 against 49.4
    # ms a step), off elsewhere; --no-cuda-graph turns it off
    cuda_graph: bool | None = None
    fsdp: bool = False
    tensorboard: bool = True


RECIPES = {
    "mae": dict(method="mae", model="mae_vit_base_patch16", blr=1.5e-4, warmup_epochs=40, weight_decay=0.05,
                betas=(0.9, 0.95), mask_ratio=0.75, norm_pix_loss=True, min_crop_scale=0.2, epochs=800),
    "beit": dict(method="beit", model="beit_base_patch16_224_8k_vocab", lr=1.5e-3, warmup_epochs=10,
                 weight_decay=0.05, betas=(0.9, 0.999), clip_grad=3.0, drop_path=0.1, min_crop_scale=0.08,
                 epochs=800, min_lr=1e-5, norm_pix_loss=False),
    # microsoft/SimMIM configs/vit_base__800ep/simmim_pretrain__vit_base__img224__800ep.yaml with
    # config.py's defaults: 128 images per GPU (2048 on 16 GPUs), BASE_LR 1e-4 per 512 images (blr
    # 5e-5 per 256), 10 warm-up epochs from WARMUP_LR, then x0.1 at epoch 700; AdamW (0.9, 0.999),
    # wd 0.05, clip 5; drop path 0.1; l1 loss on the normalised pixels; 32 px mask cells at 0.6;
    # RandomResizedCrop(224, scale (0.67, 1), bilinear) + flip, no colour jitter. SimMIM scales
    # WARMUP_LR (5e-7) and MIN_LR (5e-6) with the batch as it does BASE_LR; warmup_lr and min_lr are
    # absolute here, so they are SimMIM's at its 2048 (x4): at batch B SimMIM's are 5e-7 * B / 512
    # and 5e-6 * B / 512 (min_lr only matters with --lr-schedule cosine).
    "simmim": dict(method="beit", model="beit_base_patch16_224_pixel", pixel_masks="simmim", mask_patch_size=32,
                   simmim_mask_ratio=0.6, pixel_loss="l1", norm_pix_loss=False, batch_size=128, blr=5e-5,
                   warmup_epochs=10, warmup_lr=2e-6, min_lr=2e-5, lr_schedule="multistep", lr_milestones=(700,),
                   lr_gamma=0.1, weight_decay=0.05, betas=(0.9, 0.999), clip_grad=5.0, drop_path=0.1,
                   min_crop_scale=0.67, crop_interpolation="bilinear", epochs=800),
}

PRESETS = {
    # ViT-Tiny-sized MAE on the built-in shapes at 64 px: minutes on a CPU
    "tiny": dict(recipe="mae", model="mae_vit_tiny_patch16", img_size=64, patch_size=8, model_kwargs={"depth": 6},
                 data="builtin", builtin_size=2048, batch_size=64, epochs=8, warmup_epochs=1, blr=1.5e-3,
                 min_lr=1e-5, mask_ratio=0.75, vis_every=1, save_every=0),
    # small data on one GPU: ViT-Tiny at 96 px, longer
    "small": dict(recipe="mae", model="mae_vit_tiny_patch16", img_size=96, patch_size=8, data="builtin",
                  builtin_size=20000, batch_size=256, epochs=50, warmup_epochs=5, blr=1.5e-3, min_lr=1e-5),
    # BEiT with a 6-block ViT-Tiny at 64 px, patch 8 (8x8 grid, 24 masked, ~BEiT's 75/196); its
    # tokenizer view is 64 px for an 8x tokenizer: `mimfast tokenizer train --img-size 64`
    "beit-tiny": dict(RECIPES["beit"], recipe="beit", model="beit_tiny_patch16_224_8k_vocab", img_size=64,
                      patch_size=8, model_kwargs={"depth": 6}, data="builtin", builtin_size=2048, batch_size=64,
                      epochs=8, warmup_epochs=1, min_lr=1e-5, drop_path=0.0, num_mask_patches=24, vis_every=1,
                      save_every=0),
    # the SimMIM recipe with a 6-block ViT-Tiny at 64 px, patch 8: 16 px mask cells keep SimMIM's
    # cell of 2x2 patches (its 32 px cells over 16 px patches) and give a 4x4 grid of cells, 10
    # masked (32 px cells would leave 2x2, of which 3 masked); the schedule at 1/100 of the length
    # (1 warm-up epoch, x0.1 at epoch 7 of 8) and a learning rate for a short run
    "simmim-tiny": dict(RECIPES["simmim"], recipe="simmim", model="beit_tiny_patch16_224_pixel", img_size=64,
                        patch_size=8, model_kwargs={"depth": 6}, mask_patch_size=16, data="builtin",
                        builtin_size=2048, batch_size=64, epochs=8, warmup_epochs=1, lr_milestones=(7,), blr=2e-3,
                        warmup_lr=1e-5, drop_path=0.0, vis_every=1, save_every=0),
}

_CHOICES = {"recipe": tuple(RECIPES), "method": ("mae", "beit"), "kernels": ("auto", "eager", "triton"),
            "compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
            "precision": ("auto", "bf16", "fp16", "fp32"), "device": ("auto", "cuda", "cpu"),
            "pixel_masks": ("blockwise", "simmim"), "pixel_loss": ("l1", "mse"),
            "lr_schedule": ("cosine", "multistep"), "crop_interpolation": ("bicubic", "bilinear")}


# facebookresearch/mae main_pretrain.py's names of settings named otherwise here
_OFFICIAL_NAMES = {"img_size": ("--input_size", "--input-size")}
_OFFICIAL_NOTE = ("main_pretrain.py's spellings are accepted too: --batch_size, --accum_iter, --input_size, "
                  "--mask_ratio, --norm_pix_loss, --weight_decay, --min_lr, --warmup_epochs, --output_dir, "
                  "--num_workers, ... (every --a-b as --a_b), and --data_path DIR (trains on DIR/train)")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _official_flags(name: str) -> list[str]:
    """main_pretrain.py's spellings of a setting: ``--mask_ratio`` for ``--mask-ratio``, ..."""
    flags = ["--" + name] if "_" in name else []
    return flags + list(_OFFICIAL_NAMES.get(name, ()))


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="mimfast pretrain")
    parser.epilog = parser.epilog or _OFFICIAL_NOTE
    parser.add_argument("--config", default=None, help="YAML file of settings (flags override it)")
    # torch.distributed.launch appends --local-rank N; the process reads LOCAL_RANK from the environment
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)
    parser.add_argument("--data-path", "--data_path", dest="data_path", default=argparse.SUPPRESS,
                        help="as main_pretrain.py's --data_path: trains on DATA_PATH/train (--data takes the "
                             "training folder itself)")
    for f in dataclasses.fields(PretrainConfig):
        if f.name == "model_kwargs":
            continue
        kw = dict(dest=f.name, default=argparse.SUPPRESS)
        if f.name in _CHOICES:
            kw["choices"] = _CHOICES[f.name]
        if f.name == "preset":
            kw["choices"] = tuple(PRESETS)
        if str(f.type) in ("bool", "bool | None") or isinstance(f.default, bool):
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
            alias = dict(action="store_true")  # main_pretrain.py's switches (--norm_pix_loss) only switch on
        elif f.name == "betas":
            parser.add_argument(_flag(f.name), type=float, nargs=2, **kw)
            alias = dict(type=float, nargs=2)
        elif f.name == "lr_milestones":
            parser.add_argument(_flag(f.name), type=float, nargs="*", metavar="EPOCH", **kw)
            alias = dict(type=float, nargs="*")
        else:
            typ = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
            parser.add_argument(_flag(f.name), type=typ, **kw)
            alias = dict(type=typ, choices=kw.get("choices"))
        for flag in _official_flags(f.name):  # accepted, not listed (the epilog says so)
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **alias)
    return parser


def _resolve_recipe(given: dict, file_cfg: dict) -> str | None:
    """The recipe a run starts from: ``--recipe``, else the preset's, else the method's. A
    recipe fixes the method: a preset of another recipe, or ``--method`` of another method, is a
    mistake, not a run. None: an unknown method (validate() names it)."""
    named = {**file_cfg, **given}
    preset = named.get("preset")
    if preset is not None and preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    preset_recipe = PRESETS[preset].get("recipe") if preset is not None else None
    recipe = named.get("recipe")
    if recipe is not None:
        if recipe not in RECIPES:
            raise SystemExit(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
        if preset_recipe not in (None, recipe):
            sizes = [p for p, v in PRESETS.items() if v.get("recipe") == recipe]
            raise SystemExit(f"--preset {preset} is a size of the {preset_recipe} recipe, not of --recipe {recipe}"
                             + (f" (its presets: {', '.join(sizes)})" if sizes else ""))
    recipe = recipe or preset_recipe or named.get("method", "mae")
    if recipe not in RECIPES:
        return None
    method = named.get("method")
    if method is not None and method != RECIPES[recipe]["method"]:
        source = f"--preset {preset}" if preset_recipe == recipe and "recipe" not in named else f"--recipe {recipe}"
        raise SystemExit(f"{source} trains --method {RECIPES[recipe]['method']}, not --method {method}")
    return recipe


# what --init-from adopts from the file when the run names no model: the model and the settings
# its loss and masks were trained with
_ADOPTED = ("recipe", "method", "model", "img_size", "patch_size", "model_kwargs", "norm_pix_loss", "mask_ratio",
            "pixel_masks", "mask_patch_size", "simmim_mask_ratio", "pixel_loss", "num_mask_patches", "drop_path")
# naming any of these (flag or YAML) means the run says its own model
_NAMES_A_MODEL = ("model", "preset", "recipe", "method", "model_kwargs", "img_size", "patch_size")


def _described_by_init_from(given: dict, file_cfg: dict) -> dict:
    """``--init-from FILE`` with no model named: the model the file describes (its mimfast config,
    or one read from official args or a SimMIM / MMPretrain / HF layout:
    :func:`mimfast.train.pretrained.read_checkpoint_config`) and the loss and mask settings it was
    trained with, as a layer between the recipe / preset and the YAML file. {} when the run names a
    model or the file does not say which it holds (the run's default model then has to fit)."""
    named = {**file_cfg, **given}
    path = named.get("init_from")
    if not path or set(_NAMES_A_MODEL) & set(named):
        return {}
    from mimfast.train.pretrained import read_checkpoint_config

    try:
        described = read_checkpoint_config(path) or {}
    except ValueError as e:
        raise SystemExit(f"--init-from: {e}")
    adopted = {k: described[k] for k in _ADOPTED if described.get(k) is not None}
    if adopted.get("recipe") not in (None, *RECIPES):
        adopted.pop("recipe")
    return adopted


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    """Defaults <- recipe <- preset <- the --init-from file's model <- YAML file <- flags."""
    given = {k: v for k, v in vars(args).items() if k not in ("config", "command", "func", "local_rank")}
    if "data_path" in given:  # main_pretrain.py reads DATA_PATH/train
        data_path = given.pop("data_path")
        if "data" in given:
            raise SystemExit("give --data (the training folder) or --data-path (a folder holding train/), not both")
        given["data"] = str(Path(data_path) / "train")
    file_cfg = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise SystemExit(f"config file {str(path)!r} does not exist")
        file_cfg = yaml.safe_load(path.read_text()) or {}
        if not isinstance(file_cfg, dict):
            raise SystemExit(f"config file {path} must hold a mapping of settings")
        file_cfg = {k.replace("-", "_"): v for k, v in file_cfg.items()}
    known = {f.name for f in dataclasses.fields(PretrainConfig)}
    unknown = sorted(set(file_cfg) - known)
    if unknown:
        raise SystemExit(f"unknown settings in {args.config}: {', '.join(unknown)}")
    adopted = _described_by_init_from(given, file_cfg)
    steer = {k: adopted[k] for k in ("recipe", "method") if k in adopted}
    recipe = _resolve_recipe({**steer, **given}, file_cfg)
    preset = given.get("preset", file_cfg.get("preset"))
    values = {}
    values.update(RECIPES.get(recipe, {}))
    if preset is not None:
        values.update(PRESETS[preset])
    values.update(adopted)
    values.update(file_cfg)
    values.update(given)
    values["recipe"] = recipe
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    milestones = values.get("lr_milestones", ())
    values["lr_milestones"] = tuple(milestones) if isinstance(milestones, (list, tuple)) else (milestones,)
    named = {**file_cfg, **given}
    if "lr_milestones" in named and values.get("lr_schedule", "cosine") != "multistep" and values["lr_milestones"]:
        raise SystemExit(f"--lr-milestones {list(values['lr_milestones'])} apply to --lr-schedule multistep; "
                         f"the schedule is {values.get('lr_schedule', 'cosine')!r}")
    cfg = PretrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: PretrainConfig) -> None:
    problems = []
    if cfg.method not in _CHOICES["method"]:
        problems.append(f"--method must be one of {_CHOICES['method']}, got {cfg.method!r}")
    if cfg.batch_size <= 0:
        problems.append(f"--batch-size must be positive, got {cfg.batch_size}")
    if cfg.accum_iter <= 0:
        problems.append(f"--accum-iter must be positive, got {cfg.accum_iter}")
    if cfg.epochs <= 0:
        problems.append(f"--epochs must be positive, got {cfg.epochs}")
    if cfg.max_steps is not None and cfg.max_steps <= 0:
        problems.append(f"--max-steps must be positive, got {cfg.max_steps}")
    if not 0.0 <= cfg.mask_ratio < 1.0:
        problems.append(f"--mask-ratio must be in [0, 1), got {cfg.mask_ratio}")
    problems += _schedule_problems(cfg)
    if cfg.crop_interpolation not in _CHOICES["crop_interpolation"]:
        problems.append(f"--crop-interpolation must be one of {_CHOICES['crop_interpolation']}, "
                        f"got {cfg.crop_interpolation!r}")
    from mimfast.models import MODELS

    if cfg.model not in MODELS:
        problems.append(f"--model {cfg.model!r} is unknown; known: {', '.join(sorted(MODELS))}")
    if cfg.data != "builtin" and not Path(cfg.data).is_dir():
        problems.append(f"--data folder {cfg.data!r} does not exist (or use --data builtin)")
    if cfg.save_every < 0:
        problems.append(f"--save-every must be >= 0, got {cfg.save_every}")
    if cfg.fusion_trial_steps < 0:
        problems.append(f"--fusion-trial-steps must be >= 0, got {cfg.fusion_trial_steps}")
    if not 0.0 <= cfg.gpu_pipeline_cpu_decode <= 1.0:
        problems.append(f"--gpu-pipeline-cpu-decode must be in [0, 1], got {cfg.gpu_pipeline_cpu_decode}")
    elif cfg.gpu_pipeline_cpu_decode and not cfg.gpu_pipeline:
        problems.append("--gpu-pipeline-cpu-decode is the --gpu-pipeline's split of decoding: add --gpu-pipeline")
    if cfg.gpu_pipeline_adaptive_decode and not cfg.gpu_pipeline:
        problems.append("--gpu-pipeline-adaptive-decode adjusts the --gpu-pipeline's split of decoding: add "
                        "--gpu-pipeline")
    if cfg.cuda_graph:
        from mimfast.train.cuda_graph import config_problems

        # (--grad-checkpointing conflicts only with blocks that draw random numbers: checked once
        # the model is built)
        problems += config_problems(precision=cfg.precision, compile=cfg.compile)
    if problems:
        raise SystemExit("invalid configuration:\n  " + "\n  ".join(problems))


def _schedule_problems(cfg: PretrainConfig) -> list[str]:
    """What is wrong with the learning-rate schedule's settings (SimMIM's MultiStepLRScheduler
    asserts its warm-up ends by the first milestone; a milestone past the run would never act)."""
    problems = []
    if cfg.lr_schedule not in _CHOICES["lr_schedule"]:
        return [f"--lr-schedule must be one of {_CHOICES['lr_schedule']}, got {cfg.lr_schedule!r}"]
    if not cfg.warmup_lr >= 0:
        problems.append(f"--warmup-lr must be >= 0, got {cfg.warmup_lr}")
    if not cfg.warmup_epochs >= 0:
        problems.append(f"--warmup-epochs must be >= 0, got {cfg.warmup_epochs}")
    if cfg.lr_schedule != "multistep":
        return problems
    if not 0 < cfg.lr_gamma <= 1:
        problems.append(f"--lr-gamma must be in (0, 1], got {cfg.lr_gamma}")
    m = list(cfg.lr_milestones)
    if not m:
        problems.append("--lr-schedule multistep needs --lr-milestones (epochs, e.g. --lr-milestones 700)")
    elif any(not isinstance(x, (int, float)) or isinstance(x, bool) for x in m):
        problems.append(f"--lr-milestones must be numbers of epochs, got {m}")
    elif any(b <= a for a, b in zip(m, m[1:])):
        problems.append(f"--lr-milestones must be increasing, got {m}")
    elif m[0] < cfg.warmup_epochs:
        problems.append(f"--lr-milestones must come after the warm-up (--warmup-epochs {cfg.warmup_epochs}), got {m}")
    elif m[-1] > cfg.epochs:
        problems.append(f"--lr-milestones must be within the run's {cfg.epochs} epochs, got {m} (SimMIM's 700 of "
                        f"800 is {700 / 800 * cfg.epochs:g} of {cfg.epochs})")
    return problems
