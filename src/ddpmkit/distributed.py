"""torchrun / DistributedDataParallel helpers, and nothing else.

Launched by `torchrun --nproc_per_node N -m ddpmkit train ...`, each process reads RANK,
WORLD_SIZE and LOCAL_RANK from torchrun's environment; without them everything is a no-op and
the world has one process.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn


class DistInfo(NamedTuple):
    rank: int
    world_size: int
    local_rank: int


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup() -> DistInfo:
    """Join the process group torchrun prepared (NCCL on GPU, gloo on CPU); returns this rank."""
    if launched_by_torchrun() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return info()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def info() -> DistInfo:
    if not dist.is_initialized():
        return DistInfo(0, 1, 0)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def device_for_rank(requested: str) -> torch.device:
    if requested == "cuda" and launched_by_torchrun():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(requested)


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel when in a process group, else the model itself."""
    if not dist.is_initialized():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def no_sync(net: nn.Module, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if isinstance(net, nn.parallel.DistributedDataParallel) and not last:
        return net.no_sync()
    return nullcontext()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean(value: torch.Tensor, device) -> torch.Tensor:
    """The mean of a scalar over ranks."""
    if not dist.is_initialized():
        return value
    value = value.detach().clone().to(device)
    dist.all_reduce(value)
    return value / dist.get_world_size()


def any_rank(flag: bool, device) -> bool:
    """True on every rank when it is true on any (so that all ranks stop at the same step)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
