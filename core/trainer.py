"""The one training loop: experts, the router and the student are short specialisations of ``Trainer``.

The loop owns everything a job does besides its objective: distributed setup and the device policy,
the deterministic data order and per-step randomness (``ddm.core.schedule``), the learning-rate
schedule, EMA, precision, parallelism (DDP or FSDP2, ``ddm.core.parallel``), optional
``torch.compile``, gradient clipping, checkpoint and resume, the stop signal, the heartbeat, the
metrics log and the progress bar. A specialisation names only its data, its model, its loss for one
step's batch, extra checkpoint metadata and, optionally, a periodic evaluation (torchtitan's
``Trainer`` and its flux subclass; DiT's ``training_losses`` as the one objective call).

Read top to bottom: the result, the stop signal, step statistics, then the ``Trainer`` with its
specialisation points first and the loop last.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Sized
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ddm.core import checkpoint, parallel
from ddm.core import device as device_policy
from ddm.core.checkpointer import Checkpointer
from ddm.core.config import JobConfig, TrainConfig
from ddm.core.distributed import Distributed, any_rank, close_distributed, init_distributed
from ddm.core.ema import EMA
from ddm.core.heartbeat import Heartbeat
from ddm.core.loader import step_loader
from ddm.core.metrics_log import MetricsLog
from ddm.core.progress import progress_bar
from ddm.core.schedule import BatchOrder, StepBatches, lr_at, step_generator


@dataclass
class TrainResult:
    step: int  # the last step trained (== train.steps when the job is complete)
    final_loss: float  # loss of the last step (global batch mean); nan if no step ran and none was recorded
    checkpoint_url: str | None  # the checkpoint holding ``step``
    seconds: float  # wall time of this invocation's training loop (incl. checkpoint writes)
    images_seen: int  # images trained on by this invocation (steps run x global batch)
    losses: list[float] = field(default_factory=list)  # per-step loss of the steps this invocation ran
    interrupted: bool = False  # stopped early (signal or stop_after) after saving a checkpoint
    evaluation: dict[str, Any] | None = None  # the specialisation's last evaluation report, if one ran


# ----------------------------------------------------------------------------------------------------
# Stopping on SIGTERM / SIGINT (TorchX cancel, Kubernetes eviction, Ctrl-C).


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps, so the current step finishes
    and a checkpoint is written. A second signal restores the previous handler and re-raises it."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            self._restore()
            signal.raise_signal(signum)
            return
        self.signum = signum

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __exit__(self, *exc: object) -> None:
        self._restore()

    @property
    def requested(self) -> bool:
        return self.signum is not None


# ----------------------------------------------------------------------------------------------------
# Step statistics for the metrics rows.


class StepStats:
    """Per-step loss and gradient norm, kept as tensors until a metrics row is due, so the loop syncs
    (``.tolist()``, and the cross-rank all-reduce) once per row rather than once per step."""

    def __init__(self, d: Distributed, batch_size: int):
        self.d, self.batch_size = d, batch_size
        self.losses: list[float] = []  # global-batch loss of every step reported so far
        self._loss: list[torch.Tensor] = []
        self._norm: list[torch.Tensor] = []
        self._t_row = time.perf_counter()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self._loss.append(loss)
        self._norm.append(
            grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
        )  # FSDP: a DTensor

    def row(self, step: int, lr: float, *, elapsed_s: float) -> dict[str, float]:
        """A metrics row averaging the steps since the previous row. Collective: every rank calls it."""
        step_losses = torch.stack(self._loss)  # (k,)
        if self.d.world_size > 1:  # each rank has the mean over its equal share; average the shares
            dist.all_reduce(step_losses)
            step_losses /= self.d.world_size
        values = step_losses.tolist()
        grad_norm = torch.stack(self._norm).mean().item()  # identical on every rank after the all-reduce
        now = time.perf_counter()
        row = dict(
            step=step,
            loss=sum(values) / len(values),
            lr=lr,
            grad_norm=grad_norm,
            images_per_s=len(values) * self.batch_size / max(now - self._t_row, 1e-9),
            elapsed_s=elapsed_s,
        )
        self.losses.extend(values)
        self._loss.clear()
        self._norm.clear()
        self._t_row = now
        return row


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        model.parameters(),
        lr=lr_at(1, train),
        betas=(train.beta1, train.beta2),
        weight_decay=train.weight_decay,
    )


def seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``build()`` initialised from ``seed`` without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


# ----------------------------------------------------------------------------------------------------
# The trainer.

J = TypeVar("J", bound=JobConfig)


class Trainer(Generic[J]):
    """Train ``job`` to ``job.train.steps``, resuming from the newest checkpoint when ``resume``.

    ``stop_after=N`` stops after step N as a signal would (checkpoint, ``interrupted=True``).
    ``on_step(step)`` is called after every step on every rank (benchmarks, tests). Under torchrun
    (WORLD_SIZE > 1) it runs data-parallel (``train.parallelism``); only rank 0 writes files.
    """

    kind: ClassVar[str]  # the checkpoint kind: "expert", "router", "student"
    loss_label: ClassVar[str] = "loss"  # the metrics plot's y axis

    def __init__(
        self,
        job: J,
        *,
        resume: bool = True,
        stop_after: int | None = None,
        progress: bool = True,
        on_step: Callable[[int], None] | None = None,
    ):
        self.job, self.tc = job, job.train
        self.resume, self.stop_after, self.progress, self.on_step = resume, stop_after, progress, on_step

    # --- what a specialisation names ----------------------------------------------------------------

    def build_data(self) -> Sized:
        """The training examples: ``len(data)`` and ``data.batch_uint8(index) -> tuple of tensors`` (the
        step's batch, read by the DataLoader of ``ddm.core.loader``; streamed data through its workers)."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        """The network on the CPU, initialised from ``train.seed`` (see ``seeded``); it has ``.config``."""
        raise NotImplementedError

    def loss(self, step: int, batch: tuple[torch.Tensor, ...], gen: torch.Generator) -> torch.Tensor:
        """The scalar objective of ``batch``, this rank's rows of step ``step``'s global batch (what
        ``data.batch_uint8`` returned for them, still on the host).

        ``gen`` is the step's generator: draw the *global* batch's randomness from it (shapes with
        ``train.batch_size`` rows) and take ``self.rows`` of it, so every world size trains alike."""
        raise NotImplementedError

    @property
    def arch(self) -> str:
        return self.job.model.arch

    def checkpoint_meta(self) -> dict[str, Any]:
        """Extra metadata for every checkpoint (partitions, class names, teachers...)."""
        return {}

    def eval_due(self, step: int) -> bool:
        """Whether to evaluate after ``step`` (the final step always evaluates when ``evaluate`` does)."""
        return False

    def evaluate(self, step: int) -> dict[str, Any] | None:
        """A periodic evaluation, run on every rank (the EMA may be sharded); write files only on rank 0."""
        return None

    def restored(self, step: int) -> None:
        """Called once the start step is known (0 on a fresh start)."""

    def finished_before(self, step: int) -> dict[str, Any] | None:
        """A job already complete at ``step``: anything left to do (e.g. a missing final evaluation)."""
        return None

    def summary(self, result: TrainResult) -> str:
        """The line the entry point prints when the job ends."""
        return (
            f"{self.job.name}: step {result.step}, loss {result.final_loss:.4f}, "
            f"{result.images_seen / max(result.seconds, 1e-9):.1f} img/s, checkpoint {result.checkpoint_url}"
        )

    # --- helpers for specialisations -------------------------------------------------------------

    def autocast(self) -> AbstractContextManager[object]:
        return device_policy.autocast(self.precision, self.device)

    def to_device(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(device_policy.to_device(t, self.device) for t in tensors)

    # --- the loop --------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        self.d = init_distributed(self.tc.device)
        self.device = self.d.device
        threads = torch.get_num_threads()
        if self.tc.num_threads:
            torch.set_num_threads(self.tc.num_threads)
        try:
            return self._run()
        finally:
            torch.set_num_threads(threads)
            close_distributed(self.d)

    def _setup(self) -> None:
        tc, d = self.tc, self.d
        if tc.batch_size % d.world_size:
            raise ValueError(
                f"train.batch_size {tc.batch_size} does not divide by the {d.world_size} torchrun processes; "
                "choose a batch size that is a multiple of the number of processes"
            )
        self.rows = d.local_slice(tc.batch_size)  # this rank's slice of the global batch
        self.precision = device_policy.precision_for(tc.precision, self.device)
        self.sharded = tc.parallelism == "fsdp" and d.world_size > 1
        self.data = self.build_data()
        model = self.build_model()
        n_params = sum(p.numel() for p in model.parameters())
        device_policy.announce(
            f"{self.job.name} ({self.kind} {self.arch}, {n_params / 1e6:.2f}M parameters, {self.precision}, "
            f"{d.world_size} process(es), {tc.parallelism if d.world_size > 1 else 'single'}"
            f"{', compiled' if tc.compile else ''})",
            self.device,
            tc.device,
        )
        model = model.to(self.device)
        if self.sharded:
            shadow = parallel.sharded_copy(model, d)
            parallel.shard(model, d, precision=self.precision)
            self.ema = EMA(model, tc.ema_decay, module=shadow)
        else:
            self.ema = EMA(model, tc.ema_decay)
        self.model = model
        self.optimizer = build_optimizer(model, tc)
        self.checkpointer = Checkpointer(self.job, model.config, d.world_size, kind=self.kind, arch=self.arch)
        self.checkpointer.meta.update(self.checkpoint_meta())
        self.order = BatchOrder(len(self.data), tc.batch_size, tc.seed)

    def _restore(self) -> tuple[int, float, float]:
        """(start step, elapsed seconds before, last loss) from the newest checkpoint, or a fresh start."""
        if self.resume:
            restored = self.checkpointer.restore(self.model, self.ema, self.optimizer)
            if restored is not None:
                meta = restored.meta
                return restored.step, float(meta.get("elapsed_s", 0.0)), float(meta.get("loss", math.nan))
        elif self.d.is_main:
            self.checkpointer.clear()
        self.d.barrier()  # no rank starts before a fresh start has cleared the old checkpoints
        return 0, 0.0, math.nan

    def train_step(
        self, step: int, batch: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        tc = self.tc
        lr = lr_at(step, tc)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.loss(step, batch, step_generator(tc.seed, step))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages gradients across ranks here; FSDP reduce-scatters them
        max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True)
        self.optimizer.step()
        self.ema.update(step)
        return loss.detach(), grad_norm.detach(), lr

    def _run(self) -> TrainResult:
        tc, d, job = self.tc, self.d, self.job
        self._setup()
        start_step, elapsed_before, last_loss = self._restore()
        self.restored(start_step)
        if start_step >= tc.steps:  # already complete: re-running a finished job is a no-op
            report = self.finished_before(start_step)
            latest = checkpoint.latest(self.checkpointer.directory)
            return TrainResult(start_step, last_loss, latest, 0.0, 0, evaluation=report)

        main = d.is_main
        title = f"{job.name} ({self.arch})"
        metrics = (
            MetricsLog(job.output, resume_step=start_step, title=title, ylabel=self.loss_label)
            if main
            else None
        )
        heartbeat = Heartbeat(job.output, tc.steps) if main else None  # the coordinator watches this
        self.net = self.model if self.sharded else parallel.data_parallel(self.model, d)
        if tc.compile:
            self.net = torch.compile(self.net)
        bar = (
            progress_bar(total=tc.steps, initial=start_step, desc=job.name, unit="step")
            if self.progress and main
            else None
        )

        loader = step_loader(
            self.data, StepBatches(self.order, start_step, tc.steps, self.rows),
            workers=tc.loader_workers, prefetch=tc.loader_prefetch, pin_memory=self.device.type == "cuda",
        )  # fmt: skip
        stats = StepStats(d, tc.batch_size)
        ckpt_url: str | None = None
        report: dict[str, Any] | None = None
        step, interrupted, finished = start_step, False, False
        if heartbeat is not None:
            heartbeat.beat(start_step, force=True)
        self.model.train()
        t0 = time.perf_counter()
        batches = iter(loader)  # starts the workers, which read ahead from step start_step + 1
        try:
            with StopSignal() as stop:
                for step, batch in zip(range(start_step + 1, tc.steps + 1), batches):
                    loss, grad_norm, lr = self.train_step(step, batch)
                    stats.add(loss, grad_norm)
                    if bar is not None:
                        bar.update(1)
                    if heartbeat is not None:
                        heartbeat.beat(step)  # rate-limited inside: a clock read most steps

                    interrupted = any_rank(stop.requested, d) or (
                        self.stop_after is not None and step >= self.stop_after
                    )
                    save_now = step % tc.checkpoint_every == 0 or step == tc.steps or interrupted
                    if step % tc.log_every == 0 or save_now:
                        row = stats.row(step, lr, elapsed_s=elapsed_before + time.perf_counter() - t0)
                        if metrics is not None:
                            metrics.append(**row)
                            metrics.flush()
                        if bar is not None:
                            bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}")
                    if save_now:
                        ckpt_url = self.checkpointer.url(step)
                        if metrics is not None:
                            metrics.plot()
                        if main or self.sharded:  # gathering sharded state is collective
                            elapsed = elapsed_before + time.perf_counter() - t0
                            self.checkpointer.save(step, self.model, self.ema, self.optimizer, write=main,
                                                   loss=stats.losses[-1], elapsed_s=elapsed)  # fmt: skip
                    if step == tc.steps or self.eval_due(step):
                        report = self.evaluate(step) or report
                    if self.on_step is not None:
                        self.on_step(step)
                    if interrupted:
                        break
            finished = True
        finally:  # also on errors, so the coordinator sees that the job is no longer running
            batches = None  # the last reference: stops the loader's workers now
            if bar is not None:
                bar.close()
            if heartbeat is not None:
                heartbeat.beat(step, state="done" if finished and step >= tc.steps else "stopped", force=True)
        d.barrier()  # every rank leaves after rank 0 has written the last checkpoint
        return TrainResult(
            step=step,
            final_loss=stats.losses[-1] if stats.losses else last_loss,
            checkpoint_url=ckpt_url,
            seconds=time.perf_counter() - t0,
            images_seen=(step - start_step) * tc.batch_size,
            losses=stats.losses,
            interrupted=interrupted and step < tc.steps,
            evaluation=report,
        )
