"""The BEiT pixel variant against microsoft/SimMIM (``models/simmim.py``, ``data/data_simmim.py``)
and BEiT's "recover masked pixels" ablation:

- ``SimMIMMaskGenerator``: SimMIM's ``MaskGenerator`` (transcribed below) gives the same count and
  grid for every size; both draw a uniform random subset of ``mask_count`` cells (chi-square over
  every subset of a 3x3 grid), upsampled in aligned ``scale x scale`` blocks; sizes must be ints.
- Head and loss: ``pixel_head`` is SimMIM's decoder (1x1 conv + PixelShuffle) with its output
  channels permuted from (c, i, j) to (i, j, c), so ``unpatchify(pred)`` is SimMIM's
  reconstruction; the model's L1 loss and its gradients are SimMIM's loss (transcribed) times
  (masked pixels + 1e-5) / masked pixels, in float64, and the Triton loss kernel agrees.
- ``BEiTTask``: the pixel variant's masks are BEiT's blockwise masks by default and SimMIM's with
  ``pixel_masks="simmim"``, on the CPU path (per sample) and the GPU-pipeline path (keyed by
  (seed, epoch, index)); bad sizes are refused; a short run trains with them end to end.
"""

from __future__ import annotations

import json
import math
from itertools import combinations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mimfast import ops
from mimfast.data.masking_generators import BlockwiseMaskingGenerator, SimMIMMaskGenerator
from mimfast.models.beit import beit_tiny_patch16_224_pixel
from mimfast.train.beit_task import BEiTTask, keyed_simmim_masks
from mimfast.train.config import build_parser, config_from_args
from mimfast.train.pretrain import pretrain
from tolerance import DEVICE

# --------------------------------------------------------------------------------------------
# SimMIM, transcribed (data/data_simmim.py MaskGenerator; models/simmim.py SimMIM decoder + loss)


def _simmim_mask_generator(input_size, mask_patch_size, model_patch_size, mask_ratio):
    """MaskGenerator.__init__: the sizes it computes (it asserts the divisibility)."""
    assert input_size % mask_patch_size == 0
    assert mask_patch_size % model_patch_size == 0
    rand_size = input_size // mask_patch_size
    scale = mask_patch_size // model_patch_size
    token_count = rand_size ** 2
    mask_count = int(np.ceil(token_count * mask_ratio))
    return rand_size, scale, token_count, mask_count


def _simmim_mask(input_size, mask_patch_size, model_patch_size, mask_ratio, rs: np.random.RandomState):
    """MaskGenerator.__call__, its global np.random replaced by ``rs``."""
    rand_size, scale, token_count, mask_count = _simmim_mask_generator(input_size, mask_patch_size,
                                                                       model_patch_size, mask_ratio)
    mask_idx = rs.permutation(token_count)[:mask_count]
    mask = np.zeros(token_count, dtype=int)
    mask[mask_idx] = 1
    mask = mask.reshape((rand_size, rand_size))
    return mask.repeat(scale, axis=0).repeat(scale, axis=1)


def _simmim_decoder(pixel_head: nn.Linear, p: int, chans: int) -> nn.Sequential:
    """SimMIM's decoder (Conv2d(D, p*p*3, 1) + PixelShuffle(p)) holding ``pixel_head``'s weights:
    conv channel c*p*p + i*p + j <- head row (i*p + j)*C + c."""
    D = pixel_head.in_features
    conv = nn.Conv2d(D, p * p * chans, kernel_size=1).to(pixel_head.weight)
    perm = torch.arange(p * p * chans).view(p, p, chans).permute(2, 0, 1).reshape(-1)  # conv channel -> head row
    with torch.no_grad():
        conv.weight.copy_(pixel_head.weight[perm].view(p * p * chans, D, 1, 1))
        conv.bias.copy_(pixel_head.bias[perm])
    return nn.Sequential(conv, nn.PixelShuffle(p))


def _simmim_loss(x, x_rec, mask, patch_size, in_chans):
    """SimMIM.forward after the decoder: mask (N, h, w) of patches, upsampled to pixels."""
    mask = mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1).contiguous()
    loss_recon = F.l1_loss(x, x_rec, reduction="none")
    return (loss_recon * mask).sum() / (mask.sum() + 1e-5) / in_chans


def _chi2_z(observed, expected):
    df = observed.size - 1
    return (((observed - expected) ** 2 / expected).sum() - df) / math.sqrt(2 * df)


# --------------------------------------------------------------------------------------------
# the mask generator


@pytest.mark.parametrize("input_size,mask_patch_size,model_patch_size,mask_ratio", [
    (224, 32, 16, 0.6), (192, 32, 4, 0.6), (224, 32, 8, 0.6), (224, 16, 16, 0.75), (192, 32, 16, 0.4),
    (64, 16, 8, 0.6), (32, 8, 4, 0.6), (96, 32, 16, 0.1), (224, 224, 16, 0.6), (224, 32, 32, 1.0), (224, 32, 16, 0.0),
])
def test_mask_generator_count_and_grid(input_size, mask_patch_size, model_patch_size, mask_ratio):
    rand_size, scale, token_count, mask_count = _simmim_mask_generator(input_size, mask_patch_size,
                                                                       model_patch_size, mask_ratio)
    gen = SimMIMMaskGenerator(input_size, mask_patch_size, model_patch_size, mask_ratio)
    assert gen.rand_size == (rand_size, rand_size) and gen.scale == scale
    assert gen.token_count == token_count and gen.mask_count == mask_count
    grid = input_size // model_patch_size  # the model's patch grid
    assert gen.get_shape() == (grid, grid) and gen.num_masking_patches == mask_count * scale * scale
    ref = _simmim_mask(input_size, mask_patch_size, model_patch_size, mask_ratio, np.random.RandomState(0))
    masks = gen(50, rng=np.random.default_rng(1))
    assert masks.shape == (50, grid, grid) == (50, *ref.shape) and masks.dtype == bool
    assert ref.sum() == gen.num_masking_patches and np.all(masks.reshape(50, -1).sum(1) == ref.sum())
    cells = masks[:, ::scale, ::scale]  # aligned scale x scale blocks, as the reference's repeat
    assert np.array_equal(masks, cells.repeat(scale, axis=1).repeat(scale, axis=2))
    one = gen(rng=np.random.default_rng(2))
    assert one.shape == (grid, grid) and one.sum() == gen.num_masking_patches


def test_mask_generator_law_is_the_reference_law():
    """Every subset of mask_count cells equally likely, as permutation(token_count)[:mask_count]:
    96 px, 32 px cells, 3x3 cells, ratio 0.4 -> 4 of 9 masked, 126 subsets."""
    n = 126 * 80
    subsets = {s: k for k, s in enumerate(combinations(range(9), 4))}
    gen = SimMIMMaskGenerator(96, 32, 16, 0.4)
    cells = gen(n, rng=np.random.default_rng(3))[:, ::2, ::2].reshape(n, 9)
    ours = np.bincount([subsets[tuple(np.flatnonzero(c))] for c in cells], minlength=126)
    rs = np.random.RandomState(4)
    refs = [_simmim_mask(96, 32, 16, 0.4, rs)[::2, ::2].reshape(9) for _ in range(n)]
    theirs = np.bincount([subsets[tuple(np.flatnonzero(c))] for c in refs], minlength=126)
    expected = np.full(126, n / 126)
    assert abs(_chi2_z(ours, expected)) < 4 and abs(_chi2_z(theirs, expected)) < 4
    # and the two samples against each other (two-sample chi-square)
    stat = (((ours - theirs) ** 2) / (ours + theirs)).sum()
    assert (stat - 125) / math.sqrt(250) < 4


def test_mask_generator_sizes_must_be_ints():
    with pytest.raises(ValueError, match="mask_patch_size"):
        SimMIMMaskGenerator(224, 32.0, 16)
    with pytest.raises(ValueError, match="model_patch_size"):
        SimMIMMaskGenerator(224, 32, 16.0)
    with pytest.raises(ValueError, match="mask_patch_size"):
        SimMIMMaskGenerator(224, True, 1)
    assert SimMIMMaskGenerator(224, np.int64(32), np.int64(16)).mask_count == 30


# --------------------------------------------------------------------------------------------
# head and loss

SMALL = dict(img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=3, kernels="eager")


def _model_and_batch(dtype=torch.float64, n=3):
    torch.manual_seed(0)
    model = beit_tiny_patch16_224_pixel(**SMALL).to(dtype)
    with torch.no_grad():  # away from the init, so every term matters
        for p_ in model.parameters():
            p_.add_(torch.randn_like(p_) * 0.05)
    imgs = torch.randn(n, 3, 64, 64, dtype=dtype)
    masks = torch.from_numpy(SimMIMMaskGenerator(64, 16, 8, 0.6)(n, rng=np.random.default_rng(5)))  # (n, 8, 8)
    return model, imgs, masks


def test_pixel_head_is_simmims_decoder_permuted():
    model, imgs, masks = _model_and_batch()
    p, (h, w) = model.patch_size, model.patch_embed.grid_size
    _, pred = model(imgs, masks)
    z = model.forward_features(imgs, masks.flatten(1))[:, 1:]  # VisionTransformerForSimMIM.forward
    B, L, C = z.shape
    z = z.permute(0, 2, 1).reshape(B, C, h, w)
    x_rec = _simmim_decoder(model.pixel_head, p, 3)(z)
    # the picture (and the loss target's layout) is SimMIM's reconstruction
    torch.testing.assert_close(ops.unpatchify(pred, p, 3, (h, w)), x_rec, rtol=1e-12, atol=1e-12)
    # the permutation matters: the head's rows taken as conv channels as they are give another image
    naive = nn.Sequential(nn.Conv2d(C, p * p * 3, 1), nn.PixelShuffle(p)).to(z)
    with torch.no_grad():
        naive[0].weight.copy_(model.pixel_head.weight.view(-1, C, 1, 1))
        naive[0].bias.copy_(model.pixel_head.bias)
    assert not torch.allclose(naive(z), x_rec)


def test_l1_loss_and_gradients_are_simmims_up_to_its_eps():
    model, imgs, masks = _model_and_batch()
    p, (h, w) = model.patch_size, model.patch_embed.grid_size
    loss, _ = model(imgs, masks)
    grads = torch.autograd.grad(loss, list(model.parameters()))

    # SimMIM's forward on the same weights; the decoder holds a copy of pixel_head's
    z = model.forward_features(imgs, masks.flatten(1))[:, 1:]
    z = z.permute(0, 2, 1).reshape(z.shape[0], -1, h, w)
    decoder = _simmim_decoder(model.pixel_head, p, 3)
    ref = _simmim_loss(imgs, decoder(z), masks.to(imgs.dtype), p, 3)
    encoder_params = [q for n_, q in model.named_parameters() if not n_.startswith("pixel_head.")]
    ref_grads = torch.autograd.grad(ref, encoder_params + list(decoder.parameters()))
    masked_pixels = float(masks.sum()) * p * p
    factor = masked_pixels / (masked_pixels + 1e-5)  # the only difference: SimMIM's eps
    assert factor != 1.0
    torch.testing.assert_close(loss * factor, ref, rtol=1e-13, atol=0)
    names = [n_ for n_, _ in model.named_parameters()]
    ours = dict(zip(names, grads))
    for n_, g in zip([n_ for n_ in names if not n_.startswith("pixel_head.")], ref_grads):
        torch.testing.assert_close(ours[n_] * factor, g, rtol=1e-10, atol=1e-16, msg=n_)
    perm = torch.arange(p * p * 3).view(p, p, 3).permute(2, 0, 1).reshape(-1)
    conv_w, conv_b = ref_grads[-2], ref_grads[-1]
    torch.testing.assert_close(ours["pixel_head.weight"][perm] * factor, conv_w.view(p * p * 3, -1), rtol=1e-10,
                               atol=1e-16)
    torch.testing.assert_close(ours["pixel_head.bias"][perm] * factor, conv_b, rtol=1e-10, atol=1e-16)


def test_triton_loss_kernel_is_simmims_loss():
    """The fused loss on the pixel variant's inputs, on the test device (compiled on a GPU,
    interpreted on the CPU; Triton runs on no other tensors)."""
    model, imgs, masks = _model_and_batch(torch.float32)
    p, (h, w) = model.patch_size, model.patch_embed.grid_size
    with torch.no_grad():
        _, pred = model(imgs, masks)
    pred, imgs, masks = pred.to(DEVICE), imgs.to(DEVICE), masks.to(DEVICE)
    pred.requires_grad_(True)
    loss = ops.masked_patch_loss(pred, imgs, masks.flatten(1), p, norm_pix=False, loss="l1", backend="triton")
    ref = _simmim_loss(imgs, ops.unpatchify(pred, p, 3, (h, w)), masks.float(), p, 3)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    g, = torch.autograd.grad(loss, pred)
    g_ref, = torch.autograd.grad(ref, pred)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-9)


# --------------------------------------------------------------------------------------------
# the task: which masks the pixel variant trains with

SMALL_RUN = ["--img-size", "32", "--patch-size", "4", "--builtin-size", "16", "--batch-size", "4", "--num-workers",
             "0", "--kernels", "eager", "--log-every", "1", "--no-tensorboard", "--num-mask-patches", "20"]


def _cfg(*argv, **extra):
    cfg = config_from_args(build_parser().parse_args(["--method", "beit", "--preset", "beit-tiny", *SMALL_RUN,
                                                      "--model", "beit_tiny_patch16_224_pixel", *argv]))
    for k, v in extra.items():  # set past the parser (which checks the choices)
        setattr(cfg, k, v)
    return cfg


def test_pixel_variant_settings_from_the_command_line():
    """--pixel-masks, --mask-patch-size, --simmim-mask-ratio, --pixel-loss and --norm-pix-loss reach
    the task and the model; the BEiT recipe's pixel loss is SimMIM's (l1, no per-patch norm)."""
    task = BEiTTask(_cfg(), torch.device("cpu"))
    model = task.build_model()
    assert (model.loss_type, model.norm_pix_loss) == ("l1", False)
    task = BEiTTask(_cfg("--pixel-masks", "simmim", "--mask-patch-size", "8", "--simmim-mask-ratio", "0.5",
                         "--pixel-loss", "mse", "--norm-pix-loss"), torch.device("cpu"))
    model = task.build_model()
    assert (task.pixel_masks, task.mask_patch_size, task.simmim_mask_ratio) == ("simmim", 8, 0.5)
    assert (model.loss_type, model.norm_pix_loss) == ("mse", True)
    assert isinstance(task.mask_generator(32), SimMIMMaskGenerator)
    with pytest.raises(SystemExit):
        _cfg("--pixel-masks", "random")


def test_pixel_variant_masks_default_to_blockwise():
    task = BEiTTask(_cfg(), torch.device("cpu"))
    task.build_model()
    assert task.pixel_masks == "blockwise"
    gen = task.mask_generator(32)
    assert isinstance(gen, BlockwiseMaskingGenerator) and gen.num_masking_patches == 20


def test_pixel_variant_with_simmim_masks():
    from mimfast.data.datasets import build_dataset

    task = BEiTTask(_cfg(pixel_masks="simmim", mask_patch_size=8), torch.device("cpu"))
    torch.manual_seed(0)
    model = task.build_model()
    gen = task.mask_generator(32)  # 32 px, 8 px cells, 4 px patches: 4x4 cells of 2x2 patches, 10 masked
    assert isinstance(gen, SimMIMMaskGenerator) and gen.mask_count == 10 and gen.get_shape() == (8, 8)
    ds = build_dataset("builtin", 32, task.transform(32), seed=0, builtin_size=8)
    items = [ds[(0, i)][0] for i in range(8)]
    masks = torch.stack([it[2] for it in items])
    assert masks.shape == (8, 8, 8) and masks.dtype == torch.bool
    assert torch.all(masks.flatten(1).sum(1) == 40)
    cells = masks[:, ::2, ::2]
    assert torch.equal(masks, cells.repeat_interleave(2, 1).repeat_interleave(2, 2))
    assert torch.equal(torch.stack([ds[(0, i)][0][2] for i in range(8)]), masks)  # a function of (epoch, index)
    imgs = torch.stack([it[0] for it in items])
    loss = task.loss(model, ((imgs, torch.empty(8, 0), masks), torch.zeros(8)))
    ref, _ = model(imgs, masks)
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)

    # the GPU pipeline's masks: SimMIM's law, keyed by (seed, epoch, index)
    epochs, indices = [0] * 6 + [1] * 6, list(range(6)) * 2
    keyed = task.keyed_masks(epochs, indices, 32)
    assert keyed.shape == (12, 8, 8) and torch.all(keyed.flatten(1).sum(1) == 40)
    assert torch.equal(keyed, keyed[:, ::2, ::2].repeat_interleave(2, 1).repeat_interleave(2, 2))
    assert torch.equal(task.keyed_masks(epochs[3:5], indices[3:5], 32), keyed[3:5])  # whatever the batch
    assert not torch.equal(keyed[:6], keyed[6:])  # another epoch, other masks
    gen = task.mask_generator(32)
    many = keyed_simmim_masks(gen, 0, 0, np.arange(4000))[:, ::2, ::2].flatten(1).double()
    freq, p_ = many.mean(0), 10 / 16
    assert torch.all((freq - p_).abs() < 4.5 * math.sqrt(p_ * (1 - p_) / 4000))
    pairs = (many.T @ many / 4000)[~torch.eye(16, dtype=torch.bool)]  # P(both) = 10 * 9 / (16 * 15)
    assert (pairs.mean() - 90 / 240).abs() < 0.01


def test_simmim_masks_refused_where_they_do_not_fit():
    with pytest.raises(SystemExit, match="mask_patch_size"):  # 32 px images, 12 px cells
        BEiTTask(_cfg(pixel_masks="simmim", mask_patch_size=12), torch.device("cpu")).build_model()
    with pytest.raises(SystemExit, match="would mask 64 of the 64"):  # one 32 px cell: all masked
        BEiTTask(_cfg(pixel_masks="simmim"), torch.device("cpu")).build_model()
    with pytest.raises(SystemExit, match="pixel variant"):
        BEiTTask(_cfg("--model", "beit_tiny_patch16_224_8k_vocab", pixel_masks="simmim"), torch.device("cpu"))
    with pytest.raises(SystemExit, match="pixel_masks"):
        BEiTTask(_cfg(pixel_masks="random"), torch.device("cpu"))


def test_pretrain_pixel_variant_with_simmim_masks(tmp_path, monkeypatch):
    used = []
    transform = BEiTTask.transform

    def spy(self, img_size):
        t = transform(self, img_size)
        used.append(t.masks)
        return t

    monkeypatch.setattr(BEiTTask, "transform", spy)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = pretrain(_cfg("--max-steps", "2", "--output-dir", str(tmp_path), pixel_masks="simmim",
                                mask_patch_size=8))
    finally:
        torch.set_num_threads(n)
    assert summary["status"] == "done" and summary["steps"] == 2
    assert len(used) == 1 and isinstance(used[0], SimMIMMaskGenerator) and used[0].num_masking_patches == 40
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "done"
    assert (tmp_path / "reconstruction.png").is_file()
