"""Typed, validated configuration for the expert core, loaded from TOML.

Every field carries its help text, so ``--help``, the docs and the error messages come from one
definition. Unknown keys are rejected (a typo is an error, not a silently ignored setting).
"""

from __future__ import annotations

import tomllib
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ddm.expert import storage
from ddm.expert.model import DIT_ARCHS


class ConfigError(ValueError):
    """A configuration problem; the message names the file, the field and the fix."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Strict):
    source: Literal["fashion-mnist", "image-folder", "shards"] = Field(
        "fashion-mnist", description="where images come from: Debian's Fashion-MNIST, a folder of images, or partition shards"
    )
    path: str = Field(
        "/usr/share/datasets/fashion-mnist",
        description="dataset location: the Fashion-MNIST directory, an image folder (one sub-folder per class), or a shards directory (local or s3://)",
    )
    split: Literal["train", "test"] = Field("train", description="Fashion-MNIST split")
    image_size: int = Field(28, ge=8, le=1024, description="images are resized (folders) to this square size")
    channels: Literal[1, 3] = Field(1, description="1 for grayscale, 3 for RGB")
    limit: int | None = Field(None, ge=1, description="use only the first N examples (quick runs and tests)")


class ModelConfig(Strict):
    arch: str = Field("DiT-T/4", description=f"DiT size from the registry: {', '.join(DIT_ARCHS)}")
    num_classes: int = Field(10, ge=1, description="number of class labels (one more, the null class, is added for guidance)")

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        if v not in DIT_ARCHS:
            raise ValueError(f"unknown architecture {v!r}; choose one of {', '.join(DIT_ARCHS)}")
        return v


class TrainConfig(Strict):
    steps: int = Field(2000, ge=1, description="optimizer steps")
    batch_size: int = Field(128, ge=1, description="global batch size (split across torchrun processes)")
    lr: float = Field(1e-3, gt=0, description="AdamW peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    beta2: float = Field(0.99, ge=0, lt=1, description="AdamW beta2")
    warmup_steps: int = Field(100, ge=0, description="linear learning-rate warm-up steps")
    grad_clip: float = Field(1.0, ge=0, description="clip the global gradient norm to this (0 disables)")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA decay of the weights used for sampling")
    label_dropout: float = Field(0.1, ge=0, le=1, description="probability of replacing the class by the null class (classifier-free guidance)")
    time_sampling: Literal["uniform", "logit-normal"] = Field("logit-normal", description="distribution of training times t")
    logit_mean: float = Field(0.0, description="mean of the logit-normal time distribution")
    logit_std: float = Field(1.0, gt=0, description="std of the logit-normal time distribution")
    time_shift: float = Field(1.0, gt=0, description="resolution-dependent time shift applied to sampled t (1 = none)")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 runs the forward/backward under CPU/GPU autocast")
    seed: int = Field(0, description="seed for initialisation, data order, noise and times")
    checkpoint_every: int = Field(500, ge=1, description="save a checkpoint every N steps (and at the end)")
    keep_checkpoints: int = Field(3, ge=1, description="keep only the newest N checkpoints")
    log_every: int = Field(25, ge=1, description="write metrics every N steps")
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's choice)")


class SampleConfig(Strict):
    steps: int = Field(32, ge=1, le=10_000, description="sampler steps")
    sampler: Literal["euler", "heun", "stochastic"] = Field("euler", description="ODE (euler, heun) or SDE-like (stochastic) sampler")
    guidance: float = Field(3.0, ge=0, le=100, description="classifier-free guidance scale (1 = none, 0 = unconditional)")
    time_shift: float = Field(1.0, gt=0, description="time shift of the sampling grid")
    churn: float = Field(0.5, ge=0, le=1, description="stochastic sampler: 0 = deterministic (Euler), 1 = ancestral (DDPM-like), between = DDIM eta")


class ExpertJobConfig(Strict):
    """One expert training job: a data partition (or the whole set: the monolith) -> checkpoints."""

    name: str = Field("monolith", description="expert name, used in paths and logs")
    output: str = Field("runs/monolith", description="output directory (local or s3://): checkpoints/, metrics.csv, samples")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()


T = TypeVar("T", bound=BaseModel)


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field; check the spelling against the documented fields"
        lines.append(f"  {field}: {msg}")
    return "\n".join(lines)


def parse_config(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def load_toml(url: str) -> dict[str, Any]:
    try:
        return tomllib.loads(storage.read_bytes(url).decode())
    except FileNotFoundError:
        raise ConfigError(f"{url}: config file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{url}: not valid TOML ({e})") from None


def load_config(cls: type[T], url: str) -> T:
    return parse_config(cls, load_toml(url), url)
