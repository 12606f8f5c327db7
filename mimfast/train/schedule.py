"""Learning-rate schedules and optimizer parameter groups of the MAE, BEiT and SimMIM recipes."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["LR_SCHEDULES", "lr_at", "param_groups_weight_decay", "set_lr"]

LR_SCHEDULES = ("cosine", "multistep")


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float, *,
          schedule: str = "cosine", milestones=(), gamma: float = 0.1, warmup_lr: float = 0.0) -> float:
    """The learning rate at the fractional ``epoch`` (``step / steps_per_epoch``), evaluated per
    iteration: a linear warm-up from ``warmup_lr`` to ``lr`` over ``warmup_epochs``, then

    - ``schedule="cosine"``: facebookresearch/mae ``util/lr_sched.py``'s half-cycle cosine from
      ``lr`` to ``min_lr`` over the epochs after the warm-up (MAE, BEiT);
    - ``schedule="multistep"``: microsoft/SimMIM ``lr_scheduler.py``'s ``MultiStepLRScheduler``,
      ``lr * gamma ** (number of milestones <= epoch)``, the ``milestones`` in epochs (SimMIM's
      800-epoch ViT run: [700], gamma 0.1); ``min_lr`` and ``epochs`` play no part.

    ``warmup_lr`` 0 is MAE's and BEiT's warm-up from zero; SimMIM's (timm's ``warmup_lr_init``)
    starts from its WARMUP_LR. SimMIM counts in iterations (``int(WARMUP_EPOCHS * iters)``,
    milestones ``m * iters``), which at ``epoch = t / iters`` is this rule; its loop sets the lr
    after each optimizer step (``step_update(t)``), so its step t runs at the lr of t - 1, one
    iteration behind MAE's loop and ours. SimMIM's default ``cosine`` (timm's CosineLRScheduler)
    is not ``schedule="cosine"``: its cosine spans the whole run, warm-up included (``t / T``).
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if epoch < warmup_epochs:
        if warmup_lr == 0.0:
            return lr * epoch / warmup_epochs
        return warmup_lr + (lr - warmup_lr) * epoch / warmup_epochs
    if schedule == "multistep":
        return lr * gamma ** sum(1 for m in milestones if m <= epoch)
    if epochs <= warmup_epochs:
        return lr
    progress = min(1.0, (epoch - warmup_epochs) / (epochs - warmup_epochs))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's learning rate to ``lr`` times its ``lr_scale``; in place where it is a tensor
    (a captured step's, :func:`mimfast.train.cuda_graph.make_capturable`: the graph reads it from
    the device at each replay; no host synchronisation)."""
    for group in optimizer.param_groups:
        value = lr * group.get("lr_scale", 1.0)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


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
