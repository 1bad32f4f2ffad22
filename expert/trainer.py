"""The expert trainer: one flow-matching DiT on one data partition, single process or torchrun DDP.

Read top to bottom: small components (distributed setup, data order, per-step randomness, learning
rate, checkpointer, stop signal), then ``train``, the loop that assembles them.

Determinism is by construction, so resuming needs only the step number (no RNG state):
  * the model is initialised from ``train.seed``;
  * the data order is a permutation per epoch drawn from a generator seeded by (seed, epoch), and the
    global batch of step s is a fixed slice of it;
  * the step's noise, times and label dropout come from a generator seeded by (seed, step), drawn for
    the *global* batch, and each rank takes its slice. (The brief asked for (seed, step, rank); drawing
    globally costs one randn over the global batch per rank - negligible next to the forward pass - and
    makes a run independent of the world size: 2 ranks reproduce 1 process to float reduction order,
    and a job may resume on a different number of processes.)

Learning rate: linear warm-up over ``warmup_steps`` then constant (no cosine decay: experts are often
extended, and a constant tail keeps a resumed, extended run identical to a longer one).
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel

import ddm
from ddm.core import checkpoint, parallel, storage
from ddm.expert import flow
from ddm.core.config import TrainConfig
from ddm.expert.config import ExpertJobConfig
from ddm.expert.data import ImageDataset, build_dataset
from ddm.core.ema import EMA
from ddm.core.heartbeat import Heartbeat
from ddm.core.metrics_log import MetricsLog
from ddm.expert.model import DiT, DiTConfig, dit_config
from ddm.core.progress import progress_bar


@dataclass
class TrainResult:
    step: int  # the last step trained (== train.steps when the job is complete)
    final_loss: float  # loss of the last step (global batch mean); nan if no step ran and none was recorded
    checkpoint_url: str | None  # the checkpoint holding ``step``
    seconds: float  # wall time of this invocation's training loop (incl. checkpoint writes)
    images_seen: int  # images trained on by this invocation (steps run x global batch)
    losses: list[float] = field(default_factory=list)  # per-step loss of the steps this invocation ran
    interrupted: bool = False  # stopped early (signal or stop_after) after saving a checkpoint


# ----------------------------------------------------------------------------------------------------
# Distributed setup: torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them we are one process.


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


def init_distributed() -> Distributed:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if world_size <= 1:
        return Distributed(0, 1, 0, device, owns_group=False)
    if cuda:
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    # On GPUs the per-step stop flag goes through a CPU group so checking it never syncs the device.
    control = dist.new_group(backend="gloo") if cuda else None
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, device, owns, control)


def close_distributed(d: Distributed) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# Seeds, data order and per-step randomness.


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from a tuple such as (seed, "step", 17); independent streams per tag."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


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


def drop_labels(y: torch.Tensor, u: torch.Tensor, p: float, null_label: int) -> torch.Tensor:
    """Classifier-free guidance dropout: replace y[i] by the null class where u[i] < p.

    ``u`` are uniform(0, 1) draws, one per label, made by the caller so the choice is reproducible.
    """
    return torch.where(u < p, torch.full_like(y, null_label), y)


def sample_times(n: int, train: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    if train.time_sampling == "uniform":
        t = flow.sample_t_uniform(n, generator=generator)
    else:
        t = flow.sample_t_logit_normal(n, train.logit_mean, train.logit_std, generator=generator)
    return flow.shift_time(t, train.time_shift)  # (n,)


def lr_at(step: int, train: TrainConfig) -> float:
    """Linear warm-up from lr/warmup_steps at step 1 to lr at step warmup_steps, then constant."""
    if train.warmup_steps > 0 and step < train.warmup_steps:
        return train.lr * step / train.warmup_steps
    return train.lr


# ----------------------------------------------------------------------------------------------------
# Model and optimizer.


def model_config(job: ExpertJobConfig) -> DiTConfig:
    return dit_config(
        job.model.arch,
        image_size=job.data.image_size,
        in_channels=job.data.channels,
        num_classes=job.model.num_classes,
    )


def build_model(cfg: DiTConfig, seed: int) -> DiT:
    """The DiT initialised from ``seed`` without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DiT(cfg)


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        model.parameters(),
        lr=lr_at(1, train),
        betas=(train.beta1, train.beta2),
        weight_decay=train.weight_decay,
    )


def precision_context(precision: str, device: torch.device) -> AbstractContextManager[object]:
    """The forward pass's numeric context: nothing for fp32; bf16 autocast for bf16.

    On CPU, bf16 also selects the math attention kernel: with torch 2.13 on this machine the CPU
    flash-attention *backward* in bf16 took ~10x longer than in fp32 (660 vs 66 ms per DiT-T/4 step at
    batch 128) and erased the matmul gain; with the math kernel a bf16 step is ~30% faster than fp32.
    """
    if precision != "bf16":
        return nullcontext()
    stack = ExitStack()
    stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
    if device.type == "cpu":
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    return stack


def wrap_data_parallel(model: nn.Module, d: Distributed) -> nn.Module:
    """DDP from outside the model (the model code does not change); the model itself on one process.

    The DiT's only buffer (the fixed position embedding) is identical everywhere, so DDP need not
    broadcast buffers before every forward. (torch >= 2.13 renamed that switch.)
    """
    if d.world_size == 1:
        return model
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_buffer_sync = (
        {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    )
    device_ids = [d.device.index] if d.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, **no_buffer_sync)


def check_dataset(dataset: ImageDataset, cfg: DiTConfig, job: ExpertJobConfig) -> None:
    shape = tuple(dataset.images.shape[1:])
    want = (cfg.in_channels, cfg.image_size, cfg.image_size)
    if shape != want:
        raise ValueError(
            f"data from {job.data.path} has images of shape {shape} but the model expects {want}; "
            "set data.channels and data.image_size to match the data"
        )
    if dataset.num_classes > cfg.num_classes:
        raise ValueError(
            f"data from {job.data.path} has {dataset.num_classes} classes but model.num_classes is "
            f"{cfg.num_classes}; raise model.num_classes"
        )


# ----------------------------------------------------------------------------------------------------
# Checkpoints.


def git_commit() -> str | None:
    """The commit of the code checkout, if it is a git work tree with at least one commit."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


class Checkpointer:
    """Saves and restores model, EMA and optimizer under ``{output}/checkpoints``.

    ``kind`` goes into the metadata and ``restore`` refuses any other kind. The router trainer reuses
    this with kind="router", its job config (same name/output/data/model.arch/train fields) and its
    RouterConfig (anything with ``to_dict``).
    """

    def __init__(self, job: ExpertJobConfig, cfg: DiTConfig, world_size: int, *, kind: str = "expert"):
        self.directory = storage.join(job.output, "checkpoints")
        self.keep = job.train.keep_checkpoints
        self.cfg = cfg
        self.kind = kind
        self.meta: dict[str, Any] = {
            "kind": kind,
            "name": job.name,
            "arch": job.model.arch,
            "model": cfg.to_dict(),
            "data": job.data.model_dump(mode="json"),
            "train": job.train.model_dump(mode="json"),
            "world_size": world_size,
            "ddm_version": ddm.__version__,
            "git_commit": git_commit(),
        }

    def url(self, step: int) -> str:
        return storage.join(self.directory, checkpoint.file_name(step))

    def save(
        self, step: int, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer, **extra: Any
    ) -> str:
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
        tensors.update(parallel.optimizer_tensors(optimizer))
        return checkpoint.save(self.directory, step, tensors, {**self.meta, **extra}, keep=self.keep)

    def restore(
        self, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer
    ) -> checkpoint.Checkpoint | None:
        """Load the newest checkpoint into the components; None if there is none."""
        url = checkpoint.latest(self.directory)
        if url is None:
            return None
        ckpt = checkpoint.load(url)
        if ckpt.meta.get("kind") != self.kind:
            raise ValueError(
                f"{url}: a {ckpt.meta.get('kind')!r} checkpoint, not {self.kind!r}; "
                "use another output directory"
            )
        if ckpt.meta.get("model") != self.cfg.to_dict():
            raise ValueError(
                f"{url}: the checkpoint's model {ckpt.meta.get('model')} differs from the job's model "
                f"{self.cfg.to_dict()}; write to a new output directory, or start over with resume=False "
                "(--no-resume)"
            )
        model.load_state_dict(ckpt.prefixed("model"))
        ema.load_state_dict(ckpt.prefixed("ema"))
        parallel.load_optimizer_tensors(optimizer, ckpt.tensors)
        return ckpt

    def clear(self) -> None:
        """Remove every checkpoint (a fresh start must not be pruned against an older run's steps)."""
        for name in storage.listdir(self.directory):
            if name.startswith("step-") or name == "latest.json":
                storage.remove(storage.join(self.directory, name))


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
        self._norm.append(grad_norm)

    def row(self, step: int, lr: float, *, elapsed_s: float) -> dict[str, float]:
        """A metrics row averaging the steps since the previous row. Collective: every rank calls it."""
        step_losses = torch.stack(self._loss)  # (k,)
        if self.d.world_size > 1:  # each rank has the mean over its equal share; average the shares
            dist.all_reduce(step_losses)
            step_losses /= self.d.world_size
        values = step_losses.tolist()
        grad_norm = torch.stack(self._norm).mean().item()  # identical on every rank after DDP's all-reduce
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


# ----------------------------------------------------------------------------------------------------
# The loop.


def train(
    job: ExpertJobConfig,
    *,
    resume: bool = True,
    stop_after: int | None = None,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train ``job`` to ``job.train.steps``, resuming from the newest checkpoint when ``resume``.

    ``stop_after=N`` stops after step N as a signal would (checkpoint, ``interrupted=True``).
    ``on_step(step)`` is called after every step on every rank (benchmarks, tests).
    Under torchrun (WORLD_SIZE > 1) this runs data-parallel; only rank 0 writes files.
    """
    d = init_distributed()
    threads = torch.get_num_threads()
    if job.train.num_threads:
        torch.set_num_threads(job.train.num_threads)
    try:
        return _train(job, d, resume=resume, stop_after=stop_after, progress=progress, on_step=on_step)
    finally:
        torch.set_num_threads(threads)
        close_distributed(d)


def _train(
    job: ExpertJobConfig,
    d: Distributed,
    *,
    resume: bool,
    stop_after: int | None,
    progress: bool,
    on_step: Callable[[int], None] | None,
) -> TrainResult:
    tc = job.train
    if tc.batch_size % d.world_size:
        raise ValueError(
            f"train.batch_size {tc.batch_size} does not divide by the {d.world_size} torchrun processes; "
            "choose a batch size that is a multiple of the number of processes"
        )
    local_batch = tc.batch_size // d.world_size
    lo, hi = d.rank * local_batch, (d.rank + 1) * local_batch  # this rank's slice of the global batch

    # Components.
    dataset = build_dataset(job.data)
    cfg = model_config(job)
    check_dataset(dataset, cfg, job)
    model = build_model(cfg, tc.seed).to(d.device)
    ema = EMA(model, tc.ema_decay)
    optimizer = build_optimizer(model, tc)
    checkpointer = Checkpointer(job, cfg, d.world_size)
    order = BatchOrder(len(dataset), tc.batch_size, tc.seed)

    start_step, elapsed_before, last_loss = 0, 0.0, math.nan
    if resume:
        restored = checkpointer.restore(model, ema, optimizer)
        if restored is not None:
            start_step = restored.step
            elapsed_before = float(restored.meta.get("elapsed_s", 0.0))
            last_loss = float(restored.meta.get("loss", math.nan))
    elif d.is_main:
        checkpointer.clear()
    if start_step >= tc.steps:  # already complete: re-running a finished job is a no-op
        return TrainResult(start_step, last_loss, checkpoint.latest(checkpointer.directory), 0.0, 0)

    metrics = (
        MetricsLog(job.output, resume_step=start_step, title=f"{job.name} ({job.model.arch})")
        if d.is_main
        else None
    )
    heartbeat = Heartbeat(job.output, tc.steps) if d.is_main else None  # the coordinator watches this
    net = wrap_data_parallel(model, d)
    max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
    null_label = cfg.num_classes
    sample_shape = (tc.batch_size, cfg.in_channels, cfg.image_size, cfg.image_size)

    def train_step(step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        gen = torch.Generator().manual_seed(derive_seed(tc.seed, "step", step))
        eps = torch.randn(sample_shape, generator=gen)[lo:hi]  # (b, C, H, W)
        t = sample_times(tc.batch_size, tc, gen)[lo:hi]  # (b,)
        u_drop = torch.rand(tc.batch_size, generator=gen)[lo:hi]  # (b,)
        x_0, y = dataset.batch(order.indices(step)[lo:hi])  # (b, C, H, W), (b,)
        y = drop_labels(y, u_drop, tc.label_dropout, null_label)
        x_0, y, eps, t = (v.to(d.device, non_blocking=True) for v in (x_0, y, eps, t))
        x_t = flow.interpolate(x_0, eps, t)  # (b, C, H, W)
        with precision_context(tc.precision, d.device):
            v_pred = net(x_t, t, y)  # (b, C, H, W)
        loss = flow.flow_loss(v_pred, x_0, eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages gradients across ranks here
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)
        optimizer.step()
        ema.update(step)
        return loss.detach(), grad_norm.detach(), lr

    bar = None
    if progress and d.is_main:
        bar = progress_bar(total=tc.steps, initial=start_step, desc=job.name, unit="step")

    stats = StepStats(d, tc.batch_size)
    ckpt_url: str | None = None
    step, interrupted, finished = start_step, False, False
    if heartbeat is not None:
        heartbeat.beat(start_step, force=True)
    t0 = time.perf_counter()
    try:
        with StopSignal() as stop:
            for step in range(start_step + 1, tc.steps + 1):
                loss, grad_norm, lr = train_step(step)
                stats.add(loss, grad_norm)
                if bar is not None:
                    bar.update(1)
                if heartbeat is not None:
                    heartbeat.beat(step)  # rate-limited inside: a clock read most steps

                interrupted = _stop_requested(stop, d) or (stop_after is not None and step >= stop_after)
                save_now = step % tc.checkpoint_every == 0 or step == tc.steps or interrupted
                if step % tc.log_every == 0 or save_now:
                    row = stats.row(step, lr, elapsed_s=elapsed_before + time.perf_counter() - t0)
                    if metrics is not None:
                        metrics.append(**row)
                        metrics.flush()
                    if bar is not None:
                        bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}")
                if save_now:
                    ckpt_url = checkpointer.url(step)
                    if metrics is not None:  # rank 0
                        metrics.plot()
                        elapsed = elapsed_before + time.perf_counter() - t0
                        checkpointer.save(
                            step, model, ema, optimizer, loss=stats.losses[-1], elapsed_s=elapsed
                        )
                if on_step is not None:
                    on_step(step)
                if interrupted:
                    break
        finished = True
    finally:  # also on errors, so the coordinator sees that the job is no longer running
        if bar is not None:
            bar.close()
        if heartbeat is not None:
            heartbeat.beat(step, state="done" if finished and step >= tc.steps else "stopped", force=True)
    if d.world_size > 1:
        dist.barrier()  # every rank leaves after rank 0 has written the last checkpoint
    return TrainResult(
        step=step,
        final_loss=stats.losses[-1] if stats.losses else last_loss,
        checkpoint_url=ckpt_url,
        seconds=time.perf_counter() - t0,
        images_seen=(step - start_step) * tc.batch_size,
        losses=stats.losses,
        interrupted=interrupted and step < tc.steps,
    )


def _stop_requested(stop: StopSignal, d: Distributed) -> bool:
    """Whether any rank got a stop signal; ranks must agree or one would wait forever in all-reduce."""
    if d.world_size == 1:
        return stop.requested
    flag = torch.tensor([1 if stop.requested else 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=d.control_group)
    return bool(flag.item())
