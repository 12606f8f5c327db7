"""``--fsdp``: shard parameters, gradients and optimizer state across processes with
PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``), one unit per transformer block plus
the root, for models that do not fit one GPU with DDP (ViT-H and up). Checkpoints hold full,
unsharded state dicts, so they load with or without FSDP and into any world size.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["shard_model", "full_state_dicts", "load_full_state_dicts", "grad_scaler"]


def shard_model(model: nn.Module, device_type: str | None = None) -> nn.Module:
    """Make every transformer block and then the root an FSDP2 unit, over one mesh of all the
    processes on ``device_type`` (the run's device type: ``"cuda"`` with NCCL, ``"cpu"`` with
    gloo); by default the type of the model's parameters, which must already be on the run's
    device. The mesh is built here rather than left to ``fully_shard``: its default is a mesh on
    the machine's accelerator whatever the run's device, so a CPU (gloo) run on a machine with one
    GPU put rank r on ``cuda:r`` ('invalid device ordinal' from rank 1) and would have moved the
    model's shards to the GPU."""
    import torch.distributed as dist
    from timm.models.vision_transformer import Block
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from mimfast.models.beit import BEiTBlock

    if device_type is None:
        device_type = next(model.parameters(), torch.empty(0)).device.type
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    blocks = [m for m in model.modules() if isinstance(m, (Block, BEiTBlock)) or type(m).__name__ == "Block"]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
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
    set_optimizer_state_dict(model, optimizer, _keyed_by_name(model, optimizer, optim_sd), options=opts)


def _keyed_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, optim_sd: dict) -> dict:
    """An unsharded run's optimizer state dict (``torch.optim``'s, keyed by the parameters'
    positions in the param groups) keyed by parameter name, as the sharded runs save it and
    ``set_optimizer_state_dict`` reads it; one keyed by name already is returned as it is."""
    positions = [i for g in optim_sd["param_groups"] for i in g["params"]]
    if not all(isinstance(i, int) for i in positions):
        return optim_sd
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    if len(order) != len(positions):
        raise ValueError(f"the checkpoint's optimizer holds {len(positions)} parameters, this one {len(order)}")
    return {"state": {order[i]: v for i, v in optim_sd["state"].items()},
            "param_groups": [dict(g, params=[order[i] for i in g["params"]]) for g in optim_sd["param_groups"]]}


def grad_scaler(device_type: str, enabled: bool, sharded: bool) -> torch.amp.GradScaler:
    """fp16's loss scaler. Sharded, each rank checks only its gradient shards for inf/nan:
    FSDP's scaler all-reduces that check in ``unscale_``, so all ranks skip the same steps and
    keep one scale (the caller must call ``unscale_`` before ``step``)."""
    if not sharded:
        return torch.amp.GradScaler(device_type, enabled=enabled)
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    return ShardedGradScaler(device_type, enabled=enabled)
