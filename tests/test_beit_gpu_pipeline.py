"""BEiT on the GPU input pipeline (``mimfast pretrain --method beit --gpu-pipeline``):

- ``keyed_uniforms``: splitmix64 in torch int64 ops equals a pure-Python splitmix64 bit for
  bit, on any device; values are keyed by (seed, salt, epoch, index, k) and look uniform;
  ``crop_uniforms`` (its salt-free stream) keeps its old values.
- Blockwise masks from keyed uniforms (the Triton generator, interpreted here): exactly
  ``num_mask_patches`` per mask, a function of (seed, epoch, index) whatever the batch, and the
  reference loop's mask on the same uniforms.
- ``BEiTTask.gpu_augment``: two views of one crop box and flip (torchvision's resized_crop on
  the box), one view for the pixel variant.
- ``BEiTTask.loss`` on a ``(views, labels, epochs, indices)`` batch equals the CPU path's loss
  on the same views and masks; ``BEiTTask.picture`` works on either dataset.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from mimfast.data import crop_boxes as cb
from mimfast.data import gpu_pipeline as gp
from mimfast.data.builtin import ShapesDataset
from mimfast.data.datasets import IMAGENET_MEAN, IMAGENET_STD, build_dataset
from mimfast.data.masking_generators import BlockwiseMaskingGenerator
from mimfast.models.tokenizer import VQTokenizer, save_vq_tokenizer
from mimfast.train.beit_task import MASK_SALT, BEiTTask, keyed_blockwise_masks
from mimfast.train.config import build_parser, config_from_args
from tolerance import DEVICE

M64 = (1 << 64) - 1

# beit-tiny at 32 px, patch 4: an 8x8 grid, 20 masked; a VQ tokenizer downsampling by 4, so
# the tokenizer view is 32 px too
SMALL = ["--img-size", "32", "--patch-size", "4", "--builtin-size", "32", "--batch-size", "8", "--num-workers", "0",
         "--kernels", "eager", "--log-every", "1", "--no-tensorboard", "--num-mask-patches", "20"]


def _sm(x: int) -> int:
    """splitmix64 on Python ints (Vigna's reference, mod 2**64)."""
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def _reference_uniforms(seed, epoch, index, count, salt=None):
    key = _sm((_sm((_sm(seed & M64) + (epoch & M64)) & M64) + (index & M64)) & M64)
    if salt is not None:
        key = _sm(key ^ (salt & M64))
    return [(_sm((key + k) & M64) >> 40) * 2.0**-24 for k in range(count)]


def _numpy_crop_uniforms(seed, epochs, indices):
    """crop_uniforms as it was first written (numpy uint64): its values must not change."""
    indices = cb._as_u64(indices)
    epochs = np.broadcast_to(cb._as_u64(epochs), indices.shape)
    with np.errstate(over="ignore"):
        key = cb._splitmix64(cb._splitmix64(cb._splitmix64(cb._as_u64(seed)) + epochs) + indices)
        words = cb._splitmix64(key[:, None] + np.arange(cb.UNIFORMS_PER_SAMPLE, dtype=np.uint64)[None, :])
    return torch.from_numpy((words >> np.uint64(40)).astype(np.float64) * 2.0**-24)


# --------------------------------------------------------------------------------------------
# keyed uniforms


@pytest.mark.parametrize("salt", [None, MASK_SALT, 1, (1 << 64) - 1])
def test_keyed_uniforms_are_splitmix64_bit_for_bit(device, salt):
    seeds = [0, 7, -3, 2**63 - 1, -(2**63)]
    keys = [(0, 0), (1, 5), (3, 2**40 + 17), (-1, 2**63 - 1), (2**62, -5)]
    for seed in seeds:
        epochs, indices = zip(*keys)
        for dtype in (torch.float32, torch.float64):
            got = cb.keyed_uniforms(seed, list(epochs), list(indices), 13, salt=salt, device=device, dtype=dtype)
            assert got.dtype == dtype and got.shape == (len(keys), 13) and got.device.type == device
            want = torch.tensor([_reference_uniforms(seed, e, i, 13, salt) for e, i in keys], dtype=torch.float64)
            assert torch.equal(got.cpu().double(), want), (seed, dtype)


def test_keyed_uniforms_are_keyed_by_sample_and_device_independent(device):
    idx = torch.arange(300)
    a = cb.keyed_uniforms(5, 2, idx, 64, salt=MASK_SALT, device=device)
    # a sample's values do not depend on the batch it is in, its position or the device
    perm = torch.randperm(300)[:37]
    assert torch.equal(a[perm], cb.keyed_uniforms(5, 2, idx[perm], 64, salt=MASK_SALT, device=device))
    assert torch.equal(a.cpu(), cb.keyed_uniforms(5, 2, idx, 64, salt=MASK_SALT, device="cpu"))
    assert torch.equal(a[:, :10], cb.keyed_uniforms(5, 2, idx, 10, salt=MASK_SALT, device=device))
    # per-sample epochs broadcast like one
    assert torch.equal(a, cb.keyed_uniforms(5, torch.full((300,), 2), idx, 64, salt=MASK_SALT, device=device))
    # another epoch, index, seed or salt: other values (no row of one equals any row of another)
    others = [cb.keyed_uniforms(5, 3, idx, 64, salt=MASK_SALT, device=device),
              cb.keyed_uniforms(5, 2, idx + 300, 64, salt=MASK_SALT, device=device),
              cb.keyed_uniforms(6, 2, idx, 64, salt=MASK_SALT, device=device),
              cb.keyed_uniforms(5, 2, idx, 64, device=device)]
    rows = {tuple(r) for r in a.cpu().tolist()}
    assert len(rows) == 300
    for o in others:
        assert rows.isdisjoint(tuple(r) for r in o.cpu().tolist())
    # no aliasing between (epoch, index) pairs: (e + 1, i) is not (e, i + 1)
    assert not torch.equal(cb.keyed_uniforms(0, 1, [0], 8), cb.keyed_uniforms(0, 0, [1], 8))


def test_crop_uniforms_keep_their_values():
    rng = np.random.default_rng(0)
    for seed in (0, 3, -11, 2**63 - 1):
        indices = np.concatenate([np.arange(500), rng.integers(-2**62, 2**62, 20)])
        epochs = rng.integers(0, 1000, indices.shape)
        got = cb.crop_uniforms(seed, epochs, indices)
        assert got.dtype == torch.float64 and got.device.type == "cpu"
        assert torch.equal(got, _numpy_crop_uniforms(seed, epochs, indices))
        assert torch.equal(cb.crop_uniforms(seed, 4, indices), _numpy_crop_uniforms(seed, 4, indices))


def test_keyed_uniforms_are_uniform(device):
    u = cb.keyed_uniforms(1, 0, torch.arange(2000), 500, salt=MASK_SALT, device=device).cpu().double()
    assert u.min() >= 0 and u.max() < 1
    assert torch.equal(u * 2**24, (u * 2**24).round())  # multiples of 2**-24
    n = u.numel()
    assert abs(u.mean().item() - 0.5) < 4 * (1 / 12 / n) ** 0.5
    assert abs(u.var().item() - 1 / 12) < 1e-3
    counts = torch.histc(u, bins=32, min=0, max=1)
    chi2 = ((counts - n / 32) ** 2 / (n / 32)).sum().item()
    assert chi2 < 31 + 6 * 62**0.5  # 31 degrees of freedom, 6 sigma
    for a, b in ((u[:, :-1], u[:, 1:]), (u[:-1], u[1:])):  # neighbours in k and across samples
        corr = torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1].item()
        assert abs(corr) < 6 / n**0.5


def test_keyed_uniforms_bad_arguments():
    with pytest.raises(TypeError, match="dtype"):
        cb.keyed_uniforms(0, 0, [1], 4, dtype=torch.float16)
    with pytest.raises(ValueError, match="count"):
        cb.keyed_uniforms(0, 0, [1], -1)
    with pytest.raises(ValueError, match="epochs"):
        cb.keyed_uniforms(0, [0, 1], [1, 2, 3], 4)


# --------------------------------------------------------------------------------------------
# masks from keyed uniforms


def test_keyed_masks_exact_count_and_a_function_of_the_sample(device):
    gen = BlockwiseMaskingGenerator((6, 9), 20, min_num_patches=4)  # odd grid
    epochs = torch.tensor([0, 0, 0, 1, 1, 2])
    indices = torch.tensor([0, 1, 2, 0, 5, 1])
    masks = keyed_blockwise_masks(gen, 3, epochs, indices, device=device)
    assert masks.shape == (6, 6, 9) and masks.dtype == torch.bool and masks.device.type == device
    assert torch.all(masks.flatten(1).sum(1) == 20)
    # another batch: other samples, other order; shared samples get the same masks
    order = [4, 1, 3]
    other = keyed_blockwise_masks(gen, 3, torch.cat([epochs[order], torch.tensor([7])]),
                                  torch.cat([indices[order], torch.tensor([9])]), device=device)
    assert torch.equal(other[:3], masks[order])
    assert len({m.cpu().numpy().tobytes() for m in masks}) == 6  # different samples, different masks
    assert not torch.equal(keyed_blockwise_masks(gen, 4, epochs, indices, device=device), masks)
    # the kernel's mask is the reference loop's (BEiT v2 top-up) on the same keyed uniforms
    eager = keyed_blockwise_masks(gen, 3, epochs, indices, device="cpu", backend="eager")
    assert torch.equal(eager, masks.cpu())


# --------------------------------------------------------------------------------------------
# the task


@pytest.fixture(scope="module")
def vq_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("vq") / "vq.safetensors"
    save_vq_tokenizer(VQTokenizer(vocab_size=64, embed_dim=8, hidden=8, downsample=4), path)
    return path


def _task(device, *argv):
    cfg = config_from_args(build_parser().parse_args(["--preset", "beit-tiny", *SMALL, *argv]))
    task = BEiTTask(cfg, torch.device(device))
    torch.manual_seed(0)
    model = task.build_model().to(device)
    return task, model


def _items(n, size=40, seed=0):
    ds = gp.EncodedImages(ShapesDataset(n, img_size=size, seed=seed))
    return gp.collate_encoded([ds[(0, i)] for i in range(n)])


def _resized(img, box, flip, size):
    x = F.resized_crop(img.float(), *box, [size, size], interpolation=InterpolationMode.BICUBIC,
                       antialias=False).clamp(0, 255)
    return F.horizontal_flip(x) if flip else x


def test_gpu_augment_two_views_of_one_crop(vq_path, device):
    task, _ = _task(device, "--tokenizer", f"vq:{vq_path}", "--seed", "5")
    aug = task.gpu_augment(32)
    assert isinstance(aug, gp.GpuAugment) and aug.size == 32 and aug.scale == (0.08, 1.0)
    assert aug.seed == 5 and aug.device.type == device
    assert aug.kwargs["interpolation"] == "bicubic" and aug.kwargs["second_size"] == 32  # 8x8 grid x 4
    assert aug.kwargs["second_interpolation"] == "bicubic" and aug.kwargs["second_norm"] == "map_pixels"
    datas, _, epochs, indices = _items(3)
    patches, tokens = aug(datas, epochs, indices)
    assert patches.shape == tokens.shape == (3, 3, 32, 32)
    boxes, flips = cb.sample_crop_params([40] * 3, [40] * 3, cb.crop_uniforms(5, epochs, indices), (0.08, 1.0))
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for i in range(3):
        x = _resized(datas[i], boxes[i].tolist(), bool(flips[i]), 32) / 255
        torch.testing.assert_close(patches[i].cpu(), (x - mean) / std, atol=1e-4, rtol=0)
        torch.testing.assert_close(tokens[i].cpu(), x * 0.8 + 0.1, atol=1e-5, rtol=0)


def test_gpu_augment_pixel_variant_one_view(device):
    task, _ = _task(device, "--model", "beit_tiny_patch16_224_pixel")
    aug = task.gpu_augment(32)
    assert aug.kwargs["second_size"] is None
    datas, _, epochs, indices = _items(2)
    view = aug(datas, epochs, indices)
    assert isinstance(view, torch.Tensor) and view.shape == (2, 3, 32, 32)


def test_loss_on_a_gpu_pipeline_batch_equals_the_cpu_path(vq_path, device):
    task, model = _task(device, "--tokenizer", f"vq:{vq_path}")
    datas, labels, epochs, indices = _items(4)
    views = task.gpu_augment(32)(datas, epochs, indices)
    loss = task.loss(model, (views, labels, epochs, indices))
    assert loss.ndim == 0 and torch.isfinite(loss)
    masks = task.keyed_masks(epochs, indices, 32)
    assert masks.shape == (4, 8, 8) and torch.all(masks.flatten(1).sum(1) == 20)
    cpu_path = task.loss(model, ((views[0], views[1], masks), labels))
    torch.testing.assert_close(loss, cpu_path, rtol=0, atol=0)
    loss.backward()
    assert all(p.grad is None for p in task.tokenizer.parameters())
    assert model.lm_head.weight.grad is not None

    pixel, pmodel = _task(device, "--model", "beit_tiny_patch16_224_pixel")
    view = pixel.gpu_augment(32)(datas, epochs, indices)
    ploss = pixel.loss(pmodel, (view, labels, epochs, indices))
    assert torch.isfinite(ploss)
    torch.testing.assert_close(ploss, pixel.loss(pmodel, ((view, torch.empty(4, 0), masks), labels)), rtol=0, atol=0)


def test_picture_from_either_dataset(vq_path, device, tmp_path):
    task, model = _task(device, "--tokenizer", f"vq:{vq_path}")
    gpu_ds = gp.EncodedImages(ShapesDataset(3, img_size=32))
    task.picture(model, gpu_ds, tmp_path / "gpu.png")
    assert (tmp_path / "gpu.png").is_file()
    imgs, tok, masks = task.vis
    assert imgs.shape == tok.shape == (3, 3, 32, 32)
    assert torch.equal(masks, task.keyed_masks([0] * 3, [0, 1, 2], 32))  # the epoch-0 masks of training
    task.vis = None
    cpu_ds = build_dataset("builtin", 32, task.transform(32), seed=0, builtin_size=3)
    task.picture(model, cpu_ds, tmp_path / "cpu.png")
    assert (tmp_path / "cpu.png").is_file()

    pixel, pmodel = _task(device, "--model", "beit_tiny_patch16_224_pixel")
    pixel.picture(pmodel, gpu_ds, tmp_path / "pixel.png")
    assert (tmp_path / "pixel.png").is_file()


# --------------------------------------------------------------------------------------------
# end to end (CUDA only: pretrain refuses --gpu-pipeline without it)


@pytest.mark.skipif(DEVICE != "cuda", reason="--gpu-pipeline decodes and augments on a CUDA device")
@pytest.mark.parametrize("variant", ["vq", "pixel"])
def test_pretrain_beit_gpu_pipeline_end_to_end(tmp_path, vq_path, variant):
    from mimfast.cli import main

    extra = ["--tokenizer", f"vq:{vq_path}"] if variant == "vq" else ["--model", "beit_tiny_patch16_224_pixel"]
    out = tmp_path / "run"
    argv = ["pretrain", "--method", "beit", "--preset", "beit-tiny", *SMALL, "--kernels", "auto", "--device", "cuda",
            "--gpu-pipeline", "--builtin-size", "64", "--max-steps", "6", "--output-dir", str(out), *extra]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "done" and summary["steps"] == 6
    assert summary["last_loss"] is not None and np.isfinite(summary["last_loss"])
    assert (out / "reconstruction.png").is_file()
