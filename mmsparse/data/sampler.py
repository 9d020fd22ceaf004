"""A sampler that shards by rank, reshuffles per epoch, and resumes from a position.

Every rank draws the same permutation (seeded by seed + epoch), pads it to a multiple of
``num_replicas`` by wrapping around (or drops the tail with ``drop_last``), and takes every
``num_replicas``-th index from its ``rank``. ``state_dict()`` records the epoch and how many
indices this rank has consumed; after ``load_state_dict`` the iterator continues at that point
of the same permutation, so a resumed run sees exactly the samples the killed run had not.

The position counts what the *training loop* consumed. A DataLoader prefetches ahead of the
loop, so the loop should pass its own count: ``sampler.state_dict(consumed=batches * batch_size)``.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler


class ShardedSampler(Sampler[int]):
    """Indices of a dataset of size ``n`` for one rank. Shape legend: none (yields ints)."""

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        if n <= 0:
            raise ValueError(f"n must be > 0, got {n}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas=}, {rank=}")
        if drop_last and n < num_replicas:
            raise ValueError(f"drop_last with n={n} < num_replicas={num_replicas} leaves no samples")
        self.n, self.num_replicas, self.rank = n, num_replicas, rank
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self.position = 0  # indices of this epoch already consumed on this rank
        self.num_samples = n // num_replicas if drop_last else math.ceil(n / num_replicas)

    @classmethod
    def from_env(cls, n: int, **kw) -> "ShardedSampler":
        """Rank and world size from torch.distributed when initialised, else a single process."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            kw.setdefault("num_replicas", dist.get_world_size())
            kw.setdefault("rank", dist.get_rank())
        return cls(n, **kw)

    def indices(self) -> list[int]:
        """This rank's full index list for the current epoch."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.num_samples * self.num_replicas
        if total > len(order):
            order += (order * math.ceil(total / len(order)))[: total - len(order)]
        order = order[:total]
        return order[self.rank:total:self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        idx = self.indices()
        start = self.position
        for k in range(start, len(idx)):
            self.position = k + 1
            yield idx[k]
        # a finished epoch starts the next from its beginning unless set_epoch says otherwise
        self.position = 0

    def __len__(self) -> int:
        return self.num_samples - self.position

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.position = 0
        self.epoch = int(epoch)

    def state_dict(self, consumed: int | None = None) -> dict[str, int]:
        """{"epoch", "position", "seed", "n", "num_replicas"}; ``consumed`` overrides the position."""
        pos = self.position if consumed is None else int(consumed)
        return {"epoch": self.epoch, "position": pos, "seed": self.seed, "n": self.n,
                "num_replicas": self.num_replicas}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("n", self.n) != self.n or state.get("num_replicas", self.num_replicas) != self.num_replicas:
            raise ValueError(f"sampler state is for n={state.get('n')}, num_replicas={state.get('num_replicas')}; "
                             f"this sampler has n={self.n}, num_replicas={self.num_replicas}")
        pos = int(state["position"])
        if not 0 <= pos <= self.num_samples:
            raise ValueError(f"position must be in [0, {self.num_samples}], got {pos}")
        self.epoch, self.position = int(state["epoch"]), pos
        self.seed = int(state.get("seed", self.seed))
