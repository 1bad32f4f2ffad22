"""Typed, validated configuration of a router training job, loaded from TOML like the expert's.

    name = "router"
    output = "runs/demo/router"
    [data]
    root = "runs/demo"          # reads runs/demo/partitions/expert-0 .. expert-{k-1}
    k = 4                       # (or: partitions = ["url-0", "url-1", ...] in expert order)
    [model]
    arch = "Router-T/4"
    [train]                     # ddm.expert.config.TrainConfig, with the router's defaults below
    steps = 1000
    [eval]
    every = 250

The train table is the expert's ``TrainConfig`` (one definition of every optimizer/EMA/checkpoint
field), but the fields a router job does not set take ``ROUTER_TRAIN_DEFAULTS``: t is sampled
uniformly as in the paper, not logit-normal as for experts.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ddm.core import storage
from ddm.core.config import JobConfig, Strict, train_with_defaults
from ddm.expert.config import SampleConfig
from ddm.router.sizes import ROUTER_ARCHS
from ddm.router.strategies import GUIDANCE_MODES, STRATEGIES

# Router training defaults that differ from an expert's:
#  * uniform t: the router must be right at every t the sampler visits (paper: "uniformly sampled t");
#  * label dropout 0.2: unconditional routing (y = null) is the harder task and cheap to train more of;
#  * EMA 0.995 and 1000 steps: a router converges in far fewer steps than an expert.
ROUTER_TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 1000,
    "time_sampling": "uniform",
    "label_dropout": 0.2,
    "ema_decay": 0.995,
    "checkpoint_every": 250,
}
RouterTrainConfig = train_with_defaults(
    ROUTER_TRAIN_DEFAULTS, "router training (router defaults: uniform t, label dropout 0.2)"
)


def partition_url(root: str, k: int) -> str:
    """Where the coordinator writes partition k under a run root."""
    return storage.join(root, "partitions", f"expert-{k}")


class RouterDataConfig(Strict):
    partitions: list[str] | None = Field(
        None,
        description="partition shard directories in expert order (partition k is expert k's data); "
        "or use root and k",
    )
    root: str | None = Field(None, description="run root: read {root}/partitions/expert-0 .. expert-{k-1}")
    k: int | None = Field(None, ge=2, description="number of partitions (experts) under root")
    limit: int | None = Field(
        None, ge=2, description="use only the first N examples of each partition (quick runs, tests)"
    )
    holdout: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="fraction of each partition held out from training for the accuracy-vs-t evaluation",
    )

    @model_validator(mode="after")
    def _one_source(self) -> RouterDataConfig:
        if self.partitions is not None:
            if self.root is not None or self.k is not None:
                raise ValueError("give either data.partitions or data.root with data.k, not both")
            if len(self.partitions) < 2:
                raise ValueError(
                    f"data.partitions lists {len(self.partitions)} partition(s); a router needs at least 2"
                )
        elif self.root is None or self.k is None:
            raise ValueError("set data.partitions (a list of shard directories) or both data.root and data.k")
        return self

    def urls(self) -> list[str]:
        """The partition directories, in expert order."""
        if self.partitions is not None:
            return list(self.partitions)
        assert self.root is not None and self.k is not None  # the validator guarantees it
        return [partition_url(self.root, k) for k in range(self.k)]


class RouterModelConfig(Strict):
    arch: str = Field("Router-T/4", description=f"router size from the registry: {', '.join(ROUTER_ARCHS)}")
    num_classes: int | None = Field(
        None,
        ge=0,
        description="class labels; must equal the experts' (the null class num_classes is shared); 0: "
        "unconditional. Default: the experts' in a run, the partitions' in a router job",
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        if v not in ROUTER_ARCHS:
            raise ValueError(f"unknown router architecture {v!r}; choose one of {', '.join(ROUTER_ARCHS)}")
        return v


class RouterEvalConfig(Strict):
    every: int = Field(
        0, ge=0, description="evaluate accuracy vs t every N steps (0 = only when training finishes)"
    )
    bins: int = Field(10, ge=2, le=100, description="equal-width bins of t in [0, 1]")
    samples_per_bin: int = Field(500, ge=1, description="held-out (x_0, eps, t) draws per bin")
    batch_size: int = Field(500, ge=1, description="router forward batch size during evaluation")


class RouterInitConfig(Strict):
    """Start a router from an older one when the set of experts changes (``ddm add-expert`` /
    ``ddm retire-expert``): its trunk as it is, its head rows mapped by ``expert_map``."""

    checkpoint: str = Field(description="the old router's checkpoint file or directory (local or s3://)")
    expert_map: list[int] = Field(
        description="for each output of the new router (= each of data's partitions, in order): the old "
        "router's output it starts from, or -1 for a new expert (starts at the mean of the old rows)"
    )

    @field_validator("expert_map")
    @classmethod
    def _indexes(cls, v: list[int]) -> list[int]:
        if any(i < -1 for i in v):
            raise ValueError(f"expert_map {v}: entries are old output indexes (>= 0) or -1 for a new expert")
        return v


class RouterJobConfig(JobConfig):
    """One router training job: all partitions -> a classifier of x_t's partition, accuracy vs t."""

    kind: Literal["router"] = Field("router", description="the job kind (ddm.train picks the trainer by it)")
    name: str = Field("router", description="job name, used in logs")
    output: str = Field(
        "runs/router",
        description="output directory (local or s3://): checkpoints/, metrics.csv, accuracy_vs_t.*",
    )
    data: RouterDataConfig
    model: RouterModelConfig = RouterModelConfig()
    train: RouterTrainConfig
    eval: RouterEvalConfig = RouterEvalConfig()
    init: RouterInitConfig | None = Field(
        None, description="start from an older router (expert lifecycle) instead of a random initialisation"
    )

    @model_validator(mode="after")
    def _init_fits(self) -> RouterJobConfig:
        if self.init is not None and len(self.init.expert_map) != len(self.data.urls()):
            raise ValueError(
                f"init.expert_map has {len(self.init.expert_map)} entries but data has "
                f"{len(self.data.urls())} partitions; give one entry per partition"
            )
        return self


class RoutingConfig(Strict):
    """How the ensemble selects experts: the one definition of the routing settings and their defaults."""

    strategy: STRATEGIES.field(served=True) = Field(  # type: ignore[valid-type]
        "top-k", description="expert selection (ddm.router.strategies.STRATEGIES)"
    )
    top_k: int = Field(1, ge=1, description="experts per sample for top-k")
    threshold: float = Field(
        0.1, gt=0, le=1, description="router probability cut-off for the threshold strategy"
    )
    guidance_mode: GUIDANCE_MODES.field() = Field(  # type: ignore[valid-type]
        "ensemble",
        description="how guidance meets the ensemble (ddm.router.strategies.GUIDANCE_MODES): "
        + GUIDANCE_MODES.describe(),
    )
    route_every: int = Field(
        1,
        ge=1,
        le=1000,
        description="run the router every N-th ensemble evaluation and reuse its selection in between "
        "(1 = every step; Euler: one evaluation per step)",
    )


class SampleDefaults(SampleConfig, RoutingConfig):
    """What unset SampleRequest fields mean (the sampling and routing settings, defaults from their one
    definition), and the limits of one request."""

    max_n: int = Field(256, ge=1, description="most images per Sample call")
    max_steps: int = Field(1000, ge=1, description="most sampler steps a request may ask for")
    max_guidance: float = Field(100.0, ge=0, description="largest guidance scale a request may ask for")
    max_seconds: float = Field(600.0, gt=0, description="deadline of a call whose client sets none, seconds")

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> SampleDefaults:
        # A default outside its own limit would make every request that leaves the field unset fail.
        if not 1 <= self.steps <= self.max_steps:
            raise ValueError(f"steps: default {self.steps} must lie in 1..max_steps ({self.max_steps})")
        if not 1 <= self.route_every <= self.max_steps:
            raise ValueError(
                f"route_every: default {self.route_every} must lie in 1..max_steps ({self.max_steps})"
            )
        if not 0 <= self.guidance <= self.max_guidance:
            raise ValueError(
                f"guidance: default {self.guidance} must lie in 0..max_guidance ({self.max_guidance})"
            )
        return self
