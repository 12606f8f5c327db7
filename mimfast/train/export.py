"""``mimfast export``: a pretrained encoder as a timm state_dict, ``.pth`` and ``.safetensors``;
or (``--format hf``) the whole pretraining model as a Hugging Face folder; or (``--format simmim`` /
``--format mmpretrain``) the pretraining model under microsoft/SimMIM's or open-mmlab/mmpretrain's
keys (:func:`export_simmim`, :func:`export_mmpretrain`).

HF (-> ``transformers.ViTMAEForPreTraining`` / ``BeitForMaskedImageModeling``, and for the pixel
model built as a plain ViT, ``ViTForMaskedImageModeling``). ``--out`` is a folder;
``model.safetensors`` (keys mapped by :mod:`mimfast.models.hf`, under the names HF files
use, which transformers 4 and 5 both read) and ``config.json``
(:func:`mimfast.models.hf.hf_config_for`, with the run's ``mask_ratio`` and ``norm_pix_loss``)
are written, and ``from_pretrained(folder)`` gives the same losses and predictions. The
checkpoint must hold the decoder / LM head too (an encoder-only release has none to export).

MAE (-> timm ``VisionTransformer``). MAE's encoder already uses timm's names, so export is a
selection, not a conversion:

    kept     cls_token, pos_embed (1, 1 + L, D) with the cls row (MAE's fixed 2D sin-cos),
             patch_embed.proj.*, blocks.<i>.*, norm.*
    dropped  mask_token, decoder_* (the decoder is thrown away after pretraining)

The result loads into ``timm.create_model('vit_base_patch16_224', pretrained=False)`` (or a
``VisionTransformer`` of the same sizes, see :func:`timm_model_spec`) with ``strict=False`` and
only ``head.*`` missing (``strict=True`` with ``num_classes=0``).

Another image size (``img_size``, ``--img-size``: fine-tuning at 384 or 448). ``pos_embed`` is
written for that size's grid the way facebookresearch/mae ``main_finetune.py`` /
``main_linprobe.py`` adapt a checkpoint on load (``util/pos_embed.py`` ``interpolate_pos_embed``,
from DeiT): the patch rows resized as an image, bicubic, ``align_corners=False``, no antialias;
the cls row kept. Without it the file loads only at the pretraining size with
``load_state_dict``; timm's own ``pretrained=True`` route would resample it too, but with
``antialias=True``, which changes the bicubic kernel and gives position embeddings ~1% away
from the official ones. BEiT's relative position bias tables are not resized (timm's ``beit_*``
loader and unilm's fine-tuning each have their own way): ``img_size`` is refused for BEiT.

BEiT (-> timm ``Beit``). microsoft/unilm BEiT also uses timm's names (``gamma_1``, ``q_bias``,
``v_bias``...). The pretraining model shares one relative position bias table across blocks;
fine-tuning (unilm ``run_class_finetuning.py``, and timm's ``beit_*`` models) gives each block
its own, so the shared table is copied into every ``blocks.<i>.attn.relative_position_bias_table``,
as unilm's fine-tuning does on load. ``relative_position_index`` buffers (recomputed by timm),
``mask_token`` and the ``lm_head`` / ``pixel_head`` are dropped.

The final norm. A cls-token model ends with ``norm``, which is the pretrained final norm, so it
is kept as is (timm ``VisionTransformer`` default; timm ``Beit`` with ``global_pool='token'``).
With ``global_pool=True`` the state_dict is laid out for a global-pool model (timm
``create_model(..., global_pool='avg')``, which is the default for timm's ``beit_*``, and
facebookresearch/mae ``models_vit.VisionTransformer(global_pool=True)``, which is how MAE
fine-tunes): those have ``fc_norm`` after the mean over patch tokens and no ``norm``. ``fc_norm.*``
is then written from the pretrained ``norm.*`` and ``norm.*`` is left out. Note the official
fine-tuning code of MAE and BEiT does not carry ``norm`` over: it starts ``fc_norm`` fresh
(weight 1, bias 0); copying gives the pooled features the pretrained norm's scale and shift,
and the two differ by one affine layer that fine-tuning trains anyway.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from mimfast.models import VIT_HEADS_BY_WIDTH
from mimfast.train.checkpoint import load_model_weights
from mimfast.train.pretrained import (_HEADS, _fitting_shapes, _head_overrides, _misfit, _misfit_error, _strip_prefixes,
                                      build_model_from_config, read_checkpoint_config)

__all__ = [
    "encoder_state_dict",
    "interpolate_pos_embed",
    "timm_model_spec",
    "save_encoder",
    "export_checkpoint",
    "export_hf",
    "export_simmim",
    "export_mmpretrain",
]

_ENCODER = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
_SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"


def _is_beit(sd: dict) -> bool:
    return any(k.startswith(("rel_pos_bias.", "lm_head.")) or k.endswith((".gamma_1", ".attn.q_bias"))
               or k.endswith(".attn.relative_position_bias_table") for k in sd)


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """``pos_embed`` (1, P + g*g, D) for a (grid, grid) patch grid: (1, P + grid*grid, D). The g*g
    patch rows, as a (D, g, g) image, are resized bicubically (``align_corners=False``, no
    antialias) as facebookresearch/mae's ``interpolate_pos_embed`` does; the P prefix rows (the
    cls token's) are kept. Computed in float32, returned in the input's dtype; the same grid
    returns a copy."""
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be (1, P + L, D), got {tuple(pos_embed.shape)}")
    if grid <= 0:
        raise ValueError(f"grid must be positive, got {grid}")
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = int(round(patches.shape[1] ** 0.5))
    if old * old != patches.shape[1]:
        raise ValueError(f"pos_embed has {patches.shape[1]} patch rows, not a square grid")
    if old == grid:
        return pos_embed.detach().clone()
    dim = patches.shape[-1]
    img = patches.detach().float().reshape(1, old, old, dim).permute(0, 3, 1, 2)  # (1, D, g, g)
    img = torch.nn.functional.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = img.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat((prefix.detach(), patches), dim=1)


def encoder_state_dict(source: nn.Module | dict, global_pool: bool = False,
                       img_size: int | None = None) -> dict[str, torch.Tensor]:
    """The encoder of an MAE or BEiT pretraining model (module or state_dict) under timm keys.

    Args:
        source: ``MaskedAutoencoderViT`` / BEiT pretraining model or its state_dict (mimfast,
            facebookresearch/mae or microsoft/unilm; ``module.`` / ``_orig_mod.`` prefixes are
            stripped).
        global_pool: write ``fc_norm.*`` (from ``norm.*``) instead of ``norm.*``; see the module
            docstring.
        img_size: lay out ``pos_embed`` for this image size (a multiple of the patch size) with
            :func:`interpolate_pos_embed`; None keeps the pretraining size. MAE only.

    Returns:
        A new dict of detached, contiguous tensors with no shared storage (as safetensors needs).
    """
    if isinstance(source, nn.Module):
        source = source.state_dict()
    if not isinstance(source, dict):
        raise TypeError(f"source must be an nn.Module or a state_dict, got {type(source).__name__}")
    sd = _strip_prefixes(source)
    required = ("cls_token", "patch_embed.proj.weight", "norm.weight", "norm.bias", "blocks.0.attn.qkv.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        raise ValueError(f"source is not an MAE or BEiT encoder state_dict: missing {missing}")
    beit = _is_beit(sd)
    if not beit and "pos_embed" not in sd:
        raise ValueError("source is not an MAE encoder state_dict: missing ['pos_embed']")
    out = {}
    for k, v in sd.items():
        if k.startswith(_HEADS) or not k.startswith(_ENCODER) or k.endswith("relative_position_index"):
            continue  # pretraining heads, buffers timm recomputes, anything outside the encoder
        if global_pool and k.startswith("norm."):
            k = "fc_" + k
        out[k] = v.detach().clone().contiguous()
    if beit and _SHARED_TABLE in sd:
        depth = 1 + max(int(k.split(".")[1]) for k in out if k.startswith("blocks."))
        for i in range(depth):
            key = f"blocks.{i}.attn.relative_position_bias_table"
            if key in out:
                raise ValueError(f"source has both a shared relative position bias and {key}")
            out[key] = sd[_SHARED_TABLE].detach().clone().contiguous()
    if img_size is not None:
        if beit:
            raise ValueError("img_size: BEiT's relative position bias tables are not resized here; export at the "
                             "pretraining size and let the fine-tuning code resize them")
        patch = out["patch_embed.proj.weight"].shape[-1]
        if img_size <= 0 or img_size % patch:
            raise ValueError(f"img_size must be a positive multiple of the patch size {patch}, got {img_size}")
        out["pos_embed"] = interpolate_pos_embed(out["pos_embed"], img_size // patch).contiguous()
    return out


def timm_model_spec(encoder: dict, num_heads: int | None = None) -> tuple[str, dict]:
    """(timm class name, constructor arguments) matching ``encoder`` (an
    :func:`encoder_state_dict`): ``timm.models.vision_transformer.VisionTransformer`` for MAE,
    ``timm.models.beit.Beit`` for BEiT. The head count cannot be read from weights: give it,
    or it is taken from the standard sizes (192: 3, 384: 6, 768: 12, 1024/1280: 16) else
    64-wide heads."""
    proj = encoder["patch_embed.proj.weight"]  # (D, C, p, p)
    embed_dim, in_chans, patch_size = proj.shape[0], proj.shape[1], proj.shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in encoder if k.startswith("blocks."))
    mlp_hidden = encoder["blocks.0.mlp.fc1.weight"].shape[0]
    if num_heads is None:
        num_heads = VIT_HEADS_BY_WIDTH.get(embed_dim, max(1, embed_dim // 64))
    global_pool = "fc_norm.weight" in encoder
    kw = dict(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
              mlp_ratio=mlp_hidden / embed_dim, global_pool="avg" if global_pool else "token")
    if not _is_beit(encoder):
        num_patches = encoder["pos_embed"].shape[1] - 1
        grid = int(round(num_patches ** 0.5))
        if grid * grid != num_patches:
            raise ValueError(f"pos_embed has {num_patches} patch rows, not a square grid")
        return "VisionTransformer", dict(img_size=grid * patch_size, **kw, qkv_bias="blocks.0.attn.qkv.bias" in encoder,
                                         fc_norm=global_pool)
    layer_scale = "blocks.0.gamma_1" in encoder  # any value: the loaded gamma replaces it
    # no use_fc_norm: timm's Beit puts the norm after the pooling exactly when global_pool == 'avg'
    # (older timm has no such argument and derives it; newer timm takes None to mean the same),
    # which is this encoder's layout; naming it breaks older timm (a TypeError)
    kw.update(qkv_bias="blocks.0.attn.q_bias" in encoder, init_values=0.1 if layer_scale else None,
              use_abs_pos_emb="pos_embed" in encoder, use_shared_rel_pos_bias=False)
    if "blocks.0.attn.relative_position_bias_table" not in encoder:
        # no relative position term (the pixel model as a plain ViT, e.g. from HF's ViTForMaskedImageModeling)
        if "pos_embed" not in encoder:
            raise ValueError("a BEiT encoder with neither relative position tables nor pos_embed")
        num_patches = encoder["pos_embed"].shape[1] - 1
        grid = int(round(num_patches ** 0.5))
        if grid * grid != num_patches:
            raise ValueError(f"pos_embed has {num_patches} patch rows, not a square grid")
        return "Beit", dict(img_size=grid * patch_size, **kw, use_rel_pos_bias=False)
    table = encoder["blocks.0.attn.relative_position_bias_table"].shape[0]  # (2h-1)(2w-1) + 3
    side = int(round((table - 3) ** 0.5))
    if side * side != table - 3 or side % 2 == 0:
        raise ValueError(f"relative_position_bias_table has {table} rows, not a square window's")
    return "Beit", dict(img_size=(side + 1) // 2 * patch_size, **kw, use_rel_pos_bias=True)


def save_encoder(encoder: dict, out: str | os.PathLike, fmt: str = "both",
                 metadata: dict | None = None) -> list[Path]:
    """Write ``encoder`` as ``<out>.pth`` (``torch.save`` of the plain state_dict) and/or
    ``<out>.safetensors``; a ``.pth`` / ``.safetensors`` suffix on ``out`` is replaced.
    ``metadata`` (str -> JSON-able) goes into the safetensors header. Returns the paths."""
    if fmt not in ("both", "pth", "safetensors"):
        raise ValueError(f"fmt must be 'both', 'pth' or 'safetensors', got {fmt!r}")
    out = Path(out)
    if out.suffix in (".pth", ".safetensors", ".pt"):
        out = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    if fmt in ("both", "pth"):
        path = out.with_name(out.name + ".pth")
        torch.save(encoder, path)
        written.append(path)
    if fmt in ("both", "safetensors"):
        from safetensors.torch import save_file

        path = out.with_name(out.name + ".safetensors")
        meta = {"format": "pt"}
        meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
        save_file(encoder, str(path), metadata=meta)
        written.append(path)
    return written


def export_checkpoint(path: str | os.PathLike, out: str | os.PathLike, model_name: str | None = None,
                      global_pool: bool = False, fmt: str = "both", img_size: int | None = None) -> dict:
    """Read a mimfast, facebookresearch/mae or microsoft/unilm BEiT checkpoint and write its
    encoder for timm. When the model is known (checkpoint config or ``model_name``) the weights
    are checked against it and it gives the head count. ``img_size``: position embeddings for
    another image size (see :func:`encoder_state_dict`). Returns a summary (paths, timm class
    and arguments, tensor count)."""
    if fmt in ("hf", "simmim", "mmpretrain"):
        if global_pool or img_size is not None:
            raise ValueError(f"global_pool and img_size lay out a timm encoder; they do not apply to fmt={fmt!r}")
        return {"hf": export_hf, "simmim": export_simmim, "mmpretrain": export_mmpretrain}[fmt](path, out, model_name)
    sd = _strip_prefixes(load_model_weights(path))
    config = read_checkpoint_config(path)
    num_heads = None
    if config is not None or model_name is not None:
        model = build_model_from_config(config, model_name, kernels="eager", device="meta")
        expected = {k: v.shape for k, v in encoder_state_dict(model).items()}
        got = encoder_state_dict(sd)
        bad = sorted(set(expected) ^ set(got)) + [k for k in expected if k in got and got[k].shape != expected[k]]
        if bad:
            name = model_name or config.get("model")
            raise ValueError(f"{path} does not match model {name!r}: keys or shapes differ at {bad[:5]}")
        num_heads = model.blocks[0].attn.num_heads
    encoder = encoder_state_dict(sd, global_pool=global_pool, img_size=img_size)
    timm_class, kwargs = timm_model_spec(encoder, num_heads)
    paths = save_encoder(encoder, out, fmt, metadata={"timm_class": timm_class, "timm_kwargs": kwargs,
                                                       "source": str(path)})
    return {"paths": [str(p) for p in paths], "timm_class": timm_class, "timm_kwargs": kwargs,
            "tensors": len(encoder)}


def export_hf(path: str | os.PathLike, out: str | os.PathLike, model_name: str | None = None,
              legacy: bool = True) -> dict:
    """Write a mimfast / official MAE or BEiT pretraining checkpoint, or a pixel model with the
    plain-ViT settings (-> ``ViTForMaskedImageModeling``, see :mod:`mimfast.models.hf`), as a
    Hugging Face model folder ``out`` (``model.safetensors`` + ``config.json``). ``legacy``: the
    key names of HF files (``encoder.layer.<i>.attention.attention.query``...), which
    transformers 4 and 5 both read and transformers 5's own ``save_pretrained`` writes; False:
    transformers 5's module names, which only transformers 5 reads. Returns a summary (paths, HF
    class, tensor count)."""
    from safetensors.torch import save_file

    from mimfast.models.hf import beit_to_hf, hf_config_for, mae_to_hf, state_dict_layout
    from mimfast.models.hf_vit import vit_mim_to_hf

    sd = _strip_prefixes(load_model_weights(path))
    config = dict(read_checkpoint_config(path) or {})
    layout = state_dict_layout(sd)
    kw = dict(config.get("model_kwargs") or {})
    if layout == "beit" and config.get("drop_path") is not None:
        kw.setdefault("drop_path_rate", config["drop_path"])  # HF's config carries it
    config["model_kwargs"] = kw
    model = build_model_from_config(config, model_name, kernels="eager", device="meta", **_head_overrides(sd))
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("relative_position_index")}
    missing, unexpected, wrong = _misfit(sd, expected, list(expected), lambda k: k.endswith("relative_position_index"))
    if missing or unexpected or wrong:
        hint = (" (an encoder-only checkpoint has no decoder / head for an HF pretraining model: export the "
                "encoder with --format safetensors)" if missing and all(k.startswith(_HEADS) for k in missing)
                else "")
        raise _misfit_error(path, model_name or config.get("model"), missing, unexpected, wrong, hint)
    hf_config = hf_config_for(model, mask_ratio=config.get("mask_ratio", 0.75))
    sd = {k: v for k, v in sd.items() if k in expected}
    if layout == "mae":
        hf_sd = mae_to_hf(sd, legacy)
    else:
        hf_sd = (vit_mim_to_hf if "pixel_head.weight" in sd else beit_to_hf)(sd, legacy)
    hf_sd = {k: v.detach().clone().contiguous() for k, v in hf_sd.items()}
    dtypes = {v.dtype for v in hf_sd.values() if v.is_floating_point()}
    hf_config["dtype"] = str(dtypes.pop()).replace("torch.", "") if len(dtypes) == 1 else "float32"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights, cfg_path = out / "model.safetensors", out / "config.json"
    save_file(hf_sd, str(weights), metadata={"format": "pt"})
    cfg_path.write_text(json.dumps(hf_config, indent=2) + "\n")
    return {"paths": [str(weights), str(cfg_path)], "hf_class": hf_config["architectures"][0], "tensors": len(hf_sd)}


def export_simmim(path: str | os.PathLike, out: str | os.PathLike, model_name: str | None = None) -> dict:
    """Write a BEiT-encoder checkpoint (the pixel model ``beit_*_pixel``, or BEiT's) under
    microsoft/SimMIM's ViT keys as ``out.pth`` = ``{'model': ...}``, which SimMIM's
    ``main_finetune.py --pretrained`` and ``main_simmim.py --resume`` read
    (:func:`mimfast.models.simmim.to_simmim`). The pixel head becomes SimMIM's decoder; a BEiT
    LM head has no SimMIM counterpart, so such a file holds the encoder only. Returns a summary."""
    from mimfast.models.simmim import to_simmim

    sd = _strip_prefixes(load_model_weights(path))
    if not _is_beit(sd):
        raise ValueError(f"{path} is not a BEiT-encoder checkpoint: SimMIM's ViT is BEiT's encoder (an MAE encoder "
                         "has no SimMIM layout; export it for timm instead)")
    config = read_checkpoint_config(path)
    if config is not None or model_name is not None:
        _fitting_shapes(path, sd, config, model_name)
    head = sd.get("pixel_head.weight")
    if head is not None and head.shape[0] != 3 * sd["patch_embed.proj.weight"].shape[2] ** 2:
        raise ValueError(f"{path}: SimMIM's decoder predicts 3 channels; this pixel head has {head.shape[0]} outputs")
    simmim = {k: v.detach().clone().contiguous() for k, v in to_simmim(sd).items()}
    out = Path(out)
    target = out if out.suffix == ".pth" else out.with_name(out.name + ".pth")
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": simmim}, target)
    return {"paths": [str(target)], "tensors": len(simmim), "decoder": "decoder.0.weight" in simmim}


def export_mmpretrain(path: str | os.PathLike, out: str | os.PathLike, model_name: str | None = None) -> dict:
    """Write an MAE or BEiT token-model checkpoint (mimfast, official, HF, MMPretrain) under
    open-mmlab/mmpretrain's ``MAE`` / ``BEiT`` keys as ``out.pth`` = ``{'state_dict': ...}``
    (:func:`mimfast.models.mmpretrain.to_mmpretrain`): ``backbone.*`` (the encoder; BEiT's with
    its relative position index) and, when the checkpoint has it, the decoder (``neck.*``) or LM
    head (``head.cls_head.*``). MMPretrain's fine-tuning and linear-probe configs read the encoder
    with ``init_cfg=dict(type='Pretrained', checkpoint=PATH, prefix='backbone.')``; ``load_from=PATH``
    loads the whole model. MAE position embeddings are written as stored (see that module's notes
    on their layout). The BEiT pixel model has no MMPretrain counterpart. Returns a summary."""
    from mimfast.models.mmpretrain import to_mmpretrain

    sd = _strip_prefixes(load_model_weights(path))
    config = read_checkpoint_config(path)
    if config is not None or model_name is not None:
        _fitting_shapes(path, sd, config, model_name)
    sd = {k: v for k, v in sd.items() if not k.endswith("relative_position_index")}  # BEiT: to_mmpretrain rebuilds them
    mm = {k: v.detach().clone().contiguous() for k, v in to_mmpretrain(sd).items()}
    out = Path(out)
    target = out if out.suffix == ".pth" else out.with_name(out.name + ".pth")
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": mm}, target)
    return {"paths": [str(target)], "tensors": len(mm), "decoder": any(k.startswith(("neck.", "head.")) for k in mm)}


# --format NAME for another codebase's training code: the writer, whose keys, why a file may lack
# the decoder, how that codebase reads the file
_OTHER_CODEBASES = {
    "simmim": (export_simmim, "microsoft/SimMIM's keys", "no pixel head to write as decoder",
               "fine-tune with SimMIM: main_finetune.py --cfg <vit config> --pretrained {path}"),
    "mmpretrain": (export_mmpretrain, "open-mmlab/mmpretrain's keys", "the checkpoint has no decoder or LM head",
                   "fine-tune with MMPretrain: model.backbone.init_cfg=dict(type='Pretrained', checkpoint='{path}', "
                   "prefix='backbone.')"),
}


def add_export_command(sub) -> None:
    """``mimfast export CHECKPOINT --out PATH [--model NAME] [--global-pool] [--format ...]``."""
    p = sub.add_parser("export", help="write a pretrained MAE/BEiT encoder as a timm state_dict "
                                      "(.pth and .safetensors)")
    p.add_argument("checkpoint", help="mimfast, facebookresearch/mae, microsoft/unilm BEiT, SimMIM or MMPretrain "
                                      "checkpoint, a Hugging Face folder, or a bare state_dict")
    p.add_argument("--out", required=True,
                   help="output path without suffix (PATH.pth and PATH.safetensors are written); with "
                        "--format hf a folder (model.safetensors + config.json)")
    p.add_argument("--model", default=None,
                   help="model name to check the weights against (default: the checkpoint's config, if any)")
    p.add_argument("--global-pool", action="store_true",
                   help="lay out for a global-pool model (timm global_pool='avg'): fc_norm.* from the "
                        "pretrained norm.*, no norm.*")
    p.add_argument("--img-size", type=int, default=None,
                   help="write pos_embed for this image size (e.g. 384), interpolated as facebookresearch/mae's "
                        "fine-tuning does (bicubic); default: the pretraining size. MAE only")
    p.add_argument("--format", dest="fmt", choices=("both", "pth", "safetensors", "hf", "simmim", "mmpretrain"),
                   default="both",
                   help="timm encoder as .pth and/or .safetensors; hf: the whole pretraining model as a "
                        "Hugging Face folder for transformers ViTMAEForPreTraining / BeitForMaskedImageModeling "
                        "(a plain-ViT pixel model: ViTForMaskedImageModeling); "
                        "simmim: a BEiT-encoder model (beit_*_pixel) as microsoft/SimMIM's {'model': ...} .pth, for "
                        "its main_finetune.py --pretrained; mmpretrain: an MAE or BEiT as open-mmlab/mmpretrain's "
                        "{'state_dict': ...} .pth (backbone.*, neck.* / head.*), for its "
                        "init_cfg=dict(type='Pretrained', checkpoint=..., prefix='backbone.')")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    if not Path(args.checkpoint).exists():
        raise SystemExit(f"mimfast export: checkpoint {args.checkpoint!r} does not exist")
    img_size = getattr(args, "img_size", None)
    if args.fmt in ("hf", "simmim", "mmpretrain") and (args.global_pool or img_size is not None):
        raise SystemExit("mimfast export: --global-pool and --img-size lay out a timm encoder; they do not "
                         f"apply to --format {args.fmt}")
    if args.fmt in _OTHER_CODEBASES:
        export, keys, no_decoder, how = _OTHER_CODEBASES[args.fmt]
        try:
            summary = export(args.checkpoint, args.out, args.model)
        except ValueError as e:
            raise SystemExit(f"mimfast export: {e}")
        what = "encoder and pretraining head" if summary["decoder"] else f"encoder only ({no_decoder})"
        print(f"wrote {summary['paths'][0]} ({summary['tensors']} tensors, {what}) under {keys}")
        print(how.format(path=summary["paths"][0]))
        return 0
    if args.fmt == "hf":
        try:
            summary = export_hf(args.checkpoint, args.out, args.model)
        except ValueError as e:
            raise SystemExit(f"mimfast export: {e}")
        print(f"wrote {summary['paths'][0]} ({summary['tensors']} tensors) and {summary['paths'][1]}")
        print(f"load with: transformers.{summary['hf_class']}.from_pretrained({str(args.out)!r})")
        return 0
    try:
        summary = export_checkpoint(args.checkpoint, args.out, args.model, args.global_pool, args.fmt, img_size)
    except ValueError as e:
        raise SystemExit(f"mimfast export: {e}")
    for path in summary["paths"]:
        print(f"wrote {path} ({summary['tensors']} tensors)")
    kw = ", ".join(f"{k}={v!r}" for k, v in summary["timm_kwargs"].items())
    print(f"load with: model = timm.models.{'beit' if summary['timm_class'] == 'Beit' else 'vision_transformer'}"
          f".{summary['timm_class']}({kw}, num_classes=...)\n"
          "           model.load_state_dict(state_dict, strict=False)  # only head.* missing "
          "(strict=True with num_classes=0)")
    return 0
