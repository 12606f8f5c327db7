"""``--fsdp``: shard parameters, gradients and optimizer state across processes with
PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``), one unit per transformer block plus
the root, for models that do not fit one GPU with DDP (ViT-H and up). Checkpoints hold full,
unsharded state dicts, so they load with or without FSDP and into any world size.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["shard_model", "full_state_dicts", "load_full_state_dicts"]


def shard_model(model: nn.Module) -> nn.Module:
    from timm.models.vision_transformer import Block
    from torch.distributed.fsdp import fully_shard

    blocks = [m for m in model.modules() if isinstance(m, Block) or type(m).__name__ == "Block"]
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> tuple[dict, dict]:
    """(model, optimizer) state dicts, full and on the CPU; a collective call when sharded."""
    if not sharded:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict,
                          sharded: bool) -> None:
    if not sharded:
        model.load_state_dict(model_sd)
        optimizer.load_state_dict(optim_sd)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=opts)
    set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
