"""Kubernetes islands: one TorchX kubernetes scheduler per island, each with its own API client.

TorchX's ``KubernetesScheduler`` reads the default kubeconfig once and its app handles
(``kubernetes://session/namespace:name``) do not say which cluster a job is on. ddm lets several
islands name different clusters (a kubeconfig file and/or context each), so every kubernetes island
gets its own scheduler registered under ``kubernetes@ISLAND``: a job's handle then names its island,
and ``ddm status|cancel|logs`` reach the right cluster after a coordinator restart.

The API client is made on first use, so rendering jobs (``ddm run --dry-run``) needs no cluster.
Every job pod is hardened the same way as the k8s/ manifests (non-root, read-only root filesystem,
no privilege escalation, no capabilities, a writable /tmp) and gets the island's Secrets as
environment variables (S3 credentials), which TorchX's AppDef cannot express.
"""

from __future__ import annotations

import copy
import functools
import os
from typing import TYPE_CHECKING, Any

from torchx.runner import Runner
from torchx.schedulers import get_scheduler_factories
from torchx.schedulers.kubernetes_scheduler import KubernetesOpts, KubernetesScheduler
from torchx.specs import AppDef, AppDryRunInfo

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from ddm.coordinator.islands import Island, IslandsConfig

# The image's user (Dockerfile: USER 10001); the pods insist on it.
RUN_AS_USER = 10001
SCRATCH_VOLUME = "tmp"


def scheduler_key(island_name: str, island: Island) -> str:
    """The TorchX scheduler name a job on this island is submitted to (``Island.scheduler_key``)."""
    return island.scheduler_key(island_name)


def api_client(island: Island) -> ApiClient:
    """An API client for the island's cluster: its kubeconfig/context, else the default kubeconfig,
    else the in-cluster service account (a coordinator running as a pod)."""
    from kubernetes import client, config

    path = os.path.expanduser(island.kubeconfig) if island.kubeconfig else None
    default = os.path.expanduser(os.environ.get("KUBECONFIG", "~/.kube/config").split(os.pathsep)[0])
    if (
        path is None
        and island.kube_context is None
        and not os.path.exists(default)
        and os.environ.get("KUBERNETES_SERVICE_HOST")
    ):
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        return client.ApiClient(configuration)
    if path is not None and not os.path.exists(path):
        raise ValueError(
            f"kubeconfig {island.kubeconfig!r} of a kubernetes island does not exist; fix the island's `kubeconfig`"
        )
    try:
        return config.new_client_from_config(config_file=path, context=island.kube_context)
    except config.ConfigException as e:
        where = path or default
        raise ValueError(
            f"cannot use kubeconfig {where} (context {island.kube_context or 'current'}): {e}"
        ) from None


class IslandClient:
    """Binds a TorchX scheduler that talks to one Kubernetes API (``_client``, ``_api_client``) to a ddm
    island: its cluster, from the island's kubeconfig and context. Mixed in before the scheduler."""

    _client: ApiClient | None

    def __init__(self, session_name: str, island: Island, client: ApiClient | None = None, **_: Any) -> None:
        super().__init__(session_name, client=client)  # type: ignore[call-arg]
        self.island = island

    def _api_client(self) -> ApiClient:
        if self._client is None:
            self._client = api_client(self.island)
        return self._client


class IslandKubernetesScheduler(IslandClient, KubernetesScheduler):
    """TorchX's kubernetes scheduler bound to one island: its cluster, Secrets and pod hardening."""

    def _submit_dryrun(self, app: AppDef, cfg: KubernetesOpts) -> AppDryRunInfo:
        info = super()._submit_dryrun(app, cfg)
        resource = info.request.resource
        torchx_name, volcano_name = rank0_hosts_env(app)
        for task in resource["spec"]["tasks"]:  # type: ignore[index]
            pod = _plain(task["template"])
            for c in pod["spec"]["containers"]:
                c["command"] = [a.replace(torchx_name, volcano_name) for a in c.get("command", [])]
            task["template"] = harden_pod(pod, self.island.env_from_secrets, self.island.env_from_configmaps)
        return info


def rank0_hosts_env(app: AppDef) -> tuple[str, str]:
    """(the variable TorchX 0.7 names, the variable Volcano sets) for rank 0's host in multi-node jobs.

    Volcano's svc plugin exports ``VC_<TASK>_HOSTS`` with the task name upper-cased and '-' replaced by
    '_'; TorchX keeps the dashes, and ``${VC_DEMO-EXPERT-0_0_HOSTS:=localhost}`` is then a bash default
    expansion of ``$VC_DEMO`` — every node but rank 0 would dial a garbage rendezvous address.
    """
    from torchx.util.strings import normalize_str

    torchx_name = f"VC_{normalize_str(app.roles[0].name)}_0_HOSTS".upper()
    return torchx_name, torchx_name.replace("-", "_")


def harden_pod(
    pod: dict[str, Any], secrets: list[str], configmaps: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """Restrict a job pod template (a plain dict) the way every ddm pod is restricted, and give it the
    island's ConfigMaps and Secrets as environment variables."""
    pod = copy.deepcopy(pod)
    spec = pod.setdefault("spec", {})
    spec["securityContext"] = {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    spec.setdefault("volumes", []).append({"name": SCRATCH_VOLUME, "emptyDir": {}})
    for c in spec["containers"]:
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            raise ValueError(
                f"job container {c['name']!r} asks to run privileged (a device mount); ddm jobs never do"
            )
        c["securityContext"] = {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }
        c.setdefault("volumeMounts", []).append({"name": SCRATCH_VOLUME, "mountPath": "/tmp"})
        env = c.setdefault("env", [])
        present = {e["name"] for e in env}
        env += [
            {"name": k, "value": v}
            for k, v in (("HOME", "/tmp"), ("MPLCONFIGDIR", "/tmp/matplotlib"))
            if k not in present
        ]
        env_from = [{"configMapRef": {"name": m}} for m in configmaps] + [
            {"secretRef": {"name": s}} for s in secrets
        ]
        if env_from:
            c["envFrom"] = env_from
    return pod


def _plain(obj: Any) -> Any:
    """A kubernetes client model (V1Pod) as the plain JSON-shaped dict the API server receives."""
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


def _factory(island: Island, session_name: str, **kwargs: Any) -> IslandKubernetesScheduler:
    return IslandKubernetesScheduler(session_name, island, client=kwargs.get("client"))


def island_scheduler_factory(island: Island, client: ApiClient | None = None) -> Any:
    """The TorchX scheduler factory of one kubernetes island (its ``SchedulerKind.per_island``)."""
    return functools.partial(_factory, island, client=client)


def make_runner(islands: IslandsConfig, *, clients: dict[str, ApiClient] | None = None) -> Runner:
    """A TorchX Runner knowing TorchX's own schedulers plus ``SCHEDULER@ISLAND`` for each island whose
    scheduler is bound per island (``SchedulerKind.per_island``: kubernetes).

    ``clients`` maps island name -> an API client to use instead of the island's kubeconfig.
    """
    factories = dict(get_scheduler_factories())
    for name, island in islands.island.items():
        if island.kind.per_island is not None:
            factories[island.scheduler_key(name)] = island.kind.per_island(island, (clients or {}).get(name))
    return Runner("torchx", factories)


def is_not_found(exc: BaseException) -> bool:
    """True when a Kubernetes API error means the object is gone (deleted, never created)."""
    try:
        from kubernetes.client.rest import ApiException
    except ImportError:  # pragma: no cover - kubernetes is a dependency
        return False
    return isinstance(exc, ApiException) and exc.status == 404
