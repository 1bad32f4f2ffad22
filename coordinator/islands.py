"""Islands: where expert jobs run. An island is a TorchX scheduler plus its config and job resources.

Islands file (TOML)::

    default = "local"                 # island for experts not listed anywhere

    [island.local]
    scheduler = "local_cwd"           # TorchX scheduler name
    max_concurrent = 2                # at most this many jobs of this run at once on the island
    j = "1x1"                         # nodes x processes per node (torchrun, DDP or FSDP, when > 1 process)
    cpu = 1
    memMB = 4096

    [island.gpu-east]
    scheduler = "kubernetes"          # TorchX's kubernetes scheduler: one Volcano Job per expert job
    experts = [0, 1]                  # these experts go here
    kubeconfig = "~/.kube/gpu-east"   # which cluster: a kubeconfig file and/or one of its contexts
    kube_context = "gpu-east"         # (neither: $KUBECONFIG / ~/.kube/config, or the pod's own account)
    image = "registry.example.com/ddm:0.1.0"
    namespace = "ddm"
    queue = "ddm"                     # Volcano queue
    service_account = "ddm-job"       # the job pods' service account
    env_from_secrets = ["ddm-s3"]     # Secrets whose keys become environment variables (S3 credentials)
    env_from_configmaps = ["ddm-env"] # ConfigMaps likewise (S3 endpoint and region)
    j = "2x8"
    gpu = 8

    [island.plain-k8s]
    scheduler = "kube_jobs"           # plain batch/v1 Jobs, no Volcano (coordinator/kube_jobs.py)
    image = "ddm:0.1.0"               # same cluster fields as kubernetes, but no queue
    namespace = "ddm"
    j = "1x2"

Experts never talk to each other; the only thing islands share is the run root. Several kubernetes
islands may name different clusters: each gets its own API client (``coordinator/kube.py``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator, model_validator

from ddm.core.config import Strict, load_toml, parse_config
from ddm.core.registry import Registry

_J = re.compile(r"^(\d+:)?\d+x\d+$|^\d+$")
_ISLAND_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Kubernetes object names (RFC 1123 labels): namespaces, queues, service accounts, secrets.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
KUBERNETES_ONLY = (
    "kubeconfig",
    "kube_context",
    "namespace",
    "queue",
    "service_account",
    "env_from_secrets",
    "env_from_configmaps",
)


@dataclass(frozen=True)
class SchedulerKind:
    """What ddm needs to know about one TorchX scheduler an island may use.

    ``needs``: island fields it requires; ``owns``: island fields only it takes (set on another
    scheduler's island they are an error); ``check(island)`` raises ValueError for anything else wrong;
    ``run_cfg(island)`` its TorchX run options from the island; ``per_island(island, client)``, when
    set, a TorchX scheduler factory bound to one island, registered as ``NAME@ISLAND`` (so job handles
    name their island: kubernetes, whose islands are separate clusters)."""

    needs: tuple[str, ...] = ()
    owns: tuple[str, ...] = ()
    check: Callable[[Island], None] | None = None
    run_cfg: Callable[[Island], dict[str, Any]] | None = None
    per_island: Callable[..., Any] | None = None


ISLAND_SCHEDULERS: Registry[SchedulerKind] = Registry("scheduler")
"""The schedulers an island may name, filled below (one entry per scheduler). To add one: one entry
here (plus its TorchX scheduler, if TorchX lacks it), one test in tests/test_islands.py."""


def _kubernetes_names(island: Island) -> None:
    names = {"namespace": island.namespace, "queue": island.queue, "service_account": island.service_account}
    names.update({f"env_from_secrets[{i}]": s for i, s in enumerate(island.env_from_secrets)})
    names.update({f"env_from_configmaps[{i}]": s for i, s in enumerate(island.env_from_configmaps)})
    for field, value in names.items():
        if value is not None and not _DNS_LABEL.match(value):
            raise ValueError(
                f"{field} = {value!r} is not a kubernetes name (lowercase letters, digits and '-')"
            )


def _kubernetes_run_cfg(island: Island) -> dict[str, Any]:
    cfg: dict[str, Any] = {"namespace": island.namespace, "queue": island.queue}
    if island.service_account:
        cfg["service_account"] = island.service_account
    return cfg


def _kubernetes_scheduler(island: Island, client: Any = None) -> Any:
    from ddm.coordinator.kube import island_scheduler_factory  # torchx and kubernetes: only when launching

    return island_scheduler_factory(island, client)


# kube_jobs takes the kubernetes fields but the Volcano queue.
KUBE_JOBS_OWNS = tuple(f for f in KUBERNETES_ONLY if f != "queue")


def _kube_jobs_run_cfg(island: Island) -> dict[str, Any]:
    cfg: dict[str, Any] = {"namespace": island.namespace}
    if island.service_account:
        cfg["service_account"] = island.service_account
    return cfg


def _kube_jobs_scheduler(island: Island, client: Any = None) -> Any:
    from ddm.coordinator.kube_jobs import island_scheduler_factory  # kubernetes: only when launching

    return island_scheduler_factory(island, client)


ISLAND_SCHEDULERS.add("local_cwd", SchedulerKind(), help="TorchX's local scheduler, in the current directory")
ISLAND_SCHEDULERS.add("local_docker", SchedulerKind(), help="TorchX's local scheduler, in docker containers")
ISLAND_SCHEDULERS.add(
    "kubernetes",
    SchedulerKind(needs=("image", "namespace", "queue"), owns=KUBERNETES_ONLY, check=_kubernetes_names,
                  run_cfg=_kubernetes_run_cfg, per_island=_kubernetes_scheduler),
    help="TorchX's kubernetes scheduler (one Volcano Job per job), bound to the island's cluster",
)  # fmt: skip
ISLAND_SCHEDULERS.add(
    "kube_jobs",
    SchedulerKind(needs=("image", "namespace"), owns=KUBE_JOBS_OWNS, check=_kubernetes_names,
                  run_cfg=_kube_jobs_run_cfg, per_island=_kube_jobs_scheduler),
    help="plain Kubernetes batch/v1 Jobs, no Volcano (coordinator/kube_jobs.py), bound to the island's cluster",
)  # fmt: skip
ISLAND_SCHEDULERS.add("slurm", SchedulerKind(), help="TorchX's slurm scheduler")
ISLAND_SCHEDULERS.add("aws_batch", SchedulerKind(), help="TorchX's AWS Batch scheduler")


def parse_j(j: str) -> tuple[int, int]:
    """``"NxM"`` (or ``"M"``, or ``"min:NxM"``) -> (nodes, processes per node)."""
    if not _J.match(j):
        raise ValueError(
            f"j={j!r}: expected NODESxPROCS such as '1x1', '2x8' or 'min:maxxprocs' such as '1:2x8'"
        )
    if "x" not in j:
        return 1, int(j)
    nodes, procs = j.split("x")
    return int(nodes.split(":")[-1]), int(procs)


class Island(Strict):
    scheduler: ISLAND_SCHEDULERS.field() = Field(  # type: ignore[valid-type]
        "local_cwd", description=f"TorchX scheduler: one of {', '.join(ISLAND_SCHEDULERS.names())}"
    )
    max_concurrent: int = Field(1, ge=1, description="most jobs of this run running at once on this island")
    experts: list[int] = Field(default_factory=list, description="expert indices placed on this island")
    j: str = Field(
        "1x1",
        description='nodes x processes per node for every job on the island (experts, router, student); more than one process runs under torchrun: DDP, or FSDP2 with train.parallelism = "fsdp"',
    )
    cpu: int = Field(1, ge=1, description="CPUs per node")
    gpu: int = Field(0, ge=0, description="GPUs per node")
    memMB: int = Field(4096, ge=128, description="memory per node in MB")
    image: str | None = Field(
        None, description="container image (kubernetes/docker); local_cwd runs in the current directory"
    )
    namespace: str | None = Field(None, description="kubernetes namespace")
    queue: str | None = Field(None, description="Volcano queue (kubernetes)")
    kube_context: str | None = Field(
        None,
        description="kubeconfig context of the cluster this island uses (default: the file's current context)",
    )
    kubeconfig: str | None = Field(
        None,
        description="kubeconfig file of this island's cluster (default: $KUBECONFIG, ~/.kube/config, else in-cluster)",
    )
    service_account: str | None = Field(None, description="kubernetes service account of the job pods")
    env_from_secrets: list[str] = Field(
        default_factory=list,
        description="kubernetes Secrets whose keys become environment variables of every job pod (e.g. S3 credentials)",
    )
    env_from_configmaps: list[str] = Field(
        default_factory=list,
        description="kubernetes ConfigMaps whose keys become environment variables of every job pod (e.g. the S3 endpoint)",
    )
    env: dict[str, str] = Field(default_factory=dict, description="extra environment variables for every job")
    cfg: dict[str, Any] = Field(
        default_factory=dict, description="extra TorchX scheduler run options, passed through"
    )

    @field_validator("j")
    @classmethod
    def _j(cls, v: str) -> str:
        parse_j(v)
        return v

    @property
    def kind(self) -> SchedulerKind:
        return ISLAND_SCHEDULERS.get(self.scheduler)

    @model_validator(mode="after")
    def _scheduler_needs(self) -> Island:
        kind = self.kind
        missing = [f for f in kind.needs if not getattr(self, f)]
        if missing:
            raise ValueError(
                f"a {self.scheduler} island needs {', '.join(missing)} (set them in the island's table)"
            )
        if kind.check is not None:
            kind.check(self)
        owners: dict[str, list[str]] = {}  # field -> the other schedulers that take it
        for e in ISLAND_SCHEDULERS:
            for f in e.value.owns if e.name != self.scheduler else ():
                owners.setdefault(f, []).append(e.name)
        stray = [f for f in owners if f not in kind.owns and getattr(self, f)]
        if stray:
            only = ", ".join(sorted({" or ".join(f'scheduler = "{n}"' for n in owners[f]) for f in stray}))
            raise ValueError(f"{', '.join(stray)}: only for {only} (this island uses {self.scheduler!r})")
        return self

    def run_cfg(self) -> dict[str, Any]:
        """TorchX scheduler run options for this island."""
        cfg = self.kind.run_cfg(self) if self.kind.run_cfg is not None else {}
        cfg.update(self.cfg)
        return cfg

    def scheduler_key(self, island_name: str) -> str:
        """The TorchX scheduler name a job on this island is submitted to (and its handle starts with)."""
        return f"{self.scheduler}@{island_name}" if self.kind.per_island is not None else self.scheduler


class IslandsConfig(Strict):
    default: str = Field("local", description="island for experts not listed in any island's `experts`")
    island: dict[str, Island] = Field(default_factory=lambda: {"local": Island(max_concurrent=2)})

    @field_validator("island")
    @classmethod
    def _names(cls, v: dict[str, Island]) -> dict[str, Island]:
        for name in v:
            if not _ISLAND_NAME.match(name):
                raise ValueError(
                    f"island name {name!r}: use letters, digits, '_', '.' and '-' (it becomes part of job handles)"
                )
        return v

    @model_validator(mode="after")
    def _consistent(self) -> IslandsConfig:
        if self.default not in self.island:
            raise ValueError(
                f"default island {self.default!r} is not defined; define [island.{self.default}] or change `default`"
            )
        seen: dict[int, str] = {}
        for name, isl in self.island.items():
            for e in isl.experts:
                if e in seen:
                    raise ValueError(f"expert {e} is listed in both island {seen[e]!r} and island {name!r}")
                seen[e] = name
        return self

    def island_for(self, expert: int) -> str:
        for name, isl in self.island.items():
            if expert in isl.experts:
                return name
        return self.default

    def check_experts(self, k: int) -> None:
        for name, isl in self.island.items():
            bad = [e for e in isl.experts if not 0 <= e < k]
            if bad:
                raise ValueError(f"island {name!r} lists experts {bad}, but the run has experts 0..{k - 1}")


def load_islands(url: str | None) -> IslandsConfig:
    if url is None:
        return IslandsConfig()
    return parse_config(IslandsConfig, load_toml(url), url)
