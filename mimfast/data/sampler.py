"""A resumable, distributed-aware sampler.

Each epoch's order is a permutation drawn from ``(seed, epoch)`` (DistributedSampler's
rule: pad to a multiple of the world size, rank r takes every world-th index from r), and
iteration can start part-way through an epoch, so a run resumed mid-epoch sees exactly the
samples an uninterrupted run would have seen next.

An epoch position is also meaningful across layouts: rank r takes ``order[r::world_size]``,
so once every rank has consumed ``s`` samples the consumed set is ``order[:world_size * s]``
(the padded order is the same for every world size: position ``p`` past the end is
``order[p % num_samples]``, as DistributedSampler repeats the order when the padding is
longer than the dataset). ``position`` gives that global count and ``start_for`` turns it
back into a per-rank start for any world size.
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

    def position(self, start: int | None = None) -> int:
        """Samples of the epoch's global order consumed once every rank consumed ``start``
        (default: this sampler's start)."""
        return (self.start if start is None else start) * self.world_size

    def start_for(self, position: int, multiple: int = 1) -> int:
        """The per-rank start in this layout of a global epoch position (from ``position``, in
        any layout): rounded down to a whole number of samples per rank, then to a multiple of
        ``multiple`` (a batch, an optimizer step), and capped at the epoch's end. Nothing is
        skipped; at most ``world_size * multiple - 1`` samples of ``order[:position]`` come again."""
        if position < 0 or multiple <= 0:
            raise ValueError(f"need position >= 0 and multiple > 0, got {position} and {multiple}")
        start = min(position // self.world_size, self.per_rank)
        return start - start % multiple

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed((self.seed * 1_000_003 + self.epoch) % 2**64)  # any seed torch accepts
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        total = self.per_rank * self.world_size
        order += [order[p % self.num_samples] for p in range(self.num_samples, total)]  # every rank: per_rank
        return order[self.rank:total:self.world_size]

    def __iter__(self):
        todo = self.indices()[self.start:]
        if self.with_epoch:
            return iter([(self.epoch, i) for i in todo])
        return iter(todo)

    def __len__(self) -> int:
        return self.per_rank - self.start
