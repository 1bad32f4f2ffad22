"""The run config: one TOML file describes a whole ``ddm run`` (curate -> experts -> router -> eval -> distill).

The embedded default (``ddm/configs/default.toml``) is Fashion-MNIST, K = 4 experts, local islands, sized
for about 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from ddm.core.config import Strict, TrainConfig, load_config, load_toml, parse_config
from ddm.core.device import DEVICE_HELP, DEVICE_PATTERN
from ddm.expert.autoencoder import AUTOENCODERS, autoencoder_names
from ddm.expert.config import DataConfig, ModelConfig, SampleConfig
from ddm.router.config import RouterEvalConfig, RouterModelConfig, RouterTrainConfig, RoutingConfig
from ddm.router.distill_config import DistillStageConfig
from ddm.router.strategies import STRATEGIES


class CurateConfig(Strict):
    enabled: bool = Field(True, description="remove exact and near duplicates before clustering")
    near_duplicate_cosine: float = Field(
        0.995,
        gt=0,
        le=1,
        description="embeddings with cosine similarity at or above this are near duplicates (1 = exact only)",
    )
    example_pairs: int = Field(
        16, ge=0, description="near-duplicate pairs shown in curate/near_duplicates.png"
    )


class ClusterSettings(Strict):
    """How the data is clustered, the one definition of these settings: the run config's ``[partition]``
    (:class:`PartitionConfig`) and one clustering fit (``ddm.coordinator.cluster.ClusterConfig``) share them."""

    k: int = Field(4, ge=1, le=1024, strict=True, description="number of clusters = number of experts")
    fine_k: int = Field(
        256, ge=1, strict=True, description="fine k-means centroids, grouped into k coarse clusters"
    )
    sample_size: int = Field(50_000, ge=1, strict=True, description="points used to fit the fine centroids")
    niter: int = Field(20, ge=1, strict=True, description="k-means (Lloyd) iterations, fine and coarse")
    seed: int = Field(0, ge=0, lt=2**31, strict=True, description="clustering seed")
    balanced: bool = Field(
        True, strict=True, description="balance cluster sizes to within `tolerance` of N/k"
    )
    tolerance: float = Field(
        0.04,
        ge=0,
        le=1,
        description="allowed relative deviation from N/k when balanced (0.04 keeps largest/smallest <= 1.1)",
    )

    @model_validator(mode="after")
    def _k_le_fine_k(self) -> ClusterSettings:
        if self.k > self.fine_k:
            raise ValueError(f"fine_k ({self.fine_k}) must be >= k ({self.k}); raise fine_k or lower k")
        return self

    def cluster_settings(self) -> dict:
        """These settings alone (a PartitionConfig's, without its embedding and shard fields)."""
        return {name: getattr(self, name) for name in ClusterSettings.model_fields}


class PartitionConfig(ClusterSettings):
    """The run's ``[partition]``: the clustering settings plus how images are embedded and sharded."""

    encoder: str = Field(
        "efficientnet-lite0",
        description="embedding encoder: 'efficientnet-lite0' (pretrained, ships offline), 'pixels' (fast, for tests) or 'torchscript:/local/path.pt'",
    )
    embed_image_size: int = Field(
        64,
        ge=32,
        le=1024,
        description="encoder input size (images are resized); 64 embeds ~3x faster than 96 on CPU",
    )
    embed_batch_size: int = Field(256, ge=1, description="images per encoder batch")
    shard_size: int = Field(10_000, ge=1, description="images per partition shard file")


SHARED_MODEL_FIELDS = (
    "num_classes",
)  # one label space for the ensemble: the router mixes every expert per class


class ExpertOverride(Strict):
    """``[experts.overrides.expert-N]``: what differs for one expert (heterogeneous experts). ``model`` is
    a partial ``[experts.model]`` table (e.g. ``{arch = "DiT-M/4", objective = "eps"}``) applied on top of
    it; the other experts keep ``[experts.model]``. The router does not care what is behind an expert."""

    model: dict[str, Any] = Field(
        default_factory=dict,
        description="fields of [experts.model] that differ for this expert, e.g. {arch = 'DiT-M/4', "
        "objective = 'eps'}; num_classes is shared by every expert",
    )

    @field_validator("model")
    @classmethod
    def _model_fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        known = [f for f in ModelConfig.model_fields if f not in SHARED_MODEL_FIELDS]
        for key in v:
            if key in SHARED_MODEL_FIELDS:
                raise ValueError(
                    f"{key} cannot differ between experts (the router mixes them class by class); "
                    f"set it once in [experts.model]"
                )
            if key not in known:
                raise ValueError(f"unknown model field {key!r}; an override may set {', '.join(known)}")
        return v


class LatentConfig(Strict):
    """The run's ``[latent]``: train in the latent space of an autoencoder (``docs/latent.md``). Every image
    is encoded once at the partition stage (cached under ``ROOT/latents/``); experts, router and student
    train on the normalized latents; samples are decoded once, at the end of sampling."""

    autoencoder: str = Field(
        "none", description="'none' (pixel space) or an entry of ddm.expert.autoencoder.AUTOENCODERS: "
        + AUTOENCODERS.describe(),
    )  # fmt: skip
    path: str = Field(
        "", description="local directory of the autoencoder (diffusers-kl: what save_pretrained writes); it must "
        "be readable at the same path by the coordinator and the servers that decode",
    )  # fmt: skip
    batch_size: int = Field(64, ge=1, description="images per autoencoder batch when encoding")
    chunk_size: int = Field(
        4096, ge=1, description="images per cached latent chunk (the unit a stopped encoding resumes from)"
    )
    scale: float | None = Field(
        None, gt=0, description="latent scaling factor (unset: 1 / std of the data's latents, measured)"
    )
    shift: float | None = Field(
        None, description="latent shift (unset: the mean of the data's latents, measured)"
    )

    @field_validator("autoencoder")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in autoencoder_names():
            raise ValueError(f"unknown autoencoder {v!r}; choose one of {', '.join(autoencoder_names())}")
        return v

    @model_validator(mode="after")
    def _path_set(self) -> LatentConfig:
        if self.enabled and not self.path:
            raise ValueError(
                f"latent.autoencoder is {self.autoencoder!r} but latent.path is empty; set it to the autoencoder's directory"
            )
        return self

    @property
    def enabled(self) -> bool:
        return self.autoencoder != "none"


class ExpertsConfig(Strict):
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    overrides: dict[str, ExpertOverride] = Field(
        default_factory=dict,
        description="per-expert settings by expert name ([experts.overrides.expert-1] model = {...}): "
        "DiTs of other sizes or objectives in one ensemble",
    )
    max_attempts: int = Field(
        3, ge=1, le=100, description="launch attempts per expert job before the run reports it failed"
    )
    poll_seconds: float = Field(2.0, gt=0, description="how often the coordinator polls job states")
    lease_seconds: float = Field(
        120.0,
        gt=0,
        description="a job whose heartbeat is older than this (and unknown to its scheduler) is presumed dead",
    )

    @model_validator(mode="after")
    def _overrides_apply(self) -> ExpertsConfig:
        for name in self.overrides:
            self.model_for(name)  # a bad value fails here, naming the expert and the field
        return self

    def model_for(self, name: str) -> ModelConfig:
        """The model of expert ``name``: ``[experts.model]`` with its override, if any, on top."""
        override = self.overrides.get(name)
        if override is None or not override.model:
            return self.model
        try:
            return ModelConfig.model_validate({**self.model.model_dump(), **override.model})
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            raise ValueError(
                f"overrides.{name}.model.{field}: {err['msg'].removeprefix('Value error, ')}"
            ) from None


class RouterStageConfig(Strict):
    """The router job of a run: trained on every partition to predict p(k | x_t, t, c)."""

    enabled: bool = Field(True, description="train a router (experts mode); the ensemble strategies need it")
    island: str | None = Field(
        None, description="island to train on (default: the islands file's default island)"
    )
    model: RouterModelConfig = RouterModelConfig()
    train: RouterTrainConfig
    eval: RouterEvalConfig = RouterEvalConfig()


MIXTURE = "mixture"  # the router-free partition mixture (ddm.coordinator.eval_stage.evaluate_mixture)


@dataclass(frozen=True)
class EvalModel:
    """What an ``eval.models`` name means: a routed strategy with its top_k, or the partition mixture."""

    name: str
    strategy: str | None  # a routed entry of STRATEGIES; None for the mixture
    top_k: int = 1


def eval_model_names() -> str:
    """The accepted names, for help texts and errors: top-K, every other routed strategy, mixture."""
    others = [s for s in STRATEGIES.names(routed=True) if s != "top-k"]
    return ", ".join(["top-K (K >= 1)", *others, MIXTURE])


def eval_models() -> tuple[str, ...]:
    """Every routed strategy once (top-k as top-1 and top-2) and the mixture: ``ddm compare``'s default."""
    names = [n for s in STRATEGIES.names(routed=True) for n in (("top-1", "top-2") if s == "top-k" else (s,))]
    return (*names, MIXTURE)


def parse_eval_model(name: str) -> EvalModel:
    """An ``eval.models`` name read from the strategy registry: ``top-K`` is strategy top-k with K experts,
    any other routed strategy goes by its name, ``mixture`` needs no router; else a ValueError listing them."""
    if name == MIXTURE:
        return EvalModel(name, None)
    k = re.fullmatch(r"top-([1-9][0-9]*)", name)
    if k and "top-k" in STRATEGIES.names(routed=True):
        return EvalModel(name, "top-k", int(k[1]))
    if name != "top-k" and name in STRATEGIES.names(routed=True):
        return EvalModel(name, name)
    raise ValueError(f"unknown eval model {name!r}; choose from {eval_model_names()}")


class EvalConfig(Strict):
    enabled: bool = Field(True, description="evaluate at the end of the run")
    num_samples: int = Field(1000, ge=10, description="generated images per evaluation")
    features: str = Field(
        "efficientnet-lite0",
        description="feature space for FD/KID/PR: 'efficientnet-lite0', 'pixels' or 'torchscript:/local/path.pt'",
    )
    classifier: bool = Field(
        True, description="class accuracy with the in-repo classifier (trained once per dataset, then cached)"
    )
    real_samples: int = Field(10_000, ge=10, description="held-out real images the samples are compared with")
    models: list[str] = Field(
        ["top-1"],
        description="experts mode: what to evaluate: top-K (the K most probable experts), any other routed strategy "
        "of ddm.router.strategies.STRATEGIES by name (these need the router) or 'mixture' (class c from expert k "
        "with probability n_kc/n_c, no router)",
    )
    threshold: float = RoutingConfig.model_fields["threshold"]  # the one definition of its default and bounds

    @field_validator("models")
    @classmethod
    def _known_models(cls, v: list[str]) -> list[str]:
        for m in v:
            parse_eval_model(m)
        return v

    sample: SampleConfig = SampleConfig()


class StorageConfig(Strict):
    """How the run root is reached. Credentials never go here: they come from the standard AWS chain
    (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws, an instance or pod role)."""

    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint for s3:// roots (MinIO, Ceph, ...), e.g. 'http://minio.storage:9000'; "
        "default: $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL, else AWS itself. Passed to every job the run launches",
    )

    @field_validator("endpoint_url")
    @classmethod
    def _http(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"{v!r}: expected an http:// or https:// URL, e.g. 'http://127.0.0.1:9000'")
        return v


class RunConfig(Strict):
    name: str = Field(
        "demo", pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", description="run name (lowercase, digits, dashes)"
    )
    root: str = Field(
        "runs/demo",
        description="run root (local path or s3://bucket/prefix): every stage reads and writes only here",
    )
    islands: str | None = Field(
        None, description="islands TOML mapping experts to compute islands (default: one local island)"
    )
    mode: Literal["experts", "monolith"] = Field(
        "experts",
        description="'experts' partitions the data and trains k isolated experts; 'monolith' trains one model on all data",
    )
    device: str = Field(
        "auto", pattern=DEVICE_PATTERN,
        description=f"{DEVICE_HELP}: the networks the coordinator runs itself (curation embeddings, the eval stage, "
        "the distillation table); training jobs have their own `train.device`",
    )  # fmt: skip
    data: DataConfig = DataConfig()
    curate: CurateConfig = CurateConfig()
    partition: PartitionConfig = PartitionConfig()
    latent: LatentConfig = LatentConfig()
    experts: ExpertsConfig = ExpertsConfig()
    router: RouterStageConfig = RouterStageConfig()
    eval: EvalConfig = EvalConfig()
    distill: DistillStageConfig = DistillStageConfig()
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="after")
    def _overrides_name_experts(self) -> RunConfig:
        names = ["monolith"] if self.mode == "monolith" else [f"expert-{k}" for k in range(self.partition.k)]
        for name in self.experts.overrides:
            if name not in names:
                raise ValueError(
                    f"experts.overrides.{name}: no such expert in this run; the experts are {', '.join(names)} "
                    "(partition.k sets how many)"
                )
        return self

    def expert_model(self, name: str) -> ModelConfig:
        """The model config expert ``name`` trains (``experts.model`` plus its override)."""
        return self.experts.model_for(name)

    @model_validator(mode="after")
    def _latent_needs_partitions(self) -> RunConfig:
        if self.latent.enabled and self.mode == "monolith":
            raise ValueError(
                "latent space needs mode = 'experts' (latents are written at the partition stage, which "
                "monolith mode skips); use experts mode with partition.k = 1 for one latent model"
            )
        return self


def default_config_text() -> str:
    return resources.files("ddm").joinpath("configs/default.toml").read_text()


def load_run_config(url: str | None, overrides: dict | None = None) -> RunConfig:
    """Load a run config (``None`` = the embedded default), applying dotted ``overrides`` on top."""
    import tomllib

    if url is None:
        data, source = tomllib.loads(default_config_text()), "embedded default config"
    else:
        data, source = load_toml(url), url
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return parse_config(RunConfig, data, source, tuple(overrides or {}))


__all__ = ["RunConfig", "load_run_config", "load_config"]
