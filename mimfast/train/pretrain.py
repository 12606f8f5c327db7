"""The pretraining loop (``mimfast pretrain``): MAE or BEiT (a *task* object supplies the
model, augmentation, loss and pictures), one process or many under ``torchrun`` (DDP), with
exact resume.

What makes resume exact: the sampler's order is a function of (seed, epoch) and can start
mid-epoch; each image's augmentation is seeded by (seed, epoch, index); the mask noise comes
from torch's RNG, whose CPU and CUDA states are saved with the model, optimizer and scaler.
A checkpoint also records the epoch position as a global sample count with the layout (world
size, batch size, accumulation) that saved it, so a run resumed in another layout starts at
the same place in the epoch's order (position-exact, not bit-exact).

``--cuda-graph`` (:mod:`mimfast.train.cuda_graph`; on by default on a CUDA device where the run
allows it: one process, ``--accum-iter 1``, not fp16, not ``--compile`` or ``--fsdp``;
``--no-cuda-graph`` turns it off): the step (forward, backward, gradient clip, AdamW) is
captured into a CUDA graph after ``GRAPH_WARMUP_STEPS`` eager steps and replayed for every later
one; each batch's device tensors (the task's ``inputs``: images and mask noise, or images, masks
and BEiT's tokens) are made outside the graph and copied into its inputs. The learning rate is a
device tensor set in place, a non-finite loss skips the update on the device (the fused AdamW's
``found_inf``), and the loss logged is the graph's output. Every step is one training step, as
without the graph (the warm-up steps included), so the run trains as an eager one does. Off CUDA
the step runs eagerly through the same code. With ``--accum-iter N`` (asked for with
``--cuda-graph``; not the default until a GPU run has measured it) the window takes two graphs
(:class:`~mimfast.train.cuda_graph.GraphedAccumulation`): each micro-batch's forward and backward,
its gradients added in place, and the optimizer step, which zeroes them in place; a non-finite
loss in any of the window's micro-batches skips its update.

``--fusion-trial-steps N`` (:mod:`mimfast.train.fusion_trial`): where the kernels run on Triton and
no ``--fused-norm`` / ``--no-fused-norm`` is given, the first steps time the model's blocks fused
and unfused (N steps each, after a warm-up) and the run keeps the faster form.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from mimfast.data.datasets import IMAGENET_MEAN, IMAGENET_STD, build_dataset, sample_seed
from mimfast.data.sampler import ResumableSampler
from mimfast.models import create_model
from mimfast.nn.blocks import draws_random
from mimfast.train.checkpoint import dataset_change_notice, load_checkpoint, resolve_resume, save_checkpoint
from mimfast.train.config import PretrainConfig
from mimfast.train.cuda_graph import (
    GraphedAccumulation,
    GraphedStep,
    config_problems,
    make_capturable,
    skip_nonfinite_steps,
)
from mimfast.train.fusion_trial import FusionTrial
from mimfast.train.pretrained import init_from_checkpoint
from mimfast.train.progress import Progress
from mimfast.train.sharding import full_state_dicts, grad_scaler, load_full_state_dicts, shard_model
from mimfast.train.schedule import lr_at, param_groups_weight_decay, set_lr
from mimfast.train.visualize import mae_reconstruction_grid, save_png

__all__ = ["pretrain", "mae_transform", "CROP_INTERPOLATIONS", "GRAPH_WARMUP_STEPS"]


CROP_INTERPOLATIONS = ("bicubic", "bilinear")
GRAPH_WARMUP_STEPS = 3  # --cuda-graph: eager (real) steps before the capture


def mae_transform(img_size: int, min_scale: float = 0.2, interpolation: str = "bicubic"):
    """MAE's augmentation: RandomResizedCrop(scale (min_scale, 1), bicubic, antialiased) + flip,
    then ImageNet normalisation. Input (3, H, W) uint8, output (3, img_size, img_size) float32.
    With ``interpolation="bilinear"`` and ``min_scale=0.67`` it is microsoft/SimMIM's
    (``data/data_simmim.py``: torchvision's default interpolation, no colour jitter)."""
    from torchvision.transforms import v2

    if interpolation not in CROP_INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {CROP_INTERPOLATIONS}, got {interpolation!r}")
    mode = v2.InterpolationMode.BICUBIC if interpolation == "bicubic" else v2.InterpolationMode.BILINEAR
    return v2.Compose([
        v2.RandomResizedCrop(img_size, scale=(min_scale, 1.0), interpolation=mode, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class _Dist:
    """Process-group facts for one process (a single process is rank 0 of 1)."""

    def __init__(self, device_pref: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref == "cuda"
        if device_pref == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        self.device = torch.device("cuda", self.local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        self.enabled = self.world_size > 1
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world_size

    def close(self) -> None:
        """At the end of a run that went well on every rank: all ranks meet, then tear down. Rank
        0 still writes pictures and the summary while the others are done; a rank that tears
        down while another is still at work can hang in ``destroy_process_group`` (pytorch
        issue 75097; seen here as a rank that never returned from a 2-process gloo run)."""
        if self.enabled and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _model_kwargs(cfg: PretrainConfig) -> dict:
    kw = dict(cfg.model_kwargs)
    if cfg.img_size is not None:
        kw["img_size"] = cfg.img_size
    if cfg.patch_size is not None:
        kw["patch_size"] = cfg.patch_size
    kw["kernels"] = cfg.kernels
    if cfg.fused_norm is not None:  # None: the model's default
        kw["fused_norm"] = cfg.fused_norm
    kw["fused_mlp"] = cfg.fused_mlp
    if cfg.method == "mae":
        kw["norm_pix_loss"] = cfg.norm_pix_loss
    return kw


def _fusion_trial(cfg: PretrainConfig, model, device: torch.device, *, graphed: bool, sharded: bool,
                  mean) -> FusionTrial | None:
    """A :class:`FusionTrial` where one can choose the block form: the model has both forms, its
    kernels run on Triton here, the run did not name a form, and nothing fixes the step's code
    after the first steps (a CUDA graph, torch.compile) or runs the blocks through other forwards
    (FSDP units); one optimizer step per batch (each step timed whole)."""
    from mimfast.nn.blocks import FusedBlocksMixin, can_fuse_blocks

    if (cfg.fusion_trial_steps <= 0 or cfg.fused_norm is not None or graphed or cfg.compile or sharded
            or cfg.accum_iter != 1 or not isinstance(model, FusedBlocksMixin)
            or not can_fuse_blocks(model.blocks, model.norm) or not _blocks_on_triton(model, device)):
        return None
    return FusionTrial(model, cfg.fusion_trial_steps, mean=mean)


def _blocks_on_triton(model, device: torch.device) -> bool:
    """Whether the model's block kernels (add + LayerNorm) run on Triton on ``device``."""
    from mimfast.backend import resolve

    return resolve(model.kernels, torch.empty(0, device=device), op="add_layer_norm") == "triton"


def _blocks_fused(model, device: torch.device) -> bool:
    """Whether the model's blocks ran fused: its ``fused_norm`` set and its kernels on Triton here."""
    return bool(getattr(model, "fused_norm", False)) and _blocks_on_triton(model, device)


def _autocast(cfg: PretrainConfig, device: torch.device):
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return precision, nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return precision, lambda: torch.autocast(device.type, dtype=dtype)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.random.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.random.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class _WithMaskNoise:
    """Augmented image plus the sample's mask noise, both drawn from the per-sample seeded
    RNG: the mask of an image depends on (seed, epoch, index) only, not on the rank or the
    batch it lands in, so a run on 2 processes sees what a run on 1 sees."""

    def __init__(self, transform, num_patches: int):
        self.transform = transform
        self.num_patches = num_patches

    def __call__(self, img):
        img = self.transform(img)
        return img, torch.rand(self.num_patches)


def _keyed_noise(seed: int, epochs, indices, num_patches: int) -> torch.Tensor:
    """Mask noise of samples (epoch, index), independent of rank, batch and worker."""
    rows = []
    for e, i in zip(torch.as_tensor(epochs).tolist(), torch.as_tensor(indices).tolist()):
        g = torch.Generator().manual_seed(sample_seed(seed, e, i) ^ 0x6D61736B)  # any seed
        rows.append(torch.rand(num_patches, generator=g))
    return torch.stack(rows)


class MAETask:
    """What ``pretrain`` needs to know about MAE: model, augmentation, loss, picture."""

    def __init__(self, cfg: PretrainConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.vis_imgs = self.vis_noise = None

    def build_model(self) -> torch.nn.Module:
        model = create_model(self.cfg.model, **_model_kwargs(self.cfg))
        self.patch_size = model.patch_size
        return model

    def transform(self, img_size: int):
        return _WithMaskNoise(mae_transform(img_size, self.cfg.min_crop_scale, self.cfg.crop_interpolation),
                              (img_size // self.patch_size) ** 2)

    def gpu_augment(self, img_size: int):
        """The ``--gpu-pipeline`` augmentation: the same recipe, decoded and augmented on the GPU."""
        from mimfast.data.gpu_pipeline import GpuAugment

        return GpuAugment(img_size, scale=(self.cfg.min_crop_scale, 1.0), interpolation=self.cfg.crop_interpolation,
                          seed=self.cfg.seed, device=self.device)

    def inputs(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, mask noise) of a batch, on the device: what the loss (and a captured step) reads."""
        if len(batch) == 4:  # --gpu-pipeline: (imgs on the GPU, labels, epochs, indices)
            imgs, _, epochs, indices = batch
            noise = _keyed_noise(self.cfg.seed, epochs, indices, (imgs.shape[-1] // self.patch_size) ** 2)
            batch = ((imgs, noise), None)
        (imgs, noise), _ = batch
        return imgs.to(self.device, non_blocking=True), noise.to(self.device, non_blocking=True)

    def loss_of(self, model, imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        loss, _, _ = model(imgs, mask_ratio=self.cfg.mask_ratio, noise=noise)
        return loss

    def loss(self, model, batch) -> torch.Tensor:
        return self.loss_of(model, *self.inputs(batch))

    def picture(self, model, dataset, path: Path, write: bool = True) -> None:
        if self.vis_imgs is None:  # fixed images and noise, drawn apart from the training RNG
            gen = torch.Generator().manual_seed(self.cfg.seed + 12345)
            keys = [(0, i) for i in range(min(8, len(dataset)))]
            from mimfast.data.gpu_pipeline import EncodedImages, collate_encoded

            if isinstance(dataset, EncodedImages):  # --gpu-pipeline: bytes, augmented as the loader does
                datas, _, epochs, indices = collate_encoded([dataset[k] for k in keys])
                self.vis_imgs = self.gpu_augment(model.img_size)(datas, epochs, indices)
            else:  # items are ((image, mask noise), label)
                self.vis_imgs = torch.stack([dataset[k][0][0] for k in keys])
            self.vis_imgs = self.vis_imgs.to(self.device)
            self.vis_noise = torch.rand(self.vis_imgs.shape[0], model.patch_embed.num_patches,
                                        generator=gen).to(self.device)
        grid = mae_reconstruction_grid(model, self.vis_imgs, self.cfg.mask_ratio, IMAGENET_MEAN, IMAGENET_STD,
                                       noise=self.vis_noise)
        if write:
            save_png(grid, path, scale=max(1, 128 // model.img_size))


def _resume_position(ckpt: dict, sampler: ResumableSampler, batch_size: int, accum_iter: int,
                     steps_per_epoch: int) -> tuple[int, int, int, str | None]:
    """(step, epoch, per-process start, notice) for resuming ``ckpt`` in this run's layout.

    Same layout as the checkpoint's, or a checkpoint that does not record one: the saved
    position as is (bit-exact). Another world size, batch size or accumulation: the saved
    global epoch position converted to this layout's per-process start, rounded down to an
    optimizer step (a batch boundary where the micro-batches of a step begin), so no sample is
    skipped and fewer than one global step's worth are seen again; ``step`` is recounted in
    this layout's steps (the LR schedule follows the epoch fraction, the loop ends at
    epochs x steps per epoch). Either way a position in an epoch's tail that holds no whole
    optimizer step starts the next epoch, as the uninterrupted run does."""
    step, epoch, start = ckpt["step"], ckpt["epoch"], ckpt["sample_in_epoch"]
    group = batch_size * accum_iter  # samples per process in one optimizer step
    epoch_end = steps_per_epoch * group  # samples per process an epoch uses
    saved = (ckpt.get("world_size"), ckpt.get("batch_size"), ckpt.get("accum_iter"))
    here = (sampler.world_size, batch_size, accum_iter)
    if "global_sample_in_epoch" not in ckpt or saved == here:
        return (step, epoch + 1, 0, None) if start >= epoch_end else (step, epoch, start, None)
    position = ckpt["global_sample_in_epoch"]
    start = sampler.start_for(position, multiple=group)
    again = position - sampler.position(start)
    next_epoch = start >= epoch_end
    if next_epoch:
        epoch, start = epoch + 1, 0
    step = epoch * steps_per_epoch + start // group
    layout = "{} process(es) x batch {} x accum-iter {}"
    notice = (f"resume: the checkpoint was saved with {layout.format(*saved)} and this run has "
              f"{layout.format(*here)}: the epoch position is kept ({position} samples of the epoch's order "
              f"consumed), so the resume is position-exact but not bit-exact (batches are composed differently); ")
    if next_epoch:
        notice += f"the rest of that epoch holds no whole step here, so it starts epoch {epoch} at step {step}"
    else:
        notice += (f"it starts epoch {epoch} at sample {start} of each process, step {step}"
                   + (f", rounded down to an optimizer step: {again} samples are seen again" if again else ""))
    return step, epoch, start, notice


# what a resume reads (global_sample_in_epoch and the layout are optional: older checkpoints)
_RESUME_KEYS = ("model", "optimizer", "scaler", "epoch", "step", "sample_in_epoch", "rng")


def _load_resume_checkpoint(path) -> dict:
    """A mimfast checkpoint for ``--resume``; anything else (facebookresearch/mae's
    ``checkpoint-N.pth``, a bare state_dict, released weights) stops the run with a pointer to
    ``--init-from``, which starts a run from such weights."""
    hint = f"to start a run from its weights use --init-from {path}"
    try:
        ckpt = load_checkpoint(path, map_location="cpu")
    except pickle.UnpicklingError as e:  # official checkpoints also pickle their argparse args
        raise SystemExit(f"--resume {path}: not a mimfast checkpoint (it holds objects besides tensors and "
                         f"numbers, as facebookresearch/mae's checkpoints hold their args); {hint}") from e
    missing = [k for k in _RESUME_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise SystemExit(f"--resume {path}: not a mimfast checkpoint (no {', '.join(missing)}: a run resumes "
                         f"from the sampler position and RNG states mimfast saves); {hint}")
    return ckpt


def _plain_lrs(optim_sd: dict) -> dict:
    """A --cuda-graph run's optimizer state_dict as an eager run saves it: learning rates as
    floats (not the device tensors the graph reads), capturable off (a CPU resume refuses it)."""
    for group in optim_sd["param_groups"]:
        if isinstance(group.get("lr"), torch.Tensor):
            group["lr"] = float(group["lr"])
        if "capturable" in group:
            group["capturable"] = False
    return optim_sd


def build_task(cfg: PretrainConfig, device: torch.device):
    if cfg.method == "mae":
        return MAETask(cfg, device)
    from mimfast.train.beit_task import BEiTTask

    return BEiTTask(cfg, device)


def pretrain(cfg: PretrainConfig) -> dict:
    """Run pretraining; returns a summary (steps, first and last loss, status, paths)."""
    d = _Dist(cfg.device)
    device = d.device
    out = Path(cfg.output_dir)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(_jsonable(cfg), indent=1))

    task = build_task(cfg, device)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = task.build_model().to(device)
    if cfg.init_from:
        try:
            fresh, unused = init_from_checkpoint(model, cfg.init_from, cfg.model)
        except ValueError as e:
            raise SystemExit(f"--init-from: {e}")
        if d.main:
            detail = (f": kept as initialised {fresh[:4]}{' ...' if len(fresh) > 4 else ''}, not used "
                      f"{unused[:4]}{' ...' if len(unused) > 4 else ''}" if fresh or unused else "")
            print(f"initialised from {cfg.init_from} (missing {len(fresh)}, unexpected {len(unused)}){detail}")
    img_size = model.img_size
    if cfg.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise SystemExit(f"--grad-checkpointing: {cfg.model} has no set_grad_checkpointing()")
        model.set_grad_checkpointing(True)

    workers = cfg.num_workers if cfg.num_workers is not None else min(8, max(1, (os.cpu_count() or 2) // 2))
    if cfg.gpu_pipeline:
        if device.type != "cuda":
            raise SystemExit("--gpu-pipeline decodes and augments on the GPU: it needs a CUDA device")
        if not hasattr(task, "gpu_augment"):
            raise SystemExit(f"--gpu-pipeline is not available for --method {cfg.method}")
        from mimfast.data.builtin import ShapesDataset
        from mimfast.data.gpu_pipeline import DecodeShare, EncodedImages, GpuLoader

        source = cfg.data
        if cfg.data == "builtin":
            source = ShapesDataset(cfg.builtin_size, img_size=cfg.builtin_resolution or img_size, seed=cfg.seed)
        share = cfg.gpu_pipeline_cpu_decode
        if cfg.gpu_pipeline_adaptive_decode:  # windows of at least a batch per worker: the lag of a new share
            share = DecodeShare(initial=cfg.gpu_pipeline_cpu_decode or 1.0, window=max(8, workers))
        dataset = EncodedImages(source, cpu_decode_fraction=share)
    else:
        dataset = build_dataset(cfg.data, img_size, task.transform(img_size), seed=cfg.seed,
                                builtin_size=cfg.builtin_size, builtin_resolution=cfg.builtin_resolution)
    eff_batch = cfg.batch_size * cfg.accum_iter * d.world_size
    if len(dataset) < cfg.batch_size * d.world_size:
        raise SystemExit(f"the dataset has {len(dataset)} images, fewer than one global batch "
                         f"({cfg.batch_size} x {d.world_size} processes)")
    sampler = ResumableSampler(len(dataset), seed=cfg.seed, rank=d.rank, world_size=d.world_size,
                               with_epoch=True)
    if cfg.gpu_pipeline:
        loader = GpuLoader.from_dataset(dataset, task.gpu_augment(img_size), batch_size=cfg.batch_size,
                                        sampler=sampler, num_workers=workers, with_keys=True)
    else:
        loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                            num_workers=workers, pin_memory=device.type == "cuda",
                            persistent_workers=workers > 0, generator=torch.Generator().manual_seed(cfg.seed))
    iters_per_epoch = sampler.per_rank // cfg.batch_size
    steps_per_epoch = iters_per_epoch // cfg.accum_iter
    epoch_end_iter = steps_per_epoch * cfg.accum_iter  # the last micro-batches that make no whole step are left out
    if steps_per_epoch == 0:
        raise SystemExit(f"an epoch of {iters_per_epoch} batches holds no optimizer step with "
                         f"--accum-iter {cfg.accum_iter}")
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    sharded = cfg.fsdp and d.enabled
    if cfg.fsdp and not d.enabled and d.main:
        print("--fsdp with one process: nothing to shard, running unsharded")
    if sharded:
        shard_model(model)
    lr = cfg.lr if cfg.lr is not None else cfg.blr * eff_batch / 256
    schedule = dict(schedule=cfg.lr_schedule, milestones=tuple(cfg.lr_milestones), gamma=cfg.lr_gamma,
                    warmup_lr=cfg.warmup_lr)
    graphed = cfg.cuda_graph
    auto_graph = graphed is None  # the default, not asked for: a step that cannot be captured runs eagerly
    problems = config_problems(world_size=d.world_size, precision=_autocast(cfg, device)[0], compile=cfg.compile,
                               grad_checkpointing=cfg.grad_checkpointing, random_blocks=draws_random(model))
    if graphed is None:  # the default: captured where it can be, on a CUDA device
        # (gradient accumulation's two graphs are taken only when asked for, until a GPU run has
        # measured them)
        graphed = device.type == "cuda" and not cfg.fsdp and not problems and cfg.accum_iter == 1
        if graphed and d.main:
            print("the training step is captured in a CUDA graph and replayed (--no-cuda-graph: run it eagerly)")
        elif device.type == "cuda" and problems and d.main:
            print("the training step runs eagerly, not in a CUDA graph: " + "; ".join(problems))
    elif graphed:
        if problems:
            raise SystemExit("--cuda-graph: " + "; ".join(problems))
        if device.type != "cuda" and d.main:
            print("--cuda-graph: no CUDA device, the step runs eagerly (the same code, nothing captured)")
    # fused on CUDA; with --cuda-graph on the CPU too (its found_inf skips non-finite steps)
    fused = device.type == "cuda" or graphed
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, cfg.weight_decay), lr=lr,
                                  betas=tuple(cfg.betas), **({"fused": True} if fused else {}))
    precision, autocast = _autocast(cfg, device)
    scaler = grad_scaler(device.type, enabled=precision == "fp16", sharded=sharded)
    ddp_model = model
    if d.enabled and not sharded:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        ddp_model = torch.compile(ddp_model, mode=cfg.compile_mode)

    step, epoch, start_in_epoch = 0, 0, 0
    resume = resolve_resume(cfg.resume, out)
    if resume:
        # on the CPU: the RNG states must stay CPU tensors; weights and moments are copied to the device
        ckpt = _load_resume_checkpoint(resume)
        load_full_state_dicts(model, optimizer, ckpt["model"], ckpt["optimizer"], sharded)
        scaler.load_state_dict(ckpt["scaler"])
        step, epoch, start_in_epoch, notice = _resume_position(ckpt, sampler, cfg.batch_size, cfg.accum_iter,
                                                               steps_per_epoch)
        _set_rng_state(ckpt["rng"][d.rank] if d.rank < len(ckpt["rng"]) else ckpt["rng"][0], device)
        if d.main:
            for line in (notice, dataset_change_notice(ckpt, len(dataset))):
                if line:
                    print(line)
            print(f"resumed from {resume} at step {step} (epoch {epoch}, sample {start_in_epoch})")
    elif cfg.seed is not None:
        torch.manual_seed(cfg.seed + d.rank)  # mask noise differs across ranks

    graph_step = graph_inputs = None
    if graphed:  # after the resume: the graph updates the optimizer's state tensors in place
        make_capturable(optimizer)
        found_inf = skip_nonfinite_steps(optimizer)
        graph_inputs, graph_loss = task.inputs, task.loss_of  # the batch's device tensors, the loss of them

        def train_step(*inputs):
            with autocast():
                loss = graph_loss(model, *inputs)
            loss.backward()
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            loss = loss.detach()
            found_inf.copy_(~torch.isfinite(loss))  # a non-finite loss leaves the weights as they are
            optimizer.step()
            return loss

        if cfg.accum_iter == 1:
            graph_step = GraphedStep(train_step, optimizer=optimizer, warmup=GRAPH_WARMUP_STEPS,
                                     enabled=device.type == "cuda", scaler=scaler)
        else:  # two graphs: each micro-batch's forward and backward, then the window's step
            window_bad = torch.zeros((), dtype=torch.bool, device=device)  # a non-finite loss in the window
            params = [p for p in model.parameters() if p.requires_grad]

            def micro_step(*inputs):
                with autocast():
                    loss = graph_loss(model, *inputs)
                (loss / cfg.accum_iter).backward()
                loss = loss.detach()
                window_bad.logical_or_(~torch.isfinite(loss))
                return loss

            def window_step():
                if cfg.clip_grad:
                    torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
                found_inf.copy_(window_bad)  # any non-finite micro-batch loss leaves the weights as they are
                optimizer.step()
                torch._foreach_zero_([p.grad for p in params if p.grad is not None])  # in place: the graph adds to them
                window_bad.zero_()

            graph_step = GraphedAccumulation(micro_step, window_step, optimizer=optimizer, accum_iter=cfg.accum_iter,
                                             warmup=-(-GRAPH_WARMUP_STEPS // cfg.accum_iter),
                                             enabled=device.type == "cuda")

    trial = _fusion_trial(cfg, model, device, graphed=graphed, sharded=sharded, mean=d.mean)

    if d.main:
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"mimfast pretrain: {cfg.model} ({n_params / 1e6:.1f}M trainable), {img_size}px, data "
              f"{cfg.data} ({len(dataset)} images), device {device}, {precision}, kernels {cfg.kernels}, "
              f"{d.world_size} process(es), effective batch {eff_batch}, lr {lr:.3g} ({cfg.lr_schedule}), "
              f"{total_steps} steps")
    log_file = open(out / "log.jsonl", "a") if d.main else None
    tb = _tensorboard(out) if (d.main and cfg.tensorboard) else None
    progress = Progress(total_steps, start_step=step, every=cfg.log_every, enabled=d.main)
    nonfinite_in_row = nonfinite_total = 0
    window_finite = True  # --cuda-graph with --accum-iter: every micro-batch loss of the window so far
    last_loss = float("nan")
    first_loss = None
    t_start = time.time()
    stop_reason = "done"

    def save(tag_step: int, sample_in_epoch: int, ep: int) -> None:
        rng = [_rng_state(device)]
        if d.enabled:
            gathered = [None] * d.world_size
            dist.all_gather_object(gathered, {k: v.cpu() for k, v in rng[0].items()})
            rng = gathered
        model_sd, optim_sd = full_state_dicts(model, optimizer, sharded)
        if graphed:
            optim_sd = _plain_lrs(optim_sd)
        if not d.main:
            return
        state = {"model": model_sd, "optimizer": optim_sd, "scaler": scaler.state_dict(),
                 "epoch": ep, "step": tag_step, "sample_in_epoch": sample_in_epoch,
                 "global_sample_in_epoch": sampler.position(sample_in_epoch), "world_size": d.world_size,
                 "batch_size": cfg.batch_size, "accum_iter": cfg.accum_iter, "rng": rng,
                 "dataset_size": len(dataset), "config": _jsonable(cfg)}
        save_checkpoint(state, out / f"checkpoint-{tag_step:06d}.pth")
        save_checkpoint(state, out / "checkpoint-last.pth")
        # the oldest written go first (a resume in another layout recounts steps: names can go down)
        numbered = sorted(out.glob("checkpoint-[0-9][0-9][0-9][0-9][0-9][0-9].pth"),
                          key=lambda p: (p.stat().st_mtime_ns, p.name))
        for old in numbered[: max(0, len(numbered) - cfg.keep_checkpoints)]:
            old.unlink()

    def picture(name: str) -> None:
        if sharded:  # every rank joins the sharded forward; rank 0 writes
            task.picture(model, dataset, out / name, write=d.main)
        elif d.main:
            task.picture(model, dataset, out / name)

    model.train()
    while step < total_steps:
        sampler.set_epoch(epoch, start_in_epoch)
        it = iter(loader)
        data_iter = start_in_epoch // cfg.batch_size
        t_data = time.time()
        data_time = step_time = 0.0
        for batch in it:
            data_time += time.time() - t_data
            t_step = time.time()
            if data_iter % cfg.accum_iter == 0:
                lr_now = lr_at(epoch + data_iter / iters_per_epoch, lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs,
                               **schedule)
                set_lr(optimizer, lr_now)  # a captured step's lr tensors in place: the graph reads them
            sync = (data_iter + 1) % cfg.accum_iter == 0
            if graphed:  # one whole step (or micro-batch): captured after the warm-up, then replayed
                with autocast():  # the tokenizer runs under autocast, as in task.loss
                    inputs = graph_inputs(batch)
                try:
                    loss_value = graph_step(*inputs).item()
                except RuntimeError as e:
                    if not (auto_graph and graph_step.enabled and not graph_step.captured
                            and "could not be captured" in str(e)):
                        raise
                    # nothing of the failed capture ran: this step again, eagerly, and every later one
                    if d.main:
                        print(f"{e}\nthe steps run eagerly from here (--no-cuda-graph does so from the start)")
                    graph_step.enabled = False
                    loss_value = graph_step(*inputs).item()
                if cfg.accum_iter > 1:  # GraphedAccumulation: the window's step after its last micro-batch
                    window_finite = window_finite and math.isfinite(loss_value)
                    if sync:
                        graph_step.step()
                        loss_value = loss_value if window_finite else float("nan")
                        window_finite = True
            else:
                if sharded:  # FSDP2's no_sync: no reduce-scatter while the micro-batches accumulate
                    model.set_requires_gradient_sync(sync)
                ctx = ddp_model.no_sync() if (d.enabled and not sharded and not sync) else nullcontext()
                if trial is not None:
                    trial.before_step()
                with ctx, (trial.guard() if trial is not None else nullcontext()):
                    with autocast():
                        loss = task.loss(ddp_model, batch)
                    scaler.scale(loss / cfg.accum_iter).backward()
                    # read after the backward is queued: the GPU runs it while the host waits here (read
                    # before it, as the official loop does, the GPU idles while the host queues the backward)
                    loss_value = loss.item()
            data_iter += 1
            if sync:
                finite = math.isfinite(d.mean(loss_value))
                if finite and not graphed:  # graphed: the step ran (or, non-finite, skipped itself) on the device
                    if cfg.clip_grad or sharded:  # sharded: unscale_ is where the ranks agree on inf/nan
                        scaler.unscale_(optimizer)
                    if cfg.clip_grad:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                    scaler.step(optimizer)
                    scaler.update()
                if finite:
                    nonfinite_in_row = 0
                else:
                    nonfinite_in_row += 1
                    nonfinite_total += 1
                if not graphed:  # graphed: the gradients are the graph's outputs, written afresh each replay
                    optimizer.zero_grad(set_to_none=True)
                step += 1
                if device.type == "cuda":
                    torch.cuda.synchronize()
                step_seconds = time.time() - t_step
                step_time += step_seconds
                if trial is not None:
                    decision = trial.after_step(step_seconds)
                    if decision and d.main:
                        print(decision)
                last_loss = d.mean(loss_value) if finite else float("nan")
                if first_loss is None and finite:
                    first_loss = last_loss
                elapsed = time.time() - t_start
                cur_lr = lr_now * optimizer.param_groups[0].get("lr_scale", 1.0) if graphed else \
                    optimizer.param_groups[0]["lr"]
                imgs_per_s = (step - progress.start_step) * eff_batch / max(elapsed, 1e-9)
                progress.update(step, epoch=epoch, loss=last_loss, lr=cur_lr, img_s=round(imgs_per_s, 1),
                                data=f"{data_time:.1f}s/{data_time + step_time:.1f}s")
                if log_file and (step % cfg.log_every == 0 or step == total_steps):
                    rec = {"step": step, "epoch": epoch, "loss": last_loss, "lr": cur_lr,
                           "images_per_s": imgs_per_s, "data_time": data_time, "step_time": step_time,
                           "nonfinite": nonfinite_total}
                    log_file.write(json.dumps(rec) + "\n")
                    log_file.flush()
                    if tb:
                        for k in ("loss", "lr", "images_per_s"):
                            tb.add_scalar(f"train/{k}", rec[k], step)
                if nonfinite_in_row >= cfg.max_nonfinite:
                    stop_reason = (f"stopped: {nonfinite_in_row} non-finite losses in a row at step {step}; "
                                   f"the last good checkpoint is kept in {out}")
                    break
                ended = data_iter >= epoch_end_iter
                if cfg.save_every and step % cfg.save_every == 0:
                    save(step, 0 if ended else data_iter * cfg.batch_size, epoch + 1 if ended else epoch)
                if step >= total_steps or ended:
                    break
            t_data = time.time()
        if stop_reason != "done":
            break
        if data_iter >= epoch_end_iter:
            epoch += 1
            start_in_epoch = 0
            if cfg.vis_every and epoch % cfg.vis_every == 0:
                picture(f"reconstruction-epoch{epoch:03d}.png")
            if not cfg.save_every:
                save(step, 0, epoch)
        else:
            start_in_epoch = data_iter * cfg.batch_size
    progress.close()
    if stop_reason == "done":
        save(step, start_in_epoch, epoch)
        picture("reconstruction.png")
    summary = {"steps": step, "epochs": epoch, "first_loss": first_loss, "last_loss": last_loss,
               "fused_norm": _blocks_fused(model, device),
               "cuda_graph": bool(graph_step is not None and graph_step.enabled),
               "nonfinite_steps": nonfinite_total, "seconds": round(time.time() - t_start, 1),
               "output_dir": str(out), "status": stop_reason}
    if d.main:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"{stop_reason}: {step} steps, loss {first_loss} -> {last_loss}, "
              f"{summary['seconds']}s; checkpoints and pictures in {out}")
    if log_file:
        log_file.close()
    if tb:
        tb.close()
    d.close()
    return summary


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        print("TensorBoard scalars are off: pip install 'mimfast[tensorboard]' (log.jsonl has the same numbers)")
        return None
    return SummaryWriter(str(out / "tb"))


def _jsonable(cfg: PretrainConfig) -> dict:
    import dataclasses

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
