"""A TorchX scheduler that runs jobs as plain Kubernetes ``batch/v1`` Jobs: no Volcano (torchx#660).

One AppDef (one role) becomes one Job. A single-node job is an ordinary Job of one pod; a multi-node
job (``num_replicas`` > 1, torchrun across pods) is an *Indexed* Job of that many pods
(``completionMode: Indexed``, Kubernetes >= 1.22 where it is on by default) plus a headless Service
owned by the Job, so pod ``NAME-0`` is reachable as ``NAME-0.NAME`` for the c10d rendezvous: the
component's ``rank0_env`` macro names ``DDM_RANK0_HOST``, which every pod gets, and ``replica_id``
becomes the pod's completion index (``DDM_REPLICA_ID``, from the downward API).

Retries are the coordinator's (coordinator/launcher.py): ``backoffLimit: 0`` and ``restartPolicy:
Never``, so a failed container fails the Job and the launcher submits a new attempt, which resumes from
the job's checkpoint on the run root. A pod *deleted* (evicted, its node gone) is replaced by the Job
controller itself without counting as a failure: the new pod resumes from the checkpoint likewise.

Handles are ``kube_jobs://SESSION/NAMESPACE:NAME`` (``kube_jobs@ISLAND://...`` on a ddm island, bound
to the island's cluster like coordinator/kube.py's kubernetes islands). ``describe`` maps the Job's
conditions and pods to TorchX states; it returns None once the Job is gone (deleted, or never made).
``cancel`` deletes the Job in the foreground (its pods first; meanwhile ``describe`` says CANCELLED).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypedDict

from torchx.schedulers.api import (
    DescribeAppResponse,
    ListAppResponse,
    Scheduler,
    Stream,
    filter_regex,
    split_lines,
)
from torchx.schedulers.ids import make_unique
from torchx.schedulers.kubernetes_scheduler import (
    LABEL_ORGANIZATION,
    LABEL_UNIQUE_NAME,
    pod_labels,
    role_to_pod,
)
from torchx.specs import AppDef, AppDryRunInfo, AppState, ReplicaStatus, Role, RoleStatus, macros, runopts
from torchx.util.strings import normalize_str

from ddm.coordinator.kube import IslandClient

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from ddm.coordinator.islands import Island

BACKEND = "kube_jobs"
RANK0_ENV = "DDM_RANK0_HOST"
REPLICA_ENV = "DDM_REPLICA_ID"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
MANAGED_BY = "ddm-kube-jobs"
# Job names become pod names (+ "-INDEX-xxxxx") and label values (<= 63): keep them short.
MAX_NAME = 50
INDEXED_SINCE = (1, 22)  # Indexed Jobs: alpha 1.21 (feature gate), beta and on by default 1.22

POD_PHASE = {
    "Pending": AppState.PENDING,
    "Running": AppState.RUNNING,
    "Succeeded": AppState.SUCCEEDED,
    "Failed": AppState.FAILED,
    "Unknown": AppState.UNKNOWN,
}


class KubeJobsOpts(TypedDict, total=False):
    namespace: str | None
    service_account: str | None
    priority_class: str | None
    active_deadline_seconds: int | None


@dataclass
class KubeJobRequest:
    """What ``schedule`` creates: the Job and, for a multi-node job, its headless Service."""

    namespace: str
    job: dict[str, Any]
    service: dict[str, Any] | None

    def __str__(self) -> str:
        import yaml

        return yaml.safe_dump_all([o for o in (self.job, self.service) if o], sort_keys=False)


def job_name(app_name: str) -> str:
    """A unique RFC 1123 name for one submission of ``app_name`` (each attempt gets its own)."""
    base = normalize_str(app_name)[: MAX_NAME - 17].rstrip("-") or "job"
    return normalize_str(make_unique(base))[:MAX_NAME].rstrip("-")


def _plain(obj: Any) -> Any:
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


def app_to_job(app: AppDef, cfg: KubeJobsOpts, name: str | None = None) -> KubeJobRequest:
    """The Job (and Service) for ``app``: pure, no cluster needed (``ddm run --dry-run``)."""
    if len(app.roles) != 1:
        raise ValueError(
            f"app {app.name!r} has {len(app.roles)} roles; the {BACKEND} scheduler runs one role per Job "
            "(submit each role as its own app)"
        )
    role = app.roles[0]
    if role.max_retries:
        raise ValueError(
            f"role {role.name!r} asks for max_retries={role.max_retries}; {BACKEND} Jobs never retry "
            "(the coordinator does): set max_retries=0"
        )
    name = name or job_name(app.name)
    namespace = cfg.get("namespace") or "default"
    replicas = role.num_replicas
    container = normalize_str(role.name)[:63]
    values = macros.Values(img_root="", app_id=name, replica_id=f"$({REPLICA_ENV})", rank0_env=RANK0_ENV)
    role = values.apply(role)
    pod = _plain(role_to_pod(container, role, cfg.get("service_account")))
    labels = pod_labels(app=app, role_idx=0, role=role, replica_id=0, app_id=name)
    labels.pop("torchx.pytorch.org/replica-id")  # one template for every index: the index is the pod's
    labels = {k: str(v)[:63] for k, v in labels.items()}
    labels[LABEL_ORGANIZATION] = MANAGED_BY
    pod["metadata"]["labels"] = labels
    spec = pod["spec"]
    spec["restartPolicy"] = "Never"
    if cfg.get("priority_class"):
        spec["priorityClassName"] = cfg["priority_class"]
    index_env: dict[str, Any] = (
        {"valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}}}
        if replicas > 1
        else {"value": "0"}
    )
    rank0 = f"{name}-0.{name}" if replicas > 1 else "localhost"
    env = spec["containers"][0].setdefault("env", [])
    env += [{"name": REPLICA_ENV, **index_env}, {"name": RANK0_ENV, "value": rank0}]
    job_spec: dict[str, Any] = {
        "backoffLimit": 0,
        "completions": replicas,
        "parallelism": replicas,
        "template": pod,
    }
    if cfg.get("active_deadline_seconds"):
        job_spec["activeDeadlineSeconds"] = int(cfg["active_deadline_seconds"])  # type: ignore[arg-type]
    service = None
    if replicas > 1:
        job_spec["completionMode"] = "Indexed"
        spec["subdomain"] = name
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": True,  # rendezvous before readiness
                "selector": {LABEL_UNIQUE_NAME: name},
                "ports": [{"name": n[:15], "port": p} for n, p in role.port_map.items()] or None,
            },
        }
        if service["spec"]["ports"] is None:
            del service["spec"]["ports"]
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": job_spec,
    }
    return KubeJobRequest(namespace, job, service)


def server_version(client: ApiClient) -> tuple[int, int]:
    from kubernetes.client import VersionApi

    info = VersionApi(client).get_code()
    minor = re.match(r"\d+", info.minor or "0")
    return int(info.major), int(minor.group(0)) if minor else 0


def job_state(job: dict[str, Any], pods: list[dict[str, Any]]) -> tuple[AppState, str]:
    """(TorchX state, message) of a Job (API dict) and its pods: pure, tested on API objects."""
    meta, status = job.get("metadata") or {}, job.get("status") or {}
    if meta.get("deletionTimestamp"):
        return AppState.CANCELLED, "the Job is being deleted"
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            return AppState.SUCCEEDED, ""
        if cond.get("type") == "Failed":
            return (
                AppState.FAILED,
                f"{cond.get('reason', '')}: {cond.get('message', '')}; {_pod_failures(pods)}",
            )
    if status.get("failed"):  # counted before the Failed condition lands
        return AppState.FAILED, _pod_failures(pods)
    phases = {(p.get("status") or {}).get("phase") for p in pods}
    if "Running" in phases:
        return AppState.RUNNING, ""
    if status.get("active") or pods:
        return AppState.PENDING, _waiting(pods)
    return AppState.SUBMITTED, ""


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return (pod.get("status") or {}).get("containerStatuses") or []


def _pod_failures(pods: list[dict[str, Any]]) -> str:
    out = []
    for p in pods:
        for c in _containers(p):
            term = (c.get("state") or {}).get("terminated")
            if term and term.get("exitCode"):
                out.append(f"pod {p['metadata']['name']}: {term.get('reason')} (exit {term.get('exitCode')})")
    return "; ".join(out) or "no failed container recorded"


def _waiting(pods: list[dict[str, Any]]) -> str:
    for p in pods:
        for c in _containers(p):
            waiting = (c.get("state") or {}).get("waiting")
            if waiting and waiting.get("reason") not in (None, "ContainerCreating"):
                return f"pod {p['metadata']['name']}: {waiting.get('reason')}: {waiting.get('message', '')}"
    return ""


def pod_index(pod: dict[str, Any]) -> int:
    index = ((pod.get("metadata") or {}).get("annotations") or {}).get(INDEX_ANNOTATION, "0")
    return int(index) if str(index).isdigit() else 0


class KubeJobsScheduler(Scheduler[KubeJobsOpts]):
    """TorchX scheduler over plain batch/v1 Jobs (see the module docstring)."""

    def __init__(self, session_name: str, client: ApiClient | None = None, **_: Any) -> None:
        super().__init__(BACKEND, session_name)
        self._client = client

    def _api_client(self) -> ApiClient:
        if self._client is None:
            from kubernetes import config

            self._client = config.new_client_from_config()
        return self._client

    def _batch(self) -> Any:
        from kubernetes.client import BatchV1Api

        return BatchV1Api(self._api_client())

    def _core(self) -> Any:
        from kubernetes.client import CoreV1Api

        return CoreV1Api(self._api_client())

    # submit ----------------------------------------------------------------------------------------
    def _run_opts(self) -> runopts:
        opts = runopts()
        opts.add("namespace", type_=str, default="default", help="Kubernetes namespace of the Jobs")
        opts.add("service_account", type_=str, help="service account of the job pods")
        opts.add("priority_class", type_=str, help="PriorityClass of the job pods")
        opts.add("active_deadline_seconds", type_=int, help="the Job fails after this many seconds")
        return opts

    def _submit_dryrun(self, app: AppDef, cfg: KubeJobsOpts) -> AppDryRunInfo[KubeJobRequest]:
        return AppDryRunInfo(self._finish_request(app_to_job(app, cfg)), str)

    def _finish_request(self, request: KubeJobRequest) -> KubeJobRequest:
        """Hook for subclasses (ddm islands harden the pod template)."""
        return request

    def _validate(self, app: AppDef, scheduler: str) -> None:
        pass  # app_to_job checks what matters

    def schedule(self, dryrun_info: AppDryRunInfo[KubeJobRequest]) -> str:
        from kubernetes.client.rest import ApiException

        req = dryrun_info.request
        if req.service is not None and server_version(self._api_client()) < INDEXED_SINCE:
            major, minor = server_version(self._api_client())
            raise ValueError(
                f"a multi-node job needs Indexed Jobs (Kubernetes >= {'.'.join(map(str, INDEXED_SINCE))}); "
                f"this cluster runs {major}.{minor}: run it with j = '1xN' or on a newer cluster"
            )
        try:
            made = self._batch().create_namespaced_job(req.namespace, req.job)
        except ApiException as e:
            if e.status == 409:
                raise ValueError(f"Job {req.job['metadata']['name']} already exists; submit again") from e
            raise
        if req.service is not None:
            owner = {"apiVersion": "batch/v1", "kind": "Job", "name": made.metadata.name,
                     "uid": made.metadata.uid, "blockOwnerDeletion": True}  # fmt: skip
            req.service["metadata"]["ownerReferences"] = [owner]
            self._core().create_namespaced_service(req.namespace, req.service)
        return f"{req.namespace}:{made.metadata.name}"

    # observe ---------------------------------------------------------------------------------------
    def _get(self, app_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        from kubernetes.client.rest import ApiException

        namespace, name = app_id.split(":", 1)
        try:
            job = _plain(self._batch().read_namespaced_job(name, namespace))
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        pods = _plain(self._core().list_namespaced_pod(namespace, label_selector=f"job-name={name}")).get(
            "items", []
        )
        return job, pods

    def describe(self, app_id: str) -> DescribeAppResponse | None:
        got = self._get(app_id)
        if got is None:
            return None
        job, pods = got
        state, msg = job_state(job, pods)
        name = job["metadata"]["name"]
        role_name = job["spec"]["template"]["metadata"]["labels"].get("torchx.pytorch.org/role-name", name)
        replicas = [
            ReplicaStatus(id=pod_index(p), role=role_name,
                          state=POD_PHASE.get((p.get("status") or {}).get("phase", "Unknown"), AppState.UNKNOWN),
                          hostname=(p.get("status") or {}).get("podIP") or "")
            for p in pods
        ]  # fmt: skip
        role = Role(name=role_name, image=job["spec"]["template"]["spec"]["containers"][0].get("image", ""),
                    num_replicas=int(job["spec"].get("completions") or 1))  # fmt: skip
        return DescribeAppResponse(app_id=app_id, state=state, msg=msg, roles=[role],
                                   roles_statuses=[RoleStatus(role_name, replicas)])  # fmt: skip

    def list(self) -> list[ListAppResponse]:
        from kubernetes import config

        try:
            _, active = config.list_kube_config_contexts()
            namespace = active["context"].get("namespace", "default")
        except Exception:  # in-cluster, or no kubeconfig: the default namespace
            namespace = "default"
        jobs = _plain(
            self._batch().list_namespaced_job(namespace, label_selector=f"{LABEL_ORGANIZATION}={MANAGED_BY}")
        )
        return [
            ListAppResponse(app_id=f"{namespace}:{j['metadata']['name']}", state=job_state(j, [])[0])
            for j in jobs.get("items", [])
        ]

    def log_iter(
        self,
        app_id: str,
        role_name: str,
        k: int = 0,
        regex: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        should_tail: bool = False,
        streams: Stream | None = None,
    ) -> Iterable[str]:
        if until is not None:
            raise ValueError("the Kubernetes API cannot end logs at a time (until)")
        if streams not in (None, Stream.COMBINED):
            raise ValueError(f"{BACKEND} only has the COMBINED stream (stdout and stderr together)")
        got = self._get(app_id)
        if got is None:
            raise ValueError(f"{app_id}: no such Job (deleted, or never submitted)")
        namespace = app_id.split(":", 1)[0]
        pods = sorted((p for p in got[1] if pod_index(p) == k),
                      key=lambda p: p["metadata"].get("creationTimestamp") or "")  # fmt: skip
        if not pods:
            raise ValueError(f"{app_id}: no pod for replica {k} (yet)")
        args: dict[str, Any] = {"name": pods[-1]["metadata"]["name"], "namespace": namespace}
        if since is not None:
            args["since_seconds"] = max(1, int((datetime.now() - since).total_seconds()))
        core = self._core()
        if should_tail:
            from kubernetes import watch

            lines: Iterable[str] = watch.Watch().stream(core.read_namespaced_pod_log, **args)
        else:
            # Raw bytes, decoded here: the client's own decoding returns the repr of bytes (b'...').
            resp = core.read_namespaced_pod_log(**args, _preload_content=False)
            lines = split_lines(resp.data.decode("utf-8", errors="replace"))
        return filter_regex(regex, lines) if regex else lines

    # cancel ----------------------------------------------------------------------------------------
    def _cancel_existing(self, app_id: str) -> None:
        namespace, name = app_id.split(":", 1)
        self._batch().delete_namespaced_job(name, namespace, propagation_policy="Foreground")


def create_scheduler(session_name: str, client: ApiClient | None = None, **kwargs: Any) -> KubeJobsScheduler:
    """TorchX's entry point (``[project.entry-points."torchx.schedulers"]``)."""
    return KubeJobsScheduler(session_name, client=client)


class IslandKubeJobsScheduler(IslandClient, KubeJobsScheduler):
    """The scheduler bound to one ddm island: its cluster, Secrets/ConfigMaps and pod hardening."""

    def _finish_request(self, request: KubeJobRequest) -> KubeJobRequest:
        from ddm.coordinator.kube import harden_pod

        spec = request.job["spec"]
        spec["template"] = harden_pod(
            spec["template"], self.island.env_from_secrets, self.island.env_from_configmaps
        )
        return request


def _island_factory(island: Island, session_name: str, **kwargs: Any) -> IslandKubeJobsScheduler:
    return IslandKubeJobsScheduler(session_name, island, client=kwargs.get("client"))


def island_scheduler_factory(island: Island, client: ApiClient | None = None) -> Any:
    """The TorchX scheduler factory of one kube_jobs island (its ``SchedulerKind.per_island``)."""
    return functools.partial(_island_factory, island, client=client)
