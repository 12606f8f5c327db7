"""Learning-rate schedule and optimizer parameter groups of the MAE/BEiT recipes."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["lr_at", "param_groups_weight_decay", "set_lr"]


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """facebookresearch/mae ``util/lr_sched.py``: linear warm-up, then half-cycle cosine,
    evaluated per iteration at the fractional ``epoch`` (``step / steps_per_epoch``)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    if epochs <= warmup_epochs:
        return lr
    progress = min(1.0, (epoch - warmup_epochs) / (epochs - warmup_epochs))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def param_groups_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups by the official recipes' rule (timm's ``add_weight_decay`` /
    ``param_groups_weight_decay``, called by facebookresearch/mae and microsoft/unilm BEiT): no
    decay on 1-D parameters (norms), ``*.bias`` and the names the model's ``no_weight_decay()``
    lists (BEiT: ``pos_embed``, ``cls_token``); decay on everything else. So, as in the official
    runs, MAE decays its cls and mask tokens (its model lists nothing) and BEiT its mask token and
    relative position bias table. Frozen parameters (MAE's fixed position embeddings) are left out."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
