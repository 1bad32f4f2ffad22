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
   run spends its bootstrap rows on 6 step sizes instead of 8. That is ``shortcut.objective =
   "shortcut"`` (the default); ``"meanflow"`` (Geng et al. 2025) learns the same jump as MeanFlow's
   average velocity from the teacher's v, u = v - d du/dt with du/dt by jvp. The objectives, their
   (t, d) draws and targets are the registry ``ddm.router.distill_objectives.OBJECTIVES``; this trainer
   only splits the batch, calls the teacher on the rows that need it and takes the mean squared error.

Why shortcut models rather than progressive or consistency distillation: rectified flow already has
the Euler step as its sampler, and a shortcut model is exactly a step-size-conditioned velocity, so the
student stays a *velocity* denoiser: d = 0 is the ordinary flow (Heun, the stochastic sampler, any
step count still work), and d = 1/N makes N Euler steps. One network and one training run cover 1, 2,
4, 8, ... steps; progressive distillation (Salimans & Ho 2022; Meng et al. 2023 for guided models)
needs log2(N) sequential rounds and one model per step count; consistency distillation (Song et al.
2023) predicts x_0, so its multi-step sampling re-noises and does not fit the velocity samplers.
Its bootstrap costs two extra no-grad student passes per shortcut row and no teacher passes.

The loop is the one training loop (``ddm.core.trainer.Trainer``: per-step seeding, data order, EMA,
precision, DDP or FSDP, checkpoints of kind "student", signals, heartbeat, metrics); resuming is exact
from the step number. The teachers run on the student's device.
Checkpoints are a DiT with ``guidance_embed`` (and ``step_embed``) in the metadata, loadable by
``ddm.expert.load`` like an expert's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ddm.core import device as device_policy
from ddm.core.checkpoint import CheckpointError
from ddm.core.trainer import Trainer, TrainResult, seeded
from ddm.expert import flow
from ddm.expert.data import check_num_classes
from ddm.expert.denoiser import Denoiser
from ddm.expert.guidance import guided
from ddm.expert.images import to_model_input
from ddm.expert.load import load_denoiser, load_model
from ddm.expert.model import DiT, DiTConfig, dit_config
from ddm.expert.objectives import objective_of
from ddm.expert.trainer import drop_labels, sample_times
from ddm.router.distill_config import DistillJobConfig
from ddm.router.distill_objectives import OBJECTIVES
from ddm.router.ensemble import select_weights
from ddm.router.trainer import PartitionData, read_partitions

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
# Building the student.


def student_config(
    job: DistillJobConfig, image_shape: tuple[int, int, int], num_classes: int | None = None
) -> DiTConfig:
    """The student DiT; ``num_classes`` (the data's) is used where the job leaves model.num_classes unset."""
    if job.model.num_classes is not None:
        num_classes = job.model.num_classes
    if num_classes is None:
        raise ValueError("model.num_classes is unset and no dataset gives it; set model.num_classes")
    c, h, w = image_shape
    if h != w:
        raise ValueError(f"images are {h}x{w}; the student DiT needs square images")
    return dit_config(
        job.model.arch,
        image_size=h,
        in_channels=c,
        num_classes=num_classes,
        guidance_embed=True,
        step_embed=job.shortcut.enabled,
    )


def build_student(job: DistillJobConfig, cfg: DiTConfig) -> DiT:
    """The student, from ``train.seed`` or (``model.init = "expert"``) expert 0's EMA weights: then it
    starts as that expert's conditional velocity (the w and d embeddings start at zero output)."""
    model: DiT = seeded(lambda: DiT(cfg), job.train.seed)  # type: ignore[assignment]
    if job.model.init == "expert":
        expert, meta = load_model(job.experts[0])
        base = {k: v for k, v in cfg.to_dict().items() if k not in ("guidance_embed", "step_embed")}
        if expert.config.to_dict() != base:
            raise ValueError(
                f"model.init = 'expert' needs the student's arch to match the experts': {meta['url']} is "
                f"{meta.get('arch')} ({expert.config.to_dict()}), the student {job.model.arch}; "
                "set model.init = 'random' for another size"
            )
        objective = objective_of(meta, meta["url"]).name
        if objective != "velocity":  # the student predicts velocities: an eps/x0 network is no head start
            raise ValueError(
                f"model.init = 'expert' needs expert 0 to predict the velocity, but {meta['url']} predicts "
                f"{objective} (docs/heterogeneous.md); set model.init = 'random'"
            )
        result = model.load_state_dict(expert.state_dict(), strict=False)
        extra = [k for k in result.missing_keys if not k.startswith(("w_embedder.", "d_embedder."))]
        if extra or result.unexpected_keys:
            raise CheckpointError(f"{meta['url']}: expert weights do not fit the student ({result})")
    return model


def load_experts(urls: Sequence[str], num_classes: int, device: torch.device | str = "cpu") -> list[Denoiser]:
    experts = []
    for url in urls:
        expert = load_denoiser(url, device=device)
        if expert.num_classes != num_classes:
            raise ValueError(
                f"{url}: the expert has {expert.num_classes} classes but model.num_classes is {num_classes}"
            )
        experts.append(expert)
    return experts


# ----------------------------------------------------------------------------------------------------
# The trainer.


class StudentTrainer(Trainer[DistillJobConfig]):
    kind = "student"
    loss_label = "distillation loss"

    def build_data(self) -> PartitionData:
        job, tch, sc, tc = self.job, self.job.teacher, self.job.shortcut, self.tc
        self.urls = job.data.urls()
        data = read_partitions(self.urls, limit=job.data.limit)
        num_classes = data.dataset.num_classes if job.model.num_classes is None else job.model.num_classes
        check_num_classes(
            data.dataset.num_classes, num_classes, source=self.urls[0], field="model.num_classes"
        )
        self.latent = (data.dataset.meta or {}).get("latent")  # None in pixel space
        self.class_names = data.dataset.class_names
        self.image_shape = data.dataset.image_shape
        self.cfg = student_config(job, self.image_shape, num_classes)
        self.time_shift = flow.resolve_time_shift(tc.time_shift, self.image_shape)  # the experts' rule
        self.n_boot = round(tc.batch_size * sc.fraction) if sc.enabled else 0
        self.n_flow = tc.batch_size - self.n_boot
        if self.n_flow < 1:
            raise ValueError(
                f"train.batch_size {tc.batch_size} leaves no teacher rows; raise it or lower shortcut.fraction"
            )
        self.experts = load_experts(job.experts, self.cfg.num_classes, self.device)
        for url in job.experts:
            device_policy.announce(f"{job.name}: teacher expert {url}", self.device, tc.device)
        self.router = None
        if tch.kind == "ensemble":
            from ddm.router.model import load_router

            self.router = load_router(tch.router, device=self.device)
            device_policy.announce(f"{job.name}: teacher router {tch.router}", self.device, tc.device)
        return data

    def build_model(self) -> DiT:
        return build_student(self.job, self.cfg)

    def checkpoint_meta(self) -> dict[str, Any]:
        job = self.job
        return dict(
            experts=list(job.experts),
            partitions=self.urls,
            teacher=job.teacher.model_dump(mode="json"),
            shortcut=job.shortcut.model_dump(mode="json"),
            class_names=self.class_names,
            time_shift=self.time_shift,
            **({"latent": self.latent} if self.latent else {}),
        )

    def student(self, net: nn.Module) -> Student:
        """``net`` as ``s(x, t, y, w, d)`` in the job's precision (d ignored without shortcut models)."""
        shortcut = self.job.shortcut.enabled

        def s(
            x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, w: torch.Tensor, d: torch.Tensor
        ) -> torch.Tensor:
            with self.autocast():
                return net(x, t, y, w=w, d=d if shortcut else None).float()

        return s

    def loss(self, step: int, batch: tuple[torch.Tensor, ...], gen: torch.Generator) -> torch.Tensor:
        tc, sc, tch, rows = self.tc, self.job.shortcut, self.job.teacher, self.rows
        objective = OBJECTIVES.entry(sc.objective)
        n = (
            tc.batch_size
        )  # the global batch: rows [0, n_flow) learn the teacher, the rest the objective's jumps
        eps = torch.randn((n, *self.image_shape), generator=gen)  # (B, C, H, W)
        t_flow = sample_times(self.n_flow, tc, gen, self.time_shift)  # (B_f,)
        t_boot, size = objective.value.times(self.n_boot, sc, gen)  # (B_s,) each
        u_drop = torch.rand(n, generator=gen)  # (B,)
        w = tch.guidance_min + (tch.guidance_max - tch.guidance_min) * torch.rand(n, generator=gen)  # (B,)
        t = torch.cat([t_flow, t_boot])  # (B,)
        d_in = torch.cat([torch.zeros(self.n_flow), size])  # (B,) step-size input, 0 on teacher rows
        eps, t, u_drop, w, d_in = (v[rows] for v in (eps, t, u_drop, w, d_in))
        images, y, k = batch  # uint8 (b, C, H, W), (b,), (b,)
        y = drop_labels(y, u_drop, tc.label_dropout, self.cfg.num_classes)
        images, y, k, eps, t, w, d_in = self.to_device(images, y, k, eps, t, w, d_in)
        x_t = flow.interpolate(to_model_input(images), eps, t)  # (b, C, H, W)
        n_f = min(max(self.n_flow - rows.start, 0), rows.stop - rows.start)  # this rank's teacher rows
        f, b = slice(0, n_f), slice(n_f, None)
        taught = slice(None) if objective.teacher else f  # the rows whose target needs the teacher
        if self.router is None:
            weights = partition_weights(k[taught], len(self.experts))
        else:
            with torch.no_grad():
                probs = self.router.probabilities(x_t[taught], t[taught], y[taught])  # (b_t, K)
            weights = select_weights(probs, tch.strategy, top_k=tch.top_k, threshold=tch.threshold)
        v_teacher = teacher_velocity(self.experts, x_t[taught], t[taught], y[taught], weights, w[taught])
        target = v_teacher[f]  # (b_f, C, H, W)
        if n_f < x_t.shape[0]:
            v_boot = v_teacher[b] if objective.teacher else None
            self.model.eval()
            boot = objective.value.target(
                self.student(self.model), x_t[b], t[b], y[b], w[b], d_in[b], v_boot, sc
            )
            self.model.train()
            target = torch.cat([target, boot])
        v_pred = self.student(self.net)(x_t, t, y, w, d_in)  # (b, C, H, W)
        return torch.mean((v_pred - target.float()) ** 2)


def train(job: DistillJobConfig, **options: Any) -> TrainResult:
    """Train the student (options as ``ddm.core.trainer.Trainer``: resume, stop_after, progress, on_step)."""
    return StudentTrainer(job, **options).run()
