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

BEiT v1. MMPretrain's ``BEiT`` without a neck is ``backbone=BEiTPretrainViT`` (a ``BEiTViT``:
``BEiTTransformerEncoderLayer``s with ``BEiTAttention``) + ``head=BEiTV1Head`` +
``target_generator=DALL-E`` (its ``DALLEEncoder``); the backbone is microsoft/unilm's
``VisionTransformerForMaskedImageModeling`` (mimfast's :mod:`mimfast.models.beit`) under other
module names, and the rest of the names are unilm's (``gamma_1``, ``q_bias``...)::

    MMPretrain                                           mimfast / unilm BEiT
    backbone.cls_token, backbone.mask_token              cls_token, mask_token
    backbone.pos_embed                                   pos_embed                (use_abs_pos_emb only)
    backbone.patch_embed.projection.*                    patch_embed.proj.*
    backbone.rel_pos_bias.relative_position_bias_table   rel_pos_bias.relative_position_bias_table
    backbone.rel_pos_bias.relative_position_index        rel_pos_bias.relative_position_index
    backbone.layers.<i>.ln1.*, .ln2.*                    blocks.<i>.norm1.*, .norm2.*
    backbone.layers.<i>.gamma_1, .gamma_2                blocks.<i>.gamma_1, .gamma_2  (plain tensors)
    backbone.layers.<i>.attn.{q_bias, v_bias, qkv.weight, proj.*}          blocks.<i>.attn.(same)
    backbone.layers.<i>.attn.relative_position_bias_table / _index        (use_rel_pos_bias) (same)
    backbone.layers.<i>.ffn.layers.0.0.*, .ffn.layers.1.*                 blocks.<i>.mlp.fc1.*, .mlp.fc2.*
    backbone.ln1.*                                       norm.*                   (final_norm)
    head.cls_head.*                                      lm_head.*                (BEiTV1Head)
    target_generator.blocks.*                            (dropped; :func:`dalle_from_mmpretrain` gives
                                                          them under DalleEncoder's keys, which are the same)

The relative position index is built by the same code in both (``meshgrid`` 'ij' over
(Wh, Ww), row offset times 2 Ww - 1, then cls-to-token, token-to-cls, cls-to-cls as the last
three table rows), and the table is rows x heads in both, so the table maps as it is; a
checkpoint whose stored index differs from that construction is refused. The layer forward is
the same: ``x + gamma_1 * attn(ln1(x), rel_pos_bias)``, ``x + gamma_2 * ffn(ln2(x))``, the
attention's qkv bias ``cat(q_bias, 0, v_bias)``, the shared bias added to the scaled scores,
exact GELU, LayerNorm eps 1e-6; the mask token replaces masked patches before the cls token is
prepended; the head reads the masked patch tokens. A backbone built with ``bias=True`` (a full
``attn.qkv.bias``) maps its q and v parts; its k part adds ``q . b_k`` to every score of a
query's row, which the softmax takes away, so dropping it changes nothing.

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

import ast
import re

import torch

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
_LAYER = {"ln1": "norm1", "attn.qkv": "attn.qkv", "attn.proj": "attn.proj", "ln2": "norm2",
          "ffn.layers.0.0": "mlp.fc1", "ffn.layers.1": "mlp.fc2"}
_LAYER_BACK = {v: k for k, v in _LAYER.items()}
_STACKS = {"backbone.layers": "blocks", "neck.decoder_blocks": "decoder_blocks"}
_STACKS_BACK = {v: k for k, v in _STACKS.items()}
_MM_LAYER_RE = re.compile(r"(backbone\.layers|neck\.decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$")
_MF_LAYER_RE = re.compile(r"(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$")
_DROPPED = ("backbone.ln2.weight", "backbone.ln2.bias")  # out_type='avg_featmap': unused when pretraining

# MMPretrain VisionTransformer.arch_zoo: name -> (embed_dims, num_layers, num_heads)
_ARCH_ZOO = {"s": (768, 8, 8), "small": (768, 8, 8), "b": (768, 12, 12), "base": (768, 12, 12),
             "l": (1024, 24, 16), "large": (1024, 24, 16), "h": (1280, 32, 16), "huge": (1280, 32, 16),
             "eva-g": (1408, 40, 16), "eva-giant": (1408, 40, 16), "deit-t": (192, 12, 3), "deit-tiny": (192, 12, 3),
             "deit-s": (384, 12, 6), "deit-small": (384, 12, 6), "dinov2-s": (384, 12, 6),
             "dinov2-small": (384, 12, 6), "deit-b": (768, 12, 12), "deit-base": (768, 12, 12),
             "dinov2-g": (1536, 40, 24), "dinov2-giant": (1536, 40, 24)}
_HEADS_BY_SIZE = {(w, d): h for w, d, h in _ARCH_ZOO.values()}
_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
# mimfast's named MAE models: (width, depth, heads, patch) with a 512-wide, 8-block, 16-head decoder
MAE_PRESETS = {(768, 12, 12, 16): "mae_vit_base_patch16", (1024, 24, 16, 16): "mae_vit_large_patch16",
               (1280, 32, 16, 14): "mae_vit_huge_patch14"}
# mimfast's named BEiT token models: (width, depth, heads, patch); any other size is the tiny factory's
BEIT_PRESETS = {(768, 12, 12, 16): "beit_base_patch16_224_8k_vocab",
                (1024, 24, 16, 16): "beit_large_patch16_224_8k_vocab"}


def _has(sd: dict, *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in sd)


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
    out = {}
    for k, v in sd.items():
        if k in _FIXED:
            out[_FIXED[k]] = v
            continue
        m = _MM_LAYER_RE.match(k)
        if m and m.group(3) in _LAYER:
            out[f"{_STACKS[m.group(1)]}.{m.group(2)}.{_LAYER[m.group(3)]}.{m.group(4)}"] = v
        elif k in _DROPPED or k.startswith("data_preprocessor."):
            continue
        else:
            raise ValueError(f"unexpected key {k!r} in an MMPretrain MAE state_dict")
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
    out = {}
    for k, v in sd.items():
        if k in _FIXED_BACK:
            out[_FIXED_BACK[k]] = v
            continue
        m = _MF_LAYER_RE.match(k)
        if m and m.group(3) in _LAYER_BACK:
            out[f"{_STACKS_BACK[m.group(1)]}.{m.group(2)}.{_LAYER_BACK[m.group(3)]}.{m.group(4)}"] = v
        else:
            raise ValueError(f"key {k!r} has no MMPretrain MAE counterpart (an MAE state_dict has no such key; "
                             "mimfast's MAE and BEiT token models map)")
    return out


# --- BEiT v1

_BEIT_FIXED = {
    "backbone.cls_token": "cls_token",
    "backbone.mask_token": "mask_token",
    "backbone.pos_embed": "pos_embed",
    "backbone.patch_embed.projection.weight": "patch_embed.proj.weight",
    "backbone.patch_embed.projection.bias": "patch_embed.proj.bias",
    "backbone.rel_pos_bias.relative_position_bias_table": "rel_pos_bias.relative_position_bias_table",
    "backbone.rel_pos_bias.relative_position_index": "rel_pos_bias.relative_position_index",
    "backbone.ln1.weight": "norm.weight",
    "backbone.ln1.bias": "norm.bias",
    "head.cls_head.weight": "lm_head.weight",
    "head.cls_head.bias": "lm_head.bias",
}
_BEIT_FIXED_BACK = {v: k for k, v in _BEIT_FIXED.items()}
_BEIT_SAME = ("gamma_1", "gamma_2", "attn.q_bias", "attn.v_bias", "attn.qkv.weight", "attn.proj.weight",
              "attn.proj.bias", "attn.relative_position_bias_table", "attn.relative_position_index")
_BEIT_RENAMED = (("ln1", "norm1"), ("ln2", "norm2"), ("ffn.layers.0.0", "mlp.fc1"), ("ffn.layers.1", "mlp.fc2"))
_BEIT_LAYER = {**{name: name for name in _BEIT_SAME},
               **{f"{mm}.{p}": f"{mf}.{p}" for mm, mf in _BEIT_RENAMED for p in ("weight", "bias")}}
_BEIT_LAYER_BACK = {v: k for k, v in _BEIT_LAYER.items()}
_BEIT_MM_LAYER_RE = re.compile(r"backbone\.layers\.(\d+)\.(.+)$")
_BEIT_MF_LAYER_RE = re.compile(r"blocks\.(\d+)\.(.+)$")
_BEIT_MARKS = (".attn.q_bias", ".attn.v_bias", ".attn.relative_position_bias_table", ".gamma_1", ".gamma_2")
_VQKD = ("target_generator.encoder.", "target_generator.decoder.", "target_generator.quantize.",
         "target_generator.encode_task_layer.")


def _is_beit_layout(sd: dict) -> bool:
    """MMPretrain keys of a BEiT-style backbone (``BEiTViT``'s q/v biases, relative position tables
    or layer scale), or ``BEiTPretrainViT``'s mask token beside ``BEiTV1Head`` / a DALL-E target
    generator (a backbone built with ``bias=True``, no layer scale and absolute positions)."""
    if any((k.startswith("backbone.") and k.endswith(_BEIT_MARKS)) or k.startswith("backbone.rel_pos_bias.")
           for k in sd):
        return True
    return "backbone.mask_token" in sd and _has(sd, "head.cls_head.", "target_generator.blocks.")


def _beit_what_else(sd: dict) -> str | None:
    """None for MMPretrain's BEiT v1 (``BEiTPretrainViT`` [+ ``BEiTV1Head``] [+ ``DALL-E``]); else
    what these BEiT-style weights are, in words."""
    v2 = [k for k in sd if k.startswith(("neck.", *_VQKD))]
    if v2:
        return (f"BEiT v2 (a BEiTV2Neck and a VQKD target generator: {v2[0]!r}); mimfast's BEiT is v1, which "
                "predicts DALL-E tokens")
    other = [k for k in sd if k.startswith("target_generator.") and not k.startswith("target_generator.blocks.")]
    if other:
        return f"a BEiT-style model with a target generator other than DALL-E ({other[0]!r})"
    heads = [k for k in sd if k.startswith("head.") and not k.startswith("head.cls_head.")]
    if heads:
        return (f"a BEiT-style backbone with head {heads[0]!r}, not BEiTV1Head's head.cls_head (a fine-tuned "
                "classifier?)")
    if "backbone.patch_embed.projection.weight" not in sd:
        return "a BEiT-style backbone without MMPretrain's patch embedding (backbone.patch_embed.projection)"
    for k in sd:
        if k in _BEIT_FIXED or k in _DROPPED or k.startswith(("head.", "target_generator.", "data_preprocessor.")):
            continue
        m = _BEIT_MM_LAYER_RE.match(k)
        if not (m and (m.group(2) in _BEIT_LAYER or m.group(2) == "attn.qkv.bias")):
            return f"a BEiT-style model with {k!r}, which MMPretrain's BEiTPretrainViT has not"
    both = [k for k in sd if k.endswith(".attn.qkv.bias") and k.replace(".qkv.bias", ".q_bias") in sd]
    if both:
        return f"an attention with both a qkv bias and q/v biases ({both[0]!r})"
    return None


def _is_mimfast_beit(sd: dict) -> bool:
    """mimfast's / unilm's BEiT keys (the token model's, or the pixel variant's)."""
    return (any(k.startswith(("rel_pos_bias.", "lm_head.", "pixel_head.")) or k.endswith(_BEIT_MARKS) for k in sd)
            or ("mask_token" in sd and not _has(sd, "decoder_")))


def _grid_from_table(rows: int) -> int:
    """g for a square g x g patch grid's relative position table of (2g - 1)^2 + 3 rows."""
    side = int(round(max(rows - 3, 0) ** 0.5))
    if side * side != rows - 3 or side % 2 == 0:
        raise ValueError(f"a relative position table of {rows} rows is not (2g - 1)^2 + 3 for a square g x g grid")
    return (side + 1) // 2


def _check_relative_position_index(sd: dict) -> None:
    """Each stored index (mimfast keys) must be the one the table's square grid gives: MMPretrain
    builds it with unilm's code, so a table maps as it is only with that index."""
    from mimfast.nn.beit_attention import relative_position_index

    for key, table in sd.items():
        if not key.endswith("relative_position_bias_table") or table.is_meta:
            continue
        grid = _grid_from_table(table.shape[0])
        index = sd.get(key.replace("_bias_table", "_index"))
        if index is None or index.is_meta:
            continue
        want = relative_position_index((grid, grid))
        if index.shape != want.shape or not torch.equal(index.double(), want.double()):
            raise ValueError(f"{key.replace('_bias_table', '_index')} is not the relative position index of a "
                             f"{grid} x {grid} grid with the cls token (unilm's / MMPretrain's construction): "
                             "the table's rows would mean other offsets")


def _beit_from_mmpretrain(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if k in _BEIT_FIXED:
            out[_BEIT_FIXED[k]] = v
            continue
        m = _BEIT_MM_LAYER_RE.match(k)
        if m and m.group(2) in _BEIT_LAYER:
            out[f"blocks.{m.group(1)}.{_BEIT_LAYER[m.group(2)]}"] = v
        elif m and m.group(2) == "attn.qkv.bias":  # bias=True: q and v thirds; the k third is softmax-invariant
            d = v.shape[0] // 3
            out[f"blocks.{m.group(1)}.attn.q_bias"] = v[:d].clone()
            out[f"blocks.{m.group(1)}.attn.v_bias"] = v[2 * d:].clone()
        elif k in _DROPPED or k.startswith(("data_preprocessor.", "target_generator.")):
            continue  # avg_featmap's unused ln2; DALL-E's weights: dalle_from_mmpretrain
        else:
            raise ValueError(f"unexpected key {k!r} in an MMPretrain BEiT state_dict")
    if "norm.weight" not in out:
        raise ValueError("an MMPretrain BEiT backbone without its final norm (backbone.ln1, final_norm=False): "
                         "mimfast's BEiT ends the encoder with it")
    _check_relative_position_index(out)
    return out


def _beit_to_mmpretrain(sd: dict) -> dict:
    from mimfast.nn.beit_attention import relative_position_index

    out = {}
    for k, v in sd.items():
        if k in _BEIT_FIXED_BACK:
            out[_BEIT_FIXED_BACK[k]] = v
            continue
        m = _BEIT_MF_LAYER_RE.match(k)
        if m and m.group(2) in _BEIT_LAYER_BACK:
            out[f"backbone.layers.{m.group(1)}.{_BEIT_LAYER_BACK[m.group(2)]}"] = v
        elif k.startswith("pixel_head."):
            raise ValueError(f"{k!r}: a BEiT-encoder model with a pixel head (beit_*_pixel, the SimMIM-style variant) "
                             "has no MMPretrain BEiT counterpart, whose head predicts visual tokens (BEiTV1Head); "
                             "write it with --format simmim")
        else:
            raise ValueError(f"key {k!r} has no MMPretrain BEiT counterpart (MMPretrain's BEiTPretrainViT + "
                             "BEiTV1Head)")
    # the index buffers are in MMPretrain's state_dict, and BEiTViT's fine-tuning pre-hook pops the shared
    # one when it copies the shared table into each block: write them where they were left out
    for key in [k for k in out if k.endswith("relative_position_bias_table")]:
        index = key.replace("_bias_table", "_index")
        if index not in out:
            grid = _grid_from_table(out[key].shape[0])
            out[index] = relative_position_index((grid, grid))
    return out


def dalle_from_mmpretrain(sd: dict) -> dict:
    """The DALL-E encoder's weights in an MMPretrain file under mimfast's ``DalleEncoder`` keys:
    a BEiT v1 checkpoint's ``target_generator.*`` (MMPretrain's ``DALLEEncoder``, whose module
    names are openai/DALL-E's: ``blocks.input``, ``blocks.group_<g>.block_<i>.{id_path,
    res_path.conv_<j>}``, ``blocks.output.conv``, each with ``w`` and ``b``), or a bare
    ``DALLEEncoder`` state_dict as in MMPretrain's ``dalle_encoder.pth`` (``module.`` /
    ``target_generator.`` prefixes taken off). Tensors as they are."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    vqkd = [k for k in sd if k.startswith(_VQKD)]
    if vqkd:
        raise ValueError(f"a VQKD target generator (BEiT v2: {vqkd[0]!r}), not DALL-E's encoder")
    if _has(sd, "target_generator."):
        sd = {k.removeprefix("target_generator."): v for k, v in sd.items() if k.startswith("target_generator.")}
    if not sd or not all(k.startswith("blocks.") for k in sd) or "blocks.input.w" not in sd:
        found = sorted({k.split(".")[0] for k in sd})[:5]
        raise ValueError(f"no DALL-E encoder weights (target_generator.blocks.* or blocks.input.w ...): found {found}")
    return dict(sd)


def _find_type(obj, name: str) -> dict | None:
    """The first dict (depth first) in a parsed config whose ``type`` is ``name``."""
    if isinstance(obj, dict):
        if _type_name(obj.get("type")) == name:
            return obj
        values = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        values = obj
    else:
        return None
    for value in values:
        found = _find_type(value, name)
        if found is not None:
            return found
    return None


def _beit_model_config(sd: dict, mm_cfg: dict | None = None) -> dict:
    """A mimfast BEiT checkpoint ``config`` for an MMPretrain BEiT v1 checkpoint (``sd`` under
    mimfast's keys). From the weights: width, depth, patch, channels, MLP ratio, the grid (the
    relative position index / table, else the absolute table), the head count (the relative
    position table's columns), which position encodings, q/v biases, layer scale and the
    vocabulary (the head's rows). From the config text when there: the layer-scale init (else
    BEiTPretrainViT's 0.1), the head count of a model with no relative table, drop path and the
    mask generator's patch count."""
    model = _get(mm_cfg, "model", default={}) or {}
    kind = _type_name(model.get("type"))
    if kind is not None and kind != "BEiT":
        raise ValueError(f"the checkpoint's config builds model type {kind!r} on BEiT-style weights: only "
                         "MMPretrain's BEiT (v1) maps to mimfast's BEiT")
    parts = {name: model.get(name) if isinstance(model.get(name), dict) else None
             for name in ("backbone", "neck", "head", "target_generator")}
    head_type, generator = _type_name(_get(parts["head"], "type")), _type_name(_get(parts["target_generator"], "type"))
    if parts["neck"] is not None or head_type == "BEiTV2Head" or generator == "VQKD":
        raise ValueError(f"the checkpoint's config is BEiT v2 (neck {_get(parts['neck'], 'type')!r}, head "
                         f"{head_type!r}, target generator {generator!r}): mimfast's BEiT is v1 (DALL-E tokens)")
    if _type_name(_get(parts["backbone"], "type")) not in (None, "BEiTPretrainViT"):
        raise ValueError(f"the checkpoint's config has backbone type {_get(parts['backbone'], 'type')!r}: only "
                         "BEiTPretrainViT maps")
    backbone = parts["backbone"]
    proj = sd["patch_embed.proj.weight"]
    width, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = _depth(sd, "blocks")
    shared = sd.get("rel_pos_bias.relative_position_bias_table")
    table = shared if shared is not None else sd.get("blocks.0.attn.relative_position_bias_table")
    heads = table.shape[1] if table is not None else _encoder_heads(width, depth, backbone)
    if table is not None:
        grid = _grid_from_table(table.shape[0])
    elif "pos_embed" in sd:
        grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
    else:
        size = _get(backbone, "img_size")
        grid = (size if isinstance(size, int) else 224) // patch
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / width
    init = _get(backbone, "layer_scale_init_value")
    if "blocks.0.gamma_1" not in sd:
        init = 0.0
    elif not (isinstance(init, (int, float)) and not isinstance(init, bool) and init > 0):
        init = 0.1  # BEiTPretrainViT's default
    vocab = _get(parts["head"], "num_embed")
    if "lm_head.weight" in sd:
        vocab = sd["lm_head.weight"].shape[0]
    kwargs = dict(embed_dim=width, depth=depth, num_heads=heads, in_chans=in_chans,
                  mlp_ratio=int(mlp_ratio) if mlp_ratio.is_integer() else mlp_ratio,
                  qkv_bias="blocks.0.attn.q_bias" in sd, init_values=float(init),
                  use_abs_pos_emb="pos_embed" in sd,
                  use_rel_pos_bias="blocks.0.attn.relative_position_bias_table" in sd,
                  use_shared_rel_pos_bias=shared is not None,
                  vocab_size=vocab if isinstance(vocab, int) and vocab > 0 else 8192)
    out = dict(method="beit", model=BEIT_PRESETS.get((width, depth, heads, patch), "beit_tiny_patch16_224_8k_vocab"),
               img_size=grid * patch, patch_size=patch, model_kwargs=kwargs, norm_pix_loss=False, source="mmpretrain")
    drop_path = _get(backbone, "drop_path_rate")
    if isinstance(drop_path, (int, float)) and not isinstance(drop_path, bool):
        out["drop_path"] = float(drop_path)
    masks = _find_type(_get(mm_cfg, "train_dataloader"), "BEiTMaskGenerator") or _find_type(
        _get(mm_cfg, "train_pipeline"), "BEiTMaskGenerator")
    count = _get(masks, "num_masking_patches")
    if isinstance(count, int) and 0 < count < grid * grid:
        out["num_mask_patches"] = count
    return out


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


# --- the config text mmengine saves in meta['cfg']

_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b}


def _literal(node):
    """A config expression's value: constants, containers, ``dict(k=v, ...)``, +, -, *, / and //
    of numbers, dotted names as strings; anything else is None. Nothing is executed."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        items = [_literal(e) for e in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values) if k is not None}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg is not None}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _literal(node.operand)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _literal(node.left), _literal(node.right)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)):
            try:
                return _BINOPS[type(node.op)](a, b)
            except ZeroDivisionError:
                return None
    if isinstance(node, (ast.Name, ast.Attribute)):
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name):
            return ".".join([node.id, *reversed(parts)])
    return None


def parse_config_text(text: str) -> dict:
    """The top-level assignments of an mmengine config's text (``Config.pretty_text``, which the
    runner saves as ``meta['cfg']``) as plain values, read with :mod:`ast` (never executed);
    {} for text that does not parse."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError):
        return {}
    out = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            out[stmt.targets[0].id] = _literal(stmt.value)
    return out


def _get(cfg, *path, default=None):
    for key in path:
        if not isinstance(cfg, dict) or key not in cfg:
            return default
        cfg = cfg[key]
    return cfg


def _type_name(value) -> str | None:
    return value.rsplit(".", 1)[-1] if isinstance(value, str) else None


def _encoder_heads(width: int, depth: int, backbone: dict | None) -> int:
    arch = _get(backbone, "arch")
    if isinstance(arch, dict) and isinstance(arch.get("num_heads"), int):
        return arch["num_heads"]
    if isinstance(arch, str) and arch.lower() in _ARCH_ZOO:
        zoo_width, _, heads = _ARCH_ZOO[arch.lower()]
        if zoo_width == width:
            return heads
    return _HEADS_BY_SIZE.get((width, depth), _HEADS_BY_WIDTH.get(width, max(1, width // 64)))


def _decoder_heads(width: int, neck: dict | None) -> int:
    heads = _get(neck, "decoder_num_heads")
    if isinstance(heads, int) and heads > 0 and width % heads == 0:
        return heads
    for heads in (16, _HEADS_BY_WIDTH.get(width), max(1, width // 64)):  # 16: MAEPretrainDecoder's default
        if heads and width % heads == 0:
            return heads
    return 1


def _depth(sd: dict, stack: str) -> int:
    found = [int(m.group(1)) for k in sd if (m := re.match(rf"{stack}\.(\d+)\.", k))]
    return 1 + max(found) if found else 0


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
