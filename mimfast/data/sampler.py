"""A resumable, distributed-aware sampler.

Each epoch's order is a permutation drawn from ``(seed, epoch)`` (DistributedSampler's
rule: pad to a multiple of the world size, rank r takes every world-th index from r), and
iteration can start part-way through an epoch, so a run resumed mid-epoch sees exactly the
samples an uninterrupted run would have seen next.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableSampler"]


class ResumableSampler(Sampler[int]):
    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 with_epoch: bool = False):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.with_epoch = with_epoch  # yield (epoch, index) so datasets can seed per epoch
        self.per_rank = math.ceil(num_samples / world_size)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch ``epoch`` from this rank's ``start``-th sample on."""
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"start must be in [0, {self.per_rank}], got {start}")
        self.epoch = epoch
        self.start = start

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        total = self.per_rank * self.world_size
        order += order[: total - len(order)]  # pad so every rank gets the same count
        return order[self.rank:total:self.world_size]

    def __iter__(self):
        todo = self.indices()[self.start:]
        if self.with_epoch:
            return iter([(self.epoch, i) for i in todo])
        return iter(todo)

    def __len__(self) -> int:
        return self.per_rank - self.start
