"""Deterministic, resumable assignment of preference pairs to ranks and steps.

The pairs form one endless stream: epoch ``e`` is a permutation of the training set seeded by
``(seed, e)``, and position ``p`` of the stream is pair ``perm_{p // n}[p % n]``. Every micro-step
consumes ``world_size × micro_batch_size`` consecutive positions, rank ``r`` taking its slice. The
position after ``s`` optimiser steps is therefore a pure function of ``s``: a resumed run continues
with exactly the next unseen pair, and no pair is skipped or repeated within an epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class PairSampler:
    num_pairs: int
    seed: int
    world_size: int
    rank: int
    micro_batch_size: int
    gradient_accumulation_steps: int = 1

    @property
    def pairs_per_step(self) -> int:
        """Pairs consumed by all ranks together in one optimiser step."""
        return self.world_size * self.micro_batch_size * self.gradient_accumulation_steps

    def position(self, step: int, micro_step: int = 0) -> int:
        """Stream position where (step, micro_step) starts, for all ranks together."""
        return step * self.pairs_per_step + micro_step * self.world_size * self.micro_batch_size

    def indices(self, step: int, micro_step: int) -> list[int]:
        """Indices into the training pairs for this rank at (step, micro_step)."""
        start = self.position(step, micro_step) + self.rank * self.micro_batch_size
        return [self.index_at(p) for p in range(start, start + self.micro_batch_size)]

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_pairs)
        return _permutation(self.num_pairs, self.seed, epoch)[offset]

    def epoch_of(self, step: int) -> float:
        return self.position(step) / self.num_pairs


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def shard_evenly(items: list, world_size: int, rank: int) -> list:
    """Rank's contiguous share of ``items`` (sizes differ by at most one); used for eval and precompute."""
    per, extra = divmod(len(items), world_size)
    start = rank * per + min(rank, extra)
    return items[start : start + per + (1 if rank < extra else 0)]
