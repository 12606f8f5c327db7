"""Masked autoencoder (MAE) pretraining model with the official ``MaskedAutoencoderViT``'s
configs, init and ``state_dict`` keys (facebookresearch/mae ``models_mae.py``), on timm's
``PatchEmbed`` and ``Block``, with every hot path going through :mod:`mimfast.ops`:

    model -> ops.random_masking / ops.attention / ops.unshuffle_with_mask_token /
             ops.masked_patch_loss -> Triton kernels (CUDA, or the interpreter) or eager.

``kernels="eager"`` runs the reference math everywhere (explicit attention, as the official
code ran with timm 0.3.2); ``"auto"`` picks Triton on CUDA; ``"triton"`` forces it.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from mimfast import ops
from mimfast.backend import check_backend_name
from mimfast.models.pos_embed import get_2d_sincos_pos_embed
from mimfast.nn import Attention, Mlp
from mimfast.nn.blocks import FusedBlocksMixin

__all__ = [
    "MaskedAutoencoderViT",
    "mae_vit_base_patch16",
    "mae_vit_large_patch16",
    "mae_vit_huge_patch14",
    "mae_vit_base_patch16_dec512d8b",
    "mae_vit_large_patch16_dec512d8b",
    "mae_vit_huge_patch14_dec512d8b",
    "mae_vit_tiny_patch16",
]


class MaskedAutoencoderViT(FusedBlocksMixin, nn.Module):
    """Masked autoencoder with a ViT encoder and a light ViT decoder.

    Args:
        img_size: square input side in pixels.
        patch_size: patch side p; ``img_size`` must divide by it.
        in_chans: image channels C.
        embed_dim, depth, num_heads: encoder width, blocks, heads.
        decoder_embed_dim, decoder_depth, decoder_num_heads: decoder width, blocks, heads.
        mlp_ratio: MLP hidden width over block width.
        norm_layer: normalisation layer (LayerNorm with eps 1e-6 by default).
        norm_pix_loss: normalise each target patch by its mean and unbiased variance.
        loss: ``"mse"`` (MAE) or ``"l1"`` (SimMIM variant).
        kernels: ``"auto"``, ``"eager"`` or ``"triton"`` for every op the model calls.
        fused_norm: where kernels resolve to Triton, run the encoder and decoder blocks with
            each residual add fused into the LayerNorm after it (:func:`mimfast.nn.forward_blocks`;
            same parameters, same results). On by default: on an H200 (bf16, B = 256, fused
            MLPs) the MAE ViT-B/16 step took 49.4 ms with it and 66.1 ms without it (45.1 against
            56.1 ms captured in a CUDA graph; benchmarks/results/h200-2026-11-27-2). The first H200
            run had it off (57.6 against 91-127 ms, before the launches skipped the dispatcher).
        fused_mlp: run each MLP (:class:`mimfast.nn.Mlp`, with or without ``fused_norm``) as
            :func:`mimfast.ops.mlp`: it keeps only ``h = fc1(x)`` for the backward, not
            ``gelu(h)`` (about a fifth of a block's activation memory), and sums fc1's bias
            gradient in GELU's backward pass (one pass fewer); forward values are eager's.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        norm_pix_loss: bool = False,
        loss: str = "mse",
        kernels: str = "auto",
        fused_norm: bool = True,
        fused_mlp: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(img_size, int) or not isinstance(patch_size, int):
            raise TypeError(f"img_size and patch_size must be ints, got {img_size!r}, {patch_size!r}")
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
        if loss not in ("mse", "l1"):
            raise ValueError(f"loss must be 'mse' or 'l1', got {loss!r}")
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        self.loss_type = loss
        # --- encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer, attn_layer=Attention,
                  mlp_layer=Mlp)
            for _ in range(depth)
        )
        self.norm = norm_layer(embed_dim)

        # --- decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer,
                  attn_layer=Attention, mlp_layer=Mlp)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)

        self.initialize_weights()
        self.set_kernels(kernels, fused_norm, fused_mlp)

    def set_kernels(self, kernels: str, fused_norm: bool | None = None, fused_mlp: bool | None = None) -> None:
        """Switch every op of the model to ``"auto"``, ``"eager"`` or ``"triton"``, and the fused
        residual add + LayerNorm and the fused MLP on or off (each unchanged when None)."""
        self.kernels = check_backend_name(kernels, "kernels")
        self._set_fusions(fused_norm, fused_mlp)
        for m in self.modules():
            if isinstance(m, Attention):
                m.kernels = self.kernels

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    @property
    def img_size(self) -> int:
        return self.patch_embed.img_size[0]

    def initialize_weights(self) -> None:
        grid = self.patch_embed.grid_size
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid, cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
        dec_pos = get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid, cls_token=True)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(dec_pos).float().unsqueeze(0))
        # patch projection initialised like nn.Linear on its (out, in * p * p) view
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # --- shape helpers
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs (N, C, H, W) -> (N, L, p*p*C)."""
        return ops.patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*C) -> imgs (N, C, H, W)."""
        return ops.unpatchify(x, self.patch_size, self.in_chans, self.patch_embed.grid_size)

    def _check_imgs(self, imgs: torch.Tensor) -> None:
        if not isinstance(imgs, torch.Tensor) or imgs.dim() != 4:
            raise ValueError(f"imgs must be (N, C, H, W), got {getattr(imgs, 'shape', type(imgs).__name__)}")
        N, C, H, W = imgs.shape
        if N == 0:
            raise ValueError("imgs has an empty batch (N == 0)")
        if C != self.in_chans:
            raise ValueError(f"imgs has {C} channels, the model expects in_chans={self.in_chans}")
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image size {H}x{W} is not a multiple of patch_size={self.patch_size}")
        if (H, W) != tuple(self.patch_embed.img_size):
            raise ValueError(f"image size {H}x{W} differs from the model's {tuple(self.patch_embed.img_size)}")

    @staticmethod
    def _check_mask_ratio(mask_ratio) -> None:
        if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)):
            raise TypeError(f"mask_ratio must be a float, got {type(mask_ratio).__name__}")
        if not math.isfinite(mask_ratio) or not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")

    # --- the three stages of the official model
    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """imgs -> (latent (N, 1 + K, D), mask (N, L), ids_restore (N, L))."""
        from mimfast.backend import resolve

        pe = self.patch_embed
        if resolve(self.kernels, imgs, op="masked_patch_embed") == "triton" and isinstance(pe.norm, nn.Identity):
            # embed only the kept patches: projection + positional add + masking + gather
            if noise is None:  # drawn as the reference draws it (the embedding draws nothing)
                noise = torch.rand(imgs.shape[0], pe.num_patches, device=imgs.device)
            x, mask, ids_restore = ops.masked_patch_embed(
                imgs, pe.proj.weight, pe.proj.bias, mask_ratio, pos_embed=self.pos_embed[:, 1:, :],
                noise=noise, backend=self.kernels,
            )  # (N, K, D)
        else:
            x = pe(imgs)  # (N, L, D)
            if noise is None:  # drawn where and how the reference draws it
                noise = torch.rand(x.shape[0], x.shape[1], device=x.device)
            # positional add + masking + gather in one op
            x, mask, ids_restore = ops.random_masking(
                x, mask_ratio, pos_embed=self.pos_embed[:, 1:, :], noise=noise, backend=self.kernels
            )  # (N, K, D)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (N, 1 + K, D)
        x = self.run_blocks(x, self.blocks, self.norm)
        return x, mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (N, 1 + K, D) -> pred (N, L, p*p*C)."""
        x = self.decoder_embed(x)  # (N, 1 + K, Dd)
        x = ops.unshuffle_with_mask_token(
            x, self.mask_token, ids_restore, pos_embed=self.decoder_pos_embed, backend=self.kernels
        )  # (N, 1 + L, Dd)
        x = self.run_blocks(x, self.decoder_blocks, self.decoder_norm)
        x = self.decoder_pred(x)  # (N, 1 + L, p*p*C)
        return x[:, 1:, :]  # remove the cls row (a view)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean per-patch loss over removed patches (weights ``mask``)."""
        return ops.masked_patch_loss(
            pred, imgs, mask, self.patch_size, norm_pix=self.norm_pix_loss, loss=self.loss_type,
            backend=self.kernels,
        )

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        """imgs (N, C, H, W) -> (loss, pred (N, L, p*p*C), mask (N, L))."""
        self._check_imgs(imgs)
        self._check_mask_ratio(mask_ratio)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Encoder features without masking: (N, 1 + L, D), cls row first, after the final norm."""
        self._check_imgs(imgs)
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def _mae(**kwargs) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4, **kwargs
    )


def mae_vit_base_patch16_dec512d8b(**kwargs) -> MaskedAutoencoderViT:
    """MAE ViT-B/16: 768 wide, 12 blocks, 12 heads; decoder 512 wide, 8 blocks."""
    return _mae(patch_size=16, embed_dim=768, depth=12, num_heads=12, **kwargs)


def mae_vit_large_patch16_dec512d8b(**kwargs) -> MaskedAutoencoderViT:
    """MAE ViT-L/16: 1024 wide, 24 blocks, 16 heads; decoder 512 wide, 8 blocks."""
    return _mae(patch_size=16, embed_dim=1024, depth=24, num_heads=16, **kwargs)


def mae_vit_huge_patch14_dec512d8b(**kwargs) -> MaskedAutoencoderViT:
    """MAE ViT-H/14: 1280 wide, 32 blocks, 16 heads; decoder 512 wide, 8 blocks."""
    return _mae(patch_size=14, embed_dim=1280, depth=32, num_heads=16, **kwargs)


def mae_vit_tiny_patch16(**kwargs) -> MaskedAutoencoderViT:
    """A ViT-Tiny-sized MAE for CPU runs and small data: 192 wide, 12 blocks, 3 heads;
    decoder 128 wide, 2 blocks, 4 heads. Sizes can be overridden."""
    cfg = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, decoder_embed_dim=128,
               decoder_depth=2, decoder_num_heads=4, mlp_ratio=4)
    cfg.update(kwargs)
    return MaskedAutoencoderViT(**cfg)


mae_vit_base_patch16 = mae_vit_base_patch16_dec512d8b
mae_vit_large_patch16 = mae_vit_large_patch16_dec512d8b
mae_vit_huge_patch14 = mae_vit_huge_patch14_dec512d8b
