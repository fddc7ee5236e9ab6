"""torchrun support: process group from the environment, rank-0-only side effects, batch slicing.

Every process draws the same *global* batch (same seeded generators) and keeps the rows
`rank::world_size`; DistributedDataParallel averages the gradients. With equal local batches this
is exactly one process training on the global batch, which the tests check.
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
    """Mean of a tensor over processes (for logging)."""
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
