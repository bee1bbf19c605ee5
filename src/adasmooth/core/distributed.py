"""Several processes on one job (``torchrun --nproc-per-node N -m adasmooth ...``): who am I, my share, gather.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them a run is one process and every function
here is a no-op. The process group uses NCCL when each rank has a CUDA device and gloo otherwise.
Work is split by example index, strided (rank r takes indices r, r + N, r + 2N, ...), so every rank
gets a similar mix of easy and hard examples; since each example's randomness is seeded from (seed,
example index), the split changes no outcome.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .errors import ConfigError

__all__ = ["Distributed", "init_distributed", "shard"]


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (a list in rank order); None on the other ranks."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def device(self, requested: str) -> str:
        """One device per rank: ``cuda`` (or ``auto`` on a CUDA machine) becomes ``cuda:<local rank>``."""
        if self.active and (requested == "cuda" or (requested == "auto" and torch.cuda.is_available())):
            return f"cuda:{self.local_rank}"
        return requested


def init_distributed(device: str = "auto") -> Distributed:
    """The process group of a torchrun launch (created once), or a single-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    try:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    except (KeyError, ValueError) as err:
        raise ConfigError(f"WORLD_SIZE={world} but RANK/LOCAL_RANK are not set: start the run with torchrun") from err
    if not torch.distributed.is_initialized():
        use_nccl = device != "cpu" and torch.cuda.is_available()
        if use_nccl:
            torch.cuda.set_device(local)
        torch.distributed.init_process_group("nccl" if use_nccl else "gloo")
    return Distributed(rank=rank, world_size=world, local_rank=local)


def shard(indices: Sequence[int], dist: Distributed) -> list[int]:
    """This rank's share of ``indices``: every ``world_size``-th one, starting at its rank."""
    return list(indices[dist.rank :: dist.world_size])
