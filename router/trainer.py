"""The router trainer: a classifier of which partition x_t's clean image came from, at every t.

Per step (DDM paper, sec. 3.2): draw x_0 from the union of all partitions with its partition label k,
t ~ U[0, 1] (``train.time_sampling``), eps ~ N(0, I), x_t = interpolate(x_0, eps, t), drop the class
label to the null class with probability ``label_dropout`` (so unconditional passes route too), and
minimise cross-entropy(router(x_t, t, y), k). The minimiser is the posterior p(k | x_t, t, y), exactly
the ensemble's weights.

The pieces are the expert trainer's (imported, not copied): per-step seeding by ``derive_seed``, the
epoch permutation ``BatchOrder``, the bias-corrected ``EMA``, ``Checkpointer`` (kind="router"),
``StopSignal`` (SIGTERM/SIGINT -> checkpoint, then stop), ``Heartbeat`` and ``MetricsLog``. So resuming
is exact from the step number alone, as for experts. One process: the router is a few % of the
experts' compute; data-parallel training would follow the expert trainer's DDP path.

A fixed fraction of each partition is held out (seeded) and, when training ends (and every
``eval.every`` steps), the EMA router's accuracy in equal-width bins of t is written to
``{output}/accuracy_vs_t.json`` and ``.png``: high at small t, falling towards the largest partition
share (unconditional) or the class-given prior (conditional) as t -> 1, where x_t is pure noise.
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ddm.core import checkpoint, storage
from ddm.expert import flow
from ddm.expert.data import ImageDataset
from ddm.core.ema import EMA
from ddm.core.heartbeat import Heartbeat
from ddm.core.metrics_log import MetricsLog
from ddm.expert.shards import read_shards
from ddm.expert.trainer import (
    BatchOrder,
    Checkpointer,
    StepStats,
    StopSignal,
    TrainResult,
    build_optimizer,
    derive_seed,
    drop_labels,
    init_distributed,
    lr_at,
    precision_context,
    sample_times,
)
from ddm.router.config import RouterJobConfig
from ddm.router.model import RouterConfig, RouterNet, router_config
from ddm.core.progress import progress_bar

ACCURACY_JSON = "accuracy_vs_t.json"
ACCURACY_PNG = "accuracy_vs_t.png"
EVAL_HISTORY = "eval.json"  # [{step, conditional, unconditional}] mean accuracy over the t bins


@dataclass
class RouterTrainResult(TrainResult):
    accuracy: dict[str, Any] | None = None  # the accuracy-vs-t report, when this invocation wrote one


# ----------------------------------------------------------------------------------------------------
# Data: every partition in one place, with its partition label.


@dataclass(frozen=True)
class PartitionData:
    dataset: ImageDataset  # uint8 images (N, C, H, W), class labels, source ids
    partition: torch.Tensor  # int64 (N,): which partition (expert) each example belongs to
    num_partitions: int

    def __len__(self) -> int:
        return len(self.dataset)

    def subset(self, index: torch.Tensor) -> PartitionData:
        return PartitionData(self.dataset.subset(index), self.partition[index], self.num_partitions)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_0 float (B, C, H, W) in [-1, 1], class labels (B,), partition labels (B,))."""
        x_0, y = self.dataset.batch(index)
        return x_0, y, self.partition[index]

    def counts(self) -> list[int]:
        return torch.bincount(self.partition, minlength=self.num_partitions).tolist()


def read_partitions(urls: list[str], *, limit: int | None = None) -> PartitionData:
    """Partition k = the shards at ``urls[k]`` (first ``limit`` examples of each)."""
    parts = [read_shards(url, limit=limit) for url in urls]
    for url, part in zip(urls, parts):
        if len(part) == 0:
            raise ValueError(f"{url}: the partition is empty; a router needs examples of every partition")
        if part.image_shape != parts[0].image_shape:
            raise ValueError(
                f"{url} holds images of shape {list(part.image_shape)} but {urls[0]} holds "
                f"{list(parts[0].image_shape)}; every partition of a run must have one image shape"
            )
    num_classes = max(p.num_classes for p in parts)
    names = next((p.class_names for p in parts if p.class_names and len(p.class_names) == num_classes), None)
    dataset = ImageDataset(
        images=torch.cat([p.images for p in parts]),  # (N, C, H, W)
        labels=torch.cat([p.labels for p in parts]),  # (N,)
        ids=torch.cat([p.ids for p in parts]),  # (N,)
        num_classes=num_classes,
        class_names=names,
    )
    partition = torch.cat([torch.full((len(p),), k, dtype=torch.int64) for k, p in enumerate(parts)])  # (N,)
    return PartitionData(dataset, partition, len(parts))


def split_holdout(data: PartitionData, fraction: float, seed: int) -> tuple[PartitionData, PartitionData]:
    """(train, held-out): a seeded ``fraction`` of each partition (at least one example) held out, so
    the held-out set has the training mix of partitions."""
    train_idx, held_idx = [], []
    for k in range(data.num_partitions):
        members = (data.partition == k).nonzero().squeeze(1)  # (n_k,)
        n = members.numel()
        h = max(1, round(fraction * n))
        if n - h < 1:
            raise ValueError(f"partition {k} has {n} example(s): too few to hold out {h}; lower data.holdout")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "holdout", k)))
        held_idx.append(members[perm[:h]].sort().values)
        train_idx.append(members[perm[h:]].sort().values)
    return data.subset(torch.cat(train_idx)), data.subset(torch.cat(held_idx))


# ----------------------------------------------------------------------------------------------------
# Evaluation: accuracy as a function of t on the held-out split.


@torch.no_grad()
def accuracy_vs_t(
    model: RouterNet, data: PartitionData, *, bins: int, samples_per_bin: int, seed: int, batch_size: int
) -> dict[str, Any]:
    """Accuracy of argmax routing per equal-width bin of t, with the true class (conditional) and the
    null class (unconditional). Draws (x_0, eps, t) from generators seeded by (seed, bin): repeatable.

    References: ``prior_accuracy`` = the largest partition share (the best unconditional accuracy from
    pure noise) and ``class_prior_accuracy`` = sum_y max_k n(y, k) / n (the same, knowing the class).
    """
    device = next(model.parameters()).device
    edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)
    acc: dict[str, list[float]] = {"conditional": [], "unconditional": []}
    for b in range(bins):
        g = torch.Generator().manual_seed(derive_seed(seed, "eval", b))
        index = torch.randint(len(data), (samples_per_bin,), generator=g)  # (S,)
        eps = torch.randn((samples_per_bin, *data.dataset.image_shape), generator=g)  # (S, C, H, W)
        t = (
            edges[b]
            + (edges[b + 1] - edges[b]) * torch.rand(samples_per_bin, generator=g, dtype=torch.float64)
        ).float()
        x_0, y, k = data.batch(index)
        x_t = flow.interpolate(x_0, eps, t)  # (S, C, H, W)
        for mode, labels in (("conditional", y), ("unconditional", torch.full_like(y, model.num_classes))):
            correct = 0
            for lo in range(0, samples_per_bin, batch_size):
                sl = slice(lo, lo + batch_size)
                logits = model(x_t[sl].to(device), t[sl].to(device), labels[sl].to(device))  # (B, K)
                correct += int((logits.argmax(1).cpu() == k[sl]).sum())
            acc[mode].append(correct / samples_per_bin)
    n = len(data)
    joint = torch.zeros(data.dataset.num_classes, data.num_partitions, dtype=torch.int64)
    joint.index_put_((data.dataset.labels, data.partition), torch.ones(n, dtype=torch.int64), accumulate=True)
    counts = data.counts()
    return {
        "bins": bins,
        "t_edges": edges.tolist(),
        "t_mid": ((edges[:-1] + edges[1:]) / 2).tolist(),
        "samples_per_bin": samples_per_bin,
        "conditional": acc["conditional"],
        "unconditional": acc["unconditional"],
        "heldout_counts": counts,
        "prior_accuracy": max(counts) / n,
        "class_prior_accuracy": int(joint.max(1).values.sum()) / n,
    }


def plot_accuracy(report: dict[str, Any], url: str, title: str) -> None:
    """Accuracy against t, both modes, with the two prior references dashed (Agg canvas, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for mode, color in (("conditional", "tab:blue"), ("unconditional", "tab:orange")):
        ax.plot(
            report["t_mid"],
            report[mode],
            "o-",
            color=color,
            label=f"{mode} (y = {'class' if mode == 'conditional' else 'null'})",
        )
    ax.axhline(
        report["class_prior_accuracy"], ls="--", color="tab:blue", alpha=0.5, label="class-given prior"
    )
    ax.axhline(
        report["prior_accuracy"], ls="--", color="tab:orange", alpha=0.5, label="largest partition share"
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("t (0 = data, 1 = noise)")
    ax.set_ylabel("routing accuracy (held out)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    storage.write_bytes(url, buf.getvalue())


# ----------------------------------------------------------------------------------------------------
# The loop.


def build_router(cfg: RouterConfig, seed: int) -> RouterNet:
    """The router initialised from ``seed`` without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RouterNet(cfg)


def train(
    job: RouterJobConfig,
    *,
    resume: bool = True,
    stop_after: int | None = None,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> RouterTrainResult:
    """Train ``job`` to ``job.train.steps``, resuming from the newest checkpoint when ``resume``;
    ``stop_after`` and ``on_step`` as in the expert trainer."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "the router trainer runs in one process; launch it with python, not torchrun --nproc-per-node > 1"
        )
    threads = torch.get_num_threads()
    if job.train.num_threads:
        torch.set_num_threads(job.train.num_threads)
    try:
        return _train(job, resume=resume, stop_after=stop_after, progress=progress, on_step=on_step)
    finally:
        torch.set_num_threads(threads)


def _train(
    job: RouterJobConfig,
    *,
    resume: bool,
    stop_after: int | None,
    progress: bool,
    on_step: Callable[[int], None] | None,
) -> RouterTrainResult:
    tc, ec = job.train, job.eval
    d = init_distributed()  # one process here: picks the device and gives StepStats its context
    urls = job.data.urls()
    data = read_partitions(urls, limit=job.data.limit)
    c, h, w = data.dataset.image_shape
    if h != w:
        raise ValueError(f"{urls[0]}: images are {h}x{w}; the router needs square images")
    if data.dataset.num_classes > job.model.num_classes:
        raise ValueError(
            f"the partitions have {data.dataset.num_classes} classes but model.num_classes is "
            f"{job.model.num_classes}; set it to the experts' num_classes"
        )
    train_data, heldout = split_holdout(data, job.data.holdout, tc.seed)
    cfg = router_config(
        job.model.arch, image_size=h, in_channels=c, num_classes=job.model.num_classes, num_experts=len(urls)
    )
    model = build_router(cfg, tc.seed).to(d.device)
    ema = EMA(model, tc.ema_decay)
    optimizer = build_optimizer(model, tc)
    # The expert's Checkpointer: a router job has the same name/output/data/model.arch/train fields.
    checkpointer = Checkpointer(job, cfg, 1, kind="router")  # type: ignore[arg-type]
    checkpointer.meta.update(
        partitions=urls,
        train_counts=train_data.counts(),
        heldout_counts=heldout.counts(),
        class_names=data.dataset.class_names,
    )
    order = BatchOrder(len(train_data), tc.batch_size, tc.seed)
    acc_url, png_url = storage.join(job.output, ACCURACY_JSON), storage.join(job.output, ACCURACY_PNG)
    history_url = storage.join(job.output, EVAL_HISTORY)

    start_step, elapsed_before, last_loss = 0, 0.0, math.nan
    if resume:
        restored = checkpointer.restore(model, ema, optimizer)
        if restored is not None:
            start_step = restored.step
            elapsed_before = float(restored.meta.get("elapsed_s", 0.0))
            last_loss = float(restored.meta.get("loss", math.nan))
    else:
        checkpointer.clear()
    history = [r for r in _read_history(history_url) if r["step"] <= start_step]

    def evaluate(step: int) -> dict[str, Any]:
        report = accuracy_vs_t(
            ema.module,
            heldout,
            bins=ec.bins,
            samples_per_bin=ec.samples_per_bin,
            seed=tc.seed,
            batch_size=ec.batch_size,
        )
        report = {"step": step, "weights": "ema", "partitions": urls, **report}
        storage.write_json(acc_url, report)
        plot_accuracy(report, png_url, f"{job.name} ({job.model.arch}), step {step}")
        mean = {m: sum(report[m]) / len(report[m]) for m in ("conditional", "unconditional")}
        history.append({"step": step, **mean})
        storage.write_json(history_url, history)
        return report

    if start_step >= tc.steps:  # already complete: a no-op, unless the final evaluation never got written
        report = None if storage.exists(acc_url) else evaluate(start_step)
        return RouterTrainResult(
            start_step, last_loss, checkpoint.latest(checkpointer.directory), 0.0, 0, accuracy=report
        )

    metrics = MetricsLog(
        job.output, resume_step=start_step, title=f"{job.name} ({job.model.arch})", ylabel="cross-entropy"
    )
    heartbeat = Heartbeat(job.output, tc.steps)
    max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
    sample_shape = (tc.batch_size, c, h, w)

    def train_step(step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        gen = torch.Generator().manual_seed(derive_seed(tc.seed, "step", step))
        eps = torch.randn(sample_shape, generator=gen)  # (B, C, H, W)
        t = sample_times(tc.batch_size, tc, gen)  # (B,)
        u_drop = torch.rand(tc.batch_size, generator=gen)  # (B,)
        x_0, y, k = train_data.batch(order.indices(step))  # (B, C, H, W), (B,), (B,)
        y = drop_labels(y, u_drop, tc.label_dropout, cfg.num_classes)
        x_0, y, k, eps, t = (v.to(d.device, non_blocking=True) for v in (x_0, y, k, eps, t))
        x_t = flow.interpolate(x_0, eps, t)  # (B, C, H, W)
        with precision_context(tc.precision, d.device):
            logits = model(x_t, t, y)  # (B, K)
        loss = F.cross_entropy(logits.float(), k)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)
        optimizer.step()
        ema.update(step)
        return loss.detach(), grad_norm.detach(), lr

    bar = None
    if progress:
        bar = progress_bar(total=tc.steps, initial=start_step, desc=job.name, unit="step")
    stats = StepStats(d, tc.batch_size)
    ckpt_url: str | None = None
    report: dict[str, Any] | None = None
    step, interrupted, finished = start_step, False, False
    heartbeat.beat(start_step, force=True)
    t0 = time.perf_counter()
    try:
        with StopSignal() as stop:
            for step in range(start_step + 1, tc.steps + 1):
                loss, grad_norm, lr = train_step(step)
                stats.add(loss, grad_norm)
                heartbeat.beat(step)
                if bar is not None:
                    bar.update(1)
                interrupted = stop.requested or (stop_after is not None and step >= stop_after)
                save_now = step % tc.checkpoint_every == 0 or step == tc.steps or interrupted
                if step % tc.log_every == 0 or save_now:
                    row = stats.row(step, lr, elapsed_s=elapsed_before + time.perf_counter() - t0)
                    metrics.append(**row)
                    metrics.flush()
                    if bar is not None:
                        bar.set_postfix(loss=f"{row['loss']:.4f}")
                if save_now:
                    metrics.plot()
                    elapsed = elapsed_before + time.perf_counter() - t0
                    ckpt_url = checkpointer.save(
                        step, model, ema, optimizer, loss=stats.losses[-1], elapsed_s=elapsed
                    )
                if step == tc.steps or (ec.every and step % ec.every == 0):
                    report = evaluate(step)
                if on_step is not None:
                    on_step(step)
                if interrupted:
                    break
        finished = True
    finally:  # also on errors, so the coordinator sees that the job is no longer running
        if bar is not None:
            bar.close()
        heartbeat.beat(step, state="done" if finished and step >= tc.steps else "stopped", force=True)
    return RouterTrainResult(
        step=step,
        final_loss=stats.losses[-1] if stats.losses else last_loss,
        checkpoint_url=ckpt_url,
        seconds=time.perf_counter() - t0,
        images_seen=(step - start_step) * tc.batch_size,
        losses=stats.losses,
        interrupted=interrupted and step < tc.steps,
        accuracy=report,
    )


def _read_history(url: str) -> list[dict[str, Any]]:
    if not storage.exists(url):
        return []
    rows = storage.read_json(url)
    return rows if isinstance(rows, list) else []
