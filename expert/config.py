"""Typed, validated configuration for the expert core, loaded from TOML.

Every field carries its help text, so ``--help``, the docs and the error messages come from one
definition. Unknown keys are rejected (a typo is an error, not a silently ignored setting).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ddm.core.config import JobConfig, Strict, TrainConfig
from ddm.expert.objectives import OBJECTIVES
from ddm.expert.samplers import SAMPLERS, TIME_GRIDS
from ddm.expert.sizes import DIT_ARCHS
from ddm.expert.sources import SOURCES


class DataConfig(Strict):
    """Where the images come from: a ``ddm.expert.sources.SOURCES`` entry and its settings (docs/data.md)."""

    source: SOURCES.field() = Field(  # type: ignore[valid-type]
        "fashion-mnist",
        description="where images come from (ddm.expert.sources.SOURCES): " + SOURCES.describe(),
    )
    path: str = Field(
        "/usr/share/datasets/fashion-mnist",
        description="dataset location (local or s3://): the Fashion-MNIST directory, an image folder, tar shard URLs "
        "with braces (shards-{000..009}.tar), a parquet file or folder of them, or a shards directory",
    )
    split: Literal["train", "test"] = Field("train", description="Fashion-MNIST split")
    image_size: int | None = Field(
        None,
        ge=8,
        le=1024,
        description="square side of the images; image folders are center-cropped and resized to it. Default: the "
        "data's own (an image folder's first image, its shorter side); a fixed-size source must match it",
    )
    channels: Literal[1, 3] | None = Field(
        None,
        description="1 for grayscale, 3 for RGB; image folders are converted to it. Default: the data's own (an "
        "image folder's first image: 3 if it is in colour); a fixed-shape source must match it",
    )
    limit: int | None = Field(None, ge=1, description="use only the first N examples (quick runs and tests)")
    image_field: str = Field(
        "image",
        min_length=1,
        description="parquet: the image column (binary, or a struct with 'bytes' as Hugging Face writes it)",
    )
    label_field: str = Field(
        "label",
        description="parquet: the integer label column; webdataset: the key of NAME.json holding the label "
        "(NAME.cls holds the label itself); '' = the data has no labels (unconditional)",
    )


class ModelConfig(Strict):
    arch: str = Field("DiT-T/4", description=f"DiT size from the registry: {', '.join(DIT_ARCHS)}")
    num_classes: int | None = Field(
        None,
        ge=0,
        description="number of class labels (one more, the null class, is added for guidance); default: the "
        "data's (an image folder: its class sub-folders); 0: unlabelled data, an unconditional model",
    )
    objective: OBJECTIVES.field() = Field(  # type: ignore[valid-type]
        "velocity",
        description="what the network predicts (ddm.expert.objectives.OBJECTIVES), converted exactly to a "
        "velocity when served: " + OBJECTIVES.describe(),
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        if v not in DIT_ARCHS:
            raise ValueError(f"unknown architecture {v!r}; choose one of {', '.join(DIT_ARCHS)}")
        return v


class SampleConfig(Strict):
    """How to sample: the one definition of every sampling setting and its default. ``ddm sample``,
    ``ddm eval`` and ``ddm serve`` build their options from these fields (``ddm.core.cli``), the router's
    ``SampleDefaults`` extends this model, and the run config's ``[eval.sample]`` is this table."""

    steps: int = Field(32, ge=1, le=10_000, description="sampler steps")
    sampler: SAMPLERS.field() = Field(  # type: ignore[valid-type]
        "euler", description="sampler (ddm.expert.samplers.SAMPLERS): " + SAMPLERS.describe()
    )
    guidance: float = Field(
        3.0, ge=0, le=100, description="classifier-free guidance scale (1 = none, 0 = unconditional)"
    )
    time_grid: TIME_GRIDS.field() = Field(  # type: ignore[valid-type]
        "uniform", description="time grid (ddm.expert.samplers.TIME_GRIDS): " + TIME_GRIDS.describe()
    )
    time_shift: float | None = Field(
        None,
        gt=0,
        description="time shift of the sampling grid (1 = none); unset: the one the models were trained with "
        "(recorded in their checkpoints; by default derived from the shape they denoise, ddm.expert.flow."
        "derived_time_shift)",
    )
    churn: float = Field(
        0.5,
        ge=0,
        le=1,
        description="stochastic sampler: 0 = deterministic (Euler), 1 = ancestral (DDPM-like), between = DDIM eta",
    )


class ExpertJobConfig(JobConfig):
    """One expert training job: a data partition (or the whole set: the monolith) -> checkpoints."""

    kind: Literal["expert"] = Field("expert", description="the job kind (ddm.train picks the trainer by it)")
    name: str = Field("monolith", description="expert name, used in paths and logs")
    output: str = Field(
        "runs/monolith", description="output directory (local or s3://): checkpoints/, metrics.csv, samples"
    )
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
