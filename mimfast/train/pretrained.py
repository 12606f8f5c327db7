"""A pretraining model back from a checkpoint of any layout mimfast reads: which model it is
(:func:`read_checkpoint_config`: a mimfast checkpoint's ``config``, or one made from an official
or other codebase's weights and saved config), the model rebuilt (:func:`build_model_from_config`)
and loaded with a check that every encoder weight fits (:func:`load_pretrained_model`). Used by
``mimfast export``, ``mimfast linprobe`` and the Python API; the weights themselves come from
:func:`mimfast.train.checkpoint.load_model_weights`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch import nn

from mimfast.train.checkpoint import load_model_weights, read_foreign_checkpoint, read_model_file

__all__ = ["read_checkpoint_config", "build_model_from_config", "load_pretrained_model", "init_from_checkpoint"]

_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
_HEADS = ("mask_token", "decoder_", "lm_head.", "pixel_head.")  # pretraining-only parts


def _strip_prefixes(state_dict: dict) -> dict:
    out = {}
    for k, v in state_dict.items():
        for prefix in _PREFIXES:
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _safetensors_shapes(path) -> dict:
    """A ``.safetensors`` file's tensors as meta tensors of their shapes: its layout and model
    sizes without reading the data."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}


def _hf_checkpoint_config(path: Path, loaded: tuple[object, dict | None] | None = None) -> dict | None:
    """The mimfast config of an HF ViT masked-image-modeling checkpoint: a folder's
    ``config.json`` (:func:`mimfast.models.hf_vit.vit_mim_model_config`), or for a bare
    ``.safetensors`` of HF ViT keys one read from the weight shapes as for SimMIM's ViT
    (:func:`mimfast.models.simmim.simmim_model_config`: heads by width, the grid from the
    position embeddings, run_mim.py's masking defaults). None for other HF models. ``loaded``:
    :func:`read_model_file`'s (tensors, config.json) of ``path``, used instead of reading it."""
    from mimfast.models.hf import state_dict_layout
    from mimfast.models.hf_vit import vit_mim_from_hf, vit_mim_model_config
    from mimfast.models.simmim import simmim_model_config

    if path.is_dir():
        if loaded is not None:
            hf_config = loaded[1]
        else:
            config_path = path / "config.json"
            if not config_path.is_file():
                return None
            hf_config = json.loads(config_path.read_text())
        if hf_config.get("model_type") != "vit":
            return None
        return vit_mim_model_config(hf_config, where=f"{path}/config.json")
    try:
        shapes = (_safetensors_shapes(path) if loaded is None
                  else {k: torch.empty(v.shape, device="meta") for k, v in loaded[0].items()})
        if state_dict_layout(shapes) != "hf_vit":
            return None
    except Exception:  # unreadable, or no layout mimfast knows: load_model_weights says what it is
        return None
    try:
        config = simmim_model_config(vit_mim_from_hf(shapes))
    except ValueError as e:
        raise ValueError(f"{path}: {e} (a bare HF ViT .safetensors does not record its head count; give the HF "
                         "folder with its config.json)") from None
    config["source"] = "hf_vit"
    return config


def read_checkpoint_config(path: str | os.PathLike) -> dict | None:
    """The ``'config'`` dict a mimfast checkpoint holds; for a microsoft/SimMIM ViT checkpoint one
    made from its weights and yacs config (:func:`mimfast.models.simmim.simmim_model_config`), for
    an open-mmlab/mmpretrain MAE checkpoint one made from its weights and the config text mmengine
    saves in ``meta['cfg']`` (:func:`mimfast.models.mmpretrain.mmpretrain_model_config`), for an HF
    ``ViTForMaskedImageModeling`` folder or ``.safetensors`` one for the pixel model
    (:func:`_hf_checkpoint_config`), for an official MAE / BEiT training checkpoint the model its
    pickled ``args`` name (:func:`_official_args_config`); None for other (weights-only) official,
    HF or bare ones. Memory-mapped, so the tensors are not read a second time."""
    if Path(path).is_dir() or Path(path).suffix == ".safetensors":
        return _hf_checkpoint_config(Path(path))
    try:
        obj = read_foreign_checkpoint(path, mmap=True)
    except Exception:
        return None
    return _checkpoint_object_config(obj)


def _checkpoint_object_config(obj) -> dict | None:
    """:func:`read_checkpoint_config` of what a ``.pth`` file holds, already read."""
    from mimfast.models.mmpretrain import (from_mmpretrain, is_mmpretrain_state_dict, mmpretrain_model_config,
                                           parse_config_text)
    from mimfast.models.simmim import from_simmim, is_simmim_state_dict, simmim_model_config

    if not isinstance(obj, dict):
        return None
    cfg = obj.get("config")
    if isinstance(obj.get("model"), dict):
        weights = obj["model"]
    elif isinstance(obj.get("state_dict"), dict):
        weights = obj["state_dict"]
    else:
        weights = obj
    weights = _strip_prefixes(weights)
    if is_simmim_state_dict(weights):
        return simmim_model_config(from_simmim(weights), cfg if isinstance(cfg, dict) else None)
    try:
        mmpretrain = is_mmpretrain_state_dict(weights)
    except ValueError:
        return None  # another OpenMMLab model: load_model_weights says what it is
    if mmpretrain:
        meta = obj.get("meta")
        text = meta.get("cfg") if isinstance(meta, dict) else None
        return mmpretrain_model_config(from_mmpretrain(weights), parse_config_text(text) if isinstance(text, str)
                                       else None)
    if isinstance(cfg, dict):
        return cfg
    return _official_args_config(obj.get("args"))


def _official_args_config(args) -> dict | None:
    """The model an official training checkpoint's pickled command line names (facebookresearch/mae
    ``main_pretrain.py`` and microsoft/unilm ``run_beit_pretraining.py`` save ``args``, an argparse
    Namespace, beside the weights), as a mimfast config: ``args.model`` (the same names here),
    ``input_size``; MAE's ``mask_ratio`` and ``norm_pix_loss``; BEiT's ``rel_pos_bias``,
    ``abs_pos_emb`` and ``layer_scale_init_value`` (the arguments its ``get_model`` passes),
    ``num_mask_patches`` and ``drop_path``. None when there are no such args or the model is not
    one of mimfast's."""
    from mimfast.models import MODELS

    ns = vars(args) if isinstance(args, argparse.Namespace) else args
    if not isinstance(ns, dict) or ns.get("model") not in MODELS:
        return None
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    beit = ns["model"].startswith("beit_")
    config = dict(method="beit" if beit else "mae", model=ns["model"], source="official args")
    if isinstance(ns.get("input_size"), int) and not isinstance(ns["input_size"], bool):
        config["img_size"] = ns["input_size"]
    if not beit:
        if isinstance(ns.get("norm_pix_loss"), bool):
            config["norm_pix_loss"] = ns["norm_pix_loss"]
        if number(ns.get("mask_ratio")):
            config["mask_ratio"] = float(ns["mask_ratio"])
        return config
    kwargs = {}
    for arg, kwarg in (("rel_pos_bias", "use_shared_rel_pos_bias"), ("abs_pos_emb", "use_abs_pos_emb")):
        if isinstance(ns.get(arg), bool):
            kwargs[kwarg] = ns[arg]
    if number(ns.get("layer_scale_init_value")):
        kwargs["init_values"] = float(ns["layer_scale_init_value"])
    config["model_kwargs"] = kwargs
    if isinstance(ns.get("num_mask_patches"), int) and not isinstance(ns["num_mask_patches"], bool):
        config["num_mask_patches"] = ns["num_mask_patches"]
    if number(ns.get("drop_path")):
        config["drop_path"] = float(ns["drop_path"])
    return config


def build_model_from_config(config: dict | None, model_name: str | None = None, kernels: str = "auto",
                            device: torch.device | str | None = None, **overrides) -> nn.Module:
    """Rebuild the pretraining model: from a mimfast checkpoint's ``config`` (``model``,
    ``img_size``, ``patch_size``, ``model_kwargs``), else from ``model_name`` with its defaults.
    ``model_name`` overrides the config's model name when both are given; ``overrides`` are
    model arguments the config does not hold (a BEiT run's vocabulary comes from its tokenizer)."""
    from mimfast.models import MODELS, create_model

    config = config or {}
    name = model_name or config.get("model")
    if name is None:
        raise ValueError("the checkpoint holds no 'config'; give the model name (--model), one of "
                         f"{', '.join(sorted(MODELS))}")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    kw = dict(config.get("model_kwargs") or {})
    for key in ("img_size", "patch_size"):
        if config.get(key) is not None:
            kw[key] = config[key]
    # settings the trainer passes beside model_kwargs (as it does: MAE's over them, the BEiT
    # pixel variant's under them)
    if config.get("method", "mae") == "mae" and config.get("norm_pix_loss") is not None:
        kw["norm_pix_loss"] = config["norm_pix_loss"]
    if config.get("method") == "beit" and name.endswith("_pixel"):
        for key, arg in (("norm_pix_loss", "norm_pix_loss"), ("pixel_loss", "loss")):
            if config.get(key) is not None:
                kw.setdefault(arg, config[key])
    kw.update(overrides)
    kw["kernels"] = kernels
    with torch.device(device or "cpu"):
        return create_model(name, **kw)


def _head_overrides(sd: dict) -> dict:
    """Model arguments a checkpoint's weights say and its config does not: a BEiT run takes its
    vocabulary from the tokenizer, and the LM head has its size."""
    return {"vocab_size": sd["lm_head.weight"].shape[0]} if "lm_head.weight" in sd else {}


def _encoder_keys(model_sd: dict) -> list[str]:
    return [k for k in model_sd if not k.startswith(_HEADS) and not k.endswith("relative_position_index")]


def _misfit(sd: dict, shapes: dict, required: list[str], ignored) -> tuple[list, list, list]:
    """What keeps ``sd`` from fitting a model of parameter ``shapes``: required keys missing, keys
    the model lacks (but ``ignored(key)``), required keys of another shape."""
    missing = [k for k in required if k not in sd]
    unexpected = [k for k in sd if k not in shapes and not ignored(k)]
    wrong = [f"{k}: {tuple(sd[k].shape)} vs model {tuple(shapes[k])}" for k in required
             if k in sd and sd[k].shape != shapes[k]]
    return missing, unexpected, wrong


def _misfit_error(path, name, missing, unexpected, wrong, hint: str = "") -> ValueError:
    return ValueError(f"{path} does not fit model {name!r}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                      f"shape mismatch {wrong[:5]}{hint}")


def _fitting_shapes(path, sd: dict, config: dict | None, model_name: str | None) -> dict:
    """The parameter shapes of the model ``config`` / ``model_name`` builds; an error naming the
    keys when ``sd``'s encoder does not fit it (pretraining heads may differ)."""
    shapes = {k: v.shape for k, v in
              build_model_from_config(config, model_name, device="meta", **_head_overrides(sd)).state_dict().items()}
    missing, unexpected, wrong = _misfit(sd, shapes, _encoder_keys(shapes), lambda k: k.startswith(_HEADS))
    if missing or unexpected or wrong:
        raise _misfit_error(path, model_name or (config or {}).get("model"), missing, unexpected, wrong)
    return shapes


def load_pretrained_model(path: str | os.PathLike, model_name: str | None = None, kernels: str = "auto",
                          device: torch.device | str = "cpu") -> nn.Module:
    """The pretraining model (MAE or BEiT) with the checkpoint's weights; encoder-only
    checkpoints (official MAE releases) are fine, the pretraining head stays as initialised.

    Every encoder weight must be in the checkpoint with the model's shape: a checkpoint that
    does not fit ``model_name`` / its config is an error, not a silently random encoder. The file is
    read once, for the weights and the config both."""
    loaded = read_model_file(path)
    sd = _strip_prefixes(load_model_weights(path, loaded))
    if Path(path).is_dir() or Path(path).suffix == ".safetensors":
        config = _hf_checkpoint_config(Path(path), loaded)
    else:
        config = _checkpoint_object_config(loaded[0])
    overrides = _head_overrides(sd)
    shapes = _fitting_shapes(path, sd, config, model_name)
    # pretraining heads are loaded where they fit (e.g. another vocabulary size is skipped)
    sd = {k: v for k, v in sd.items() if k in shapes and v.shape == shapes[k]}
    model = build_model_from_config(config, model_name, kernels=kernels, device=device, **overrides)
    model.load_state_dict(sd, strict=False)
    return model


def init_from_checkpoint(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> tuple[list, list]:
    """``--init-from``: load a checkpoint of any layout :func:`load_model_weights` reads into the
    run's ``model`` (named ``name`` in errors). Every encoder weight must be in the file with the
    model's shape (DDP / compile prefixes taken off), else an error naming the keys, and the model
    the file describes when it says; a silently random encoder is never the result. Pretraining
    heads (decoder, LM / pixel head, mask token) load where they fit and are otherwise kept as
    initialised: an encoder-only release, another vocabulary; a timm classifier's ``head.*`` is not
    used. Returns (head keys kept as initialised, file keys not used)."""
    sd = _strip_prefixes(load_model_weights(path))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    computed = lambda k: k.endswith("relative_position_index")  # noqa: E731 (buffers rebuilt from the table)
    # a timm ViT's classifier (``head.*``) is not part of a pretraining model: unused, reported
    missing, unexpected, wrong = _misfit(sd, shapes, _encoder_keys(shapes),
                                         lambda k: k.startswith((*_HEADS, "head.")) or computed(k))
    if missing or unexpected or wrong:
        described = read_checkpoint_config(path) or {}
        hint = ""
        if described.get("model"):
            sizes = {k: described.get(k) for k in ("img_size", "patch_size") if described.get(k)}
            hint = (f"; the file holds {described['model']} {sizes or ''} with model_kwargs "
                    f"{described.get('model_kwargs') or {}}: name that model (--model, --img-size, --patch-size, "
                    "model_kwargs in the run's YAML)")
        raise _misfit_error(path, name or type(model).__name__, missing, unexpected, wrong, hint)
    fits = {k: v for k, v in sd.items() if k in shapes and v.shape == shapes[k]}
    model.load_state_dict(fits, strict=False)
    fresh = [k for k in shapes if k not in fits and not computed(k)]
    unused = [k for k in sd if k not in fits and not computed(k)]
    return fresh, unused
