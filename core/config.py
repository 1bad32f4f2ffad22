"""The config base every job shares: strict typed models (unknown keys are errors), TOML loading, error
messages that name the file and the field, and the training loop's own settings (``TrainConfig``).

Every field carries its help text, so ``--help``, the docs and the error messages come from one
definition.
"""

from __future__ import annotations

import difflib
import tomllib
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from ddm.core import storage
from ddm.core.device import DEVICE_HELP, DEVICE_PATTERN, PRECISION_HELP


class ConfigError(ValueError):
    """A configuration problem; the message names the file, the field and the fix."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    label_dropout: float = Field(
        0.1,
        ge=0,
        le=1,
        description="probability of replacing the class by the null class (classifier-free guidance)",
    )
    time_sampling: Literal["uniform", "logit-normal"] = Field(
        "logit-normal", description="distribution of training times t"
    )
    logit_mean: float = Field(0.0, description="mean of the logit-normal time distribution")
    logit_std: float = Field(1.0, gt=0, description="std of the logit-normal time distribution")
    time_shift: float | None = Field(
        None,
        gt=0,
        description="resolution-dependent time shift applied to sampled t (1 = none); unset: derived from "
        "the shape the model denoises by the SD3 rule, sqrt(C*H*W / 784) (1 at 28x28 grayscale), and recorded "
        "in the checkpoint; sampling uses the recorded value unless its own time_shift is set",
    )
    device: str = Field("auto", pattern=DEVICE_PATTERN, description=DEVICE_HELP)
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description=PRECISION_HELP)
    compile: bool = Field(
        False, description="torch.compile the network (opt-in: the first steps pay the compile time)"
    )
    parallelism: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="with several processes (torchrun): 'ddp' replicates the model on every device, "
        "'fsdp' shards parameters, gradients and optimizer state (FSDP2) for models larger than one device",
    )
    seed: int = Field(0, description="seed for initialisation, data order, noise and times")
    checkpoint_every: int = Field(500, ge=1, description="save a checkpoint every N steps (and at the end)")
    keep_checkpoints: int = Field(3, ge=1, description="keep only the newest N checkpoints")
    log_every: int = Field(25, ge=1, description="write metrics every N steps")
    num_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads (default: torch's choice)"
    )
    loader_workers: int = Field(
        2,
        ge=0,
        description="DataLoader worker processes that read streamed partition shards (0 = read them in the training process; in-memory sources are always read there)",
    )
    loader_prefetch: int = Field(
        2, ge=1, description="batches each DataLoader worker reads ahead of the step being trained"
    )


def train_with_defaults(defaults: dict[str, Any], description: str) -> Any:
    """The type of a ``train`` table whose unset fields take ``defaults`` instead of TrainConfig's (a
    router or student job trains differently from an expert): the one definition of that merge, for
    every job and stage config that has one. Use it as the field's annotation, with no default."""
    unknown = set(defaults) - set(TrainConfig.model_fields)
    if unknown:
        raise ValueError(f"defaults for unknown TrainConfig fields: {sorted(unknown)}")

    def merge(v: Any) -> Any:
        return {**defaults, **v} if isinstance(v, dict) else v

    return Annotated[
        TrainConfig,
        BeforeValidator(merge),
        Field(default_factory=lambda: TrainConfig(**defaults), description=description),
    ]


class JobConfig(Strict):
    """The base of every training job's config (expert, router, student): a name, an output directory
    and the training loop's settings; each job adds its data, model and objective sections."""

    kind: str = Field(description="which trainer runs the job: expert, router or student (ddm.train's JOBS)")
    name: str = Field(description="job name, used in paths and logs")
    output: str = Field(
        description="output directory (local or s3://): checkpoints/, metrics.csv, heartbeat.json"
    )
    train: TrainConfig = TrainConfig()


T = TypeVar("T", bound=BaseModel)


def format_validation_error(
    err: ValidationError, source: str, cls: type[BaseModel] | None = None, overridden: tuple[str, ...] = ()
) -> str:
    """One line per problem, naming the field. An unknown field gets the closest known names of its
    section ("did you mean"); a problem in a field set by ``--set`` says so, not the file."""
    lines = []
    all_set = True
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        field = ".".join(loc) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            known = _fields_at(cls, loc[:-1]) if cls is not None else []
            close = difflib.get_close_matches(loc[-1], known, n=3, cutoff=0.6) if loc else []
            if close:
                msg = f"unknown field; did you mean {' or '.join(repr('.'.join([*loc[:-1], c])) for c in close)}?"
            elif known:
                msg = f"unknown field; the fields here are {', '.join(known)}"
            else:
                msg = "unknown field; check the spelling against the documented fields"
        from_set = [key for key in overridden if field == key or field.startswith(key + ".")]
        where = f" (from --set {from_set[0]})" if from_set else ""
        all_set = all_set and bool(from_set)
        lines.append(f"  {field}{where}: {msg}")
    head = (
        f"--set: invalid configuration (on top of {source})"
        if all_set and lines
        else f"{source}: invalid configuration"
    )
    return "\n".join([head, *lines])


def _fields_at(cls: type[BaseModel], path: list[str]) -> list[str]:
    """The field names of the config section at ``path`` under ``cls`` (empty when it is not a section)."""
    model: Any = cls
    for key in path:
        fields = getattr(model, "model_fields", None)
        if not fields or key not in fields:
            return []
        model = fields[key].annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    return list(getattr(model, "model_fields", {}))


def parse_config(
    cls: type[T], data: dict[str, Any], source: str = "config", overridden: tuple[str, ...] = ()
) -> T:
    """``cls`` from ``data``; a ConfigError naming every bad field (``overridden``: dotted keys set on
    the command line, so their errors name ``--set``)."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, cls, overridden)) from None


def load_toml(url: str) -> dict[str, Any]:
    try:
        return tomllib.loads(storage.read_bytes(url).decode())
    except FileNotFoundError:
        raise ConfigError(f"{url}: config file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{url}: not valid TOML ({e})") from None


def load_config(cls: type[T], url: str) -> T:
    return parse_config(cls, load_toml(url), url)


def to_toml(d: dict[str, Any]) -> str:
    """Minimal TOML writer for our flat-of-tables configs (scalars and one level of tables): what the
    coordinator writes as each job's ``job.toml``, and what ``load_config`` reads back."""

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    lines = [f"{k} = {scalar(v)}" for k, v in d.items() if v is not None and not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {scalar(vv)}" for kk, vv in v.items() if vv is not None]
    return "\n".join(lines) + "\n"
