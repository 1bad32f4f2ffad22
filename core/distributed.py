"""The process group of a training job: torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them a job is
one process. The device comes from the one device policy (``ddm.core.device``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ddm.core import device as device_policy


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # we created the process group, so we destroy it
    control_group: Any = None  # CPU (gloo) group for the per-step stop flag; None = the default group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_slice(self, global_batch: int) -> slice:
        """This rank's rows of a global batch (the batch divides by the world size)."""
        b = global_batch // self.world_size
        return slice(self.rank * b, (self.rank + 1) * b)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_distributed(spec: str = "auto") -> Distributed:
    """Join torchrun's process group (NCCL on CUDA, gloo on the CPU) and choose the device by ``spec``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = device_policy.resolve(spec, field="train.device")
    device_policy.configure(device)
    if world_size <= 1:
        return Distributed(0, 1, 0, device, owns_group=False)
    cuda = device.type == "cuda"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    # On GPUs the per-step stop flag goes through a CPU group so checking it never syncs the device.
    control = dist.new_group(backend="gloo") if cuda else None
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, device, owns, control)


def close_distributed(d: Distributed) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def any_rank(flag: bool, d: Distributed) -> bool:
    """Whether ``flag`` is set on any rank (ranks must agree on stopping, or one would wait forever)."""
    if d.world_size == 1:
        return flag
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=d.control_group)
    return bool(t.item())
