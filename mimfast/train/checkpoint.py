"""Checkpoints: written atomically (temporary file + rename), read with ``weights_only=True``.

:func:`load_model_weights` also reads ``.safetensors`` files and Hugging Face model folders
(``config.json`` + ``model.safetensors``, a sharded ``model.safetensors.index.json``, or
``pytorch_model.bin``), and converts HF ViTMAE / BEiT layouts to the official keys and HF
``ViTForMaskedImageModeling`` (transformers' SimMIM example) to the pixel model's
(:mod:`mimfast.models.hf`), microsoft/SimMIM ViT checkpoints to the pixel model's
(:mod:`mimfast.models.simmim`) and open-mmlab/mmpretrain MAE checkpoints (mmengine's
``{'meta', 'state_dict', 'message_hub', ...}``) to the official MAE keys
(:mod:`mimfast.models.mmpretrain`), so ``--init-from`` takes those as they are."""

from __future__ import annotations

import collections
import json
import os
import warnings
from pathlib import Path

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "find_last_checkpoint", "resolve_resume", "load_model_weights",
           "read_model_file", "read_foreign_checkpoint", "dataset_change_notice"]


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic on POSIX: a reader sees the old file or the new one
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint with the safe unpickler only (tensors, containers, plain numbers)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def find_last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    d = Path(output_dir)
    last = d / "checkpoint-last.pth"
    if last.is_file():
        return last
    steps = sorted(d.glob("checkpoint-[0-9][0-9][0-9][0-9][0-9][0-9]*.pth"))
    return steps[-1] if steps else None


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> str | None:
    """``--resume``: a checkpoint path as given, or for ``"auto"`` the run's last checkpoint in
    ``output_dir`` (None when there is none yet: the run starts fresh)."""
    if resume == "auto":
        found = find_last_checkpoint(output_dir)
        return str(found) if found else None
    return resume or None


def dataset_change_notice(ckpt: dict, dataset_size: int) -> str | None:
    """A warning when the run resumed from ``ckpt`` reads a dataset of another size than the one
    it was saved with (images added to or removed from the folder): the epoch's order is drawn
    over the new list, so the resumed epoch neither continues the saved one exactly nor covers
    each image once. None when the sizes agree or the checkpoint does not record one."""
    saved = ckpt.get("dataset_size")
    if saved is None or saved == dataset_size:
        return None
    return (f"resume: the checkpoint was saved with a dataset of {saved} images and this run's has {dataset_size}: "
            f"the rest of epoch {ckpt.get('epoch')} follows the new list's order, so some images of it may be seen "
            f"twice and others not at all; later epochs are whole")


class _YacsNode:
    """Stands in for ``yacs.config.CfgNode``, the dict subclass microsoft/SimMIM pickles its config
    as: the safe unpickler builds each node as an ``OrderedDict`` of its settings (the node's
    attributes, its frozen flag and such, land in the dict's ``__dict__``). Nothing of yacs runs."""

    def __new__(cls, *args, **kwargs):
        return collections.OrderedDict()


class _HistoryBuffer:
    """Stands in for ``mmengine.logging.history_buffer.HistoryBuffer``, the logged-scalar history
    mmengine pickles in a checkpoint's ``message_hub``: built as an empty ``OrderedDict`` (its
    attributes land in the dict's ``__dict__``); nothing of mmengine runs."""

    def __new__(cls, *args, **kwargs):
        return collections.OrderedDict()


class _Unread:
    """Stands in for the numpy arrays, dtypes and scalars in mmengine's ``message_hub`` (the
    history buffers' arrays, runtime values): an empty object that takes whatever it is built
    from and reads nothing of it, so no numpy code runs while unpickling."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


_NUMPY_NAMES = ("numpy.ndarray", "numpy.dtype", "numpy.core.multiarray._reconstruct",
                "numpy.core.multiarray.scalar", "numpy._core.multiarray._reconstruct",
                "numpy._core.multiarray.scalar")
_FOREIGN_GLOBALS = [(_YacsNode, "yacs.config.CfgNode"),
                    (_HistoryBuffer, "mmengine.logging.history_buffer.HistoryBuffer"),
                    (_Unread, "mimfast.train.checkpoint._Unread")] + [(_Unread, name) for name in _NUMPY_NAMES]


def read_foreign_checkpoint(path, mmap: bool = False) -> object:
    """``torch.load(path, weights_only=True)``; for an official checkpoint that also pickles its
    command line (MAE / BEiT: an argparse ``Namespace``), config (SimMIM: yacs ``CfgNode``s) or
    logging state (mmengine's ``message_hub``: ``HistoryBuffer``s holding numpy arrays), retried
    with only those names allowed: the config is read as nested dicts, the logging state as empty
    stand-ins (:class:`_HistoryBuffer`, :class:`_Unread`)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception:
        import argparse

        with torch.serialization.safe_globals([argparse.Namespace, *_FOREIGN_GLOBALS]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _load_safetensors(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def _hf_folder_weights(folder: Path) -> tuple[dict, dict]:
    """(state_dict, config) of a Hugging Face model folder."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder}: a folder must be a Hugging Face model folder with config.json "
                         "(for a mimfast run folder give its checkpoint-*.pth)")
    config = json.loads(config_path.read_text())
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        sd = _load_safetensors(folder / "model.safetensors")
    elif index.is_file():
        sd = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            sd.update(_load_safetensors(folder / shard))
    elif (folder / "pytorch_model.bin").is_file():
        sd = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    model_type = config.get("model_type")
    if model_type not in ("vit_mae", "beit", "vit"):
        raise ValueError(f"{folder}: config.json model_type is {model_type!r}, expected 'vit_mae', 'beit' or 'vit'")
    return sd, config


def _check_hf_config(config: dict, where) -> None:
    """Warn where the HF config describes a model that mimfast runs differently."""
    eps = config.get("layer_norm_eps", 1e-12)
    if eps != 1e-6:
        warnings.warn(f"{where}: HF config has layer_norm_eps={eps}, mimfast's models use 1e-6 (the official "
                      "value): activations differ slightly from the HF model's", stacklevel=3)
    if config.get("hidden_act", "gelu") != "gelu":
        warnings.warn(f"{where}: HF config has hidden_act={config['hidden_act']!r}, mimfast's blocks use exact "
                      "GELU", stacklevel=3)


def read_model_file(path: str | os.PathLike) -> tuple[object, dict | None]:
    """What :func:`load_model_weights` reads before converting: (the object the file holds, a
    Hugging Face folder's ``config.json`` or None), for a caller that also reads other parts of
    the file (its saved config) to read it once."""
    path = Path(path)
    if path.is_dir():
        return _hf_folder_weights(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path), None
    return read_foreign_checkpoint(path), None


def load_model_weights(path: str | os.PathLike, loaded: tuple[object, dict | None] | None = None) -> dict:
    """A model state_dict, under the official MAE / BEiT keys, from:

    * a mimfast or official MAE / BEiT / SimMIM checkpoint (``{'model': ...}``), an mmengine one
      (MMPretrain: ``{'state_dict': ...}``) or a bare state_dict (``.pth``); official checkpoints
      also pickle an argparse Namespace (MAE, BEiT), yacs config (SimMIM) or mmengine logging
      state, which the safe unpickler refuses: for those it runs with an allow-list of just those
      names (:func:`read_foreign_checkpoint`);
    * a ``.safetensors`` file;
    * a Hugging Face model folder (``config.json`` + ``model.safetensors`` / sharded /
      ``pytorch_model.bin``, read with ``weights_only=True``).

    HF ``ViTMAEForPreTraining`` / ``ViTMAEModel`` / ``BeitForMaskedImageModeling`` /
    ``ViTForMaskedImageModeling`` layouts are converted (:func:`mimfast.models.hf.from_hf`; a
    folder of ``model_type`` ``"vit"`` always as a ViT, whose ``encoder_stride`` and
    ``num_channels`` must fit the weights), wherever they come from, and so are SimMIM ViT
    ones (:func:`mimfast.models.simmim.from_simmim`: mimfast's ``beit_*_pixel`` keys) and
    MMPretrain MAE ones (:func:`mimfast.models.mmpretrain.from_mmpretrain`); other OpenMMLab
    models' weights (``backbone.`` keys) are an error naming what was found. ``loaded``: what
    :func:`read_model_file` gave for ``path``, which is then not read again."""
    from mimfast.models.hf import from_hf, is_hf_state_dict, state_dict_layout
    from mimfast.models.hf_vit import vit_mim_from_hf
    from mimfast.models.mmpretrain import from_mmpretrain, is_mmpretrain_state_dict
    from mimfast.models.simmim import from_simmim, is_simmim_state_dict

    path = Path(path)
    obj, config = loaded if loaded is not None else read_model_file(path)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # mmengine (MMPretrain) checkpoints
    elif not (isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise ValueError(f"{path}: neither a state_dict nor a checkpoint with a 'model' or 'state_dict' entry")
    unwrapped = {k.removeprefix("module."): v for k, v in obj.items()}  # SimMIM's DDP-wrapped saves
    if is_simmim_state_dict(unwrapped):
        return from_simmim(unwrapped)
    try:
        if is_mmpretrain_state_dict(unwrapped):
            return from_mmpretrain(unwrapped)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if config is not None and config.get("model_type") == "vit":
        # by the config, not the keys: a bare ViTModel's keys are a bare ViTMAEModel's
        _check_hf_config(config, path)
        try:
            return vit_mim_from_hf(obj, config)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    try:
        hf = is_hf_state_dict(obj)
    except ValueError:
        hf = False  # not an MAE / BEiT layout: returned as it is, for the caller to judge
    if not hf:
        return obj
    if config is not None:
        _check_hf_config(config, path)
    sd = from_hf(obj)
    if state_dict_layout(obj) == "hf_vit":
        return sd  # an HF ViT's position embeddings are trained: the note below is ViTMAE's
    for key in ("pos_embed", "decoder_pos_embed"):
        if key in sd and not bool(torch.any(sd[key] != 0)):
            warnings.warn(f"{path}: the HF checkpoint's fixed {key} is all zeros (a ViTMAEForPreTraining built "
                          "from a config in transformers 5.24 has zero sin-cos position embeddings, and they "
                          "are not trained): it is loaded as it is", stacklevel=2)
    return sd
