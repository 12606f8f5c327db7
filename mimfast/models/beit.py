"""BEiT pretraining models with microsoft/unilm ``beit/modeling_pretrain.py`` semantics and
``state_dict`` keys (``VisionTransformerForMaskedImageModeling`` as the pretraining recipe builds
it: shared relative position bias, no absolute position embedding, layer scale), with every
hot path going through :mod:`mimfast.ops`:

    model -> ops.attention (with the relative position bias) -> Triton or eager
          -> ops.linear_cross_entropy (LM head + loss, masked positions only) -> Triton or eager

and the "recover masked pixels" variant (BEiT's ablation, SimMIM style): the same encoder, a
linear pixel head and ``ops.masked_patch_loss`` (L1 by default) on the masked patches.

Forward of the token model: ``model(imgs, bool_masked_pos)`` -> logits (M, vocab) at the masked
positions (M = number of True in ``bool_masked_pos``), as the reference;
``model(imgs, bool_masked_pos, labels)`` -> the mean cross-entropy, computed without the
(M, vocab) logits on the Triton path. ``labels`` are the visual tokens at the masked positions
(M,) — the reference's ``input_ids[bool_masked_pos]`` — or all of them (N, L).
"""

from __future__ import annotations

import math
import re
from functools import partial

import torch
from timm.layers import DropPath, PatchEmbed
from timm.layers import trunc_normal_ as _timm_trunc_normal_
from torch import nn

from mimfast import ops
from mimfast.backend import check_backend_name, resolve
from mimfast.ops.linear_ce import same_row_count
from mimfast.nn.beit_attention import BEiTAttention, RelativePositionBias, table_grid
from mimfast.nn.blocks import FusedBlocksMixin, no_hooks
from mimfast.nn.mlp import Mlp

__all__ = [
    "BEiTBlock",
    "encoder_config_from_state_dict",
    "VisionTransformerForMaskedImageModeling",
    "VisionTransformerForMaskedPixelModeling",
    "beit_base_patch16_224_8k_vocab",
    "beit_large_patch16_224_8k_vocab",
    "beit_tiny_patch16_224_8k_vocab",
    "beit_base_patch16_224_pixel",
    "beit_large_patch16_224_pixel",
    "beit_tiny_patch16_224_pixel",
]


def trunc_normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """The reference's truncation: bounds at +-std (absolute values), not +-2 std."""
    return _timm_trunc_normal_(tensor, mean=mean, std=std, a=-std, b=std)


class BEiTBlock(nn.Module):
    """Pre-norm transformer block with layer scale (``gamma_1``, ``gamma_2``), as the reference's
    ``Block``; its attention takes the shared relative position bias."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False, qk_scale=None,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, init_values=None,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm, window_size=None, attn_head_dim=None,
                 kernels: str = "auto") -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = BEiTAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                                  attn_drop=attn_drop, proj_drop=drop, window_size=window_size,
                                  attn_head_dim=attn_head_dim, kernels=kernels)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        # dropout after fc2 only, as the reference's Mlp (timm's drop=p would also drop after the GELU)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=(0.0, drop),
                       kernels=kernels)
        if init_values is not None and init_values > 0:
            self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
            self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
        else:
            self.gamma_1, self.gamma_2 = None, None

    def forward(self, x: torch.Tensor, rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.gamma_1 is None:
            x = x + self.drop_path(self.attn(self.norm1(x), rel_pos_bias=rel_pos_bias))
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        else:
            x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x), rel_pos_bias=rel_pos_bias))
            x = x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))
        return x


class _BEiTEncoder(FusedBlocksMixin, nn.Module):
    """Patch embedding, mask token, cls token, blocks and final norm: everything but the head."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_scale=None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_layer=partial(nn.LayerNorm, eps=1e-6), init_values=0.1, attn_head_dim=None,
                 use_abs_pos_emb: bool = False, use_rel_pos_bias: bool = False, use_shared_rel_pos_bias: bool = True,
                 init_std: float = 0.02, kernels: str = "auto", fused_norm: bool = True,
                 fused_mlp: bool = True) -> None:
        super().__init__()
        if not isinstance(img_size, int) or not isinstance(patch_size, int):
            raise TypeError(f"img_size and patch_size must be ints, got {img_size!r}, {patch_size!r}")
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
        self.num_features = self.embed_dim = embed_dim
        self.in_chans = in_chans
        self.num_heads = num_heads

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        patch_shape = tuple(self.patch_embed.grid_size)

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim)) if use_abs_pos_emb else None
        self.pos_drop = nn.Dropout(p=drop_rate)
        self.rel_pos_bias = (RelativePositionBias(window_size=patch_shape, num_heads=num_heads)
                             if use_shared_rel_pos_bias else None)

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]  # stochastic depth decay rule
        self.blocks = nn.ModuleList(
            BEiTBlock(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                      drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i], init_values=init_values,
                      norm_layer=norm_layer, window_size=patch_shape if use_rel_pos_bias else None,
                      attn_head_dim=attn_head_dim, kernels=kernels)
            for i in range(depth)
        )
        self.norm = norm_layer(embed_dim)
        self.init_std = init_std
        self.kernels = check_backend_name(kernels, "kernels")
        self._set_fusions(fused_norm, fused_mlp)

    def _init_all(self, head: nn.Linear) -> None:
        """The reference's order: tokens, head, every module, then the depth rescale."""
        if self.cls_token.is_meta:  # a shape-only build (device "meta") has nothing to initialise
            return
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=self.init_std)
        trunc_normal_(self.cls_token, std=self.init_std)
        trunc_normal_(self.mask_token, std=self.init_std)
        trunc_normal_(head.weight, std=self.init_std)
        self.apply(self._init_weights)
        self.fix_init_weight()

    def fix_init_weight(self) -> None:
        for layer_id, layer in enumerate(self.blocks):
            layer.attn.proj.weight.data.div_(math.sqrt(2.0 * (layer_id + 1)))
            layer.mlp.fc2.weight.data.div_(math.sqrt(2.0 * (layer_id + 1)))

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_(m.weight, std=self.init_std)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def set_kernels(self, kernels: str, fused_norm: bool | None = None, fused_mlp: bool | None = None) -> None:
        """Switch every op of the model to ``"auto"``, ``"eager"`` or ``"triton"``, and the fused
        residual add + LayerNorm (:func:`mimfast.nn.forward_blocks`) and the fused MLP on or off
        (each unchanged when None)."""
        self.kernels = check_backend_name(kernels, "kernels")
        self._set_fusions(fused_norm, fused_mlp)
        for m in self.modules():
            if isinstance(m, BEiTAttention):
                m.kernels = self.kernels

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token"}

    def get_num_layers(self) -> int:
        return len(self.blocks)

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    @property
    def img_size(self) -> int:
        return self.patch_embed.img_size[0]

    def _check_inputs(self, imgs: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        if not isinstance(imgs, torch.Tensor) or imgs.dim() != 4:
            raise ValueError(f"imgs must be (N, C, H, W), got {getattr(imgs, 'shape', type(imgs).__name__)}")
        N, C, H, W = imgs.shape
        if N == 0:
            raise ValueError("imgs has an empty batch (N == 0)")
        if C != self.in_chans:
            raise ValueError(f"imgs has {C} channels, the model expects in_chans={self.in_chans}")
        if (H, W) != tuple(self.patch_embed.img_size):
            raise ValueError(f"image size {H}x{W} differs from the model's {tuple(self.patch_embed.img_size)}")
        L = self.patch_embed.num_patches
        if not isinstance(bool_masked_pos, torch.Tensor):
            raise TypeError(f"bool_masked_pos must be a tensor, got {type(bool_masked_pos).__name__}")
        if bool_masked_pos.shape[0] != N or bool_masked_pos[0].numel() != L:
            raise ValueError(f"bool_masked_pos must be (N, L) = ({N}, {L}) or (N, h, w), got "
                             f"{tuple(bool_masked_pos.shape)}")
        if bool_masked_pos.is_floating_point() or bool_masked_pos.is_complex():
            raise TypeError(f"bool_masked_pos must be bool (or 0/1 integers), got {bool_masked_pos.dtype}")
        if bool_masked_pos.device != imgs.device:
            raise ValueError(f"bool_masked_pos is on {bool_masked_pos.device}, imgs on {imgs.device}")
        return bool_masked_pos.flatten(1).to(torch.bool)

    def _embed_patches(self, imgs: torch.Tensor) -> torch.Tensor:
        """``patch_embed(imgs)``; as :func:`mimfast.ops.patch_embed` (the pixels gathered, one matrix
        product) where the kernels run on Triton and the module is the plain convolution."""
        pe = self.patch_embed
        plain = (isinstance(pe.norm, nn.Identity) and getattr(pe, "flatten", False)
                 and not getattr(pe, "dynamic_img_pad", False) and no_hooks(pe) and no_hooks(pe.proj)
                 and tuple(pe.proj.stride) == tuple(pe.proj.kernel_size) and tuple(pe.proj.padding) == (0, 0))
        if plain:
            return ops.patch_embed(imgs, pe.proj.weight, pe.proj.bias, backend=self.kernels)
        return pe(imgs)

    def forward_features(self, imgs: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """imgs (N, C, H, W), bool_masked_pos (N, L) bool -> (N, 1 + L, D) after the final norm."""
        x = self._embed_patches(imgs)  # (N, L, D)
        batch_size, seq_len, _ = x.size()
        cls_tokens = self.cls_token.expand(batch_size, -1, -1)
        mask_token = self.mask_token.expand(batch_size, seq_len, -1)
        # replace the masked visual tokens by mask_token
        if resolve(self.kernels, x, op="mask_token") == "triton":
            # one pass instead of four: x * (1 - w) + mask_token * w is x or mask_token exactly (finite
            # values), in the same promoted dtype, with the same gradients up to summation order
            x = torch.where(bool_masked_pos.unsqueeze(-1), mask_token, x)
        else:
            w = bool_masked_pos.unsqueeze(-1).type_as(mask_token)
            x = x * (1 - w) + mask_token * w
        x = torch.cat((cls_tokens, x), dim=1)  # (N, 1 + L, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        rel_pos_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None  # (H, 1 + L, 1 + L)
        return self.run_blocks(x, self.blocks, self.norm, rel_pos_bias=rel_pos_bias)


def masked_positions(bool_masked_pos: torch.Tensor, num_masked: int) -> torch.Tensor:
    """(N, num_masked) int64: each row's masked positions, ascending (``x[bool_masked_pos]``'s
    order), for masks with exactly ``num_masked`` True per row; found on the device without a
    host synchronisation (a stable sort puts a row's masked positions first, in order). A row
    with another count fails a device-side assertion (a CPU tensor: at once)."""
    counts_ok = (bool_masked_pos.sum(1) == num_masked).all()
    torch._assert_async(counts_ok, f"every sample must have exactly num_masked = {num_masked} masked positions")
    order = torch.argsort((~bool_masked_pos).to(torch.uint8), dim=1, stable=True)
    return order[:, :num_masked]


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (N, L, D), index (N, K) -> (N * K, D): rows ``x[n, index[n, k]]`` in (n, k) order."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1])).reshape(-1, x.shape[-1])


class VisionTransformerForMaskedImageModeling(_BEiTEncoder):
    """BEiT pretraining model: predicts visual tokens at masked positions.

    Args (beyond the encoder's, which follow the reference's names):
        vocab_size: size of the visual-token vocabulary (8192 for the DALL-E tokenizer).
        init_values: layer-scale init (0.1 base, 1e-5 large; 0 or None: no layer scale).
        use_abs_pos_emb, use_rel_pos_bias, use_shared_rel_pos_bias: position encodings; the
            defaults are the pretraining recipe's (shared relative bias only).
        kernels: ``"auto"``, ``"eager"`` or ``"triton"`` for every op the model calls.
        fused_norm: where kernels resolve to Triton, run the blocks with each residual add fused
            into the LayerNorm after it (:func:`mimfast.nn.forward_blocks`; same results).
        fused_mlp: each MLP (:class:`mimfast.nn.Mlp`, with or without ``fused_norm``) keeps
            only its GELU input for the backward and sums fc1's bias gradient in GELU's backward
            pass (:func:`mimfast.ops.mlp`).
    """

    def __init__(self, vocab_size: int = 8192, **kwargs) -> None:
        super().__init__(**kwargs)
        self.lm_head = nn.Linear(self.embed_dim, vocab_size)
        self._init_all(self.lm_head)

    def forward(self, imgs: torch.Tensor, bool_masked_pos: torch.Tensor, labels: torch.Tensor | None = None,
                return_all_tokens: bool = False, ignore_index: int = -100,
                num_masked: int | None = None) -> torch.Tensor:
        """Logits (M, vocab) at masked positions; with ``labels``, the mean cross-entropy.

        Args:
            imgs: (N, C, H, W).
            bool_masked_pos: (N, L) or (N, h, w), True = masked.
            labels: visual tokens at the masked positions (M,) in ``x[bool_masked_pos]`` order,
                or for every position (N, L); rows equal to ``ignore_index`` do not count.
            return_all_tokens: logits for every position (N, L, vocab), as the reference.
            num_masked: the number of masked positions of every sample, where it is the same for
                all (BEiT's blockwise generator masks exactly ``num_masking_patches``). The masked
                rows are then gathered by index, in ``x[bool_masked_pos]``'s order, without the
                host synchronisation of boolean-mask indexing (its ``nonzero`` waits for the
                GPU, which stalls the launch queue mid-step and cannot be captured in a CUDA
                graph). A sample with another count is an error (asserted on the device).
        """
        bool_masked_pos = self._check_inputs(imgs, bool_masked_pos)
        if num_masked is not None:
            L = bool_masked_pos.shape[1]
            if isinstance(num_masked, bool) or not isinstance(num_masked, int) or not 0 < num_masked <= L:
                raise ValueError(f"num_masked must be an int in [1, {L}], got {num_masked!r}")
        x = self.forward_features(imgs, bool_masked_pos)[:, 1:]  # (N, L, D)
        if return_all_tokens:
            return self.lm_head(x)
        index = None if num_masked is None else masked_positions(bool_masked_pos, num_masked)
        hidden = x[bool_masked_pos] if index is None else gather_rows(x, index)  # (M, D)
        if labels is None:
            return self.lm_head(hidden)
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
        if labels.shape == bool_masked_pos.shape:
            labels = labels[bool_masked_pos] if index is None else labels.gather(1, index).reshape(-1)
        elif labels.dim() != 1 or not same_row_count(labels.shape[0], hidden.shape[0]):
            raise ValueError(f"labels must be (M,) = ({hidden.shape[0]},) or (N, L) = "
                             f"{tuple(bool_masked_pos.shape)}, got {tuple(labels.shape)}")
        return ops.linear_cross_entropy(hidden, self.lm_head.weight, self.lm_head.bias, labels,
                                        ignore_index=ignore_index, backend=self.kernels)


class VisionTransformerForMaskedPixelModeling(_BEiTEncoder):
    """BEiT's "recover masked pixels" ablation, SimMIM style: the BEiT encoder, a linear head to
    the p*p*C pixels of each patch, and the masked patch loss.

    Against microsoft/SimMIM's ``SimMIM`` (ViT encoder): the head is its decoder, a 1x1 conv to
    p*p*3 channels + ``PixelShuffle(p)``, with the output channels in another order: head row
    ``(i * p + j) * C + c`` (``ops.patchify``'s (p, q, c)) is conv channel ``c * p * p + i * p + j``
    (PixelShuffle's (c, p, q)), so ``ops.unpatchify(pred)`` is SimMIM's reconstruction, and a SimMIM
    ``decoder.0`` loads as ``pixel_head`` after that permutation (:mod:`mimfast.models.simmim`). The L1 loss, without
    ``norm_pix_loss``, is SimMIM's ``(l1 * mask).sum() / (mask.sum() + 1e-5) / in_chans`` (the mask
    upsampled to pixels) but for the 1e-5 (a relative 1e-5 / (masked patches * p * p)). The head
    is initialised as BEiT's LM head (truncated normal, std 0.02, zero bias); SimMIM's conv keeps
    PyTorch's default init. SimMIM's masks: :class:`mimfast.data.masking_generators.SimMIMMaskGenerator`.

    Args (beyond the encoder's):
        norm_pix_loss: normalise each target patch by its mean and variance (off in SimMIM).
        loss: ``"l1"`` (SimMIM) or ``"mse"``.
    """

    def __init__(self, norm_pix_loss: bool = False, loss: str = "l1", **kwargs) -> None:
        super().__init__(**kwargs)
        if loss not in ("mse", "l1"):
            raise ValueError(f"loss must be 'mse' or 'l1', got {loss!r}")
        self.norm_pix_loss = norm_pix_loss
        self.loss_type = loss
        self.pixel_head = nn.Linear(self.embed_dim, self.patch_size**2 * self.in_chans)
        self._init_all(self.pixel_head)

    def forward(self, imgs: torch.Tensor, bool_masked_pos: torch.Tensor):
        """imgs (N, C, H, W), bool_masked_pos (N, L) or (N, h, w) -> (loss, pred (N, L, p*p*C))."""
        bool_masked_pos = self._check_inputs(imgs, bool_masked_pos)
        x = self.forward_features(imgs, bool_masked_pos)[:, 1:]  # (N, L, D)
        pred = self.pixel_head(x)  # (N, L, p*p*C), patches in (p, q, c) order as ops.patchify
        loss = ops.masked_patch_loss(pred, imgs, bool_masked_pos, self.patch_size, norm_pix=self.norm_pix_loss,
                                     loss=self.loss_type, backend=self.kernels)
        return loss, pred


def encoder_config_from_state_dict(sd: dict) -> dict:
    """The BEiT encoder a state_dict under mimfast's / unilm's keys holds: ``img_size``,
    ``patch_size`` and ``model_kwargs`` (width, depth, heads, channels, MLP ratio, q/v biases,
    absolute / shared / per-block position terms, and layer scale as ``init_values`` 0.1 where the
    weights have it, None where not; the weights replace the value). Heads and grid come from a
    relative position table (its columns; (2g - 1)^2 + 3 rows), the grid else from the absolute
    position embedding; what the weights cannot say (a model with neither) is None, for the caller
    to fill from the checkpoint's config."""
    proj = sd["patch_embed.proj.weight"]
    width, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    shared = sd.get("rel_pos_bias.relative_position_bias_table")
    table = shared if shared is not None else sd.get("blocks.0.attn.relative_position_bias_table")
    heads = grid = None
    if table is not None:
        grid, heads = table_grid(table.shape[0]), int(table.shape[1])
    elif "pos_embed" in sd:
        grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / width
    kwargs = dict(embed_dim=width, depth=depth, num_heads=heads, in_chans=in_chans,
                  mlp_ratio=int(mlp_ratio) if mlp_ratio.is_integer() else mlp_ratio,
                  qkv_bias="blocks.0.attn.q_bias" in sd, init_values=0.1 if "blocks.0.gamma_1" in sd else None,
                  use_abs_pos_emb="pos_embed" in sd,
                  use_rel_pos_bias="blocks.0.attn.relative_position_bias_table" in sd,
                  use_shared_rel_pos_bias=shared is not None)
    return dict(img_size=grid * patch if grid is not None else None, patch_size=patch, model_kwargs=kwargs)


_BASE = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4, qkv_bias=True, init_values=0.1)
_LARGE = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4, qkv_bias=True, init_values=1e-5)
_TINY = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4, qkv_bias=True, init_values=0.1)


def _build(cls, cfg: dict, kwargs: dict):
    kwargs.pop("num_classes", None)  # timm's create_model passes it; the reference drops it
    kwargs.pop("pretrained", None)
    return cls(**{**cfg, **kwargs})


def beit_base_patch16_224_8k_vocab(**kwargs) -> VisionTransformerForMaskedImageModeling:
    """BEiT-B/16 pretraining model: 768 wide, 12 blocks, 12 heads, 8192 visual tokens, layer
    scale 0.1, shared relative position bias."""
    return _build(VisionTransformerForMaskedImageModeling, {**_BASE, "vocab_size": 8192}, kwargs)


def beit_large_patch16_224_8k_vocab(**kwargs) -> VisionTransformerForMaskedImageModeling:
    """BEiT-L/16 pretraining model: 1024 wide, 24 blocks, 16 heads, layer scale 1e-5."""
    return _build(VisionTransformerForMaskedImageModeling, {**_LARGE, "vocab_size": 8192}, kwargs)


def beit_tiny_patch16_224_8k_vocab(**kwargs) -> VisionTransformerForMaskedImageModeling:
    """A ViT-Tiny-sized BEiT for CPU runs and tests: 192 wide, 12 blocks, 3 heads. Sizes can be
    overridden (e.g. ``img_size=64, depth=2, vocab_size=512``)."""
    return _build(VisionTransformerForMaskedImageModeling, {**_TINY, "vocab_size": 8192}, kwargs)


def beit_base_patch16_224_pixel(**kwargs) -> VisionTransformerForMaskedPixelModeling:
    """BEiT-B/16 encoder with a linear pixel head and L1 loss on masked patches (SimMIM style)."""
    return _build(VisionTransformerForMaskedPixelModeling, _BASE, kwargs)


def beit_large_patch16_224_pixel(**kwargs) -> VisionTransformerForMaskedPixelModeling:
    """BEiT-L/16 encoder with a linear pixel head and L1 loss on masked patches."""
    return _build(VisionTransformerForMaskedPixelModeling, _LARGE, kwargs)


def beit_tiny_patch16_224_pixel(**kwargs) -> VisionTransformerForMaskedPixelModeling:
    """ViT-Tiny-sized pixel variant for CPU runs and tests."""
    return _build(VisionTransformerForMaskedPixelModeling, _TINY, kwargs)
