"""Several processes on one job (``torchrun --nproc-per-node N -m adasmooth ...``): who am I, my share, gather.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them a run is one process and every function
here is a no-op. The process group uses NCCL when each rank has a CUDA device and gloo otherwise.
Work is split by example index, strided (rank r takes indices r, r + N, r + 2N, ...), so every rank
gets a similar mix of easy and hard examples; since each example's randomness is seeded from (seed,
example index), the split changes no outcome.

Training under torchrun (:func:`data_parallel`) wraps the trained module in DistributedDataParallel
after :func:`synchronise_batchnorm`: every batch-norm layer then normalises with the statistics of the
whole global batch (all ranks' shares), computed by one differentiable all-reduce of per-channel sums,
so N processes train the network that one process would. torch's own SyncBatchNorm runs on CUDA only;
this one runs on any device, gloo included.
"""

from __future__ import annotations

import datetime
import inspect
import os
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["Distributed", "init_distributed", "shard", "is_main_process", "finish_distributed", "SyncedBatchNorm",
           "synchronise_batchnorm", "batch_mean_std", "restore_batchnorm", "data_parallel", "unwrap"]


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

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of ``values`` over the ranks, on every rank (float64)."""
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t)
        return t.cpu().tolist()

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
        # Other ranks wait while rank 0 alone measures a trained model or writes results, which can
        # outlast the default 10-minute collective timeout of NCCL on a large model.
        torch.distributed.init_process_group("nccl" if use_nccl else "gloo", timeout=datetime.timedelta(hours=2))
    return Distributed(rank=rank, world_size=world, local_rank=local)


def is_main_process() -> bool:
    """False on every torchrun rank but 0 (e.g. to print a run's summary once)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def finish_distributed(success: bool = True) -> None:
    """Tear the process group down (a no-op without one). After a successful run every rank first
    waits for the others, then the process exits with status 0 at once (this does not return)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if success:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        if success:
            # Interpreter teardown after gloo has run sometimes ends in "terminate called without an
            # active exception" (SIGABRT), failing a finished run: leave without it, output flushed.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


def shard(indices: Sequence[int], dist: Distributed) -> list[int]:
    """This rank's share of ``indices``: every ``world_size``-th one, starting at its rank."""
    return list(indices[dist.rank :: dist.world_size])


# ---------------------------------------------------------------------------- training on several processes


class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over the ranks; the gradient of each rank's copy is the sum of the ranks'
    output gradients (every rank's loss depends on every rank's input through the sum)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        torch.distributed.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        torch.distributed.all_reduce(total)
        return total


class SyncedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training-mode statistics cover the global batch of every rank.

    Outside training mode, or without a process group of more than one rank, it is plain batch
    norm. State-dict keys and buffers are those of ``nn.BatchNorm*d``; the running variance gets the
    unbiased variance of the global batch, as one process's batch norm would record it.
    """

    def __init__(self, *args, original: type = nn.BatchNorm2d, **kwargs):
        super().__init__(*args, **kwargs)
        self.original = original

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"batch norm expects (N, C, ...) inputs, got shape {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1):
            return super().forward(input)
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        # Each rank's mean and variance by torch's stable reduction, combined in float64 (a few numbers
        # per channel): the global variance is the mean of (variance + squared mean) less the squared mean.
        local_var, local_mean = torch.var_mean(input, dim=dims, unbiased=False)
        count = input.numel() // max(channels, 1)
        local_mean, local_var = local_mean.double(), local_var.double()
        if count == 0:  # this rank holds no input (its statistics weigh nothing; var_mean gave NaN)
            local_mean, local_var = torch.zeros_like(local_mean), torch.zeros_like(local_var)
        weight = torch.full((1,), float(count), dtype=torch.float64, device=input.device)
        totals = _SumOverRanks.apply(torch.cat([count * local_mean, count * (local_var + local_mean * local_mean),
                                                weight]))
        n = totals[-1].detach()
        if float(n) < 2:
            raise ValueError(f"batch norm needs at least 2 values per channel over all ranks, got {int(n)}")
        mean = totals[:channels] / n
        var = (totals[channels:2 * channels] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                unbiased = var * n / (n - 1)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        shape = (1, channels, *([1] * (input.dim() - 2)))
        out = (input - mean.to(input.dtype).view(shape)) * torch.rsqrt(var + self.eps).to(input.dtype).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def _replace_batchnorm(module: nn.Module, make) -> nn.Module:
    replacement = make(module)
    for name, child in module.named_children():
        new = _replace_batchnorm(child, make)
        if new is not child:
            setattr(module, name, new)
    return replacement


def batch_mean_std(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased standard deviation of ``values`` (no gradient) over the global batch: every
    rank's values when a process group of several ranks is running (all must call), else these alone."""
    values = values.detach()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return values.mean(), values.std()
    flat = values.double().flatten()
    totals = torch.stack([flat.sum(), (flat * flat).sum(), torch.tensor(float(flat.numel()), dtype=torch.float64,
                                                                          device=flat.device)])
    torch.distributed.all_reduce(totals)
    total, squares, n = totals.unbind()
    mean = total / n
    var = ((squares - n * mean * mean) / (n - 1)).clamp_min(0)
    return mean.to(values.dtype), var.sqrt().to(values.dtype)


def _move_norm(source: nn.Module, target: nn.Module) -> nn.Module:
    """``target`` holding ``source``'s very parameter and buffer objects (an optimizer built on the
    model keeps training them) and its mode."""
    target._parameters.update(source._parameters)
    target._buffers.update(source._buffers)
    target.train(source.training)
    return target


def synchronise_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every ``nn.BatchNorm1d/2d/3d`` replaced by a :class:`SyncedBatchNorm` that holds
    its parameters and buffers (the same objects); in place for children, and the returned module is
    ``module`` unless it is a batch norm itself."""

    def make(m: nn.Module) -> nn.Module:
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) and not isinstance(m, SyncedBatchNorm):
            synced = SyncedBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                                     original=type(m))
            return _move_norm(m, synced)
        return m

    return _replace_batchnorm(module, make)


def restore_batchnorm(module: nn.Module) -> nn.Module:
    """Undo :func:`synchronise_batchnorm`: each :class:`SyncedBatchNorm` back to its original class."""

    def make(m: nn.Module) -> nn.Module:
        if isinstance(m, SyncedBatchNorm):
            plain = m.original(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
            return _move_norm(m, plain)
        return m

    return _replace_batchnorm(module, make)


def data_parallel(module: nn.Module, dist: Distributed, device: torch.device) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel (its batch norms synchronised) on a multi-process
    run; ``module`` itself otherwise. Buffers are not broadcast: synchronised batch norm keeps them
    equal on every rank."""
    if not dist.active:
        return module
    synchronise_batchnorm(module)
    ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    # buffers are equal on every rank already; newer torch names the switch differently
    quiet = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
             else {"broadcast_buffers": False})
    return ddp(module, device_ids=ids, **quiet)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (e.g. for attacks, which need no gradient sync)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
