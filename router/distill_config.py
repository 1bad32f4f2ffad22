"""Typed, validated configuration of a distillation job (``python -m ddm.router.distill_train``).

    name = "student"
    output = "runs/demo/distill"
    experts = ["runs/demo/experts/expert-0", ...]   # checkpoint dirs (or files), expert k = partition k
    [data]
    root = "runs/demo"      # partitions/expert-0 .. expert-{k-1}: x_0 and its partition label
    k = 4
    [model]
    arch = "DiT-T/4"        # the student's size: smaller, equal or larger than one expert
    init = "expert"         # start from expert 0's EMA weights when the arch matches ("random": from scratch)
    [teacher]
    kind = "partition"      # the expert of each example's partition (the paper); "ensemble": the router's mix
    guidance_min = 1.0      # w ~ U[guidance_min, guidance_max] per example (the student's w input)
    guidance_max = 5.0
    [shortcut]
    enabled = true
    objective = "shortcut"  # or "meanflow": what the step-size rows learn (ddm.router.distill_objectives)
    min_step = 0.03125      # 1/32: the smallest shortcut step (below it, two Euler half steps of the flow)
    fraction = 0.25         # share of each batch that trains the self-consistency (bootstrap) targets
    [train]                 # ddm.expert.config.TrainConfig with the distillation defaults below
    steps = 2000

The train table is the expert's ``TrainConfig``; fields a job does not set take ``DISTILL_TRAIN_DEFAULTS``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ddm.core.config import JobConfig, Strict, train_with_defaults
from ddm.expert.sizes import DIT_ARCHS
from ddm.router.config import RouterDataConfig, RoutingConfig
from ddm.router.distill_objectives import OBJECTIVES
from ddm.router.strategies import STRATEGIES

# Distillation defaults that differ from an expert's:
#  * no label dropout: the unconditional rows' target is the teacher's unconditional velocity, which w
#    already covers (w = 0); the student sees the class on every row and learns the guided field;
#  * lower lr than from-scratch training: the student usually starts from an expert's weights;
#  * EMA 0.995: short jobs;
#  * uniform t: the shortcut bootstrap evaluates the d = 0 student at every t, t = 1 included.
DISTILL_TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 2000,
    "time_sampling": "uniform",
    "lr": 3e-4,
    "warmup_steps": 50,
    "label_dropout": 0.0,
    "ema_decay": 0.995,
    "checkpoint_every": 250,
}
DistillTrainConfig = train_with_defaults(
    DISTILL_TRAIN_DEFAULTS, "student training (distillation defaults: lr 3e-4, uniform t, no label dropout)"
)


class StudentModelConfig(Strict):
    arch: str = Field("DiT-T/4", description=f"student DiT size from the registry: {', '.join(DIT_ARCHS)}")
    num_classes: int | None = Field(
        None,
        ge=0,
        description="class labels; must equal the experts' (the null class is shared); 0: unconditional. "
        "Default: the experts' in a run, the partitions' in a distillation job",
    )
    init: Literal["expert", "random"] = Field(
        "expert",
        description="'expert': start from expert 0's EMA weights (needs the experts' arch); 'random': from scratch",
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        if v not in DIT_ARCHS:
            raise ValueError(f"unknown architecture {v!r}; choose one of {', '.join(DIT_ARCHS)}")
        return v


class TeacherSettings(Strict):
    """Who teaches and at which guidance scales (the run config's ``[distill.teacher]``)."""

    kind: Literal["partition", "ensemble"] = Field(
        "partition",
        description="'partition': each example's teacher is the expert of its partition (DDM paper); "
        "'ensemble': the router-weighted ensemble (needs the router)",
    )
    strategy: STRATEGIES.field(routed=True) = Field(  # type: ignore[valid-type]
        "top-k",
        description="ensemble teacher: expert selection, any routed strategy (ddm.router.strategies.STRATEGIES)",
    )
    top_k: int = Field(1, ge=1, description="ensemble teacher: experts per row for top-k")
    threshold: float = RoutingConfig.model_fields["threshold"]  # the one definition of its default and bounds
    guidance_min: float = Field(1.0, ge=0, le=100, description="smallest guidance scale w drawn for training")
    guidance_max: float = Field(5.0, ge=0, le=100, description="largest guidance scale w drawn for training")

    @model_validator(mode="after")
    def _range(self) -> TeacherSettings:
        if self.guidance_max < self.guidance_min:
            raise ValueError(
                f"guidance_max ({self.guidance_max}) is below guidance_min ({self.guidance_min}); swap them"
            )
        return self


class TeacherConfig(TeacherSettings):
    """The job's teacher: the settings plus the router checkpoint an ensemble teacher needs."""

    router: str | None = Field(
        None, description="router checkpoint (file or directory) for kind = 'ensemble'"
    )

    @model_validator(mode="after")
    def _router_for_ensemble(self) -> TeacherConfig:
        if self.kind == "ensemble" and not self.router:
            raise ValueError("teacher.kind = 'ensemble' needs teacher.router (the router checkpoint)")
        return self


class ShortcutConfig(Strict):
    """Step distillation: the student's step-size input d and the objective its d > 0 rows learn."""

    enabled: bool = Field(
        True, description="step distillation: the student takes the step size d (few-step sampling)"
    )
    objective: OBJECTIVES.field() = Field(  # type: ignore[valid-type]
        "shortcut",
        description=f"what the d > 0 rows learn (ddm.router.distill_objectives): {OBJECTIVES.describe()}",
    )
    min_step: float = Field(
        1 / 32,
        gt=0,
        le=1,
        description="smallest shortcut step (a power of 1/2): its target is two Euler half steps of the d = 0 "
        "flow, so 1/32 bootstraps from a 64-step Euler solution; smaller adds levels, each trained less",
    )
    fraction: float = Field(
        0.25, gt=0, lt=1, description="share of each batch trained on the objective's d > 0 targets"
    )
    meanflow_times: Literal["grid", "uniform"] = Field(
        "grid",
        description="meanflow: (t, d) of its rows; 'grid': the steps a 1..1/min_step step Euler sampler takes "
        "(the shortcut grid); 'uniform': t, r the sorted pair of two U[0, 1] draws",
    )

    @field_validator("min_step")
    @classmethod
    def _power_of_half(cls, v: float) -> float:
        levels = -math.log2(v)
        if abs(levels - round(levels)) > 1e-9:
            raise ValueError(f"min_step must be 1/2^n (e.g. 0.03125 = 1/32), got {v}")
        return v

    @property
    def levels(self) -> int:
        """log2(1 / min_step): the shortcut sizes D are 2^-j for j = 0..levels (1, 1/2, ..., min_step)."""
        return round(-math.log2(self.min_step))


class DistillJobConfig(JobConfig):
    """One distillation job: K experts (+ router) and their partitions -> one student checkpoint."""

    kind: Literal["student"] = Field(
        "student", description="the job kind (ddm.train picks the trainer by it)"
    )
    name: str = Field("student", description="job name, used in logs")
    output: str = Field(
        "runs/distill", description="output directory (local or s3://): checkpoints/, metrics.csv"
    )
    experts: list[str] = Field(description="expert checkpoint files or directories, in partition order")
    data: RouterDataConfig
    model: StudentModelConfig = StudentModelConfig()
    teacher: TeacherConfig = TeacherConfig()
    shortcut: ShortcutConfig = ShortcutConfig()
    train: DistillTrainConfig

    @model_validator(mode="after")
    def _experts_match_partitions(self) -> DistillJobConfig:
        n = len(self.data.urls())
        if len(self.experts) != n:
            raise ValueError(
                f"experts lists {len(self.experts)} checkpoint(s) but data has {n} partitions; "
                "give one expert per partition, in partition order"
            )
        return self


class DistillEvalConfig(Strict):
    """The distillation table: the guided top-1 ensemble and the student at several step counts, one run."""

    enabled: bool = Field(
        True, description="evaluate the student against the guided top-1 ensemble after training"
    )
    ensemble_steps: list[int] = Field(
        [8, 16, 32], description="sampler steps of the guided top-1 ensemble rows"
    )
    student_steps: list[int] = Field([1, 2, 4, 8], description="sampler steps of the student rows")
    num_samples: int | None = Field(None, ge=10, description="images per row (default: eval.num_samples)")
    guidance: float | None = Field(
        None, ge=0, le=100, description="guidance scale of every row (default: eval.sample.guidance)"
    )

    @field_validator("ensemble_steps", "student_steps")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(s < 1 for s in v):
            raise ValueError(f"step counts must be >= 1, got {v}")
        return v


class DistillStageConfig(Strict):
    """The run config's ``[distill]``: a student trained after eval as its own TorchX job, then evaluated."""

    enabled: bool = Field(True, description="distil the experts into one student (experts mode)")
    island: str | None = Field(
        None, description="island to train on (default: the islands file's default island)"
    )
    model: StudentModelConfig = StudentModelConfig()
    teacher: TeacherSettings = TeacherSettings()
    shortcut: ShortcutConfig = ShortcutConfig()
    train: DistillTrainConfig
    eval: DistillEvalConfig = DistillEvalConfig()
