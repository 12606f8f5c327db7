"""``load_pretrained_model`` reads its file once, for the weights and the config both: a mimfast
``.pth`` checkpoint is unpickled by one ``torch.load``, a ``.safetensors`` file is opened once."""

from __future__ import annotations

import safetensors
import safetensors.torch
import torch

from mimfast.models import create_model
from mimfast.train.pretrained import load_pretrained_model

MAE = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, decoder_embed_dim=32, decoder_depth=1,
           decoder_num_heads=4)


def _counting(fn, calls: list):
    def wrapper(*args, **kwargs):
        calls.append(args[0] if args else kwargs)
        return fn(*args, **kwargs)

    return wrapper


def test_a_pth_checkpoint_is_loaded_once(tmp_path, monkeypatch):
    torch.manual_seed(0)
    mae = create_model("mae_vit_tiny_patch16", **MAE, kernels="eager")
    config = dict(method="mae", model="mae_vit_tiny_patch16", img_size=32, patch_size=8,
                  model_kwargs={k: v for k, v in MAE.items() if k not in ("img_size", "patch_size")})
    torch.save({"model": mae.state_dict(), "config": config, "epoch": 1}, tmp_path / "checkpoint-1.pth")
    calls = []
    monkeypatch.setattr(torch, "load", _counting(torch.load, calls))
    loaded = load_pretrained_model(tmp_path / "checkpoint-1.pth", kernels="eager")  # no model name: the config's
    assert len(calls) == 1, calls
    for k, v in mae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_a_safetensors_file_is_opened_once(tmp_path, monkeypatch):
    torch.manual_seed(0)
    mae = create_model("mae_vit_tiny_patch16", kernels="eager")  # the named model's own sizes: no config needed
    safetensors.torch.save_file({k: v.contiguous() for k, v in mae.state_dict().items()},
                                str(tmp_path / "mae.safetensors"))
    calls = []
    monkeypatch.setattr(safetensors.torch, "load_file", _counting(safetensors.torch.load_file, calls))
    monkeypatch.setattr(safetensors, "safe_open", _counting(safetensors.safe_open, calls))
    loaded = load_pretrained_model(tmp_path / "mae.safetensors", "mae_vit_tiny_patch16", kernels="eager")
    assert len(calls) == 1, calls
    for k, v in mae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0, msg=k)
