"""open-mmlab/mmpretrain (MMPretrain 1.x, formerly mmselfsup) MAE and BEiT v1 checkpoints <->
mimfast's MAE and BEiT (pure ``state_dict`` mapping; nothing of mmpretrain, mmcv or mmengine is
imported).

MMPretrain's ``MAE`` is ``backbone=MAEViT`` (its ``VisionTransformer`` with ``mmcv`` bricks) +
``neck=MAEPretrainDecoder`` + ``head=MAEPretrainHead`` (the loss only, no weights); its
``state_dict`` keys carry those prefixes. Every parameter has a counterpart in mimfast's (and
facebookresearch/mae's) ``MaskedAutoencoderViT`` that plays the same role::

    MMPretrain                                    mimfast / official MAE
    backbone.cls_token, backbone.pos_embed        cls_token, pos_embed     (1, 1 + L, D), cls row first
    backbone.patch_embed.projection.*             patch_embed.proj.*       (mmcv PatchEmbed's conv)
    backbone.layers.<i>.ln1.*                     blocks.<i>.norm1.*
    backbone.layers.<i>.attn.qkv.*                blocks.<i>.attn.qkv.*    rows q, k, v; heads inside each
    backbone.layers.<i>.attn.proj.*               blocks.<i>.attn.proj.*
    backbone.layers.<i>.ln2.*                     blocks.<i>.norm2.*
    backbone.layers.<i>.ffn.layers.0.0.*          blocks.<i>.mlp.fc1.*     (mmcv FFN: Sequential(Linear, GELU,
    backbone.layers.<i>.ffn.layers.1.*            blocks.<i>.mlp.fc2.*      Dropout), Linear, Dropout)
    backbone.ln1.*                                norm.*                   (``final_norm``; ``norm1`` property)
    neck.mask_token                               mask_token               (the decoder's, as in the official code)
    neck.decoder_pos_embed, neck.decoder_embed.*  decoder_pos_embed, decoder_embed.*
    neck.decoder_blocks.<i>.<as layers>           decoder_blocks.<i>.<as blocks>
    neck.ln1.*                                    decoder_norm.*           (mmcv build_norm_layer 'ln' + postfix 1)
    neck.decoder_pred.*                           decoder_pred.*           (p*p*3 outputs in (p, q, c) order)

The forward is the official one (pre-norm blocks, exact GELU, LayerNorm eps 1e-6, the same
``random_masking``, the decoder's cls row dropped after ``decoder_pred``; the head's target is
the same (p, q, c) patchify with ``norm_pix`` by the unbiased variance + 1e-6 and an MSE averaged
over pixels, then over masked patches), so a converted model gives the same loss.

Position embeddings. Both are fixed 2D sin-cos tables with a zero cls row, but not in the same
layout: MMPretrain's ``build_2d_sincos_position_embedding`` meshes (w, h) with 'ij' indexing, so
the first half of patch ``y*g + x``'s row encodes ``y`` and the second half ``x``; the official
``get_2d_sincos_pos_embed`` (and mimfast) encodes ``x`` first. MMPretrain's table is the
official one with the grid transposed (:func:`mmpretrain_sincos_pos_embed`). The tables are
stored in the checkpoints and every path here (``--init-from``, export, linprobe, and MMPretrain
loading a written file) uses the stored table, which the weights were trained with; so the
mapping carries ``pos_embed`` / ``decoder_pos_embed`` unchanged, and converting either would
change what the model computes. :func:`pos_embed_layout` says which layout a table is in, and
the config read from an MMPretrain checkpoint records it (``pos_embed_layout``).

BEiT v1 (``BEiTPretrainViT`` + ``BEiTV1Head`` + DALL-E targets): :mod:`mimfast.models.mmpretrain_beit`.

Not mapped (refused with what was found): other MMPretrain models (MixMIM, CAE, BEiT v2 (a
``BEiTV2Neck`` and a VQKD target generator), HiViT/iTPN, MFF, MILAN/EVA feature targets,
MaskFeat, SimMIM-Swin, contrastive models, fine-tuned classifiers), layer scale in MAE's ViT
(``gamma1`` / ``gamma2``), ``pre_norm``, and encoders without the final norm. An
``out_type='avg_featmap'`` backbone's ``ln2`` (never used by the masked forward) is dropped.
Files written by mmengine's ``CheckpointHook`` (``{'meta', 'state_dict', 'message_hub',
'optimizer', 'param_schedulers'}``) are read by :func:`mimfast.train.checkpoint.load_model_weights`
with ``weights_only=True``; the config text in ``meta['cfg']`` is parsed without executing it
(:func:`parse_config_text`) for the head counts, ``norm_pix`` and ``mask_ratio`` (MAE), the
layer-scale init, drop path and the mask generator's patch count (BEiT).
"""

from __future__ import annotations

import re

import torch

from mimfast.models import VIT_HEADS_BY_WIDTH
from mimfast.models.mmpretrain_beit import (BEIT_PRESETS, _beit_from_mmpretrain, _beit_model_config,
                                            _beit_to_mmpretrain, _beit_what_else, _is_beit_layout, _is_mimfast_beit,
                                            dalle_from_mmpretrain)
from mimfast.models.mmpretrain_cfg import (_DROPPED, _depth, _encoder_heads, _get, _has, _map_keys,
                                           _type_name, parse_config_text)

__all__ = ["is_mmpretrain_state_dict", "from_mmpretrain", "to_mmpretrain", "mmpretrain_model_config",
           "dalle_from_mmpretrain", "parse_config_text", "mmpretrain_sincos_pos_embed", "pos_embed_layout",
           "MAE_PRESETS", "BEIT_PRESETS"]

_FIXED = {
    "backbone.cls_token": "cls_token",
    "backbone.pos_embed": "pos_embed",
    "backbone.patch_embed.projection.weight": "patch_embed.proj.weight",
    "backbone.patch_embed.projection.bias": "patch_embed.proj.bias",
    "backbone.ln1.weight": "norm.weight",
    "backbone.ln1.bias": "norm.bias",
    "neck.mask_token": "mask_token",
    "neck.decoder_pos_embed": "decoder_pos_embed",
    "neck.decoder_embed.weight": "decoder_embed.weight",
    "neck.decoder_embed.bias": "decoder_embed.bias",
    "neck.ln1.weight": "decoder_norm.weight",
    "neck.ln1.bias": "decoder_norm.bias",
    "neck.decoder_pred.weight": "decoder_pred.weight",
    "neck.decoder_pred.bias": "decoder_pred.bias",
}
_FIXED_BACK = {v: k for k, v in _FIXED.items()}
_LAYER_NAMES = (("ln1", "norm1"), ("attn.qkv", "attn.qkv"), ("attn.proj", "attn.proj"), ("ln2", "norm2"),
                ("ffn.layers.0.0", "mlp.fc1"), ("ffn.layers.1", "mlp.fc2"))
_LAYER = {f"{mm}.{p}": f"{mf}.{p}" for mm, mf in _LAYER_NAMES for p in ("weight", "bias")}
_LAYER_BACK = {v: k for k, v in _LAYER.items()}
_STACKS = {"backbone.layers": "blocks", "neck.decoder_blocks": "decoder_blocks"}
_STACKS_BACK = {v: k for k, v in _STACKS.items()}
_MM_LAYER_RE = re.compile(r"(backbone\.layers|neck\.decoder_blocks)\.(\d+)\.(.+)$")
_MF_LAYER_RE = re.compile(r"(blocks|decoder_blocks)\.(\d+)\.(.+)$")

# mimfast's named MAE models: (width, depth, heads, patch) with a 512-wide, 8-block, 16-head decoder
MAE_PRESETS = {(768, 12, 12, 16): "mae_vit_base_patch16", (1024, 24, 16, 16): "mae_vit_large_patch16",
               (1280, 32, 16, 14): "mae_vit_huge_patch14"}


def _what_else(sd: dict) -> str | None:
    """What an OpenMMLab (mmengine) ``state_dict`` that is not MMPretrain's MAE ViT holds, in words;
    None when it is one."""
    if _has(sd, "teacher.") or _has(sd, "neck.regressors.", "neck.decoders."):
        return "a CAE model (teacher / regressor-decoder weights)"
    if any(re.match(r"backbone\.layers\.\d+\.blocks\.", k) for k in sd):
        return ("a hierarchical (Swin-style) backbone, as MixMIM's" if _has(sd, "neck.decoder_blocks.")
                else "a hierarchical (Swin-style) backbone, as SimMIM-Swin's")
    if _has(sd, "backbone.blocks.", "backbone.patch_embed.proj."):
        return "a HiViT backbone (MAEHiViT / iTPN)"
    if _has(sd, "backbone.proj_layers.", "backbone.proj_weights"):
        return "an MFF backbone (multi-level feature fusion)"
    if _is_beit_layout(sd):
        return _beit_what_else(sd)
    if _has(sd, "target_generator."):
        return ("a model with a target generator (BEiT v2, MILAN, EVA, MaskFeat...: "
                f"{next(k for k in sd if k.startswith('target_generator.'))!r})")
    if _has(sd, "momentum_encoder.") or (_has(sd, "neck.") and not _has(sd, "neck.decoder_blocks.")):
        return f"a model with another neck ({next(k for k in sd if k.startswith(('neck.', 'momentum_encoder.')))!r})"
    heads = [k for k in sd if k.startswith("head.")]
    if heads:
        return f"a model with a trained head ({heads[0]!r}: a fine-tuned classifier, or not MAE's weightless head)"
    if not _has(sd, "backbone.patch_embed.projection."):
        found = sorted({k.split(".")[0] + "." + k.split(".")[1] for k in sd if "." in k})[:4]
        return f"no MMPretrain ViT patch embedding (backbone.patch_embed.projection): found {found}"
    scaled = [k for k in sd if re.search(r"\.gamma[12]\.", k)]
    if scaled:
        return f"a ViT with layer scale ({scaled[0]!r}), which mimfast's MAE has not"
    if _has(sd, "backbone.pre_norm."):
        return "a ViT with pre_norm (CLIP-style), which mimfast's MAE has not"
    return None


def _backbone_only(sd: dict) -> bool:
    """A ViT backbone's weights without the ``backbone.`` prefix (as backbone-extraction tools write)."""
    return "patch_embed.projection.weight" in sd and _has(sd, "layers.")


def is_mmpretrain_state_dict(sd: dict) -> bool:
    """Whether ``sd`` is MMPretrain's MAE (``backbone.`` / ``neck.`` keys, or a bare ``MAEViT``
    backbone's) or BEiT v1 (``backbone.`` / ``head.`` / ``target_generator.`` keys, or a bare
    ``BEiTPretrainViT``'s). Other ``backbone.*`` weights (another MMPretrain / OpenMMLab model) are
    an error naming what was found; anything else (no ``backbone.`` key) is not this layout."""
    if _backbone_only(sd):
        return True
    if not _has(sd, "backbone."):
        return False
    what = _what_else(sd)
    if what is not None:
        raise ValueError(f"backbone.* weights (an MMPretrain / OpenMMLab model) that are not MMPretrain's MAE ViT "
                         f"or BEiT v1: {what}; mimfast maps MAE (MAEViT + MAEPretrainDecoder) and BEiT v1 "
                         "(BEiTPretrainViT + BEiTV1Head, DALL-E targets) only")
    return True


def from_mmpretrain(sd: dict) -> dict:
    """An MMPretrain MAE ``state_dict`` under mimfast's / the official ``MaskedAutoencoderViT`` keys,
    or a BEiT v1 one under mimfast's / unilm's ``VisionTransformerForMaskedImageModeling`` keys
    (tensors as they are; a backbone-only file gives the encoder only; BEiT's DALL-E target
    generator is left out: :func:`dalle_from_mmpretrain`)."""
    if _backbone_only(sd):
        sd = {"backbone." + k: v for k, v in sd.items()}
    if not is_mmpretrain_state_dict(sd):
        raise ValueError("not an MMPretrain MAE state_dict (no backbone.patch_embed.projection.weight)")
    if _is_beit_layout(sd):
        return _beit_from_mmpretrain(sd)

    def unmapped(k, v, m) -> dict:
        if k in _DROPPED or k.startswith("data_preprocessor."):
            return {}
        raise ValueError(f"unexpected key {k!r} in an MMPretrain MAE state_dict")

    out = _map_keys(sd, _FIXED, _MM_LAYER_RE, _STACKS, _LAYER, unmapped)
    if "norm.weight" not in out:
        raise ValueError("an MMPretrain ViT without its final norm (backbone.ln1, final_norm=False): mimfast's MAE "
                         "ends the encoder with it")
    rows = out.get("decoder_pred.weight")
    proj = out["patch_embed.proj.weight"]
    if rows is not None and rows.shape[0] != proj.shape[1] * proj.shape[2] * proj.shape[3]:
        raise ValueError(f"neck.decoder_pred predicts {rows.shape[0]} features per patch, not the "
                         f"p*p*C = {proj.shape[1] * proj.shape[2] * proj.shape[3]} pixels of MAE: a feature-target "
                         "model (EVA, MILAN)")
    return out


def to_mmpretrain(sd: dict) -> dict:
    """mimfast's / the official MAE ``state_dict`` under MMPretrain's ``MAE`` keys (``backbone.`` and,
    when the decoder is there, ``neck.``), as MMPretrain's pretraining writes them: MMPretrain's
    ``load_checkpoint`` / ``load_from`` read it into ``MAE``, and fine-tuning configs read the
    encoder with ``init_cfg=dict(type='Pretrained', checkpoint=..., prefix='backbone.')``. A BEiT
    token model (mimfast's / unilm's keys) goes to MMPretrain's ``BEiT`` keys (``backbone.``,
    ``head.cls_head.``; no target generator: MMPretrain's config loads DALL-E's weights itself)."""
    if _is_mimfast_beit(sd):
        return _beit_to_mmpretrain(sd)

    def unmapped(k, v, m) -> dict:
        raise ValueError(f"key {k!r} has no MMPretrain MAE counterpart (an MAE state_dict has no such key; "
                         "mimfast's MAE and BEiT token models map)")

    return _map_keys(sd, _FIXED_BACK, _MF_LAYER_RE, _STACKS_BACK, _LAYER_BACK, unmapped)


# --- position embeddings


def mmpretrain_sincos_pos_embed(embed_dim: int, grid: int, temperature: float = 10000.0) -> torch.Tensor:
    """(1, 1 + grid*grid, embed_dim) float32: the table MMPretrain's MAE initialises (a zero cls row,
    then for patch ``y*grid + x``: [sin(y w), cos(y w), sin(x w), cos(x w)], w = 1/T^(i/(D/4)),
    i < D/4) -- the official table with x and y swapped."""
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for 2D sin-cos, got {embed_dim}")
    q = embed_dim // 4
    omega = 1.0 / temperature ** (torch.arange(q, dtype=torch.float32) / q)  # (D/4,)
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                          indexing="ij")
    oy, ox = y.reshape(-1, 1) * omega, x.reshape(-1, 1) * omega  # (g*g, D/4)
    table = torch.cat([oy.sin(), oy.cos(), ox.sin(), ox.cos()], dim=1)
    return torch.cat([torch.zeros(1, embed_dim), table], dim=0).unsqueeze(0)


def pos_embed_layout(pos_embed: torch.Tensor, atol: float = 1e-4) -> str:
    """``'official'`` (facebookresearch/mae's and mimfast's sin-cos), ``'mmpretrain'`` (the
    transposed one) or ``'other'`` (learned, resized, or not a square grid) for a (1, 1 + L, D) table."""
    from mimfast.models.pos_embed import get_2d_sincos_pos_embed

    if pos_embed.is_meta or pos_embed.dim() != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[-1] % 4:
        return "other"
    grid = int(round((pos_embed.shape[1] - 1) ** 0.5))
    if grid * grid != pos_embed.shape[1] - 1:
        return "other"
    got = pos_embed.detach().float().cpu()
    dim = got.shape[-1]
    official = torch.from_numpy(get_2d_sincos_pos_embed(dim, grid, cls_token=True)).float().unsqueeze(0)
    if torch.allclose(got, official, atol=atol, rtol=0):
        return "official"
    if torch.allclose(got, mmpretrain_sincos_pos_embed(dim, grid), atol=atol, rtol=0):
        return "mmpretrain"
    return "other"


def _decoder_heads(width: int, neck: dict | None) -> int:
    heads = _get(neck, "decoder_num_heads")
    if isinstance(heads, int) and heads > 0 and width % heads == 0:
        return heads
    for heads in (16, VIT_HEADS_BY_WIDTH.get(width), max(1, width // 64)):  # 16: MAEPretrainDecoder's default
        if heads and width % heads == 0:
            return heads
    return 1


def mmpretrain_model_config(sd: dict, mm_cfg: dict | None = None) -> dict:
    """A mimfast checkpoint ``config`` (method, model, img_size, patch_size, model_kwargs,
    norm_pix_loss, mask_ratio) for an MMPretrain MAE checkpoint: ``sd`` already under mimfast's keys
    (:func:`from_mmpretrain`), ``mm_cfg`` the checkpoint's config (:func:`parse_config_text` of
    ``meta['cfg']``), if any. Width, depth, patch, grid, channels, MLP ratio and the decoder's width
    and depth come from the weights; the head counts from the config, else MMPretrain's arch table
    for the encoder and its default of 16 for the decoder; ``norm_pix`` defaults to True (every MAE ViT
    config of MMPretrain sets it) and ``mask_ratio`` to 0.75. BEiT weights give a BEiT config
    (:func:`_beit_model_config`)."""
    if _is_mimfast_beit(sd):
        return _beit_model_config(sd, mm_cfg)
    model = _get(mm_cfg, "model", default={}) or {}
    kind = _type_name(model.get("type"))
    if kind is not None and kind != "MAE":
        raise ValueError(f"the checkpoint's config builds model type {kind!r} on MAE ViT weights: only MMPretrain's "
                         "MAE and BEiT (v1) map to mimfast")
    backbone = model.get("backbone") if isinstance(model.get("backbone"), dict) else None
    neck = model.get("neck") if isinstance(model.get("neck"), dict) else None
    head = model.get("head") if isinstance(model.get("head"), dict) else None
    if _type_name(_get(backbone, "type")) not in (None, "MAEViT"):
        raise ValueError(f"the checkpoint's config has backbone type {_get(backbone, 'type')!r}: only MAEViT maps")
    proj = sd["patch_embed.proj.weight"]
    width, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = _depth(sd, "blocks")
    grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / width
    heads = _encoder_heads(width, depth, backbone)
    kwargs = dict(embed_dim=width, depth=depth, num_heads=heads, in_chans=in_chans,
                  mlp_ratio=int(mlp_ratio) if mlp_ratio.is_integer() else mlp_ratio)
    decoder = "decoder_embed.weight" in sd
    if decoder:
        dec_width = sd["decoder_embed.weight"].shape[0]
        dec_ratio = sd["decoder_blocks.0.mlp.fc1.weight"].shape[0] / dec_width if _depth(sd, "decoder_blocks") else 4
        if dec_ratio != mlp_ratio:
            raise ValueError(f"the decoder's MLP ratio {dec_ratio} differs from the encoder's {mlp_ratio}: "
                             "mimfast's MAE has one mlp_ratio")
        kwargs.update(decoder_embed_dim=dec_width, decoder_depth=_depth(sd, "decoder_blocks"),
                      decoder_num_heads=_decoder_heads(dec_width, neck))
    else:  # an encoder-only file: MMPretrain's default decoder, initialised fresh
        kwargs.update(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
    criterion = _get(head, "loss", "criterion")
    if isinstance(criterion, str) and criterion.upper() == "L1":
        kwargs["loss"] = "l1"
    preset = MAE_PRESETS.get((width, depth, heads, patch))
    if (preset and in_chans == 3 and kwargs["mlp_ratio"] == 4 and "loss" not in kwargs
            and (kwargs["decoder_embed_dim"], kwargs["decoder_depth"], kwargs["decoder_num_heads"]) == (512, 8, 16)):
        name, model_kwargs, patch_size = preset, {}, None  # the named model's own sizes (it fixes the patch)
    else:
        name, model_kwargs, patch_size = "mae_vit_tiny_patch16", kwargs, patch  # the factory that takes any size
    norm_pix = _get(head, "norm_pix")
    mask_ratio = _get(backbone, "mask_ratio")
    return dict(method="mae", model=name, img_size=grid * patch, patch_size=patch_size, model_kwargs=model_kwargs,
                norm_pix_loss=bool(norm_pix) if isinstance(norm_pix, bool) else True,
                mask_ratio=float(mask_ratio) if isinstance(mask_ratio, (int, float)) else 0.75,
                source="mmpretrain", pos_embed_layout=pos_embed_layout(sd["pos_embed"]))
