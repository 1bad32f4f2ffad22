"""The expert trainer: one flow-matching DiT on one data partition (or the whole set: the monolith).

A short specialisation of the one training loop (``ddm.core.trainer.Trainer``), which owns
distribution, determinism, precision, EMA, checkpoints, signals and metrics. The expert names its data
(``build_training_dataset``: partition shards streamed, other sources in memory), its model (a DiT sized by ``model.arch``) and its objective for one step's batch:
flow matching with classifier-free label dropout,

    x_t = (1 - t) x_0 + t eps,    loss = || f_theta(x_t, t, y) - target(x_0, eps) ||^2,

with the target of ``model.objective`` (``ddm.expert.objectives``: the velocity eps - x_0 by default,
or eps, or x_0; the checkpoint records it, so serving converts the prediction to a velocity), t from
``train.time_sampling`` and y replaced by the null class with probability ``train.label_dropout``.
"""

from __future__ import annotations

from typing import Any

import torch

from ddm.core import checkpoint, storage
from ddm.core.config import TrainConfig
from ddm.core.trainer import Trainer, TrainResult, seeded
from ddm.expert import flow
from ddm.expert.config import ExpertJobConfig
from ddm.expert.data import ImageDataset, build_training_dataset, check_num_classes
from ddm.expert.images import to_model_input
from ddm.expert.model import DiT, DiTConfig, dit_config
from ddm.expert.objectives import OBJECTIVES, objective_of
from ddm.expert.stream import StreamedDataset


def drop_labels(y: torch.Tensor, u: torch.Tensor, p: float, null_label: int) -> torch.Tensor:
    """Classifier-free guidance dropout: replace y[i] by the null class where u[i] < p.

    ``u`` are uniform(0, 1) draws, one per label, made by the caller so the choice is reproducible.
    """
    return torch.where(u < p, torch.full_like(y, null_label), y)


def sample_times(n: int, train: TrainConfig, generator: torch.Generator, shift: float) -> torch.Tensor:
    """n training times from ``train.time_sampling``, shifted by ``shift`` (the job's resolved
    ``flow.resolve_time_shift(train.time_shift, shape)``, recorded in its checkpoints)."""
    if train.time_sampling == "uniform":
        t = flow.sample_t_uniform(n, generator=generator)
    else:
        t = flow.sample_t_logit_normal(n, train.logit_mean, train.logit_std, generator=generator)
    return flow.shift_time(t, shift)  # (n,)


def model_config(job: ExpertJobConfig, dataset: ImageDataset | StreamedDataset | None = None) -> DiTConfig:
    """The DiT of a job; what the job leaves unset (data.channels, data.image_size, model.num_classes)
    is the dataset's, which is then required. On a latent partition (its index records the latent
    space) the DiT denoises the latents' shape; data.image_size and data.channels describe the pixels."""
    unset = job.data.channels is None or job.data.image_size is None or job.model.num_classes is None
    if unset and dataset is None:
        raise ValueError("data.channels, data.image_size and model.num_classes must be set without a dataset")
    c, size = job.data.channels, job.data.image_size
    if dataset is not None and (unset or (dataset.meta or {}).get("latent")):
        if (dataset.meta or {}).get("latent"):
            c, size, w = dataset.image_shape
            if size != w:
                raise ValueError(
                    f"latents of shape {tuple(dataset.image_shape)} are not square; the DiT needs h == w"
                )
        else:
            c, size = c or dataset.image_shape[0], size or dataset.image_shape[1]
    return dit_config(
        job.model.arch,
        image_size=size,
        in_channels=c,
        num_classes=dataset.num_classes if job.model.num_classes is None else job.model.num_classes,  # type: ignore[union-attr]
    )


def build_model(cfg: DiTConfig, seed: int) -> DiT:
    """The DiT initialised from ``seed`` without disturbing the caller's global RNG."""
    return seeded(lambda: DiT(cfg), seed)  # type: ignore[return-value]


def check_dataset(dataset: ImageDataset | StreamedDataset, cfg: DiTConfig, job: ExpertJobConfig) -> None:
    shape = tuple(dataset.image_shape)
    want = (cfg.in_channels, cfg.image_size, cfg.image_size)
    if shape != want:
        raise ValueError(
            f"data from {job.data.path} has images of shape {shape} but the model expects {want}; "
            "set data.channels and data.image_size to match the data"
        )
    check_num_classes(dataset.num_classes, cfg.num_classes, source=job.data.path, field="model.num_classes")


class ExpertTrainer(Trainer[ExpertJobConfig]):
    kind = "expert"
    loss_label = "flow-matching loss"

    def checkpoint_meta(self) -> dict[str, Any]:
        # what serving converts from (objectives.objective_of); the names `ddm sample --labels` takes
        meta = {"objective": self.job.model.objective, "class_names": self.data.class_names}
        return {**meta, "time_shift": self.time_shift, **({"latent": self.latent} if self.latent else {})}

    def restored(self, step: int) -> None:
        """A resume continues the objective its checkpoints were trained with, or refuses (the model
        config is checked by the checkpointer; the objective lives in the metadata)."""
        if step == 0:
            return
        url = storage.join(self.checkpointer.directory, checkpoint.file_name(step))
        trained = objective_of(storage.read_json(url.removesuffix(".safetensors") + ".json"), url).name
        if trained != self.job.model.objective:
            raise ValueError(
                f"{self.job.name}: the checkpoints in {self.checkpointer.directory} were trained with objective "
                f"{trained!r}, but model.objective is {self.job.model.objective!r}; set it back to {trained!r}, "
                "or train into a new output directory"
            )

    def build_data(self) -> ImageDataset | StreamedDataset:
        dataset = build_training_dataset(self.job.data)
        self.latent = (dataset.meta or {}).get("latent")  # the latent space's record, None in pixel space
        self.cfg = model_config(self.job, dataset)
        check_dataset(dataset, self.cfg, self.job)
        shape = (self.cfg.in_channels, self.cfg.image_size, self.cfg.image_size)
        self.time_shift = flow.resolve_time_shift(self.tc.time_shift, shape)
        return dataset

    def build_model(self) -> DiT:
        return build_model(self.cfg, self.tc.seed)

    def loss(self, step: int, batch: tuple[torch.Tensor, ...], gen: torch.Generator) -> torch.Tensor:
        tc, cfg, rows = self.tc, self.cfg, self.rows
        eps = torch.randn((tc.batch_size, cfg.in_channels, cfg.image_size, cfg.image_size), generator=gen)[
            rows
        ]
        t = sample_times(tc.batch_size, tc, gen, self.time_shift)[rows]  # (b,)
        u_drop = torch.rand(tc.batch_size, generator=gen)[rows]  # (b,)
        images, y = batch  # uint8 (b, C, H, W), (b,)
        y = drop_labels(y, u_drop, tc.label_dropout, cfg.num_classes)
        images, y, eps, t = self.to_device(images, y, eps, t)
        x_0 = to_model_input(images)  # (b, C, H, W), converted on the device
        objective = OBJECTIVES.get(self.job.model.objective, field="model.objective")
        return objective.training_loss(self._forward, x_0, eps, t, y)

    def _forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.net(x_t, t, y)  # (b, C, H, W)


def train(job: ExpertJobConfig, **options: Any) -> TrainResult:
    """Train one expert (options as ``ddm.core.trainer.Trainer``: resume, stop_after, progress, on_step)."""
    return ExpertTrainer(job, **options).run()
