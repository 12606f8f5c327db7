"""Reconstruction pictures: original / masked / reconstruction / reconstruction with the
visible patches pasted back, one row per image.

With ``norm_pix_loss`` the model predicts each patch normalised by its own mean and variance;
for display the prediction is de-normalised with the target patch's statistics (a picture
of raw normalised predictions looks like noise).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mimfast import ops

__all__ = ["mae_reconstruction_grid", "save_png"]


@torch.no_grad()
def mae_reconstruction_grid(model, imgs, mask_ratio, mean, std, noise=None, gap: int = 2) -> np.ndarray:
    """(rows * H, 4 * W) uint8 RGB grid for a batch of normalised images."""
    was_training = model.training
    model.eval()
    try:
        _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    finally:
        model.train(was_training)
    p = model.patch_size
    pred = pred.float()
    if model.norm_pix_loss:
        target = ops.patchify(imgs.float(), p)
        mu = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mu
    recon = model.unpatchify(pred)
    mask_img = model.unpatchify(mask.float().unsqueeze(-1).expand(-1, -1, pred.shape[-1]))  # 1 = removed
    mean_t = torch.tensor(mean, device=imgs.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=imgs.device).view(1, -1, 1, 1)
    grey = ((0.5 - mean_t) / std_t).expand_as(imgs)
    masked = imgs * (1 - mask_img) + grey * mask_img
    pasted = imgs * (1 - mask_img) + recon * mask_img
    panels = [imgs.float(), masked, recon, pasted]
    panels = [((x * std_t + mean_t).clamp(0, 1) * 255).round().byte().cpu() for x in panels]
    N, C, H, W = imgs.shape
    out = np.full((N * (H + gap) - gap, 4 * (W + gap) - gap, 3), 255, np.uint8)
    for n in range(N):
        for j, panel in enumerate(panels):
            tile = panel[n].permute(1, 2, 0).numpy()
            if C == 1:
                tile = np.repeat(tile, 3, axis=2)
            out[n * (H + gap): n * (H + gap) + H, j * (W + gap): j * (W + gap) + W] = tile
    return out


def save_png(array: np.ndarray, path, scale: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)
    return path
