"""torchrun / DistributedDataParallel helpers, and nothing else.

Launched by `torchrun --nproc_per_node N -m ddpmkit train ...` (or `ddpmkit train --nproc N`,
which runs that command), each process reads RANK, WORLD_SIZE and LOCAL_RANK from torchrun's
environment; without them everything is a no-op and the world has one process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import nullcontext
from typing import NamedTuple, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ddpmkit.errors import DdpmkitError

T = TypeVar("T")


class DistInfo(NamedTuple):
    rank: int
    world_size: int
    local_rank: int


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(cuda: bool | None = None) -> DistInfo:
    """Join the process group torchrun prepared (NCCL for GPUs, gloo for CPUs); returns this rank.

    `cuda`: whether training runs on GPUs (default: whether there are any)."""
    if launched_by_torchrun() and not dist.is_initialized():
        backend = "nccl" if (torch.cuda.is_available() if cuda is None else cuda) else "gloo"
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


def rank_slice(k: int, micro: int, world: DistInfo) -> slice:
    """This rank's part of micro-batch k of a global batch: micro-batch k is ranks 0..W-1 in turn."""
    start = (k * world.world_size + world.rank) * micro
    return slice(start, start + micro)


class RankBatchSampler(torch.utils.data.Sampler):
    """A DataLoader batch sampler: this rank's micro-batches for steps start, start + 1, ... (endless).

    `global_indices(step)` gives the dataset indices of step's global batch (micro x world x accum);
    the rank takes the same slices as the in-memory path, so both see identical examples.
    """

    def __init__(
        self, global_indices: Callable[[int], torch.Tensor], micro: int, accum: int, start_step: int, world: DistInfo
    ):
        self.global_indices, self.micro, self.accum = global_indices, micro, accum
        self.start_step, self.world = start_step, world

    def __iter__(self):
        step = self.start_step
        while True:
            idx = self.global_indices(step)
            for k in range(self.accum):
                yield idx[rank_slice(k, self.micro, self.world)].tolist()
            step += 1


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


def _run_where(here: bool, fn: Callable[[], T], device) -> T | None:
    """fn() on the ranks where `here` holds; if it fails on any of them, every rank raises."""
    result, error = None, None
    if here:
        try:
            result = fn()
        except Exception as e:  # shared with the other ranks below, then re-raised here
            error = e
    if any_rank(error is not None, device):  # also the barrier where the other ranks wait
        if error is not None:
            raise error
        raise DdpmkitError("another rank failed (its error is printed above); stopping this rank too")
    return result


def on_rank_zero(fn: Callable[[], T], device) -> T | None:
    """Run fn on rank 0 only; if it fails there, every rank raises (instead of waiting forever)."""
    return _run_where(info().rank == 0, fn, device)


def rank_zero_first(fn: Callable[[], T], device) -> T:
    """Run fn on rank 0, then on the first process of each other machine, then on the rest.

    For downloads: with a shared cache, rank 0 fetches and everyone else finds the file; with
    caches local to each machine, each machine fetches once.
    """
    me = info()
    first = _run_where(me.rank == 0, fn, device)
    machine_first = _run_where(me.rank != 0 and me.local_rank == 0, fn, device)
    rest = _run_where(me.local_rank != 0, fn, device)
    return first if me.rank == 0 else machine_first if me.local_rank == 0 else rest


def torchrun_command(nproc: int, module_args: list[str]) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc_per_node N -m ddpmkit ARGS` (one machine)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "ddpmkit",
        *module_args,
    ]


def without_option(argv: list[str], option: str) -> list[str]:
    """argv without `option VALUE` or `option=VALUE`, nor argparse's abbreviations of option (4+ chars)."""
    out, skip_value = [], False
    for arg in argv:
        name = arg.split("=", 1)[0]
        if skip_value:
            skip_value = False
        elif len(name) >= 4 and option.startswith(name):
            skip_value = "=" not in arg
        else:
            out.append(arg)
    return out


def relaunch(nproc: int, module_args: list[str]) -> int:
    """Run `ddpmkit ARGS` in nproc processes through torchrun; returns torchrun's exit status."""
    if nproc < 1:
        raise DdpmkitError(f"--nproc must be >= 1, got {nproc}")
    if launched_by_torchrun():
        raise DdpmkitError("--nproc starts torchrun itself; do not combine it with torchrun")
    with subprocess.Popen(torchrun_command(nproc, module_args)) as proc:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:  # the workers got the same Ctrl-C: let them save and exit
                continue
