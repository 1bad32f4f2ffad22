"""What makes training deterministic by construction, so resuming needs only the step number.

* the data order is a permutation per epoch drawn from a generator seeded by (seed, epoch), and the
  global batch of step s is a fixed slice of it (``BatchOrder``);
* the step's randomness (noise, times, label dropout...) comes from a generator seeded by
  (seed, "step", s) (``step_generator``), drawn for the *global* batch, and each rank takes its slice.
  Drawing globally costs one randn over the global batch per rank - negligible next to the forward
  pass - and makes a run independent of the world size: N ranks reproduce 1 process to float
  reduction order, and a job may resume on a different number of processes;
* the batches reach the loop through a DataLoader whose sampler (``StepBatches``) yields exactly
  ``BatchOrder``'s indices of steps start+1, start+2, ..., so workers and prefetching change when a
  batch is read, never which;
* the learning rate is a pure function of the step (``lr_at``): linear warm-up then constant (no
  cosine decay: experts are often extended, and a constant tail keeps a resumed, extended run
  identical to a longer one).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from ddm.core.config import TrainConfig


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from a tuple such as (seed, "step", 17); independent streams per tag."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator every rank draws step ``step``'s global-batch randomness from."""
    return torch.Generator().manual_seed(derive_seed(seed, "step", step))


class BatchOrder:
    """Global batch indices for each step: epoch e is a permutation seeded by (seed, e); step s
    (1-based) takes the next ``batch_size`` slice. The last partial batch of an epoch is dropped."""

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        if num_examples < batch_size:
            raise ValueError(
                f"the dataset has {num_examples} examples but train.batch_size is {batch_size}; "
                "lower train.batch_size or raise data.limit"
            )
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.steps_per_epoch = num_examples // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step - 1, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "data", epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.num_examples, generator=g)
        return self._perm[i * self.batch_size : (i + 1) * self.batch_size]  # (B,)


class StepBatches(Sampler[torch.Tensor]):
    """This rank's rows of the global batch indices of steps ``start + 1 .. steps``, in order: a
    DataLoader sampler (with ``batch_size=None``, each element is one step's index tensor). Resuming at
    step s is ``start = s``; the order itself never depends on where a run started."""

    def __init__(self, order: BatchOrder, start: int, steps: int, rows: slice = slice(None)):
        self.order, self.start, self.steps, self.rows = order, start, steps, rows

    def __len__(self) -> int:
        return max(self.steps - self.start, 0)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for step in range(self.start + 1, self.steps + 1):
            yield self.order.indices(step)[self.rows]  # (b,)


def lr_at(step: int, train: TrainConfig) -> float:
    """Linear warm-up from lr/warmup_steps at step 1 to lr at step warmup_steps, then constant."""
    if train.warmup_steps > 0 and step < train.warmup_steps:
        return train.lr * step / train.warmup_steps
    return train.lr
