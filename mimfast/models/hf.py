"""Hugging Face transformers <-> official key layouts for the MAE, BEiT and SimMIM pretraining models.

Pure ``state_dict`` mapping (this module does not import transformers):

    HF ViTMAEForPreTraining (or ViTMAEModel)  <->  facebookresearch/mae MaskedAutoencoderViT
    HF BeitForMaskedImageModeling             <->  microsoft/unilm BEiT modeling_pretrain.py
    HF ViTForMaskedImageModeling (SimMIM)     <->  mimfast's BEiT pixel model, plain-ViT settings

which are mimfast's :class:`~mimfast.models.MaskedAutoencoderViT`,
:class:`~mimfast.models.VisionTransformerForMaskedImageModeling` and
:class:`~mimfast.models.VisionTransformerForMaskedPixelModeling` keys. Two HF key layouts are read:
transformers 5's (``vit.layers.<i>.attention.q_proj``, ``o_proj``, ``mlp.fc1``, ``beit.shared_position_bias``)
and the older one the Hub checkpoints carry (``vit.encoder.layer.<i>.attention.attention.query``,
``attention.output.dense``, ``intermediate.dense``, ``output.dense``,
``beit.encoder.relative_position_bias``). ``*_to_hf`` gives transformers 5's module names (what
``model.state_dict()`` holds), or with ``legacy=True`` the older ones, which transformers 4 loads
and transformers 5 both loads and writes in its own ``save_pretrained`` files; ``mimfast export
--format hf`` writes those.

Per block (MAE encoder ``blocks`` / decoder ``decoder_blocks``; BEiT ``blocks``)::

    official                 HF
    norm1, norm2             layernorm_before, layernorm_after
    attn.qkv (3D, D)         attention.{q,k,v}_proj, stacked q, k, v along the output rows
    attn.proj                attention.o_proj
    mlp.fc1, mlp.fc2         mlp.fc1, mlp.fc2
    gamma_1, gamma_2         lambda_1, lambda_2                       (BEiT layer scale)
    attn.q_bias, v_bias      attention.q_proj.bias, v_proj.bias       (BEiT: k_proj has no bias)

MAE: ``cls_token``, ``pos_embed``, ``patch_embed.proj`` <-> ``vit.embeddings.{cls_token,
position_embeddings, patch_embeddings.projection}``, ``norm`` <-> ``vit.layernorm``, and
``mask_token``, ``decoder_{pos_embed,embed,norm,pred}`` <-> ``decoder.{mask_token,decoder_...}``.
BEiT: the same embeddings under ``beit.embeddings`` plus ``mask_token``,
``rel_pos_bias.relative_position_bias_table`` <-> ``beit.shared_position_bias...``, ``norm`` <->
the top-level ``layernorm`` and ``lm_head`` <-> ``lm_head``. ``relative_position_index`` buffers
are not in HF files: they are recomputed from the table's size.

Real differences between the HF models and the official ones. With the same weights, inputs,
``noise`` / ``bool_masked_pos``, the losses, predictions, masks and gradients agree to fp32
rounding (``tests/test_hf_convert.py``, transformers 5.24); what differs is around that:

* LayerNorm eps: HF's configs default to ``layer_norm_eps=1e-12``, the official models use 1e-6.
  :func:`hf_config_for` writes 1e-6; an HF checkpoint trained with 1e-12 loads, but its
  activations differ slightly in mimfast (``load_model_weights`` warns).
* MAE ``mask_ratio`` is an HF config field (the model masks by it); officially it is a forward
  argument (the training recipe's 0.75). ``norm_pix_loss`` is in both.
* MAE MLP widths: HF has ``intermediate_size`` and ``decoder_intermediate_size`` separately, the
  official model one ``mlp_ratio`` for both; ``qkv_bias=False`` HF models load with zero q/k/v
  biases (the same forward).
* MAE position embeddings: fixed 2D sin-cos in both, with the official code's h/w swap (HF
  builds the canonical layout and rotates its halves to match); HF can interpolate them to
  other image sizes (``interpolate_pos_encoding``), mimfast cannot. Seen in transformers 5.24:
  ``ViTMAEForPreTraining(config)`` (a model built from a config, not ``from_pretrained``) holds
  all-zero ``position_embeddings``, ``decoder_pos_embed`` and ``mask_token``; the embeddings are
  frozen, so a model trained from there has none. They are mapped as they are
  (``load_model_weights`` warns).
* Files: transformers 5.24's ``save_pretrained`` writes the older key names, and for the MAE
  decoder a mangled ``decoder.decoder_encoder.layer.<i>`` (its reverse rename of
  ``encoder.layer.`` -> ``layers.`` also hits ``decoder_layers.``); it reads that back, and so
  does :func:`mae_from_hf`.
* BEiT final norm: BeitForMaskedImageModeling has a top-level ``layernorm`` before ``lm_head``
  and also ``beit.layernorm``, a second LayerNorm unless ``use_mean_pooling=True`` (HF's
  default, where it is an Identity). The official model has one: exported configs set
  ``use_mean_pooling=True``, and a state_dict with ``beit.layernorm`` is refused.
* BEiT ``drop_path_rate``: HF's config default is 0.1 (the base recipe's), mimfast's model
  default 0; the HF rule is ``rate * i / (depth - 1)`` per layer like the official linspace.
* BEiT relative position bias: HF resamples the table (bilinear) to the input's grid on
  every forward; at the trained size this is the identity, so the table maps 1:1.
* BEiT outputs: HF returns logits at every position (N, L, vocab) and takes ``labels`` (M,)
  for the masked positions; the official forward returns the (M, vocab) rows at masked
  positions (``return_all_tokens=True`` for all of them).
* Init only (irrelevant once weights are loaded): HF zero-initialises BEiT's cls/mask tokens and
  skips the official per-depth rescale of ``attn.proj`` / ``mlp.fc2``; layer scale
  ``layer_scale_init_value`` only decides whether ``lambda_*`` exist.
* No HF class matches MAE's L1 loss, nor the BEiT pixel-regression variant with BEiT's position
  terms or layer scale (the ``beit_*_pixel`` defaults): those export only as encoders
  (``mimfast export --format safetensors`` / ``simmim``).

ViT masked image modeling (HF ``ViTForMaskedImageModeling``, transformers' SimMIM example) is in
:mod:`mimfast.models.hf_vit`; :func:`from_hf` and :func:`hf_config_for` dispatch to it.
"""

from __future__ import annotations

import re

import torch

__all__ = [
    "mae_from_hf",
    "mae_to_hf",
    "beit_from_hf",
    "beit_to_hf",
    "from_hf",
    "hf_config_for",
    "is_hf_state_dict",
    "state_dict_layout",
]

# the older (transformers 4 / Hub) names -> transformers 5 names, inside one layer
_LEGACY_LAYER = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.attention.relative_position_bias.", "relative_position_bias."),
    ("attention.output.dense.", "attention.o_proj."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
)
# one layer, official name <-> HF name (besides q/k/v)
_LAYER = (
    ("norm1.", "layernorm_before."),
    ("norm2.", "layernorm_after."),
    ("attn.proj.", "attention.o_proj."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
    ("gamma_1", "lambda_1"),
    ("gamma_2", "lambda_2"),
    ("attn.relative_position_bias_table", "relative_position_bias.relative_position_bias_table"),
)
_LAYER_RE = re.compile(r"^(?P<stack>.*?)(?:encoder\.layer|layers|decoder_layers)\.(?P<i>\d+)\.(?P<rest>.+)$")


def state_dict_layout(sd: dict) -> str:
    """Which layout ``sd`` is in: ``"hf_mae"`` (ViTMAEForPreTraining / ViTMAEModel), ``"hf_beit"``
    (BeitForMaskedImageModeling / BeitModel), ``"hf_vit"`` (ViTForMaskedImageModeling, or a
    ViTModel with its mask token or pooler), ``"mae"`` or ``"beit"`` (official / mimfast; the
    pixel model is ``"beit"``). A bare ViTModel without mask token or pooler has the keys of a
    bare ViTMAEModel and reads as ``"hf_mae"``: a folder's ``config.json`` decides there.

    Raises:
        ValueError: ``sd`` is in none of them.
    """
    if not isinstance(sd, dict) or not sd:
        raise ValueError(f"expected a non-empty state_dict, got {type(sd).__name__} of length {len(sd or ())}")
    keys = [k for k in sd if isinstance(k, str)]
    if any(k.startswith("beit.") for k in keys):
        return "hf_beit"
    # ViTMAE has neither an encoder mask token, a conv decoder nor a pooler
    vit = any(k.startswith("vit.") for k in keys)
    if vit and ("vit.embeddings.mask_token" in sd or any(k.startswith("decoder.0.") for k in keys)):
        return "hf_vit"
    if "embeddings.patch_embeddings.projection.weight" in sd and any(k.startswith("pooler.dense.") for k in keys):
        return "hf_vit"
    if any(k.startswith(("vit.", "decoder.decoder_")) for k in keys):
        return "hf_mae"
    if "embeddings.patch_embeddings.projection.weight" in sd:  # a bare ViTMAEModel / BeitModel / ViTModel
        if any("lambda_" in k or "position_bias" in k for k in keys):
            return "hf_beit"
        if "embeddings.mask_token" in sd:  # BEiT's key has no bias, ViT's (qkv_bias=True) has
            key_bias = any(k.endswith(("attention.k_proj.bias", "attention.attention.key.bias")) for k in keys)
            return "hf_vit" if key_bias else "hf_beit"
        return "hf_mae"
    if "patch_embed.proj.weight" in sd:
        beit = any(k.startswith(("rel_pos_bias.", "lm_head.", "pixel_head."))
                   or k.endswith((".gamma_1", ".attn.q_bias")) for k in keys)
        return "beit" if beit else "mae"
    raise ValueError(f"state_dict is neither an HF ViTMAE / BEiT nor an official MAE / BEiT one: no "
                     f"'patch_embed.proj.weight' nor HF 'embeddings.patch_embeddings.projection.weight'; "
                     f"first keys {keys[:5]}")


def is_hf_state_dict(sd: dict) -> bool:
    """True for an HF ViTMAE / BEiT / ViT-MIM state_dict (either key generation), False for an official one."""
    return state_dict_layout(sd).startswith("hf_")


def _unlegacy(rest: str) -> str:
    for old, new in _LEGACY_LAYER:
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def _renamed(k: str, fixed: dict, prefixes) -> str | None:
    """``k`` under its other name: from the exact-name table ``fixed`` or the (old prefix, new
    prefix) pairs ``prefixes``; None where neither has it (a layer key)."""
    if k in fixed:
        return fixed[k]
    return next((new + k[len(old):] for old, new in prefixes if k.startswith(old)), None)


def _layer_from_hf(rest: str, v: torch.Tensor, out: dict, prefix: str, qkv: dict, where: str) -> None:
    """One HF layer entry (``rest`` after ``layers.<i>.``) into official keys under ``prefix``."""
    rest = _unlegacy(rest)
    m = re.fullmatch(r"attention\.([qkv])_proj\.(weight|bias)", rest)
    if m:
        qkv[(prefix, m.group(1), m.group(2))] = v
        return
    if rest.endswith("relative_position_index"):
        return  # a buffer, recomputed
    for official, hf in _LAYER:
        if rest.startswith(hf):
            out[prefix + official + rest[len(hf):]] = v
            return
    raise ValueError(f"unknown HF key {where!r}")


def _hf_key_to_official(k: str, v: torch.Tensor, out: dict, qkv: dict, fixed: dict, prefixes, stacks: dict) -> bool:
    """Write HF key ``k`` into ``out`` under its official name: a renamed embedding / norm / head
    key, or a layer's parameter of an HF stack in ``stacks`` (HF stack prefix -> official block
    list), q/k/v parts collected in ``qkv`` for :func:`_fuse_qkv`; False when ``k`` is neither."""
    hit = _renamed(k, fixed, prefixes)
    if hit is not None:
        out[hit] = v
        return True
    m = _LAYER_RE.match(k)
    if m and m.group("stack") in stacks:
        _layer_from_hf(m.group("rest"), v, out, f"{stacks[m.group('stack')]}.{m.group('i')}.", qkv, where=k)
        return True
    return False


def _fuse_qkv(qkv: dict, out: dict, beit: bool, drop_key_bias: bool = False) -> None:
    """Stack each layer's q/k/v weights into ``attn.qkv.weight``. MAE: one fused bias (zeros where
    HF has none). BEiT: ``q_bias`` / ``v_bias``, and HF's key bias must be zero, or with
    ``drop_key_bias`` (ViT-MIM) is dropped whatever it holds (it has no effect on outputs)."""
    for prefix in sorted({p for p, _, _ in qkv}):
        ws = [qkv.get((prefix, n, "weight")) for n in "qkv"]
        if any(w is None for w in ws):
            raise ValueError(f"HF layer {prefix!r}: q/k/v projection weights incomplete "
                             f"(have {[n for n, w in zip('qkv', ws) if w is not None]})")
        out[prefix + "attn.qkv.weight"] = torch.cat(ws, dim=0)  # (3 * H * Dh, D): q rows, k rows, v rows
        bq, bk, bv = (qkv.get((prefix, n, "bias")) for n in "qkv")
        if beit:
            if bk is not None and not drop_key_bias and bool(torch.any(bk != 0)):
                raise ValueError(f"HF BEiT layer {prefix!r} has a non-zero key bias: BEiT's key has none")
            if (bq is None) != (bv is None):
                raise ValueError(f"HF BEiT layer {prefix!r}: query and value biases must both be present or absent")
            if bq is not None:
                out[prefix + "attn.q_bias"] = bq
                out[prefix + "attn.v_bias"] = bv
        else:
            # qkv_bias=False: zero biases give the same forward (the official model always has them)
            b = [x if x is not None else torch.zeros(w.shape[0], dtype=w.dtype) for x, w in zip((bq, bk, bv), ws)]
            out[prefix + "attn.qkv.bias"] = torch.cat(b, dim=0)


def _split_qkv(w: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if w.shape[0] % 3:
        raise ValueError(f"{where}: fused qkv has {w.shape[0]} rows, not a multiple of 3")
    return tuple(t.clone() for t in w.chunk(3, dim=0))


def mae_from_hf(sd: dict) -> dict:
    """HF ``ViTMAEForPreTraining`` (or encoder-only ``ViTMAEModel``) state_dict -> official
    MAE keys. Returns a new dict; tensors are shared except the fused ``qkv``."""
    if state_dict_layout(sd) != "hf_mae":
        raise ValueError(f"not an HF ViTMAE state_dict (layout {state_dict_layout(sd)!r})")
    # transformers 5.24's save_pretrained reverses its `encoder.layer.` -> `layers.` rename inside
    # the decoder's name too, writing `decoder.decoder_encoder.layer.<i>` (it reads that back)
    sd = {k.replace("decoder.decoder_encoder.layer.", "decoder.decoder_layers."): v for k, v in sd.items()}
    enc = "vit." if any(k.startswith("vit.") for k in sd) else ""
    fixed = {
        f"{enc}embeddings.cls_token": "cls_token",
        f"{enc}embeddings.position_embeddings": "pos_embed",
        "decoder.mask_token": "mask_token",
        "decoder.decoder_pos_embed": "decoder_pos_embed",
    }
    prefixes = (
        (f"{enc}embeddings.patch_embeddings.projection.", "patch_embed.proj."),
        (f"{enc}layernorm.", "norm."),
        ("decoder.decoder_embed.", "decoder_embed."),
        ("decoder.decoder_norm.", "decoder_norm."),
        ("decoder.decoder_pred.", "decoder_pred."),
    )
    stacks = {enc: "blocks", f"{enc}encoder.": "blocks", "decoder.": "decoder_blocks"}
    out, qkv = {}, {}
    for k, v in sd.items():
        if not _hf_key_to_official(k, v, out, qkv, fixed, prefixes, stacks):
            raise ValueError(f"unknown HF ViTMAE key {k!r}")
    _fuse_qkv(qkv, out, beit=False)
    return out


def _layer_to_hf(rest: str, v: torch.Tensor, out: dict, prefix: str, where: str) -> None:
    """One official block entry (``rest`` after ``blocks.<i>.``) into HF keys under ``prefix``."""
    names = {"q": "attention.q_proj.", "k": "attention.k_proj.", "v": "attention.v_proj."}
    if rest in ("attn.qkv.weight", "attn.qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        for n, t in zip("qkv", _split_qkv(v, where)):
            out[prefix + names[n] + kind] = t
        return
    if rest in ("attn.q_bias", "attn.v_bias"):
        out[prefix + names[rest[5]] + "bias"] = v
        return
    if rest == "attn.relative_position_index":
        return
    for official, hf in _LAYER:
        if rest.startswith(official):
            out[prefix + hf + rest[len(official):]] = v
            return
    raise ValueError(f"unknown official key {where!r}")


def _to_legacy(sd: dict) -> dict:
    """transformers 5 HF names -> the older ones (``encoder.layer``, ``attention.attention.query``...)."""
    out = {}
    for k, v in sd.items():
        m = _LAYER_RE.match(k)
        if m:
            rest = m.group("rest")
            for old, new in _LEGACY_LAYER:
                if rest.startswith(new):
                    rest = old + rest[len(new):]
                    break
            stack = m.group("stack")
            layer = "decoder_layers" if stack == "decoder." else "encoder.layer"
            k = f"{stack}{layer}.{m.group('i')}.{rest}"
        elif k == "beit.shared_position_bias.relative_position_bias_table":
            k = "beit.encoder.relative_position_bias.relative_position_bias_table"
        out[k] = v
    return out


def mae_to_hf(sd: dict, legacy: bool = False) -> dict:
    """Official MAE state_dict -> HF ``ViTMAEForPreTraining`` keys (transformers 5 names, or the
    older ones with ``legacy=True``). The split q/k/v are copies (safetensors refuses views of
    one storage); other tensors are shared."""
    if state_dict_layout(sd) != "mae":
        raise ValueError(f"not an official MAE state_dict (layout {state_dict_layout(sd)!r})")
    fixed = {"cls_token": "vit.embeddings.cls_token", "pos_embed": "vit.embeddings.position_embeddings",
             "mask_token": "decoder.mask_token", "decoder_pos_embed": "decoder.decoder_pos_embed"}
    prefixes = (("patch_embed.proj.", "vit.embeddings.patch_embeddings.projection."), ("norm.", "vit.layernorm."),
                ("decoder_embed.", "decoder.decoder_embed."), ("decoder_norm.", "decoder.decoder_norm."),
                ("decoder_pred.", "decoder.decoder_pred."))
    out = {}
    for k, v in sd.items():
        hit = _renamed(k, fixed, prefixes)
        if hit is not None:
            out[hit] = v
            continue
        m = re.match(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)$", k)
        if m:
            prefix = f"vit.layers.{m.group(2)}." if m.group(1) == "blocks" else f"decoder.decoder_layers.{m.group(2)}."
            _layer_to_hf(m.group(3), v, out, prefix, where=k)
            continue
        raise ValueError(f"unknown official MAE key {k!r}")
    return _to_legacy(out) if legacy else out


def _relative_position_index(table: torch.Tensor, where: str) -> torch.Tensor:
    from mimfast.nn.beit_attention import relative_position_index, table_grid

    try:
        grid = table_grid(table.shape[0])
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return relative_position_index((grid, grid))


def beit_from_hf(sd: dict) -> dict:
    """HF ``BeitForMaskedImageModeling`` (or ``BeitModel``) state_dict -> microsoft/unilm BEiT
    pretraining keys, ``relative_position_index`` buffers included (recomputed)."""
    if state_dict_layout(sd) != "hf_beit":
        raise ValueError(f"not an HF BEiT state_dict (layout {state_dict_layout(sd)!r})")
    enc = "beit." if any(k.startswith("beit.") for k in sd) else ""
    if any(k.startswith((f"{enc}layernorm.", f"{enc}pooler.")) for k in sd) and enc:
        raise ValueError("HF BEiT state_dict has 'beit.layernorm' / 'beit.pooler' (use_mean_pooling=False): "
                         "BeitForMaskedImageModeling then applies two LayerNorms before lm_head, the official "
                         "model one; only use_mean_pooling=True checkpoints map")
    fixed = {
        f"{enc}embeddings.cls_token": "cls_token",
        f"{enc}embeddings.mask_token": "mask_token",
        f"{enc}embeddings.position_embeddings": "pos_embed",
        f"{enc}shared_position_bias.relative_position_bias_table": "rel_pos_bias.relative_position_bias_table",
        f"{enc}encoder.relative_position_bias.relative_position_bias_table":
            "rel_pos_bias.relative_position_bias_table",
    }
    prefixes = ((f"{enc}embeddings.patch_embeddings.projection.", "patch_embed.proj."), ("layernorm.", "norm."),
                ("lm_head.", "lm_head."))
    out, qkv = {}, {}
    for k, v in sd.items():
        if k.endswith("relative_position_index"):
            continue  # buffers of older files: recomputed below
        if not _hf_key_to_official(k, v, out, qkv, fixed, prefixes, {enc: "blocks", f"{enc}encoder.": "blocks"}):
            raise ValueError(f"unknown HF BEiT key {k!r}")
    _fuse_qkv(qkv, out, beit=True)
    for k in [k for k in out if k.endswith("relative_position_bias_table")]:
        index_key = k.replace("relative_position_bias_table", "relative_position_index")
        out[index_key] = _relative_position_index(out[k], k)
    return out


def _official_key_to_hf(k: str, v: torch.Tensor, out: dict, fixed: dict, prefixes, layers: str) -> bool:
    """Write official (mimfast) key ``k`` into ``out`` under its HF name: a renamed embedding / norm /
    head key, or a block's parameter under ``{layers}<i>.``; False when ``k`` is neither."""
    hit = _renamed(k, fixed, prefixes)
    if hit is not None:
        out[hit] = v
        return True
    m = re.match(r"^blocks\.(\d+)\.(.+)$", k)
    if m:
        _layer_to_hf(m.group(2), v, out, f"{layers}{m.group(1)}.", where=k)
        return True
    return False


def beit_to_hf(sd: dict, legacy: bool = False) -> dict:
    """Official BEiT pretraining state_dict -> HF ``BeitForMaskedImageModeling`` keys. Without
    ``q_bias`` / ``v_bias`` (``qkv_bias=False``) zero biases are written: HF's query and value
    always have one."""
    if state_dict_layout(sd) != "beit":
        raise ValueError(f"not an official BEiT state_dict (layout {state_dict_layout(sd)!r})")
    if any(k.startswith("pixel_head.") for k in sd):
        raise ValueError("the BEiT pixel-regression model (pixel_head) has no HF class; export its encoder "
                         "for timm instead (mimfast export --format safetensors)")
    fixed = {"cls_token": "beit.embeddings.cls_token", "mask_token": "beit.embeddings.mask_token",
             "pos_embed": "beit.embeddings.position_embeddings",
             "rel_pos_bias.relative_position_bias_table": "beit.shared_position_bias.relative_position_bias_table"}
    prefixes = (("patch_embed.proj.", "beit.embeddings.patch_embeddings.projection."), ("norm.", "layernorm."),
                ("lm_head.", "lm_head."))
    out = {}
    for k, v in sd.items():
        if k == "rel_pos_bias.relative_position_index":
            continue
        if not _official_key_to_hf(k, v, out, fixed, prefixes, "beit.layers."):
            raise ValueError(f"unknown official BEiT key {k!r}")
    for k in [k for k in out if k.endswith("attention.q_proj.weight")]:
        for n in "qv":
            bias = k.replace("q_proj.weight", f"{n}_proj.bias")
            if bias not in out:
                out[bias] = torch.zeros(out[k].shape[0], dtype=out[k].dtype)
    return _to_legacy(out) if legacy else out


def from_hf(sd: dict) -> dict:
    """Any HF ViTMAE / BEiT / ViT-MIM state_dict -> official (mimfast) keys; an official one is
    returned as is."""
    layout = state_dict_layout(sd)
    if layout == "hf_mae":
        return mae_from_hf(sd)
    if layout == "hf_beit":
        return beit_from_hf(sd)
    if layout == "hf_vit":
        from mimfast.models.hf_vit import vit_mim_from_hf

        return vit_mim_from_hf(sd)
    return sd


def _mlp_hidden(block) -> int:
    return block.mlp.fc1.out_features


def hf_config_for(model, mask_ratio: float = 0.75) -> dict:
    """The HF ``config.json`` fields of a mimfast MAE (``ViTMAEForPreTraining``), BEiT token
    model (``BeitForMaskedImageModeling``) or pixel model with the plain-ViT settings
    (``ViTForMaskedImageModeling``). ``mask_ratio`` goes into the MAE config (HF masks by its
    config, the official model by a forward argument).

    Raises:
        ValueError: a model HF has no class for (MAE with L1 loss; a pixel model with BEiT's
            position terms or layer scale, the ``beit_*_pixel`` defaults: the message names the
            settings that export).
    """
    from mimfast.models.beit import VisionTransformerForMaskedImageModeling, VisionTransformerForMaskedPixelModeling
    from mimfast.models.mae import MaskedAutoencoderViT

    common = dict(
        hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.02,
        image_size=model.img_size, patch_size=model.patch_size, num_channels=model.in_chans,
        layer_norm_eps=float(model.norm.eps), hidden_size=model.patch_embed.proj.out_channels,
        num_hidden_layers=len(model.blocks), intermediate_size=_mlp_hidden(model.blocks[0]),
    )
    if isinstance(model, MaskedAutoencoderViT):
        if model.loss_type != "mse":
            raise ValueError("HF ViTMAEForPreTraining computes the MSE loss only, the model uses "
                             f"loss={model.loss_type!r}")
        dec = model.decoder_blocks
        return dict(
            architectures=["ViTMAEForPreTraining"], model_type="vit_mae", **common,
            num_attention_heads=model.blocks[0].attn.num_heads, qkv_bias=True,
            decoder_hidden_size=model.decoder_embed.out_features, decoder_num_hidden_layers=len(dec),
            decoder_num_attention_heads=dec[0].attn.num_heads if len(dec) else 1,
            decoder_intermediate_size=_mlp_hidden(dec[0]) if len(dec) else 4 * model.decoder_embed.out_features,
            mask_ratio=float(mask_ratio), norm_pix_loss=bool(model.norm_pix_loss),
        )
    if isinstance(model, VisionTransformerForMaskedPixelModeling):
        from mimfast.models.hf_vit import vit_mim_hf_config

        return vit_mim_hf_config(model, common)
    if isinstance(model, VisionTransformerForMaskedImageModeling):
        blk = model.blocks[0]
        if blk.attn.qkv.out_features != 3 * common["hidden_size"]:
            raise ValueError("BEiT with attn_head_dim * num_heads != embed_dim has no HF config field")
        drop = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.blocks]
        layer_scale = blk.gamma_1 is not None
        return dict(
            architectures=["BeitForMaskedImageModeling"], model_type="beit", **common,
            num_attention_heads=blk.attn.num_heads, vocab_size=model.lm_head.out_features,
            use_mask_token=True, use_absolute_position_embeddings=model.pos_embed is not None,
            use_relative_position_bias=blk.attn.relative_position_bias_table is not None,
            use_shared_relative_position_bias=model.rel_pos_bias is not None,
            # only decides whether lambda_1/2 exist (> 0); the loaded weights replace the value
            layer_scale_init_value=0.1 if layer_scale else 0.0,
            drop_path_rate=float(f"{max(drop):.6g}"), use_mean_pooling=True,  # DropPath holds an fp32 value
        )
    raise TypeError(f"model must be a mimfast MaskedAutoencoderViT or BEiT model, got {type(model).__name__}")
