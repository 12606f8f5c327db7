"""Checkpoints: written atomically (temporary file + rename), read with ``weights_only=True``."""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "find_last_checkpoint", "load_model_weights"]


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


def load_model_weights(path: str | os.PathLike) -> dict:
    """A model state_dict from a mimfast or official MAE checkpoint (``{'model': ...}``) or a
    bare state_dict. Official checkpoints also pickle an argparse Namespace, which the safe
    unpickler refuses; for those only the ``model`` entry is read, through an allow-list."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        import argparse

        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj["model"]
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise ValueError(f"{path}: neither a state_dict nor a checkpoint with a 'model' entry")
