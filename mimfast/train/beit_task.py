"""BEiT pretraining for ``mimfast pretrain --method beit`` (microsoft/unilm ``beit/
run_beit_pretraining.py``, ``engine_for_pretraining.py``): what the shared loop in
:mod:`mimfast.train.pretrain` needs to know, as :class:`BEiTTask`.

Per sample (in the data workers, from the (seed, epoch, index)-seeded RNG, so masks and crops
do not depend on the rank, the batch or the number of workers, and resume is exact):

    image -> TwoViewTransform -> patch view (img_size, ``--crop-interpolation``: BEiT's bicubic,
             normalised), tokenizer view (grid x tokenizer downsampling, Lanczos, map_pixels)
          -> BlockwiseMaskingGenerator -> bool_masked_pos (grid, exactly num_mask_patches)

Per batch: the frozen tokenizer turns the tokenizer views into (N, h, w) token ids under
no_grad (``--tokenizer dalle:PATH`` or ``vq:PATH``), and the model's loss is the cross-entropy
of its predictions at the masked positions, ``model(imgs, bool_masked_pos, labels=tokens)``.
The pixel variant (``--model beit_*_pixel``) needs no tokenizer: its patch view is MAE's crop
(scale (min_crop_scale, 1), ``--crop-interpolation`` bicubic, no ColorJitter; ``--recipe
simmim`` makes it SimMIM's, bilinear at scale (0.67, 1)) and its loss the model's masked patch
loss against the normalised pixels (``--pixel-loss l1``, SimMIM's, or ``mse``;
``--norm-pix-loss`` normalises each target patch, off in the BEiT and SimMIM recipes). Its masks
are, by ``--pixel-masks`` (with ``--mask-patch-size`` and ``--simmim-mask-ratio``):

- ``"blockwise"`` (default): BEiT's blockwise masks of ``num_mask_patches``, as in BEiT's
  "recover masked pixels" ablation;
- ``"simmim"``: SimMIM's masks (microsoft/SimMIM ``MaskGenerator``): ``ceil(ratio * cells)`` of
  the ``mask_patch_size`` (32 px) cells at random, ratio 0.6, upsampled to the patch grid
  (:class:`~mimfast.data.masking_generators.SimMIMMaskGenerator`); the image side must be a
  multiple of the cell and the cell of the patch.

With ``--gpu-pipeline`` (:mod:`mimfast.data.gpu_pipeline`) the workers only read bytes; per
batch, on the GPU:

    bytes -> nvjpeg -> one Triton kernel: the crop box and flip of (seed, epoch, index), resized
             to img_size (crop_interpolation, normalised) and, from the same box and flip, to grid x
             tokenizer downsampling (bicubic, map_pixels)
    (seed, epoch, index) -> keyed uniforms (splitmix64 in torch int64 ops, the mask stream)
             -> the blockwise-mask kernel (mimfast.kernels.blockwise_mask) -> bool_masked_pos

so crops and masks are still functions of (seed, epoch, index) alone and resume stays exact.
What differs from the CPU path: no ColorJitter (BEiT v1 jitters brightness, contrast and
saturation by 0.4 before the crop), the tokenizer view is bicubic, not Lanczos, and neither
resize low-pass filters when it shrinks (PIL's resize does); the masks follow the same rule
(microsoft/unilm's loop with BEiT v2's top-up to the exact count) from another random stream.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mimfast.backend import resolve
from mimfast.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from mimfast.data.masking_generators import (
    BlockwiseMaskingGenerator,
    ReplayedUniforms,
    SimMIMMaskGenerator,
    blockwise_mask_reference,
)
from mimfast.data.two_view import TwoViewTransform
from mimfast.models import create_model
from mimfast.models.tokenizer import load_tokenizer
from mimfast.train.config import PretrainConfig

__all__ = ["BEiTTask", "BEiTSampleTransform", "keyed_blockwise_masks", "keyed_simmim_masks", "MASK_SALT",
           "PIXEL_MASKS"]

MASK_SALT = 0x424549546D61736B  # b"BEITmask": the mask stream of keyed_uniforms, apart from the crops'
PIXEL_MASKS = ("blockwise", "simmim")  # the pixel variant's masks: BEiT's ablation, SimMIM's

_NEED_TOKENIZER = (
    "BEiT predicts visual tokens, so it needs a tokenizer: --tokenizer dalle:ENCODER.safetensors (the "
    "DALL-E dVAE encoder; convert the official encoder.pkl once with `mimfast tokenizer convert "
    "encoder.pkl encoder.safetensors`) or --tokenizer vq:TOKENIZER.safetensors (train one with "
    "`mimfast tokenizer train`; for --preset beit-tiny: `mimfast tokenizer train --img-size 64`). "
    "Or pretrain the pixel variant: --model beit_base_patch16_224_pixel")


class BEiTSampleTransform:
    """(3, H, W) uint8 image -> (patch view, tokenizer view, bool_masked_pos (h, w)); the
    tokenizer view is an empty tensor when ``two_view`` is None (pixel variant)."""

    def __init__(self, patch_transform, masks: BlockwiseMaskingGenerator | SimMIMMaskGenerator,
                 two_view: bool = True) -> None:
        self.patch_transform = patch_transform
        self.masks = masks
        self.two_view = two_view

    def __call__(self, img):
        views = self.patch_transform(img)
        patches, tokens = views if self.two_view else (views, torch.empty(0))
        seed = int(torch.randint(0, 2**62, (1,)).item())  # from the sample's seeded torch RNG
        mask = torch.from_numpy(self.masks(rng=np.random.default_rng(seed)))
        return patches, tokens, mask


def keyed_blockwise_masks(generator: BlockwiseMaskingGenerator, seed: int, epochs, indices, device=None,
                          backend: str = "auto") -> torch.Tensor:
    """(N, h, w) bool blockwise masks of samples ``(epochs[i], indices[i])``, made on ``device``.

    Each mask is a pure function of (seed, epoch, index) and the generator's rule: its
    uniforms are :func:`mimfast.data.crop_boxes.keyed_uniforms` of the mask stream
    (:data:`MASK_SALT`), 4 per try for 10 x (num_masking_patches + 1) tries (never runs out)
    then one key per cell for the top-up, all computed on the device; the blockwise-mask
    kernel runs microsoft/unilm's loop on them, one program per mask, and tops every mask up to
    exactly ``num_masking_patches``. Without Triton (CPU tensors, interpreter off) or for grids
    over the kernel's 4096 cells, the reference loop runs on the same uniforms, mask by mask.
    """
    from mimfast.data.crop_boxes import keyed_uniforms
    from mimfast.kernels.blockwise_mask import MAX_CELLS, TRIES_PER_BLOCK

    h, w, cells = generator.height, generator.width, generator.num_patches
    tries = TRIES_PER_BLOCK * (generator.num_masking_patches + 1)
    u = keyed_uniforms(seed, epochs, indices, 4 * tries + cells, salt=MASK_SALT, device=device)  # (N, 4T + L)
    n = u.shape[0]
    uniforms, keys = u[:, : 4 * tries].view(n, tries, 4), u[:, 4 * tries:]
    which = resolve(backend if cells <= MAX_CELLS or backend != "auto" else "eager", u, op="blockwise masks")
    if which == "triton":
        from mimfast.kernels.blockwise_mask import blockwise_masks

        masks, _, _ = blockwise_masks(uniforms, keys, h, w, generator.num_masking_patches, generator.min_num_patches,
                                      min(generator.max_num_patches, cells), generator.log_aspect_ratio)
        return masks.view(n, h, w)
    u64, k64 = uniforms.double().cpu().numpy(), keys.double().cpu().numpy()
    masks = [blockwise_mask_reference(h, w, generator.num_masking_patches, generator.min_num_patches,
                                      generator.max_num_patches, generator.min_aspect, generator.max_aspect,
                                      rng=ReplayedUniforms(u64[i], k64[i])) for i in range(n)]
    out = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, h, w, dtype=torch.bool)
    return out.to(u.device)


def keyed_simmim_masks(generator: SimMIMMaskGenerator, seed: int, epochs, indices, device=None) -> torch.Tensor:
    """(N, h, w) bool SimMIM masks of samples ``(epochs[i], indices[i])``, made on ``device``.

    Each is a pure function of (seed, epoch, index): the ``mask_count`` cells of smallest keys
    (a uniform random subset, SimMIM's ``permutation[:mask_count]``), each key two uniforms of
    :func:`mimfast.data.crop_boxes.keyed_uniforms`' mask stream (48 bits, so ties are
    negligible), then each cell repeated to its ``scale x scale`` patches."""
    from mimfast.data.crop_boxes import keyed_uniforms

    cells, (rh, rw), s = generator.token_count, generator.rand_size, generator.scale
    u = keyed_uniforms(seed, epochs, indices, 2 * cells, salt=MASK_SALT, device=device, dtype=torch.float64)
    keys = u[:, :cells] + u[:, cells:] * 2.0**-24  # (N, cells)
    picked = keys.argsort(dim=1)[:, : generator.mask_count]
    masks = torch.zeros(keys.shape, dtype=torch.bool, device=keys.device).scatter_(1, picked, True)
    return masks.view(-1, rh, rw).repeat_interleave(s, 1).repeat_interleave(s, 2)


class BEiTTask:
    """What ``pretrain`` needs to know about BEiT: model, augmentation, loss, picture."""

    def __init__(self, cfg: PretrainConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.pixel = cfg.model.endswith("_pixel")
        self.pixel_masks = cfg.pixel_masks  # the pixel variant's masks (see the module docstring)
        self.mask_patch_size = cfg.mask_patch_size
        self.simmim_mask_ratio = cfg.simmim_mask_ratio
        if self.pixel_masks not in PIXEL_MASKS:
            raise SystemExit(f"pixel_masks must be one of {PIXEL_MASKS}, got {self.pixel_masks!r}")
        if self.pixel_masks == "simmim" and not self.pixel:
            raise SystemExit(f"SimMIM's masks (pixel_masks 'simmim') are for the pixel variant (--model "
                             f"beit_*_pixel), not {cfg.model}")
        self.tokenizer = None
        if not self.pixel:
            if not cfg.tokenizer:
                raise SystemExit(_NEED_TOKENIZER)
            try:
                self.tokenizer = load_tokenizer(cfg.tokenizer).to(device)
            except (ValueError, FileNotFoundError) as e:
                raise SystemExit(f"--tokenizer {cfg.tokenizer}: {e}") from None
        self.patch_size = cfg.patch_size or 16
        self.grid = None
        self.vis = None
        self._mask_generator = None

    def build_model(self) -> torch.nn.Module:
        kw = dict(self.cfg.model_kwargs)
        if self.cfg.img_size is not None:
            kw["img_size"] = self.cfg.img_size
        if self.cfg.patch_size is not None:
            kw["patch_size"] = self.cfg.patch_size
        kw["kernels"] = self.cfg.kernels
        if self.cfg.fused_norm is not None:  # None: the model's default
            kw["fused_norm"] = self.cfg.fused_norm
        kw["fused_mlp"] = self.cfg.fused_mlp
        kw.setdefault("drop_path_rate", self.cfg.drop_path)
        if self.tokenizer is not None:
            kw["vocab_size"] = self.tokenizer.vocab_size
        if self.pixel:
            kw.setdefault("norm_pix_loss", self.cfg.norm_pix_loss)
            kw.setdefault("loss", self.cfg.pixel_loss)
        model = create_model(self.cfg.model, **kw)
        if not hasattr(model, "lm_head") and not hasattr(model, "pixel_head"):
            raise SystemExit(f"--method beit needs a BEiT pretraining model (beit_*), got {self.cfg.model}")
        self.patch_size = model.patch_size
        self.grid = tuple(model.patch_embed.grid_size)
        num_patches = self.grid[0] * self.grid[1]
        if self.pixel_masks == "simmim":
            try:
                masked = self.mask_generator(model.img_size).num_masking_patches
            except ValueError as e:
                raise SystemExit(f"SimMIM's masks for {model.img_size} px images and {self.patch_size} px patches: "
                                 f"{e}") from None
            if not 0 < masked < num_patches:
                raise SystemExit(f"SimMIM's masks would mask {masked} of the {num_patches} patches (mask_patch_size "
                                 f"{self.mask_patch_size}, ratio {self.simmim_mask_ratio}); a smaller mask_patch_size "
                                 f"or another ratio leaves some masked and some visible")
        elif not 0 < self.cfg.num_mask_patches < num_patches:
            raise SystemExit(f"--num-mask-patches must be in [1, {num_patches - 1}] for a {self.grid[0]}x"
                             f"{self.grid[1]} patch grid, got {self.cfg.num_mask_patches}")
        return model

    def _grid(self, img_size: int) -> tuple[int, int]:
        return self.grid or (img_size // self.patch_size,) * 2

    def mask_generator(self, img_size: int):
        """The masks of ``img_size`` images: SimMIM's for the pixel variant with ``pixel_masks``
        "simmim", else BEiT's blockwise masks of ``num_mask_patches``."""
        if self.pixel_masks == "simmim":
            return SimMIMMaskGenerator(img_size, self.mask_patch_size, self.patch_size, self.simmim_mask_ratio)
        return BlockwiseMaskingGenerator(self._grid(img_size), self.cfg.num_mask_patches)

    def transform(self, img_size: int):
        grid = self._grid(img_size)
        masks = self.mask_generator(img_size)
        if self.pixel:
            from mimfast.train.pretrain import mae_transform

            return BEiTSampleTransform(mae_transform(img_size, self.cfg.min_crop_scale, self.cfg.crop_interpolation),
                                       masks, two_view=False)
        # the token grid must be the patch grid: view side = grid x the tokenizer's downsampling
        views = TwoViewTransform(img_size, grid[0] * self.tokenizer.downsample, scale=(self.cfg.min_crop_scale, 1.0),
                                 interpolation=self.cfg.crop_interpolation, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        return BEiTSampleTransform(views, masks)

    def gpu_augment(self, img_size: int):
        """The ``--gpu-pipeline`` augmentation: :meth:`transform`'s crop (scale (min_crop_scale,
        1), crop_interpolation) and flip, decoded and augmented on the GPU. Two views of the same
        box and flip in one kernel pass: the patch view (img_size, normalised) and the tokenizer
        view (grid x tokenizer downsampling, bicubic, map_pixels); the pixel variant has the
        patch view only.

        Differences from the CPU path: no ColorJitter, a bicubic (not Lanczos) tokenizer view,
        no antialiasing when shrinking (see :mod:`mimfast.data.gpu_pipeline`).
        """
        from mimfast.data.gpu_pipeline import GpuAugment

        kw = dict(scale=(self.cfg.min_crop_scale, 1.0), interpolation=self.cfg.crop_interpolation, mean=IMAGENET_MEAN,
                  std=IMAGENET_STD, seed=self.cfg.seed, device=self.device)
        if not self.pixel:
            kw.update(second_size=self._grid(img_size)[0] * self.tokenizer.downsample,
                      second_interpolation="bicubic", second_norm="map_pixels")
        return GpuAugment(img_size, **kw)

    def keyed_masks(self, epochs, indices, img_size: int) -> torch.Tensor:
        """(N, h, w) bool masks of samples (epoch, index) on the task's device
        (:func:`keyed_blockwise_masks`, or :func:`keyed_simmim_masks` for SimMIM's masks, of the
        run's seed): the ``--gpu-pipeline`` masks."""
        gen = self._mask_generator
        if gen is None or gen.get_shape() != tuple(self._grid(img_size)):
            gen = self._mask_generator = self.mask_generator(img_size)
        if isinstance(gen, SimMIMMaskGenerator):
            return keyed_simmim_masks(gen, self.cfg.seed, epochs, indices, device=self.device)
        return keyed_blockwise_masks(gen, self.cfg.seed, epochs, indices, device=self.device)

    @torch.no_grad()
    def tokens(self, tokenizer_views: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) tokenizer views -> (N, L) token ids from the frozen tokenizer."""
        ids = self.tokenizer(tokenizer_views)
        if tuple(ids.shape[1:]) != tuple(self.grid or ids.shape[1:]):
            raise ValueError(f"the tokenizer gives a {tuple(ids.shape[1:])} token grid, the model has a {self.grid} "
                             f"patch grid")
        return ids.flatten(1)

    def inputs(self, batch) -> tuple[torch.Tensor, ...]:
        """(images, masks (N, L)[, tokens (N, L)]) of a batch on the device: what the loss (and
        a captured step) reads. The frozen tokenizer runs here, outside a captured step."""
        if len(batch) == 4:  # --gpu-pipeline: (views on the GPU, labels, epochs, indices)
            views, labels, epochs, indices = batch
            imgs, tokenizer_views = views if isinstance(views, (tuple, list)) else (views, None)
            batch = ((imgs, tokenizer_views, self.keyed_masks(epochs, indices, imgs.shape[-1])), labels)
        (imgs, tokenizer_views, bool_masked_pos), _ = batch
        imgs = imgs.to(self.device, non_blocking=True)
        bool_masked_pos = bool_masked_pos.to(self.device, non_blocking=True).flatten(1)
        if self.pixel:
            return imgs, bool_masked_pos
        return imgs, bool_masked_pos, self.tokens(tokenizer_views.to(self.device, non_blocking=True))

    def loss_of(self, model, imgs: torch.Tensor, bool_masked_pos: torch.Tensor,
                tokens: torch.Tensor | None = None) -> torch.Tensor:
        if self.pixel:
            loss, _ = model(imgs, bool_masked_pos)
            return loss
        # the blockwise masks have exactly num_mask_patches each: the model gathers the masked
        # tokens by index, without boolean indexing's host synchronisation mid-step (which a
        # captured step could not hold)
        return model(imgs, bool_masked_pos, labels=tokens, num_masked=self.cfg.num_mask_patches)

    def loss(self, model, batch) -> torch.Tensor:
        return self.loss_of(model, *self.inputs(batch))

    def _vis_batch(self, dataset, img_size: int) -> list:
        """[patch views, tokenizer views (None for the pixel variant on the GPU pipeline), masks]
        of the first (up to) 8 samples of epoch 0, as training sees them."""
        from mimfast.data.gpu_pipeline import EncodedImages, collate_encoded

        keys = [(0, i) for i in range(min(8, len(dataset)))]
        if isinstance(dataset, EncodedImages):  # --gpu-pipeline: bytes, augmented as the loader does
            datas, _, epochs, indices = collate_encoded([dataset[k] for k in keys])
            views = self.gpu_augment(img_size)(datas, epochs, indices)
            imgs, tokenizer_views = views if isinstance(views, tuple) else (views, None)
            return [imgs, tokenizer_views, self.keyed_masks(epochs, indices, img_size)]
        items = [dataset[k][0] for k in keys]
        return [torch.stack([it[j] for it in items]).to(self.device) for j in range(3)]

    @torch.no_grad()
    def picture(self, model, dataset, path: Path, write: bool = True) -> None:
        """One row per image: image | masked image | tokenizer's tokens | the model's predicted
        tokens at the masked positions (others grey). Pixel variant: image | masked |
        reconstruction with the visible patches pasted back."""
        from mimfast.train.tokenizer_train import token_colors
        from mimfast.train.visualize import save_png

        if self.vis is None:  # fixed images and masks (the dataset's epoch-0 samples)
            self.vis = self._vis_batch(dataset, model.img_size)
        imgs, tokenizer_views, masks = self.vis
        masks = masks.flatten(1)
        N, _, S, _ = imgs.shape
        p = self.patch_size
        h, w = self.grid
        mask_img = masks.view(N, 1, h, w).float().repeat_interleave(p, 2).repeat_interleave(p, 3)
        mean = torch.tensor(IMAGENET_MEAN, device=imgs.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=imgs.device).view(1, 3, 1, 1)
        pixels = (imgs.float() * std + mean).clamp(0, 1)
        masked = pixels * (1 - mask_img) + 0.5 * mask_img
        was_training = model.training
        model.eval()
        try:
            if self.pixel:
                from mimfast import ops

                _, pred = model(imgs, masks)
                pred = pred.float()
                if getattr(model, "norm_pix_loss", False):
                    target = ops.patchify(imgs.float(), p)
                    pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
                recon = (ops.unpatchify(pred, p, 3, (h, w)) * std + mean).clamp(0, 1)
                panels = [pixels, masked, pixels * (1 - mask_img) + recon * mask_img]
            else:
                labels = self.tokens(tokenizer_views)  # (N, L)
                pred = model(imgs, masks).argmax(-1)  # (M,) at the masked positions
                predicted = labels.clone()
                predicted[masks] = pred
                tok = token_colors(labels.view(N, h, w), S).float().div(255).to(imgs.device)
                shown = token_colors(predicted.view(N, h, w), S).float().div(255).to(imgs.device)
                panels = [pixels, masked, tok, shown * mask_img + 0.5 * (1 - mask_img)]
        finally:
            model.train(was_training)
        if not write:
            return
        gap = 2
        grid = np.full((N * (S + gap) - gap, len(panels) * (S + gap) - gap, 3), 255, np.uint8)
        for n in range(N):
            for j, panel in enumerate(panels):
                tile = (panel[n].permute(1, 2, 0) * 255).round().byte().cpu().numpy()
                grid[n * (S + gap): n * (S + gap) + S, j * (S + gap): j * (S + gap) + S] = tile
        save_png(grid, path, scale=max(1, 128 // S))
