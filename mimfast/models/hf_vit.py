"""Hugging Face ``ViTForMaskedImageModeling`` <-> mimfast's pixel model (pure ``state_dict`` and
config mapping; this module does not import transformers).

Masked image modeling with a plain ViT (transformers' ``examples/pytorch/image-pretraining/run_mim.py``, SimMIM
with ``ViTForMaskedImageModeling``). HF's model is a plain ViT (absolute position embeddings,
q/k/v biases, no layer scale, no relative position bias, final ``vit.layernorm``) with a mask
token, and a decoder ``Conv2d(D, encoder_stride**2 * C, 1)`` + ``PixelShuffle(encoder_stride)``
with SimMIM's L1 loss on masked pixels. It is mimfast's pixel model built with
``use_abs_pos_emb=True, use_rel_pos_bias=False, use_shared_rel_pos_bias=False, init_values=None``
(``qkv_bias`` as HF's), ``loss="l1"``, ``norm_pix_loss=False``, ``patch_size == encoder_stride``::

    HF                                               mimfast
    vit.embeddings.{cls_token, mask_token,           cls_token, mask_token, pos_embed,
      position_embeddings, patch_embeddings.           patch_embed.proj
      projection}
    vit.layers.<i> (q/k/v, o_proj, mlp, norms)      blocks.<i> (qkv weight, q_bias, v_bias, ...)
    vit.layernorm                                    norm
    decoder.0 (C_out, D, 1, 1), C_out = p*p*C        pixel_head (p*p*C, D), rows permuted
    vit.pooler (a ViTModel's; not in the MIM model)  dropped

The decoder rows are permuted as for SimMIM's decoder (``mimfast.models.simmim._shuffle_rows``):
PixelShuffle's channel ``c*p*p + i*p + j`` is the head's row ``(i*p + j)*C + c``, so
``ops.unpatchify(pred)`` is HF's ``reconstruction``. BEiT's attention has no key bias; HF's
``key.bias`` is dropped, without a warning: a bias added to every key adds the same ``q . b_k``
to all of a query's logits, which softmax cancels, so it changes no output and gets a zero
gradient (up to rounding; Adam's normalisation can still move it by that noise, so trained HF
checkpoints may hold small non-zero key biases, which mean nothing). Export writes a zero key
bias. The losses differ only by HF's ``+ 1e-5`` in the masked-pixel count (a relative
``1e-5 / (masked patches * p * p)``; with a bool mask the count is an integer tensor, the sum
is in the default float32, and the 1e-5 vanishes in it from 256 pixels on: the losses are then
equal). HF's ViT has no stochastic depth (``drop_path`` is not exported) and defaults to
``layer_norm_eps=1e-12`` (mimfast: 1e-6; loading warns).
"""

from __future__ import annotations

import math

import torch

from mimfast.models.hf import _fuse_qkv, _hf_key_to_official, _official_key_to_hf, _to_legacy, state_dict_layout

__all__ = ["vit_mim_from_hf", "vit_mim_to_hf", "vit_mim_model_config", "vit_mim_hf_config"]


_VIT_SETTINGS = ("use_abs_pos_emb=True, use_rel_pos_bias=False, use_shared_rel_pos_bias=False, init_values=None "
                 "(model_kwargs), loss 'l1' and norm_pix_loss False")
_DEC_W, _DEC_B = "decoder.0.weight", "decoder.0.bias"


def _vit_prefix(sd: dict) -> str:
    """``"vit."`` (ViTForMaskedImageModeling) or ``""`` (a bare ViTModel)."""
    for enc in ("vit.", ""):
        if f"{enc}embeddings.patch_embeddings.projection.weight" in sd:
            return enc
    raise ValueError("not an HF ViT state_dict: no 'vit.embeddings.patch_embeddings.projection.weight'")


def _square(value, name: str, where: str) -> int:
    """An HF size field (an int or a square [h, w]) as one int."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{where}: {name}={list(value)}; mimfast's models take square sizes only")
        value = value[0]
    return int(value)


def _check_vit_config(config: dict, patch: int, in_chans: int, where: str) -> None:
    """Refuse an HF ViT config whose decoder or channels do not fit weights of this patch / in_chans."""
    arch = config.get("architectures") or ["ViTForMaskedImageModeling"]
    stride = config.get("encoder_stride", 16)
    if "ViTForMaskedImageModeling" in arch and stride != patch:
        raise ValueError(f"{where}: encoder_stride={stride} != patch_size={patch}: HF's decoder then predicts another "
                         "resolution than the patches (HF refuses bool_masked_pos for it); mimfast's pixel head "
                         "predicts each patch's pixels, so only encoder_stride == patch_size maps")
    channels = config.get("num_channels", 3)
    if channels != in_chans:
        raise ValueError(f"{where}: config num_channels={channels}, but the patch embedding takes {in_chans} "
                         "channels")


def vit_mim_from_hf(sd: dict, config: dict | None = None) -> dict:
    """HF ``ViTForMaskedImageModeling`` (or a ``ViTModel``'s encoder) state_dict -> mimfast's pixel
    model keys (``beit_*_pixel`` with the plain-ViT settings of the module docstring). ``key.bias``
    and the pooler are dropped; ``decoder.0`` becomes ``pixel_head`` (rows permuted). ``config``:
    the folder's ``config.json``; without it the layout must be recognisable from the keys
    (:func:`state_dict_layout`), with it ``encoder_stride`` / ``num_channels`` are checked against
    the weights. Returns a new dict; tensors are shared except the fused ``qkv`` and the head."""
    from mimfast.models.simmim import _shuffle_rows

    if config is None and state_dict_layout(sd) != "hf_vit":
        raise ValueError(f"not an HF ViT masked-image-modeling state_dict (layout {state_dict_layout(sd)!r})")
    enc = _vit_prefix(sd)
    fixed = {f"{enc}embeddings.cls_token": "cls_token", f"{enc}embeddings.mask_token": "mask_token",
             f"{enc}embeddings.position_embeddings": "pos_embed"}
    prefixes = ((f"{enc}embeddings.patch_embeddings.projection.", "patch_embed.proj."), (f"{enc}layernorm.", "norm."))
    out, qkv = {}, {}
    for k, v in sd.items():
        if k.startswith(f"{enc}pooler.") or k in (_DEC_W, _DEC_B):
            continue  # ViTModel's pooler is not part of the MIM model; the decoder below
        if not _hf_key_to_official(k, v, out, qkv, fixed, prefixes, {enc: "blocks", f"{enc}encoder.": "blocks"}):
            raise ValueError(f"unknown HF ViT key {k!r}")
    _fuse_qkv(qkv, out, beit=True, drop_key_bias=True)
    proj = out["patch_embed.proj.weight"]  # (D, C, p, p)
    patch, in_chans = proj.shape[-1], proj.shape[1]
    if config is not None:
        _check_vit_config(config, patch, in_chans, "HF config")
    if _DEC_W in sd:
        w = sd[_DEC_W]
        if w.dim() != 4 or tuple(w.shape[2:]) != (1, 1) or w.shape[1] != proj.shape[0]:
            raise ValueError(f"HF ViT {_DEC_W} must be a 1x1 conv (C_out, {proj.shape[0]}, 1, 1), got {tuple(w.shape)}")
        if w.shape[0] != patch * patch * in_chans:
            raise ValueError(f"HF ViT decoder has {w.shape[0]} output channels (encoder_stride**2 * num_channels); "
                             f"mimfast's pixel head predicts patch_size**2 * in_chans = {patch}**2 * {in_chans}: only "
                             "encoder_stride == patch_size with the patch embedding's channels maps")
        perm = _shuffle_rows(patch, in_chans).to(w.device)
        out["pixel_head.weight"] = w.reshape(w.shape[0], w.shape[1])[perm].contiguous()
        if _DEC_B in sd:
            out["pixel_head.bias"] = sd[_DEC_B][perm].contiguous()
    return out


def vit_mim_to_hf(sd: dict, legacy: bool = False) -> dict:
    """mimfast pixel-model state_dict (plain-ViT settings) -> HF ``ViTForMaskedImageModeling``
    keys, transformers 5 names or with ``legacy=True`` the older ones. A zero key bias is written
    where the model has q/v biases (HF's ``qkv_bias`` gives all three or none).

    Raises:
        ValueError: no ``pixel_head``, or a relative position bias, layer scale or no absolute
            position embedding (no HF ViT counterpart).
    """
    from mimfast.models.simmim import _shuffle_rows

    if state_dict_layout(sd) != "beit" or "pixel_head.weight" not in sd:
        raise ValueError("not a mimfast pixel-model state_dict (no pixel_head.weight)")
    beit_only = [k for k in sd if "relative_position" in k or k.endswith((".gamma_1", ".gamma_2"))]
    if beit_only or "pos_embed" not in sd:
        what = beit_only[:3] if beit_only else ["no pos_embed"]
        raise ValueError(f"HF's ViTForMaskedImageModeling is a plain ViT; this pixel model has {what}: only one built "
                         f"with {_VIT_SETTINGS} exports to HF")
    fixed = {"cls_token": "vit.embeddings.cls_token", "mask_token": "vit.embeddings.mask_token",
             "pos_embed": "vit.embeddings.position_embeddings"}
    prefixes = (("patch_embed.proj.", "vit.embeddings.patch_embeddings.projection."), ("norm.", "vit.layernorm."))
    proj = sd["patch_embed.proj.weight"]
    patch, in_chans = proj.shape[-1], proj.shape[1]
    out = {}
    for k, v in sd.items():
        if k in ("pixel_head.weight", "pixel_head.bias"):
            if v.shape[0] != patch * patch * in_chans:
                raise ValueError(f"{k} has {v.shape[0]} rows, not patch_size**2 * in_chans = "
                                 f"{patch * patch * in_chans}")
            inverse = torch.argsort(_shuffle_rows(patch, in_chans)).to(v.device)  # conv channel -> head row
            if k.endswith("weight"):
                out[_DEC_W] = v[inverse].reshape(*v.shape, 1, 1)  # (p*p*C, D, 1, 1)
            else:
                out[_DEC_B] = v[inverse]
            continue
        if not _official_key_to_hf(k, v, out, fixed, prefixes, "vit.layers."):
            raise ValueError(f"unknown mimfast pixel-model key {k!r}")
    for k in [k for k in out if k.endswith("attention.q_proj.bias")]:
        out[k.replace("q_proj.bias", "k_proj.bias")] = torch.zeros_like(out[k])
    return _to_legacy(out) if legacy else out


def vit_mim_model_config(config: dict, where="HF config") -> dict:
    """A mimfast checkpoint config (method, model, img_size, patch_size, model_kwargs, the SimMIM
    masking and loss settings) rebuilding the pixel model of an HF ViT ``config.json``. Masking:
    ``run_mim.py``'s defaults (32-px cells, ratio 0.6), which its config does not record.

    Raises:
        ValueError: not a ViT config, non-square sizes, ``encoder_stride != patch_size`` for a
            ViTForMaskedImageModeling, ``hidden_size`` not a multiple of the heads.
    """
    from mimfast.models.simmim import PIXEL_MODELS

    if config.get("model_type") != "vit":
        raise ValueError(f"{where}: model_type {config.get('model_type')!r}, expected 'vit'")
    img = _square(config.get("image_size", 224), "image_size", where)
    patch = _square(config.get("patch_size", 16), "patch_size", where)
    in_chans = int(config.get("num_channels", 3))
    _check_vit_config(config, patch, in_chans, where)
    width, depth = int(config.get("hidden_size", 768)), int(config.get("num_hidden_layers", 12))
    heads = int(config.get("num_attention_heads", 12))
    if width % heads:
        raise ValueError(f"{where}: hidden_size={width} is not a multiple of num_attention_heads={heads}")
    mlp_ratio = int(config.get("intermediate_size", 3072)) / width
    kwargs = dict(embed_dim=width, depth=depth, num_heads=heads, in_chans=in_chans,
                  mlp_ratio=int(mlp_ratio) if mlp_ratio.is_integer() else mlp_ratio,
                  qkv_bias=bool(config.get("qkv_bias", True)), init_values=None, use_abs_pos_emb=True,
                  use_rel_pos_bias=False, use_shared_rel_pos_bias=False)
    return dict(method="beit", model=PIXEL_MODELS.get((width, depth), "beit_base_patch16_224_pixel"), img_size=img,
                patch_size=patch, model_kwargs=kwargs, recipe="simmim", pixel_masks="simmim", pixel_loss="l1",
                norm_pix_loss=False, source="hf_vit", mask_patch_size=32, simmim_mask_ratio=0.6)


def _vit_misfits(model) -> list[str]:
    """What keeps a mimfast pixel model from being HF's plain ``ViTForMaskedImageModeling``."""
    blk = model.blocks[0]
    attn = blk.attn
    head_dim = attn.qkv.out_features // 3 // attn.num_heads
    return [what for what, bad in (
        ("no absolute position embedding (use_abs_pos_emb=False)", model.pos_embed is None),
        ("a shared relative position bias (use_shared_rel_pos_bias=True)", model.rel_pos_bias is not None),
        ("per-block relative position biases (use_rel_pos_bias=True)", attn.relative_position_bias_table is not None),
        ("layer scale (init_values)", blk.gamma_1 is not None),
        (f"loss={model.loss_type!r}", model.loss_type != "l1"),
        ("norm_pix_loss=True", bool(model.norm_pix_loss)),
        ("attn_head_dim * num_heads != embed_dim", attn.qkv.out_features != 3 * model.embed_dim),
        ("a qk_scale other than head_dim ** -0.5", not math.isclose(attn.scale, head_dim ** -0.5, rel_tol=1e-12)),
    ) if bad]


def vit_mim_hf_config(model, common: dict) -> dict:
    """The ``ViTForMaskedImageModeling`` ``config.json`` of a plain-ViT pixel model, ``common`` the
    fields :func:`mimfast.models.hf.hf_config_for` fills for every model.

    Raises:
        ValueError: BEiT's position terms or layer scale, another loss (the message names the
            settings that export).
    """
    misfits = _vit_misfits(model)
    if misfits:
        raise ValueError(f"HF's ViTForMaskedImageModeling is a plain ViT with SimMIM's L1 loss; this pixel model "
                         f"has {'; '.join(misfits)}. Only a pixel model built with {_VIT_SETTINGS} exports to "
                         "HF; export this one's encoder for timm (--format safetensors) or as SimMIM's "
                         "(--format simmim)")
    return dict(
        architectures=["ViTForMaskedImageModeling"], model_type="vit", **common,
        num_attention_heads=model.blocks[0].attn.num_heads, qkv_bias=model.blocks[0].attn.q_bias is not None,
        encoder_stride=model.patch_size,
    )
