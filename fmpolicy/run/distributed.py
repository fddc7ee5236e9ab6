"""torchrun support for both trainers: process group from the environment, rank-0-only side effects,
batch slicing, the collectives the RL update needs.

Imitation: every process draws the same *global* batch (same seeded generators) and keeps the rows
`rank::world_size`; DistributedDataParallel averages the gradients. With equal local batches this
is exactly one process training on the global batch, which the tests check.

RL: every process collects its own rollouts (its own envs and noise); the update averages the
gradients (`average_gradients`) and standardises advantages over all processes (`global_mean_std`),
so that a step equals one process's on the union of the processes' minibatches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fmpolicy.config import resolve_device
from fmpolicy.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> DistInfo:
    """Join the process group that torchrun describes in the environment (NCCL on CUDA, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo(device=resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def local_rows(global_batch_size: int, info: DistInfo) -> slice:
    """This process's rows of a global batch: rank, rank + world, ..."""
    if global_batch_size % info.world_size:
        raise ConfigError(f"train.batch_size = {global_batch_size} is invalid: expected a multiple of the "
                          f"{info.world_size} processes")
    return slice(info.rank, None, info.world_size)


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a tensor over processes (for logging, and for the KL that adapts the lr or stops the epochs:
    every process must decide alike)."""
    if info.enabled:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= info.world_size
    return value


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait until every process reaches this point (a no-op in a single process)."""
    if info.enabled and dist.is_initialized():
        dist.barrier()


def average_gradients(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Average `.grad` over processes (a missing gradient counts as zeros, on every process alike)."""
    if not info.enabled:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= info.world_size


def reduce_max(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The largest value of a scalar tensor over processes."""
    if info.enabled:
        value = value.detach().clone().float()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def all_finite(value: torch.Tensor, info: DistInfo) -> bool:
    """True when `value` is finite in every process (so that all stop together when one is not)."""
    ok = torch.isfinite(value.detach()).all().float()
    if info.enabled:
        ok = ok.clone()
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok > 0)


def global_mean_std(x: torch.Tensor, info: DistInfo) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean, unbiased std and count of the rows of `x` (n,) over all processes."""
    if not info.enabled:
        return x.mean(), x.std(), x.numel()
    stats = torch.stack([x.sum(), (x * x).sum(), torch.tensor(float(x.numel()), device=x.device)]).double()
    dist.all_reduce(stats)
    total, squares, n = stats
    mean = total / n
    var = (squares - n * mean * mean) / (n - 1).clamp_min(1)
    return mean.to(x.dtype), var.clamp_min(0).sqrt().to(x.dtype), int(n)


def gather_objects(obj, info: DistInfo) -> list:
    """Every process's `obj` (picklable), in rank order, on every process."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
