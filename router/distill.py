"""Distil the guided ensemble into one dense, few-step student (DDM, McAllister et al. 2025, sec. 3.4).

Three distillations in one training objective, so one student does all three at once:

1. **Dense distillation** (the paper's): the student regresses the teacher's velocity at x_t made from
   training data, where the teacher of an example is the expert of that example's partition
   (``teacher.kind = "partition"``); the router-weighted ensemble is the option ``"ensemble"``.
   Partition teachers are exact where the router would only approximate p(k | x_t) and cost one
   expert per row.
2. **Guidance distillation** (Meng et al. 2023, "On Distillation of Guided Diffusion Models", stage 1):
   the student takes the guidance scale w as an input and regresses the *guided* teacher,
   v_u + w (v_c - v_u) through the example's expert (the convention of ``ddm.expert.guidance`` and the
   ensemble), with w ~ U[guidance_min, guidance_max] per row. Sampling then costs one pass per step.
3. **Step distillation** with **shortcut models** (Frans, Hafner, Levine, Abbeel 2024, "One Step
   Diffusion via Shortcut Models"): the student also takes the step size d and learns the jump
   x_{t-d} = x_t - d s(x_t, t, d). Rows with d = 0 regress the guided teacher (1-2 above); the other
   rows (``shortcut.fraction``) learn self-consistency: one step of size 2h equals two steps of size h,

       s(x_t, t, 2h) <- ( s(x_t, t, h) + s(x_t - h s(x_t, t, h), t - h, h) ) / 2     (stop-gradient),

   with 2h in {1, 1/2, ..., min_step}, t on the grid of multiples of 2h, and h < min_step evaluated at
   d = 0 (the flow itself). Frans et al. eq. 5 in our time direction (t = 1 noise, sampling decreases t).
   Frans et al. go down to 1/128; our default stops at 1/32 (the base target is then a 64-step Euler
   solution of the student's flow, finer than the 32-step ensemble it is compared with) so a short CPU
   run spends its bootstrap rows on 6 step sizes instead of 8.

Why shortcut models rather than progressive or consistency distillation: rectified flow already has
the Euler step as its sampler, and a shortcut model is exactly a step-size-conditioned velocity, so the
student stays a *velocity* denoiser: d = 0 is the ordinary flow (Heun, the stochastic sampler, any
step count still work), and d = 1/N makes N Euler steps. One network and one training run cover 1, 2,
4, 8, ... steps; progressive distillation (Salimans & Ho 2022; Meng et al. 2023 for guided models)
needs log2(N) sequential rounds and one model per step count; consistency distillation (Song et al.
2023) predicts x_0, so its multi-step sampling re-noises and does not fit the velocity samplers.
Its bootstrap costs two extra no-grad student passes per shortcut row and no teacher passes.

The loop reuses the expert trainer's machinery (imported, not copied): per-step seeding, the epoch
permutation, the bias-corrected EMA, ``Checkpointer`` (kind "student"), ``StopSignal`` (SIGTERM ->
checkpoint, then stop), ``Heartbeat`` and ``MetricsLog``; resuming is exact from the step number.
Checkpoints are a DiT with ``guidance_embed`` (and ``step_embed``) in the metadata, loadable by
``ddm.expert.load`` like an expert's.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ddm.core import checkpoint
from ddm.expert import flow
from ddm.core.checkpoint import CheckpointError
from ddm.expert.denoiser import Denoiser
from ddm.core.ema import EMA
from ddm.expert.guidance import guided
from ddm.core.heartbeat import Heartbeat
from ddm.expert.load import load_denoiser, load_model
from ddm.core.metrics_log import MetricsLog
from ddm.expert.model import DiT, DiTConfig, dit_config
from ddm.core.progress import progress_bar
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
from ddm.router.distill_config import DistillJobConfig, ShortcutConfig
from ddm.router.ensemble import select_weights
from ddm.router.trainer import read_partitions
from torch import nn

Student = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, 1) in like's dtype."""
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


# ----------------------------------------------------------------------------------------------------
# The teacher: guided velocity through the experts a weight matrix selects, with a scale per row.


@torch.no_grad()
def teacher_velocity(
    experts: Sequence[Denoiser],
    x_t: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
    w: torch.Tensor,
) -> torch.Tensor:
    """sum_k weights[:, k] * (v_u,k + w (v_c,k - v_u,k)) (N, C, H, W), each expert called once on its
    rows as one [conditional; unconditional] batch. weights (N, K): one-hot partitions for the paper's
    teacher, or the router's selected probabilities. w (N,) guidance scale per row."""
    null = experts[0].num_classes
    out = torch.zeros_like(x_t)  # (N, C, H, W)
    for k, expert in enumerate(experts):
        rows = weights[:, k].nonzero().squeeze(1)  # (n_k,)
        if rows.numel() == 0:
            continue
        x_k, t_k, y_k = x_t[rows], t[rows], y[rows]
        v = expert.velocity(
            torch.cat([x_k, x_k]), torch.cat([t_k, t_k]), torch.cat([y_k, torch.full_like(y_k, null)])
        )  # (2 n_k, C, H, W)
        v_c, v_u = v.chunk(2)
        out.index_add_(0, rows, _col(weights[rows, k], x_k) * guided(v_c, v_u, _col(w[rows], x_k)))
    return out


def partition_weights(k: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The paper's teacher: row i uses expert k[i] alone. (N,) -> (N, K)."""
    return torch.nn.functional.one_hot(k, num_experts).float()


# ----------------------------------------------------------------------------------------------------
# Shortcut models: which rows learn which step size, and their self-consistency targets.


def shortcut_times(
    n: int, shortcut: ShortcutConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, D) for n bootstrap rows: D = 2^-j with j uniform in {0, ..., levels}, and t uniform on the
    grid {D, 2D, ..., 1} that an N = 1/D step Euler sampler visits. Both (n,) float32."""
    level = torch.randint(0, shortcut.levels + 1, (n,), generator=generator)  # (n,)
    size = torch.pow(2.0, -level.float())  # (n,) D
    steps = torch.pow(2.0, level.float())  # (n,) 1/D
    j = torch.floor(torch.rand(n, generator=generator) * steps) + 1  # (n,) in {1, ..., 1/D}
    return (j * size).clamp(max=1.0), size


@torch.no_grad()
def shortcut_target(
    student: Student,
    x_t: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor,
    size: torch.Tensor,
    min_step: float,
) -> torch.Tensor:
    """Self-consistency target for s(x_t, t, D): the mean of two half steps h = D / 2 (module docstring).

    ``student(x, t, y, w, d)`` is the network; half steps below ``min_step`` are evaluated at d = 0.
    Shapes: x_t (N, C, H, W); t, w, size (N,); y (N,) -> (N, C, H, W).
    """
    h = size / 2  # (N,)
    d_in = torch.where(h >= min_step - 1e-12, h, torch.zeros_like(h))  # (N,)
    s_1 = student(x_t, t, y, w, d_in)  # (N, C, H, W)
    x_mid = x_t - _col(h, x_t) * s_1  # one Euler step of size h towards t = 0
    s_2 = student(x_mid, t - h, y, w, d_in)  # (N, C, H, W)
    return (s_1 + s_2) / 2


# ----------------------------------------------------------------------------------------------------
# Building the student.


def student_config(job: DistillJobConfig, image_shape: tuple[int, int, int]) -> DiTConfig:
    c, h, w = image_shape
    if h != w:
        raise ValueError(f"images are {h}x{w}; the student DiT needs square images")
    return dit_config(
        job.model.arch,
        image_size=h,
        in_channels=c,
        num_classes=job.model.num_classes,
        guidance_embed=True,
        step_embed=job.shortcut.enabled,
    )


def build_student(job: DistillJobConfig, cfg: DiTConfig) -> DiT:
    """The student, from ``train.seed`` or (``model.init = "expert"``) expert 0's EMA weights: then it
    starts as that expert's conditional velocity (the w and d embeddings start at zero output)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.train.seed)
        model = DiT(cfg)
    if job.model.init == "expert":
        expert, meta = load_model(job.experts[0])
        base = {k: v for k, v in cfg.to_dict().items() if k not in ("guidance_embed", "step_embed")}
        if expert.config.to_dict() != base:
            raise ValueError(
                f"model.init = 'expert' needs the student's arch to match the experts': {meta['url']} is "
                f"{meta.get('arch')} ({expert.config.to_dict()}), the student {job.model.arch}; "
                "set model.init = 'random' for another size"
            )
        result = model.load_state_dict(expert.state_dict(), strict=False)
        extra = [k for k in result.missing_keys if not k.startswith(("w_embedder.", "d_embedder."))]
        if extra or result.unexpected_keys:
            raise CheckpointError(f"{meta['url']}: expert weights do not fit the student ({result})")
    return model


def load_experts(urls: Sequence[str], num_classes: int) -> list[Denoiser]:
    experts = []
    for url in urls:
        expert = load_denoiser(url)
        if expert.num_classes != num_classes:
            raise ValueError(
                f"{url}: the expert has {expert.num_classes} classes but model.num_classes is {num_classes}"
            )
        experts.append(expert)
    return experts


# ----------------------------------------------------------------------------------------------------
# The loop.


@dataclass
class Batch:
    x_t: torch.Tensor  # (B, C, H, W)
    t: torch.Tensor  # (B,)
    y: torch.Tensor  # (B,)
    w: torch.Tensor  # (B,) guidance scale
    d: torch.Tensor  # (B,) step size input (0 on teacher rows)
    target: torch.Tensor  # (B, C, H, W)


def train(
    job: DistillJobConfig,
    *,
    resume: bool = True,
    stop_after: int | None = None,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train the student to ``job.train.steps``, resuming from the newest checkpoint when ``resume``;
    ``stop_after`` and ``on_step`` as in the expert trainer. One process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("the distillation trainer runs in one process; launch it with python, not torchrun")
    threads = torch.get_num_threads()
    if job.train.num_threads:
        torch.set_num_threads(job.train.num_threads)
    try:
        return _train(job, resume=resume, stop_after=stop_after, progress=progress, on_step=on_step)
    finally:
        torch.set_num_threads(threads)


def _train(
    job: DistillJobConfig,
    *,
    resume: bool,
    stop_after: int | None,
    progress: bool,
    on_step: Callable[[int], None] | None,
) -> TrainResult:
    tc, sc, tch = job.train, job.shortcut, job.teacher
    d = init_distributed()
    urls = job.data.urls()
    data = read_partitions(urls, limit=job.data.limit)
    if data.dataset.num_classes > job.model.num_classes:
        raise ValueError(
            f"the partitions have {data.dataset.num_classes} classes but model.num_classes is "
            f"{job.model.num_classes}; set it to the experts' num_classes"
        )
    image_shape = data.dataset.image_shape
    cfg = student_config(job, image_shape)
    experts = load_experts(job.experts, cfg.num_classes)
    router = None
    if tch.kind == "ensemble":
        from ddm.router.model import load_router

        router = load_router(tch.router)
    model = build_student(job, cfg).to(d.device)
    ema = EMA(model, tc.ema_decay)
    optimizer = build_optimizer(model, tc)
    checkpointer = Checkpointer(job, cfg, 1, kind="student")  # type: ignore[arg-type]
    checkpointer.meta.update(
        experts=list(job.experts),
        partitions=urls,
        teacher=tch.model_dump(mode="json"),
        shortcut=sc.model_dump(mode="json"),
        class_names=data.dataset.class_names,
    )
    order = BatchOrder(len(data), tc.batch_size, tc.seed)

    start_step, elapsed_before, last_loss = 0, 0.0, math.nan
    if resume:
        restored = checkpointer.restore(model, ema, optimizer)
        if restored is not None:
            start_step = restored.step
            elapsed_before = float(restored.meta.get("elapsed_s", 0.0))
            last_loss = float(restored.meta.get("loss", math.nan))
    else:
        checkpointer.clear()
    if start_step >= tc.steps:
        return TrainResult(start_step, last_loss, checkpoint.latest(checkpointer.directory), 0.0, 0)

    metrics = MetricsLog(job.output, resume_step=start_step, title=f"{job.name} ({job.model.arch})", ylabel="distillation loss")
    heartbeat = Heartbeat(job.output, tc.steps)
    max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
    n_boot = round(tc.batch_size * sc.fraction) if sc.enabled else 0
    n_flow = tc.batch_size - n_boot
    if n_flow < 1:
        raise ValueError(f"train.batch_size {tc.batch_size} leaves no teacher rows; raise it or lower shortcut.fraction")

    def student_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, w: torch.Tensor, dd: torch.Tensor) -> torch.Tensor:
        with precision_context(tc.precision, d.device):
            return model(x, t, y, w=w, d=dd if sc.enabled else None).float()

    def make_batch(step: int) -> Batch:
        gen = torch.Generator().manual_seed(derive_seed(tc.seed, "step", step))
        eps = torch.randn((tc.batch_size, *image_shape), generator=gen)  # (B, C, H, W)
        t_flow = sample_times(n_flow, tc, gen)  # (B_f,)
        t_boot, size = shortcut_times(n_boot, sc, gen)  # (B_s,) each
        u_drop = torch.rand(tc.batch_size, generator=gen)  # (B,)
        w = tch.guidance_min + (tch.guidance_max - tch.guidance_min) * torch.rand(tc.batch_size, generator=gen)
        x_0, y, k = data.batch(order.indices(step))  # (B, C, H, W), (B,), (B,)
        y = drop_labels(y, u_drop, tc.label_dropout, cfg.num_classes)
        t = torch.cat([t_flow, t_boot])  # (B,)
        x_0, y, k, eps, t, w, size = (v.to(d.device) for v in (x_0, y, k, eps, t, w, size))
        x_t = flow.interpolate(x_0, eps, t)  # (B, C, H, W)
        f = slice(0, n_flow)
        if router is None:
            weights = partition_weights(k[f], len(experts))
        else:
            with torch.no_grad():
                probs = router.probabilities(x_t[f], t[f], y[f])  # (B_f, K)
            weights = select_weights(probs, "top-k" if tch.strategy == "top-k" else "full", top_k=tch.top_k)
        target_flow = teacher_velocity(experts, x_t[f], t[f], y[f], weights, w[f])  # (B_f, C, H, W)
        dd = torch.zeros_like(t)
        if n_boot:
            b = slice(n_flow, None)
            dd[b] = size
            model.eval()
            target_boot = shortcut_target(student_fn, x_t[b], t[b], y[b], w[b], size, sc.min_step)
            model.train()
            target = torch.cat([target_flow, target_boot])
        else:
            target = target_flow
        return Batch(x_t, t, y, w, dd, target)

    def train_step(step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = make_batch(step)
        v_pred = student_fn(batch.x_t, batch.t, batch.y, batch.w, batch.d)  # (B, C, H, W)
        loss = torch.mean((v_pred - batch.target.float()) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)
        optimizer.step()
        ema.update(step)
        return loss.detach(), grad_norm.detach(), lr

    bar = progress_bar(total=tc.steps, initial=start_step, desc=job.name, unit="step") if progress else None
    stats = StepStats(d, tc.batch_size)
    ckpt_url: str | None = None
    step, interrupted, finished = start_step, False, False
    heartbeat.beat(start_step, force=True)
    model.train()
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
                    ckpt_url = checkpointer.save(step, model, ema, optimizer, loss=stats.losses[-1], elapsed_s=elapsed)
                if on_step is not None:
                    on_step(step)
                if interrupted:
                    break
        finished = True
    finally:
        if bar is not None:
            bar.close()
        heartbeat.beat(step, state="done" if finished and step >= tc.steps else "stopped", force=True)
    return TrainResult(
        step=step,
        final_loss=stats.losses[-1] if stats.losses else last_loss,
        checkpoint_url=ckpt_url,
        seconds=time.perf_counter() - t0,
        images_seen=(step - start_step) * tc.batch_size,
        losses=stats.losses,
        interrupted=interrupted and step < tc.steps,
    )
