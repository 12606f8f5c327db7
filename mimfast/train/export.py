"""``mimfast export``: a pretrained MAE encoder as a timm ``VisionTransformer`` state_dict.

MAE's encoder already uses timm's names, so export is a selection, not a conversion:

    kept     cls_token, pos_embed (1, 1 + L, D) with the cls row (MAE's fixed 2D sin-cos),
             patch_embed.proj.*, blocks.<i>.*, norm.*
    dropped  mask_token, decoder_* (the decoder is thrown away after pretraining)

The result loads into ``timm.create_model('vit_base_patch16_224', pretrained=False)`` (or a
``VisionTransformer`` of the same sizes) with ``strict=False``, and only ``head.*`` missing.

The final norm. timm's default (cls-token) ViT ends with ``norm``, which is MAE's final norm,
so it is kept as is. With ``global_pool=True`` the state_dict is laid out for a global-pool
model (``timm.create_model(..., global_pool='avg')``, and facebookresearch/mae
``models_vit.VisionTransformer(global_pool=True)``, which fine-tunes that way): those have
``fc_norm`` after the mean over patch tokens and no ``norm``. ``fc_norm.*`` is then written from
MAE's ``norm.*`` and ``norm.*`` is left out. Note facebookresearch/mae's own fine-tuning does
not carry ``norm`` over: it starts ``fc_norm`` fresh (weight 1, bias 0); copying gives the
pooled features the pretrained norm's scale and shift, and is one layer's difference either way.

BEiT encoders are not exported yet (``mimfast/models/beit.py`` did not exist when this was
written): a BEiT state_dict is refused with a clear error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from mimfast.train.checkpoint import load_model_weights

__all__ = [
    "encoder_state_dict",
    "timm_vit_kwargs",
    "save_encoder",
    "read_checkpoint_config",
    "build_model_from_config",
    "load_pretrained_model",
    "export_checkpoint",
]

_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
_DROPPED = ("mask_token", "decoder_")
_REQUIRED = ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "norm.bias")
_MAE_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}  # the MAE / DeiT model sizes


def _strip_prefixes(state_dict: dict) -> dict:
    out = {}
    for k, v in state_dict.items():
        for prefix in _PREFIXES:
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def encoder_state_dict(source: nn.Module | dict, global_pool: bool = False) -> dict[str, torch.Tensor]:
    """The encoder of an MAE (model or state_dict) under timm ``VisionTransformer`` keys.

    Args:
        source: a ``MaskedAutoencoderViT`` or its state_dict (mimfast or facebookresearch/mae;
            ``module.`` / ``_orig_mod.`` prefixes are stripped).
        global_pool: write ``fc_norm.*`` (from ``norm.*``) instead of ``norm.*``; see the module
            docstring.

    Returns:
        A new dict of detached, contiguous tensors (safe for safetensors: no shared storage).
    """
    if isinstance(source, nn.Module):
        source = source.state_dict()
    if not isinstance(source, dict):
        raise TypeError(f"source must be an nn.Module or a state_dict, got {type(source).__name__}")
    sd = _strip_prefixes(source)
    if any(".attn.q_bias" in k or k.startswith("lm_head.") for k in sd):
        raise ValueError("source looks like a BEiT state_dict (q_bias / lm_head keys); only MAE encoders "
                         "are exported so far")
    missing = [k for k in _REQUIRED if k not in sd]
    if missing or not any(k.startswith("blocks.") for k in sd):
        raise ValueError(f"source is not an MAE encoder state_dict: missing {missing or ['blocks.*']}")
    out = {}
    for k, v in sd.items():
        if k.startswith(_DROPPED):
            continue
        if not k.startswith(("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")):
            continue  # anything else (e.g. a fine-tuning head) is not part of the encoder
        if global_pool and k.startswith("norm."):
            k = "fc_" + k
        out[k] = v.detach().clone().contiguous()
    return out


def timm_vit_kwargs(encoder: dict, num_heads: int | None = None) -> dict:
    """``timm.models.vision_transformer.VisionTransformer`` arguments matching ``encoder``
    (an :func:`encoder_state_dict`). The head count cannot be read from weights: give it, or
    it is taken from the MAE sizes (192: 3, 384: 6, 768: 12, 1024/1280: 16) else 64-wide heads."""
    proj = encoder["patch_embed.proj.weight"]  # (D, C, p, p)
    embed_dim, in_chans, patch_size = proj.shape[0], proj.shape[1], proj.shape[-1]
    num_patches = encoder["pos_embed"].shape[1] - 1
    grid = int(round(num_patches ** 0.5))
    if grid * grid != num_patches:
        raise ValueError(f"pos_embed has {num_patches} patch rows, not a square grid")
    depth = 1 + max(int(k.split(".")[1]) for k in encoder if k.startswith("blocks."))
    mlp_hidden = encoder["blocks.0.mlp.fc1.weight"].shape[0]
    if num_heads is None:
        num_heads = _MAE_HEADS.get(embed_dim, max(1, embed_dim // 64))
    global_pool = "fc_norm.weight" in encoder
    return dict(img_size=grid * patch_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                depth=depth, num_heads=num_heads, mlp_ratio=mlp_hidden / embed_dim, qkv_bias=True,
                global_pool="avg" if global_pool else "token", fc_norm=global_pool)


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


def read_checkpoint_config(path: str | os.PathLike) -> dict | None:
    """The ``'config'`` dict a mimfast checkpoint holds (None for official or bare ones).
    Memory-mapped, so the tensors are not read a second time."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    cfg = obj.get("config") if isinstance(obj, dict) else None
    return cfg if isinstance(cfg, dict) else None


def build_model_from_config(config: dict | None, model_name: str | None = None, kernels: str = "auto",
                            device: torch.device | str | None = None) -> nn.Module:
    """Rebuild the pretraining model: from a mimfast checkpoint's ``config`` (``model``,
    ``img_size``, ``patch_size``, ``model_kwargs``), else from ``model_name`` with its defaults.
    ``model_name`` overrides the config's model name when both are given."""
    from mimfast.models import MODELS, create_model

    config = config or {}
    name = model_name or config.get("model")
    if name is None:
        raise ValueError("the checkpoint holds no 'config'; give the model name (--model), one of "
                         f"{', '.join(sorted(MODELS))}")
    if config.get("method", "mae") != "mae":
        raise ValueError(f"method={config.get('method')!r}: only MAE encoders are supported so far")
    kw = dict(config.get("model_kwargs") or {})
    for key in ("img_size", "patch_size"):
        if config.get(key) is not None:
            kw[key] = config[key]
    kw["kernels"] = kernels
    with torch.device(device or "cpu"):
        return create_model(name, **kw)


def load_pretrained_model(path: str | os.PathLike, model_name: str | None = None, kernels: str = "auto",
                          device: torch.device | str = "cpu") -> nn.Module:
    """An MAE with the checkpoint's encoder weights (decoder weights too when present).

    Every encoder weight must be in the checkpoint with the model's shape: a checkpoint that
    does not fit ``model_name`` / its config is an error, not a silently random encoder."""
    sd = _strip_prefixes(load_model_weights(path))
    model = build_model_from_config(read_checkpoint_config(path), model_name, kernels=kernels, device="meta")
    expected = {k: v.shape for k, v in model.state_dict().items()}
    encoder_keys = [k for k in expected if not k.startswith(_DROPPED)]
    missing = [k for k in encoder_keys if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k}: {tuple(sd[k].shape)} vs model {tuple(expected[k])}" for k in expected
             if k in sd and sd[k].shape != expected[k]]
    if missing or unexpected or wrong:
        raise ValueError(f"{path} does not fit the model ({type(model).__name__}): missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shape mismatch {wrong[:5]}")
    model = build_model_from_config(read_checkpoint_config(path), model_name, kernels=kernels, device=device)
    model.load_state_dict(sd, strict=False)  # decoder keys may be absent (encoder-only checkpoints)
    return model


def export_checkpoint(path: str | os.PathLike, out: str | os.PathLike, model_name: str | None = None,
                      global_pool: bool = False, fmt: str = "both") -> dict:
    """Read a mimfast or official MAE checkpoint, write its encoder for timm. When the model
    is known (checkpoint config or ``model_name``) its sizes are checked against the weights
    and give the head count. Returns a summary (paths, timm kwargs, tensor count)."""
    sd = _strip_prefixes(load_model_weights(path))
    config = read_checkpoint_config(path)
    num_heads = None
    if config is not None or model_name is not None:
        model = build_model_from_config(config, model_name, kernels="eager", device="meta")
        expected = {k: v.shape for k, v in encoder_state_dict(model).items()}
        got = encoder_state_dict(sd)
        bad = sorted(set(expected) ^ set(got)) + [k for k in expected if k in got and got[k].shape != expected[k]]
        if bad:
            raise ValueError(f"{path} does not match model {model_name or config.get('model')!r}: "
                             f"keys or shapes differ at {bad[:5]}")
        num_heads = model.blocks[0].attn.num_heads
    encoder = encoder_state_dict(sd, global_pool=global_pool)
    kwargs = timm_vit_kwargs(encoder, num_heads)
    paths = save_encoder(encoder, out, fmt, metadata={"timm_vit_kwargs": kwargs, "source": str(path)})
    return {"paths": [str(p) for p in paths], "timm_vit_kwargs": kwargs, "tensors": len(encoder)}


def add_export_command(sub) -> None:
    """``mimfast export CHECKPOINT --out PATH [--model NAME] [--global-pool] [--format ...]``."""
    p = sub.add_parser("export", help="write a pretrained MAE encoder as a timm VisionTransformer state_dict "
                                      "(.pth and .safetensors)")
    p.add_argument("checkpoint", help="mimfast or facebookresearch/mae checkpoint, or a bare state_dict")
    p.add_argument("--out", required=True,
                   help="output path without suffix (PATH.pth and PATH.safetensors are written)")
    p.add_argument("--model", default=None,
                   help="model name to check the weights against (default: the checkpoint's config, if any)")
    p.add_argument("--global-pool", action="store_true",
                   help="lay out for a global-pool ViT: fc_norm.* from MAE's norm.*, no norm.*")
    p.add_argument("--format", dest="fmt", choices=("both", "pth", "safetensors"), default="both")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"checkpoint {args.checkpoint!r} does not exist")
    try:
        summary = export_checkpoint(args.checkpoint, args.out, args.model, args.global_pool, args.fmt)
    except ValueError as e:
        raise SystemExit(f"mimfast export: {e}")
    kw = summary["timm_vit_kwargs"]
    for path in summary["paths"]:
        print(f"wrote {path} ({summary['tensors']} tensors)")
    print("load with: timm.models.vision_transformer.VisionTransformer(" +
          ", ".join(f"{k}={v!r}" for k, v in kw.items()) + ", num_classes=...)"
          ".load_state_dict(sd, strict=False)  # only head.* missing")
    return 0
