"""The input pipeline alone, and the MAE ViT-B/16 step with data loading included.

Data: ImageNet-like JPEGs made here (no download): sizes drawn from common ImageNet shapes
(about 500x375 on average), smooth random content plus noise, quality 90 (about 100-150 KB
each, like ImageNet's), written to a temporary folder (read back from the page cache).

Pipelines, each delivering a normalised (B, 3, 224, 224) float32 batch on the GPU:
- ``torchvision_cpu_pil``: the official MAE recipe: PIL decode, torchvision v1
  RandomResizedCrop(224, scale (0.2, 1), bicubic) + flip + ToTensor + Normalize in all
  ``os.cpu_count()`` DataLoader workers, pinned, copied to the GPU;
- ``mimfast_cpu``: mimfast's own CPU pipeline (``build_dataset`` + ``mae_transform``: PIL
  decode, v2 transforms on tensors with antialias, per-sample seeding), same workers;
- ``gpu_pipeline``: ``GpuLoader``: workers only read bytes, nvjpeg batch decode and the one
  augmentation kernel in the main process (prefetch thread, side stream);
- ``gpu_pipeline_hybrid``: the same with all cores as workers, which decode a share
  (``HYBRID_CPU_FRACTION``, a fifth) of the images themselves while nvjpeg decodes the rest
  (full runs: also ``gpu_pipeline_hybrid_0.33``, a third);
- ``gpu_pipeline_cpu_decode``: the same with the workers decoding every image (libjpeg-turbo),
  the GPU only augmenting: nvjpeg takes no GPU time from a training step;
- ``gpu_pipeline_adaptive``: the same with the share adjusted as it runs
  (``mimfast.data.gpu_pipeline.DecodeShare``, from 1 as ``mimfast pretrain
  --gpu-pipeline-adaptive-decode`` starts; ``cpu_decode_share_end`` is where it ended,
  ``cpu_decode_share_path`` its last values);
- ``gpu_decode_augment_inmem``: the same without the loader (bytes already in memory): the
  ceiling of the GPU side;
- ``nvjpeg_decode`` and ``augment_kernel``: the two GPU stages alone (kernel: GB/s of the
  output written plus the crop bytes read once).

Step: one MAE ViT-B/16 training step (bf16 autocast, fused AdamW, mask ratio 0.75) on a fixed
batch, against the same step fed by each pipeline (wall clock per step, the pipeline running
concurrently). Case ``mae_vit_b16_graph_step_b128``: the step captured in a CUDA graph, as
``mimfast pretrain`` runs it on CUDA by default (the GPU busy for the whole step, so nvjpeg's
and the kernel's GPU time show); ``mae_vit_b16_step_b128`` (full and smoke runs): the eager
step, whose host-bound launches leave the GPU gaps that hide the loader's GPU work. Target
(issue 10): GPU pipeline >= 3x torchvision's CPU pipeline with all cores, and the step with GPU
data loading within 10% of the step without.

Measurement windows: each loader runs one epoch long enough for the whole measurement (a
sampler over the folder's images repeated, ``_sampler``: an epoch end would restart it with
workers idle); the clock starts after a warm-up of at least one batch per worker (the workers'
first batches all arrive at once) and times whole rounds of the workers (``_window``), so no
batch made before the window is counted as made inside it. The step rows time at least 32
steps (64 in full runs) after 16, so the few batches a loader holds ready at the start hide
little of a deficit.

    python -m benchmarks.run --out DIR --only input_pipeline

Smoke mode (``ctx.smoke``, CPU; sizes in ``_sizes``): 12 JPEGs of about 40 x 50 px, 32 px
crops, batches of 4, one worker per loader, a one-block MAE with eager ops as the step; every
pipeline runs on the CPU (the GpuLoader takes its synchronous path), the augmentation kernel
under the interpreter. ``nvjpeg_decode`` needs CUDA and is left out.
"""

from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks import harness

BENCH = "input_pipeline"
IMG_SIZE = 224
SCALE = (0.2, 1.0)  # MAE
# share of images decoded by the workers in the hybrid variant: the second H200 run's 16 workers
# decoded about 3,600 images/s (hybrid at 0.4 made 9,000) against nvjpeg's 13,500-17,600, so the
# two sides balance near a fifth on the CPU; full runs also try a third
HYBRID_CPU_FRACTION = 0.2
HYBRID_CPU_FRACTION_FULL = 0.33
# (H, W) of common ImageNet shapes; the mean area is about 500x375's
SHAPES = [(375, 500), (500, 375), (333, 500), (500, 333), (375, 500), (400, 500), (366, 500), (500, 400),
          (480, 640), (281, 500), (375, 500), (300, 400)]
BATCH, STEP_BATCH = 256, 128
STEP_MODEL = ("mae_vit_base_patch16", {})


@dataclass(frozen=True)
class _Sizes:
    device: str
    img_size: int  # output crop side
    shapes: list  # (H, W) of the JPEGs made
    n_images: int
    batch: int  # pipeline batches
    measured: int  # timed batches at least (see _window: whole rounds of the loader's workers)
    step_batch: int
    step_steps: int  # timed steps at least (see _window)
    step_model: tuple  # (name, overrides)
    cpu_workers: int
    gpu_workers: int
    step_warmup: int = 2  # untimed steps at least, on each loader (see _window)
    full: bool = False  # a full (not --quick) GPU run: the extra hybrid share too


def _sizes(ctx) -> _Sizes:
    if ctx.smoke:
        # the step's model runs eager: its kernels are bench_step's; here it only consumes batches
        return _Sizes(ctx.device, 32, [(40, 50), (50, 40), (36, 48), (45, 60)], 12, 4, 2, 4, 2,
                      ("mae_vit_tiny_patch16", dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                                    decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2,
                                                    kernels="eager")),
                      1, 1)
    cpu_workers = os.cpu_count() or 1
    return _Sizes(ctx.device, IMG_SIZE, SHAPES, 1024 if ctx.quick else 2048, BATCH, 16 if ctx.quick else 32,
                  STEP_BATCH, 32 if ctx.quick else 64, STEP_MODEL, cpu_workers, min(8, cpu_workers), 16,
                  full=not ctx.quick)


def _make_jpegs(folder: Path, n: int, seed: int = 0, shapes=SHAPES) -> list[torch.Tensor]:
    """n JPEGs (quality 90) in ``folder``; returns their bytes."""
    from torchvision.io import encode_jpeg

    def one(i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 100003 + i)
        h, w = shapes[i % len(shapes)]
        # smooth colour fields plus fine noise: JPEG sizes like natural photos
        low = torch.rand(1, 3, max(2, h // 24), max(2, w // 24), generator=g) * 255
        img = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)[0]
        img = img + torch.randn(3, h, w, generator=g) * 20
        img = img.clamp(0, 255).to(torch.uint8)
        data = encode_jpeg(img, quality=90)
        (folder / f"{i:05d}.jpg").write_bytes(data.numpy().tobytes())
        return data

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, range(n)))


class _PilFolder(torch.utils.data.Dataset):
    """torchvision's ImageFolder loader: PIL open + convert('RGB') + a v1 transform."""

    def __init__(self, files, transform):
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with open(self.files[i], "rb") as f:
            img = Image.open(f).convert("RGB")
        return self.transform(img), 0


def _official_mae_transform(size: int):
    from torchvision import transforms

    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=SCALE, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])


def _repeat(loader, n_batches):
    """Yield n_batches batches, restarting the loader if its epoch ends first (the samplers
    here make it long enough: a restart would idle the workers, see _sampler)."""
    done = 0
    while done < n_batches:
        for batch in loader:
            yield batch
            done += 1
            if done == n_batches:
                return


def _window(workers: int, warmup: int, measured: int) -> tuple[int, int]:
    """(warm-up, timed) batch counts for a DataLoader with ``workers`` workers.

    DataLoader gives batch k to worker k % workers, and every worker starts its first batch at
    once: the first ``workers`` batches arrive together, then each later round together. The
    warm-up takes at least the first round and the timed window whole rounds; a shorter window
    (2 warm-up and 6 timed batches with 16 workers) times batches made before it began, and
    shows a CPU pipeline many times faster than it is."""
    w = max(1, int(workers))
    return max(warmup, w), -(-max(measured, 1) // w) * w


def _sampler(dataset, n_batches: int, batch: int, seed: int = 0):
    """A shuffled sampler drawing ``n_batches`` batches in one epoch (permutations of the dataset
    back to back): the JPEG folder is smaller than a measurement, and an epoch's end inside it
    would restart the loader with its workers idle (1024 images are 4 batches of 256: 4 of 16
    workers busy)."""
    from torch.utils.data import RandomSampler

    return RandomSampler(dataset, num_samples=n_batches * batch, generator=torch.Generator().manual_seed(seed))


def _throughput(batches, batch_size: int, warmup: int, measured: int, device: str,
                consume=None) -> tuple[float, float]:
    """(ms per batch, images/s) over ``measured`` batches after ``warmup``; each batch is moved
    to the device (if it is not there) and ``consume``d; the clock stops after a synchronize."""
    it = iter(batches)
    t0 = None
    for k in range(warmup + measured):
        if k == warmup:
            harness.sync()
            t0 = time.perf_counter()
        imgs, _ = next(it)
        imgs = imgs.to(device, non_blocking=True)
        if consume is not None:
            consume(imgs)
    harness.sync()
    dt = time.perf_counter() - t0
    return 1e3 * dt / measured, measured * batch_size / dt


PREFETCH_FACTOR = 4  # batches each CPU DataLoader worker works ahead
GPU_SPARE_BATCHES = 4  # batches a GpuLoader's sampler holds past the measurement (see _gpu_loader)


def _cpu_loaders(folder: Path, files, batch: int, workers: int, size: int, n_batches: int):
    """The two CPU pipelines, each a loader of ``n_batches`` batches in one epoch."""
    from mimfast.data.datasets import build_dataset
    from mimfast.train.pretrain import mae_transform

    common = dict(batch_size=batch, num_workers=workers, pin_memory=harness.on_cuda(),
                  drop_last=True, persistent_workers=False, prefetch_factor=PREFETCH_FACTOR)
    tv = _PilFolder(files, _official_mae_transform(size))
    yield "torchvision_cpu_pil", DataLoader(tv, sampler=_sampler(tv, n_batches, batch), **common)
    mf = build_dataset(str(folder), size, mae_transform(size, SCALE[0]))
    yield "mimfast_cpu", DataLoader(mf, sampler=_sampler(mf, n_batches, batch), **common)


def _gpu_loader(folder: Path, batch: int, workers: int, sz: _Sizes, n_batches: int,
                cpu_decode_fraction=0.0):
    from mimfast.data.gpu_pipeline import EncodedImages, GpuAugment, GpuLoader

    augment = GpuAugment(sz.img_size, scale=SCALE, seed=0, device=sz.device)
    dataset = EncodedImages(folder, cpu_decode_fraction=cpu_decode_fraction)
    # 4 spare batches: the prefetch thread keeps working past the last timed batch, whose GPU work
    # the final synchronize then waits for, as the first synchronize waited for the batches it
    # had made ahead of the timed window (up to prefetch + 1)
    sampler = _sampler(dataset, n_batches + GPU_SPARE_BATCHES, batch)
    return GpuLoader.from_dataset(dataset, augment, batch_size=batch, num_workers=workers, sampler=sampler,
                                  prefetch=2, persistent_workers=False)


def _gpu_loaders(folder: Path, batch: int, gpu_workers: int, cpu_workers: int, sz: _Sizes, warmup: int,
                 measured: int):
    """(name, workers, warm-up batches, timed batches, loader) of the GPU pipelines."""
    warm, timed = _window(gpu_workers, warmup, measured)
    yield "gpu_pipeline", gpu_workers, warm, timed, _gpu_loader(folder, batch, gpu_workers, sz, warm + timed)
    # the workers decode a share of the images with libjpeg-turbo while nvjpeg decodes the rest
    warm, timed = _window(cpu_workers, warmup, measured)
    yield "gpu_pipeline_hybrid", cpu_workers, warm, timed, _gpu_loader(folder, batch, cpu_workers, sz, warm + timed,
                                                                        HYBRID_CPU_FRACTION)
    if sz.full:
        yield (f"gpu_pipeline_hybrid_{HYBRID_CPU_FRACTION_FULL}", cpu_workers, warm, timed,
               _gpu_loader(folder, batch, cpu_workers, sz, warm + timed, HYBRID_CPU_FRACTION_FULL))
    # every image decoded by the workers: the GPU only augments
    yield "gpu_pipeline_cpu_decode", cpu_workers, warm, timed, _gpu_loader(folder, batch, cpu_workers, sz,
                                                                            warm + timed, 1.0)
    # the share adjusted as the loader runs (from 1, as the trainer starts; the row records where it ended)
    from mimfast.data.gpu_pipeline import DecodeShare

    share = DecodeShare(1.0, window=max(4, cpu_workers // 2))
    yield "gpu_pipeline_adaptive", cpu_workers, warm, timed, _gpu_loader(folder, batch, cpu_workers, sz,
                                                                          warm + timed, share)


def _share_cols(loader) -> dict:
    """The workers' decode share a loader ended with, where it adjusts one."""
    share = getattr(getattr(getattr(loader, "loader", None), "dataset", None), "decode_share", None)
    return {} if share is None else {"cpu_decode_share_end": round(share.get(), 2),
                                     "cpu_decode_share_path": "-".join(f"{v:.2f}" for v in share.history[-8:])}


def _all_loaders(folder: Path, files, batch: int, sz: _Sizes, gpu_workers: int, warmup: int, measured: int):
    """(name, workers, warm-up batches, timed batches, loader): the GPU pipelines, then the CPU ones."""
    yield from _gpu_loaders(folder, batch, gpu_workers, sz.cpu_workers, sz, warmup, measured)
    warm, timed = _window(sz.cpu_workers, warmup, measured)
    for name, loader in _cpu_loaders(folder, files, batch, sz.cpu_workers, sz.img_size, warm + timed):
        yield name, sz.cpu_workers, warm, timed, loader


def _stage_rows(ctx, datas, batch: int, sz: _Sizes) -> None:
    """nvjpeg decode alone, the kernel alone, and decode + augment from bytes in memory."""
    from mimfast.data import crop_boxes as cb
    from mimfast.data import gpu_pipeline as gp
    from mimfast.kernels.augment import augment_crops

    dev, size = sz.device, sz.img_size
    datas = datas[:batch]
    if dev == "cuda":  # nvjpeg; elsewhere decode_images decodes on the CPU, which is no nvjpeg row
        ms = harness.time_ms(lambda: gp.decode_images(datas, dev), warmup_ms=100, rep_ms=500)
        ctx.add(BENCH, f"b{batch}", "nvjpeg_decode", ms, images_per_s=round(batch * 1e3 / ms))

    images, _ = gp.decode_images(datas, dev)
    packed = gp.pack_images(images)
    u = cb.crop_uniforms(0, 0, range(batch))
    boxes, flips = cb.sample_crop_params(packed.heights, packed.widths, u, SCALE)
    meta = gp._meta(packed, boxes, flips).to(dev)
    (mul, add), _ = gp._affines((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "map_pixels")
    out = torch.empty(batch, 3, size, size, device=dev)
    crop_bytes = int((boxes[:, 2] * boxes[:, 3]).sum()) * 3
    for variant, kw in (("augment_kernel", {}), ("augment_kernel_bilinear", {"interpolation": "bilinear"})):
        ms = harness.time_ms(lambda: augment_crops(packed.data, meta, out, mul, add, **kw))
        ctx.add(BENCH, f"b{batch}", variant, ms, bytes_moved=out.numel() * 4 + crop_bytes,
                images_per_s=round(batch * 1e3 / ms))
    out2 = torch.empty(batch, 3, size // 2, size // 2, device=dev)
    (mul, add), (mul2, add2) = gp._affines((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "map_pixels")
    ms = harness.time_ms(lambda: augment_crops(packed.data, meta, out, mul, add, out2=out2, mul2=mul2, add2=add2))
    ctx.add(BENCH, f"b{batch}", "augment_kernel_beit_two_views", ms,
            bytes_moved=(out.numel() + out2.numel()) * 4 + crop_bytes, images_per_s=round(batch * 1e3 / ms))
    # the host side of a batch: box sampling, packing, meta upload, launch (no decode)
    ms = harness.time_ms(lambda: gp.gpu_random_resized_crop(images, size, u, scale=SCALE))
    ctx.add(BENCH, f"b{batch}", "augment_incl_host", ms, images_per_s=round(batch * 1e3 / ms))
    aug = gp.GpuAugment(size, scale=SCALE, device=dev)
    epochs, idx = torch.zeros(batch, dtype=torch.int64), torch.arange(batch)
    ms = harness.time_ms(lambda: aug(datas, epochs, idx), warmup_ms=100, rep_ms=500)
    ctx.add(BENCH, f"b{batch}", "gpu_decode_augment_inmem", ms, images_per_s=round(batch * 1e3 / ms))


def _step_rows(ctx, folder: Path, files, workers: int, batch: int, steps: int, sz: _Sizes,
               graphed: bool = False) -> None:
    """The MAE step fed by each loader against the step on a fixed batch. ``graphed``: the step
    captured in a CUDA graph (``GraphedStep``, ``mimfast pretrain``'s default on CUDA): the
    step's GPU time is what the loader's GPU work (nvjpeg, the kernel) then competes with, no
    longer hidden behind the host's launches. Off CUDA it runs eagerly."""
    from mimfast.models import create_model
    from mimfast.train.cuda_graph import GraphedStep, make_capturable

    dev = sz.device
    name, overrides = sz.step_model
    model = create_model(name, **overrides).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    fixed = torch.randn(batch, 3, sz.img_size, sz.img_size, device=dev)

    def step_fn(imgs):
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss, _, _ = model(imgs, mask_ratio=0.75)
        loss.backward()
        opt.step()
        return loss.detach()

    if graphed:
        make_capturable(opt)
        # warmed up and captured on the fixed batch now; each call copies its batch in and replays
        step = GraphedStep(step_fn, (fixed,), optimizer=opt, warmup=1 if ctx.smoke else 3)
    else:
        def step(imgs):
            step_fn(imgs)
            opt.zero_grad(set_to_none=True)

        for _ in range(1 if ctx.smoke else 3):
            step(fixed)
    case = f"mae_vit_b16_{'graph_' if graphed else ''}step_b{batch}"
    # the same wall-clock loop as with a loader, on one fixed batch already on the GPU
    ms, ips = _throughput(((fixed, None) for _ in range(sz.step_warmup + steps)), batch, warmup=sz.step_warmup,
                          measured=steps, device=dev, consume=step)
    ctx.add(BENCH, case, "no_data", ms, images_per_s=round(ips), timed_batches=steps)
    base_ms = ms
    # one loader at a time: its workers end (the iterator freed) before the next starts
    for name, n_workers, warm, timed, loader in _all_loaders(folder, files, batch, sz, workers, sz.step_warmup, steps):
        try:
            ms, ips = _throughput(_repeat(loader, warm + timed), batch, warmup=warm, measured=timed, device=dev,
                                  consume=step)
        except Exception as e:  # one pipeline failing must not lose the others' rows
            ctx.fail(BENCH, case, name, e, workers=n_workers)
        else:
            ctx.add(BENCH, case, name, ms, images_per_s=round(ips), workers=n_workers, timed_batches=timed,
                    overhead_vs_no_data_pct=round(100 * (ms / base_ms - 1), 1), **_share_cols(loader))
        del loader
    ctx.speedups(BENCH, case, over="no_data")


def run(ctx: harness.Context) -> None:
    sz = _sizes(ctx)
    batch, n_images, measured = sz.batch, sz.n_images, sz.measured
    gpu_workers = sz.gpu_workers
    with tempfile.TemporaryDirectory(prefix="mimfast-jpegs-") as tmp:
        folder = Path(tmp)
        t0 = time.time()
        datas = _make_jpegs(folder, n_images, shapes=sz.shapes)
        files = sorted(str(p) for p in folder.glob("*.jpg"))
        mean_kb = sum(d.numel() for d in datas) / len(datas) / 1024
        print(f"[{BENCH}] {n_images} JPEGs, mean {mean_kb:.0f} KB, made in {time.time() - t0:.1f}s", flush=True)

        try:
            _stage_rows(ctx, datas, batch, sz)
        except Exception as e:  # the pipelines' rows still follow
            print(f"[{BENCH}] stage rows failed: {type(e).__name__}: {e}", flush=True)
            ctx.fail(BENCH, f"b{batch}", "stages", e)

        case = f"pipeline_b{batch}"
        for name, workers, warm, timed, loader in _all_loaders(folder, files, batch, sz, gpu_workers, 2, measured):
            try:
                ms, ips = _throughput(_repeat(loader, warm + timed), batch, warmup=warm, measured=timed,
                                      device=sz.device)
            except Exception as e:  # one pipeline failing must not lose the others' rows
                ctx.fail(BENCH, case, name, e, workers=workers)
            else:
                ctx.add(BENCH, case, name, ms, images_per_s=round(ips), workers=workers, timed_batches=timed,
                        mean_jpeg_kb=round(mean_kb), **_share_cols(loader))
            del loader
        ctx.speedups(BENCH, case, over="torchvision_cpu_pil")
        ctx.speedups(BENCH, case, over="mimfast_cpu")

        # the step as mimfast pretrain runs it on CUDA (captured) first; the eager step in full
        # runs and smoke runs (where the graph's step runs eagerly anyway)
        for graphed in (True, False) if (sz.full or ctx.smoke) else (True,):
            try:
                _step_rows(ctx, folder, files, gpu_workers, batch=sz.step_batch, steps=sz.step_steps, sz=sz,
                           graphed=graphed)
            except Exception as e:  # the model's own kernels must not lose the pipeline's rows
                print(f"[{BENCH}] MAE step with data loading failed: {type(e).__name__}: {e}", flush=True)
                ctx.add(BENCH, f"mae_vit_b16_{'graph_' if graphed else ''}step_b{sz.step_batch}", "failed",
                        float("nan"), error=f"{type(e).__name__}: {e}")
            harness.empty_cache()
