"""The training loop's data path: one DataLoader per run that reads each step's batch, in step order.

The sampler (``ddm.core.schedule.StepBatches``) yields each step's index tensor, the dataset
(``StepData``) turns it into that step's batch with the data's own ``batch_uint8``, and workers read
ahead (``train.loader_workers`` x ``train.loader_prefetch`` batches) while the model trains. The
DataLoader keeps its output in sampler order whatever the number of workers, so the batches - and the
numerics - are those of a loop that indexed the data itself. Its seed generator is private, so building
the loader never advances torch's global RNG.

Workers run in their own process group: Ctrl-C, or a scheduler that signals the job's whole process
group, would otherwise reach them too, and a worker killed by it makes the DataLoader raise in the middle
of the step and the checkpoint the training process is finishing (its ``StopSignal``). They still die of
a signal sent to them (the loader's own shutdown, which terminates stragglers) - ignoring SIGTERM instead
would hang the interpreter's exit, which terminates and joins leftover workers - and exit by themselves
when the training process is gone (torch's worker watchdog).

Data held in memory (``ImageDataset``, or any data without ``in_memory = False``) is indexed in the
training process: workers would only copy what is already resident. Streamed partitions
(``ddm.expert.stream``) get the workers.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from ddm.core.schedule import StepBatches


class Batched(Protocol):
    def __len__(self) -> int: ...
    def batch_uint8(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]: ...


class StepData(Dataset):
    """``dataset[index]`` = ``data.batch_uint8(index)``: one whole batch per sampler element."""

    def __init__(self, data: Batched):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.data.batch_uint8(index)


def _unchanged(batch: Any) -> Any:
    return batch


def _own_process_group(worker_id: int) -> None:
    os.setpgid(0, 0)  # signals to the job's group reach the training process, which stops the workers


def workers_for(data: object, workers: int) -> int:
    """``workers`` for streamed data, 0 for data already in memory."""
    return workers if getattr(data, "in_memory", True) is False else 0


def step_loader(
    data: Batched, batches: StepBatches, *, workers: int, prefetch: int, pin_memory: bool = False
) -> DataLoader:
    """A DataLoader yielding ``data.batch_uint8`` of each index tensor ``batches`` yields, in order."""
    workers = workers_for(data, workers)
    return DataLoader(
        StepData(data),
        sampler=batches,
        batch_size=None,  # each sampler element is already a batch of indices
        collate_fn=_unchanged,
        num_workers=workers,
        prefetch_factor=prefetch if workers else None,
        pin_memory=pin_memory,
        worker_init_fn=_own_process_group if workers else None,
        generator=torch.Generator().manual_seed(0),  # the workers' base seed; never the global RNG
    )
