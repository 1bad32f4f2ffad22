"""The router trainer: a classifier of which partition x_t's clean image came from, at every t.

Per step (DDM paper, sec. 3.2): draw x_0 from the union of all partitions with its partition label k,
t ~ U[0, 1] (``train.time_sampling``), eps ~ N(0, I), x_t = interpolate(x_0, eps, t), drop the class
label to the null class with probability ``label_dropout`` (so unconditional passes route too), and
minimise cross-entropy(router(x_t, t, y), k). The minimiser is the posterior p(k | x_t, t, y), exactly
the ensemble's weights.

A short specialisation of the one training loop (``ddm.core.trainer.Trainer``: seeding, data order,
EMA, precision, DDP or FSDP, checkpoints of kind "router", signals, heartbeat, metrics), so resuming is
exact from the step number alone and the router trains data-parallel under torchrun like an expert.

A fixed fraction of each partition is held out (seeded) and, when training ends (and every
``eval.every`` steps), the EMA router's accuracy in equal-width bins of t is written to
``{output}/accuracy_vs_t.json`` and ``.png``: high at small t, falling towards the largest partition
share (unconditional) or the class-given prior (conditional) as t -> 1, where x_t is pure noise.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ddm.core import storage
from ddm.core.schedule import derive_seed
from ddm.core.trainer import Trainer, TrainResult, seeded
from ddm.expert import flow
from ddm.expert.data import ImageDataset, check_num_classes
from ddm.expert.images import to_model_input
from ddm.expert.stream import StreamedDataset, open_partitions
from ddm.expert.trainer import drop_labels, sample_times
from ddm.router.config import RouterJobConfig
from ddm.router.model import RouterConfig, RouterNet, router_config

ACCURACY_JSON = "accuracy_vs_t.json"
ACCURACY_PNG = "accuracy_vs_t.png"
EVAL_HISTORY = "eval.json"  # [{step, conditional, unconditional}] mean accuracy over the t bins


# ----------------------------------------------------------------------------------------------------
# Data: every partition in one place, with its partition label.


@dataclass(frozen=True)
class PartitionData:
    dataset: ImageDataset | StreamedDataset  # uint8 images (N, C, H, W), class labels, source ids
    partition: torch.Tensor  # int64 (N,): which partition (expert) each example belongs to
    num_partitions: int

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def in_memory(self) -> bool:  # streamed partitions are read through DataLoader workers
        return bool(getattr(self.dataset, "in_memory", True))

    def subset(self, index: torch.Tensor) -> PartitionData:
        return PartitionData(self.dataset.subset(index), self.partition[index], self.num_partitions)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_0 float (B, C, H, W) in [-1, 1], class labels (B,), partition labels (B,))."""
        x_0, y = self.dataset.batch(index)
        return x_0, y, self.partition[index]

    def batch_uint8(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As ``batch`` with the images still uint8 (B, C, H, W), for the trainers' device copies."""
        images, y = self.dataset.batch_uint8(index)
        return images, y, self.partition[index]

    def counts(self) -> list[int]:
        return torch.bincount(self.partition, minlength=self.num_partitions).tolist()


def read_partitions(urls: list[str], *, limit: int | None = None) -> PartitionData:
    """Partition k = the shards at ``urls[k]`` (first ``limit`` examples of each), streamed: opening
    reads only the indexes; shards are read row by row as batches ask (``ddm.expert.stream``)."""
    dataset, counts = open_partitions(urls, limit=limit)
    for url, n in zip(urls, counts):
        if n == 0:
            raise ValueError(f"{url}: the partition is empty; a router needs examples of every partition")
    partition = torch.cat([torch.full((n,), k, dtype=torch.int64) for k, n in enumerate(counts)])  # (N,)
    return PartitionData(dataset, partition, len(urls))


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
    joint = torch.zeros(max(data.dataset.num_classes, 1), data.num_partitions, dtype=torch.int64)
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
# The trainer.


def build_router(cfg: RouterConfig, seed: int) -> RouterNet:
    """The router initialised from ``seed`` without disturbing the caller's global RNG."""
    return seeded(lambda: RouterNet(cfg), seed)  # type: ignore[return-value]


class RouterTrainer(Trainer[RouterJobConfig]):
    kind = "router"
    loss_label = "cross-entropy"

    def build_data(self) -> PartitionData:
        job = self.job
        self.urls = job.data.urls()
        data = read_partitions(self.urls, limit=job.data.limit)
        c, h, w = data.dataset.image_shape
        if h != w:
            raise ValueError(f"{self.urls[0]}: images are {h}x{w}; the router needs square images")
        num_classes = data.dataset.num_classes if job.model.num_classes is None else job.model.num_classes
        check_num_classes(
            data.dataset.num_classes, num_classes, source=self.urls[0], field="model.num_classes"
        )
        self.latent = (data.dataset.meta or {}).get("latent")  # None in pixel space
        self.class_names = data.dataset.class_names
        train_data, self.heldout = split_holdout(data, job.data.holdout, self.tc.seed)
        self.cfg = router_config(
            job.model.arch,
            image_size=h,
            in_channels=c,
            num_classes=num_classes,
            num_experts=len(self.urls),
        )
        self.time_shift = flow.resolve_time_shift(self.tc.time_shift, (c, h, w))  # the experts' rule
        return train_data

    def build_model(self) -> RouterNet:
        init = self.job.init
        if init is None:
            return build_router(self.cfg, self.tc.seed)
        from ddm.router.grow import grown_router

        net = grown_router(init.checkpoint, init.expert_map)
        if net.config != self.cfg:
            raise ValueError(
                f"init.checkpoint {init.checkpoint}: its router ({net.config}) does not match this job's "
                f"({self.cfg}); use the same model.arch and data as the run's router"
            )
        return net

    def checkpoint_meta(self) -> dict[str, Any]:
        return dict(
            partitions=self.urls,
            train_counts=self.data.counts(),
            heldout_counts=self.heldout.counts(),
            class_names=self.class_names,
            time_shift=self.time_shift,
            **({"latent": self.latent} if self.latent else {}),
        )

    def loss(self, step: int, batch: tuple[torch.Tensor, ...], gen: torch.Generator) -> torch.Tensor:
        tc, cfg, rows = self.tc, self.cfg, self.rows
        eps = torch.randn((tc.batch_size, cfg.in_channels, cfg.image_size, cfg.image_size), generator=gen)[
            rows
        ]
        t = sample_times(tc.batch_size, tc, gen, self.time_shift)[rows]  # (b,)
        u_drop = torch.rand(tc.batch_size, generator=gen)[rows]  # (b,)
        images, y, k = batch  # uint8 (b, C, H, W), (b,), (b,)
        y = drop_labels(y, u_drop, tc.label_dropout, cfg.num_classes)
        images, y, k, eps, t = self.to_device(images, y, k, eps, t)
        x_t = flow.interpolate(to_model_input(images), eps, t)  # (b, C, H, W)
        with self.autocast():
            logits = self.net(x_t, t, y)  # (b, K)
        return F.cross_entropy(logits.float(), k)

    # --- accuracy against t on the held-out split: every ``eval.every`` steps and at the end ---------

    def restored(self, step: int) -> None:
        out = self.job.output
        self.acc_url, self.png_url = storage.join(out, ACCURACY_JSON), storage.join(out, ACCURACY_PNG)
        self.history_url = storage.join(out, EVAL_HISTORY)
        self.history = [r for r in _read_history(self.history_url) if r["step"] <= step]

    def eval_due(self, step: int) -> bool:
        every = self.job.eval.every
        return bool(every) and step % every == 0

    def evaluate(self, step: int) -> dict[str, Any]:
        ec, job = self.job.eval, self.job
        report = accuracy_vs_t(
            self.ema.module, self.heldout, bins=ec.bins, samples_per_bin=ec.samples_per_bin, seed=self.tc.seed,
            batch_size=ec.batch_size,
        )  # fmt: skip
        report = {"step": step, "weights": "ema", "partitions": self.urls, **report}
        mean = {m: sum(report[m]) / len(report[m]) for m in ("conditional", "unconditional")}
        self.history.append({"step": step, **mean})
        if self.d.is_main:
            storage.write_json(self.acc_url, report)
            plot_accuracy(report, self.png_url, f"{job.name} ({job.model.arch}), step {step}")
            storage.write_json(self.history_url, self.history)
        return report

    def finished_before(self, step: int) -> dict[str, Any] | None:
        """A complete job is a no-op, unless its final evaluation never got written."""
        return None if storage.exists(self.acc_url) else self.evaluate(step)

    def summary(self, result: TrainResult) -> str:
        line = super().summary(result)
        acc = result.evaluation
        if acc is None:
            return line
        return line + (
            f"; held-out accuracy at t ~ {acc['t_mid'][0]:.2f}: {acc['conditional'][0]:.3f} (class), "
            f"{acc['unconditional'][0]:.3f} (null); at t ~ {acc['t_mid'][-1]:.2f}: "
            f"{acc['unconditional'][-1]:.3f} (null; largest share {acc['prior_accuracy']:.3f})"
        )


def train(job: RouterJobConfig, **options: Any) -> TrainResult:
    """Train the router (options as ``ddm.core.trainer.Trainer``); ``evaluation`` holds the
    accuracy-vs-t report when this invocation wrote one."""
    return RouterTrainer(job, **options).run()


def _read_history(url: str) -> list[dict[str, Any]]:
    if not storage.exists(url):
        return []
    rows = storage.read_json(url)
    return rows if isinstance(rows, list) else []
