"""Batches of a data set through ``torch.utils.data.DataLoader``: seeded per epoch, resumable mid-epoch.

The order of epoch ``e`` is a permutation drawn from (seed, e) alone, so batch ``k`` of epoch ``e`` is
the same whether the run started at epoch 0 or resumed at (e, k). Each batch is fetched as a whole
(the sampler yields lists of indices), by the main process or by ``workers`` worker processes, and
arrives in order. The data set only has to offer ``len(data)`` and
``data.load(indices, augment=, seed=, epoch=) -> (x, y)`` (in-memory sets slice tensors, image folders
decode files), and augmentation is seeded per example (:mod:`.augment`): batches are the same for any
number of workers.

``shard=(rank, world_size)`` is the distributed sampler of a torchrun training run: every rank walks
the same (seed, epoch) order and takes the rows ``rank, rank + world_size, ...`` of each global
batch, so N processes together see exactly the batches one process would. A final batch with fewer
examples than processes is left out (some rank would get none).
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from ..core.errors import ConfigError
from .augment import check_augmentation, derived_seed

__all__ = ["epoch_permutation", "batches_per_epoch", "EpochBatchSampler", "stream_batches"]


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch ``epoch``: a permutation of range(n) that depends on (seed, epoch) only."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(seed, epoch)))


def batches_per_epoch(n: int, batch_size: int, drop_last: bool = False, world_size: int = 1) -> int:
    """Batches in an epoch of ``n`` examples; with several processes a last batch smaller than their
    number is left out (some rank would get none of it)."""
    total = n // batch_size if drop_last else math.ceil(n / batch_size)
    if total and world_size > 1 and n - (total - 1) * batch_size < world_size:
        total -= 1
    return total


class EpochBatchSampler(Sampler):
    """Index lists of the batches ``start_batch, start_batch + 1, ...`` of one epoch."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, epoch: int = 0, *, shuffle: bool = True,
                 start_batch: int = 0, drop_last: bool = False, shard: tuple[int, int] = (0, 1)):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        rank, world = shard
        if not 0 <= rank < world:
            raise ConfigError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
        self.rank, self.world = int(rank), int(world)
        self.n, self.batch_size, self.drop_last = int(n), int(batch_size), drop_last
        self.order = epoch_permutation(self.n, seed, epoch) if shuffle else torch.arange(self.n)
        total = batches_per_epoch(self.n, self.batch_size, drop_last, self.world)
        if not 0 <= start_batch <= total:
            raise ConfigError(f"start_batch must lie in [0, {total}] (batches of this epoch), got {start_batch}")
        self.start_batch, self.total = int(start_batch), total

    def __len__(self) -> int:
        return self.total - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.start_batch, self.total):
            yield self.order[b * self.batch_size:(b + 1) * self.batch_size][self.rank::self.world].tolist()


class _BatchFetcher(torch.utils.data.Dataset):
    """What the DataLoader indexes: one whole batch per index list (also inside worker processes)."""

    def __init__(self, data: Any, augment: str, seed: int, epoch: int):
        self.data, self.augment, self.seed, self.epoch = data, augment, seed, epoch

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        x, y = self.data.load(idx, augment=self.augment, seed=self.seed, epoch=self.epoch)
        return x, y, idx


def stream_batches(
    data: Any,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    start_batch: int = 0,
    workers: int = 0,
    augment: str = "none",
    drop_last: bool = False,
    pin_memory: bool = False,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(x, y, idx)`` for the batches ``start_batch, ...`` of epoch ``epoch`` of ``data`` (CPU tensors;
    ``idx`` are the examples' indices in ``data``)."""
    if workers < 0:
        raise ConfigError(f"workers must be >= 0, got {workers}")
    sampler = EpochBatchSampler(len(data), batch_size, seed, epoch, shuffle=shuffle, start_batch=start_batch,
                                drop_last=drop_last, shard=shard)
    loader = DataLoader(
        _BatchFetcher(data, check_augmentation(augment), seed, epoch), batch_size=None, sampler=sampler,
        num_workers=workers, pin_memory=pin_memory,
        # The loader draws a base seed for its workers; from its own generator, it leaves the global
        # one (noise, attack starts) untouched, so a resumed run draws what an uninterrupted one did.
        generator=torch.Generator().manual_seed(derived_seed(seed, epoch)),
        persistent_workers=False,
    )
    yield from loader
