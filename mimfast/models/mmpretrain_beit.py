"""open-mmlab/mmpretrain BEiT v1 checkpoints <-> mimfast's BEiT token model (pure ``state_dict``
mapping; nothing of mmpretrain, mmcv or mmengine is imported), and the DALL-E target generator's
weights such a checkpoint carries. :mod:`mimfast.models.mmpretrain` dispatches here.

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
"""

from __future__ import annotations

import re

import torch

from mimfast.models.beit import encoder_config_from_state_dict
from mimfast.models.mmpretrain_cfg import _DROPPED, _encoder_heads, _find_type, _get, _has, _map_keys, _type_name
from mimfast.nn.beit_attention import relative_position_index, table_grid

__all__ = ["dalle_from_mmpretrain", "BEIT_PRESETS"]

# mimfast's named BEiT token models: (width, depth, heads, patch); any other size is the tiny factory's
BEIT_PRESETS = {(768, 12, 12, 16): "beit_base_patch16_224_8k_vocab",
                (1024, 24, 16, 16): "beit_large_patch16_224_8k_vocab"}


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
_BEIT_STACKS = {"backbone.layers": "blocks"}
_BEIT_STACKS_BACK = {v: k for k, v in _BEIT_STACKS.items()}
_BEIT_MM_LAYER_RE = re.compile(r"(backbone\.layers)\.(\d+)\.(.+)$")
_BEIT_MF_LAYER_RE = re.compile(r"(blocks)\.(\d+)\.(.+)$")
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
        if not (m and (m.group(3) in _BEIT_LAYER or m.group(3) == "attn.qkv.bias")):
            return f"a BEiT-style model with {k!r}, which MMPretrain's BEiTPretrainViT has not"
    both = [k for k in sd if k.endswith(".attn.qkv.bias") and k.replace(".qkv.bias", ".q_bias") in sd]
    if both:
        return f"an attention with both a qkv bias and q/v biases ({both[0]!r})"
    return None


def _is_mimfast_beit(sd: dict) -> bool:
    """mimfast's / unilm's BEiT keys (the token model's, or the pixel variant's)."""
    return (any(k.startswith(("rel_pos_bias.", "lm_head.", "pixel_head.")) or k.endswith(_BEIT_MARKS) for k in sd)
            or ("mask_token" in sd and not _has(sd, "decoder_")))


def _check_relative_position_index(sd: dict) -> None:
    """Each stored index (mimfast keys) must be the one the table's square grid gives: MMPretrain
    builds it with unilm's code, so a table maps as it is only with that index."""
    for key, table in sd.items():
        if not key.endswith("relative_position_bias_table") or table.is_meta:
            continue
        grid = table_grid(table.shape[0])
        index = sd.get(key.replace("_bias_table", "_index"))
        if index is None or index.is_meta:
            continue
        want = relative_position_index((grid, grid))
        if index.shape != want.shape or not torch.equal(index.double(), want.double()):
            raise ValueError(f"{key.replace('_bias_table', '_index')} is not the relative position index of a "
                             f"{grid} x {grid} grid with the cls token (unilm's / MMPretrain's construction): "
                             "the table's rows would mean other offsets")


def _beit_from_mmpretrain(sd: dict) -> dict:
    def unmapped(k, v, m) -> dict:
        if m and m.group(3) == "attn.qkv.bias":  # bias=True: q and v thirds; the k third is softmax-invariant
            d, block = v.shape[0] // 3, f"blocks.{m.group(2)}.attn"
            return {f"{block}.q_bias": v[:d].clone(), f"{block}.v_bias": v[2 * d:].clone()}
        if k in _DROPPED or k.startswith(("data_preprocessor.", "target_generator.")):
            return {}  # avg_featmap's unused ln2; DALL-E's weights: dalle_from_mmpretrain
        raise ValueError(f"unexpected key {k!r} in an MMPretrain BEiT state_dict")

    out = _map_keys(sd, _BEIT_FIXED, _BEIT_MM_LAYER_RE, _BEIT_STACKS, _BEIT_LAYER, unmapped)
    if "norm.weight" not in out:
        raise ValueError("an MMPretrain BEiT backbone without its final norm (backbone.ln1, final_norm=False): "
                         "mimfast's BEiT ends the encoder with it")
    _check_relative_position_index(out)
    return out


def _beit_to_mmpretrain(sd: dict) -> dict:
    def unmapped(k, v, m) -> dict:
        if k.startswith("pixel_head."):
            raise ValueError(f"{k!r}: a BEiT-encoder model with a pixel head (beit_*_pixel, the SimMIM-style variant) "
                             "has no MMPretrain BEiT counterpart, whose head predicts visual tokens (BEiTV1Head); "
                             "write it with --format simmim")
        raise ValueError(f"key {k!r} has no MMPretrain BEiT counterpart (MMPretrain's BEiTPretrainViT + "
                         "BEiTV1Head)")

    out = _map_keys(sd, _BEIT_FIXED_BACK, _BEIT_MF_LAYER_RE, _BEIT_STACKS_BACK, _BEIT_LAYER_BACK, unmapped)
    # the index buffers are in MMPretrain's state_dict, and BEiTViT's fine-tuning pre-hook pops the shared
    # one when it copies the shared table into each block: write them where they were left out
    for key in [k for k in out if k.endswith("relative_position_bias_table")]:
        index = key.replace("_bias_table", "_index")
        if index not in out:
            grid = table_grid(out[key].shape[0])
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
    arch = encoder_config_from_state_dict(sd)
    kwargs, patch = arch["model_kwargs"], arch["patch_size"]
    width, depth = kwargs["embed_dim"], kwargs["depth"]
    if kwargs["num_heads"] is None:  # no relative position table says it
        kwargs["num_heads"] = _encoder_heads(width, depth, backbone)
    heads = kwargs["num_heads"]
    size = _get(backbone, "img_size")
    img_size = arch["img_size"] or (size if isinstance(size, int) else 224) // patch * patch
    grid = img_size // patch
    init = _get(backbone, "layer_scale_init_value")
    if "blocks.0.gamma_1" not in sd:
        init = 0.0
    elif not (isinstance(init, (int, float)) and not isinstance(init, bool) and init > 0):
        init = 0.1  # BEiTPretrainViT's default
    kwargs["init_values"] = float(init)
    vocab = _get(parts["head"], "num_embed")
    if "lm_head.weight" in sd:
        vocab = sd["lm_head.weight"].shape[0]
    kwargs["vocab_size"] = vocab if isinstance(vocab, int) and vocab > 0 else 8192
    out = dict(method="beit", model=BEIT_PRESETS.get((width, depth, heads, patch), "beit_tiny_patch16_224_8k_vocab"),
               img_size=img_size, patch_size=patch, model_kwargs=kwargs, norm_pix_loss=False, source="mmpretrain")
    drop_path = _get(backbone, "drop_path_rate")
    if isinstance(drop_path, (int, float)) and not isinstance(drop_path, bool):
        out["drop_path"] = float(drop_path)
    masks = _find_type(_get(mm_cfg, "train_dataloader"), "BEiTMaskGenerator") or _find_type(
        _get(mm_cfg, "train_pipeline"), "BEiTMaskGenerator")
    count = _get(masks, "num_masking_patches")
    if isinstance(count, int) and 0 < count < grid * grid:
        out["num_mask_patches"] = count
    return out
