"""coordinator/kube_jobs.py, the TorchX scheduler of plain batch/v1 Jobs (no Volcano): the objects it
renders (checked against the Kubernetes schemas), its state mapping, and submit/status/retry/cancel
through TorchX's Runner and the coordinator's launcher against a real kube-apiserver (v1.20, RBAC on,
as the coordinator's service account). That server runs no controllers: the test writes the Job's
status itself. tests/test_kube_node.py runs the same scheduler's Jobs in real pods.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from k8s_helpers import K8S, KubeAPIServer, validate
from torchx import specs
from torchx.schedulers import get_scheduler_factories

from ddm.coordinator import components
from ddm.coordinator.islands import Island, IslandsConfig
from ddm.coordinator.kube import make_runner
from ddm.coordinator.kube_jobs import RANK0_ENV, REPLICA_ENV, app_to_job, job_state
from ddm.coordinator.launcher import JobSpec, Launcher, cancel_jobs
from ddm.coordinator.manifest import Manifest


@pytest.fixture(scope="module")
def kube(tmp_path_factory):
    try:
        server = KubeAPIServer(tmp_path_factory.mktemp("kube-jobs")).start(timeout=300)
    except RuntimeError as e:
        pytest.fail(str(e))
    server.kubectl("apply", "-f", str(K8S / "base" / "namespace.yaml"))
    server.kubectl("apply", "-n", "ddm", "-f", str(K8S / "base" / "rbac.yaml"))
    yield server
    server.stop()


def island(kubeconfig: str | None = None, **kw) -> Island:
    return Island(scheduler="kube_jobs", kubeconfig=kubeconfig, image="ddm:dev", namespace="ddm",
                  service_account="ddm-workload", env_from_secrets=["ddm-s3"], cpu=1, memMB=1024, **kw)  # fmt: skip


def test_registered_through_torchx_entry_point_next_to_torchx_own():
    factories = get_scheduler_factories()
    assert {"kube_jobs", "local_cwd", "kubernetes", "slurm"} <= set(factories)
    assert type(factories["kube_jobs"]("s")).__name__ == "KubeJobsScheduler"


def test_island_takes_cluster_fields_but_not_a_volcano_queue():
    assert island().run_cfg() == {"namespace": "ddm", "service_account": "ddm-workload"}
    with pytest.raises(ValueError, match='queue: only for scheduler = "kubernetes"'):
        island(queue="ddm")
    with pytest.raises(
        ValueError, match='namespace: only for scheduler = "kubernetes" or scheduler = "kube_jobs"'
    ):
        Island(namespace="ddm")
    with pytest.raises(ValueError, match="needs namespace"):
        Island(scheduler="kube_jobs", image="ddm:dev")


def test_single_node_job_is_one_pod_that_never_retries():
    app = components.trainer("s3://b/r/job.toml", name="demo-expert-0", image="ddm:dev", j="1x2")
    req = app_to_job(app, {"namespace": "ddm"}, name="demo-expert-0-abc")
    job = req.job
    assert req.service is None and "completionMode" not in job["spec"]
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["completions"] == 1
    pod = job["spec"]["template"]
    assert pod["spec"]["restartPolicy"] == "Never"
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env[REPLICA_ENV] == "0" and env[RANK0_ENV] == "localhost"
    assert pod["metadata"]["labels"]["app.kubernetes.io/instance"] == "demo-expert-0-abc"
    for version in ("1.25.0", "1.37.0"):
        validate(job, version)


def test_multi_node_job_is_indexed_with_a_headless_service_for_the_rendezvous():
    app = components.trainer("s3://b/r/job.toml", name="demo-expert-1", image="ddm:dev", j="3x2")
    req = app_to_job(app, {"namespace": "ddm"}, name="e1-xyz")
    spec = req.job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 3
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "e1-xyz" == req.service["metadata"]["name"]
    assert req.service["spec"]["clusterIP"] == "None" and req.service["spec"]["publishNotReadyAddresses"]
    assert req.service["spec"]["selector"] == {"app.kubernetes.io/instance": "e1-xyz"}
    c = pod["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    assert env[RANK0_ENV]["value"] == "e1-xyz-0.e1-xyz"
    assert "job-completion-index" in env[REPLICA_ENV]["valueFrom"]["fieldRef"]["fieldPath"]
    script = c["command"][-1]
    assert "${DDM_RANK0_HOST:=localhost}:29500" in script and "--rdzv-id e1-xyz" in script
    for version in ("1.25.0", "1.37.0"):
        validate(req.job, version)
        validate(req.service, version)


def test_bad_apps_are_refused_naming_the_fix():
    app = components.trainer("s3://b/r/job.toml", name="x", image="ddm:dev")
    two = specs.AppDef("two", roles=[app.roles[0], app.roles[0]])
    with pytest.raises(ValueError, match="one role per Job"):
        app_to_job(two, {})
    app.roles[0].max_retries = 2
    with pytest.raises(ValueError, match="set max_retries=0"):
        app_to_job(app, {})


def _pod(phase: str, exit_code: int | None = None, reason: str = "Error") -> dict:
    status: dict = {"phase": phase}
    if exit_code is not None:
        term = {"exitCode": exit_code, "reason": reason}
        status["containerStatuses"] = [{"state": {"terminated": term}}]
    return {"metadata": {"name": "p"}, "status": status}


def test_job_state_from_conditions_and_pods():
    S = specs.AppState
    assert job_state({}, [])[0] == S.SUBMITTED
    assert job_state({"status": {"active": 1}}, [_pod("Pending")])[0] == S.PENDING
    assert job_state({"status": {"active": 1}}, [_pod("Running")])[0] == S.RUNNING
    done = {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    assert job_state(done, [_pod("Succeeded", 0)])[0] == S.SUCCEEDED
    failed = {"status": {"failed": 1, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "has reached the limit"}]}}  # fmt: skip
    state, msg = job_state(failed, [_pod("Failed", 137, "OOMKilled")])
    assert state == S.FAILED and "BackoffLimitExceeded" in msg and "OOMKilled (exit 137)" in msg
    assert job_state({"status": {"failed": 1}}, [_pod("Failed", 1)])[0] == S.FAILED  # before the condition
    assert job_state({"metadata": {"deletionTimestamp": "x"}, "status": {"active": 1}}, [])[0] == S.CANCELLED


def _patch_status(kube, name: str, status: dict) -> None:
    from kubernetes import client, config

    api = client.BatchV1Api(config.new_client_from_config(config_file=kube.admin_kubeconfig))
    api.patch_namespaced_job_status(name, "ddm", {"status": status})


def _job(kube, name: str) -> dict | None:
    r = kube.kubectl("get", "jobs.batch", name, "-n", "ddm", "-o", "json", check=False)
    return json.loads(r.stdout) if r.returncode == 0 else None


def wait_for(what: str, check, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


FAILED = {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                       "message": "Job has reached the specified backoff limit"}]}  # fmt: skip
COMPLETE = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}


def test_coordinator_submits_follows_and_retries_plain_jobs(kube, tmp_path):
    """As the coordinator's service account: a Failed Job is retried by the launcher as a new Job."""
    islands = IslandsConfig(default="k8s", island={"k8s": island(kube.coordinator_kubeconfig)})
    manifest = Manifest.open(str(tmp_path / "root"), {"name": "kj"})
    app = components.trainer("s3://b/r/experts/expert-0/job.toml", name="kj-expert-0", image="ddm:dev")
    complete = threading.Event()
    job = JobSpec("expert-0", "k8s", app, output=str(tmp_path / "out"), is_complete=complete.is_set)
    outcomes: dict = {}
    with make_runner(islands) as runner:
        launcher = Launcher(manifest, islands, runner, max_attempts=2, poll_seconds=0.1, lease_seconds=1)
        thread = threading.Thread(target=lambda: outcomes.update(launcher.run([job])), daemon=True)
        thread.start()
        try:
            record = manifest.job("expert-0")
            handle = wait_for("the first submission", lambda: record.get("handle"))
            assert handle.startswith("kube_jobs@k8s://torchx/ddm:kj-expert-0-")
            name = handle.rsplit(":", 1)[1]
            stored = _job(kube, name)
            pod = stored["spec"]["template"]["spec"]
            assert stored["spec"]["backoffLimit"] == 0 and pod["serviceAccountName"] == "ddm-workload"
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["containers"][0]["envFrom"] == [{"secretRef": {"name": "ddm-s3"}}]
            time.sleep(0.5)  # no pods yet (no controllers): submitted, not running
            assert record["state"] == "SUBMITTED"
            _patch_status(kube, name, FAILED)
            wait_for("a second attempt", lambda: len(record["attempts"]) == 2 and record.get("handle") not in (None, handle))  # fmt: skip
            assert record["attempts"][0]["state"] == "FAILED"
            assert "BackoffLimitExceeded" in record["attempts"][0]["error"]
            second = record["handle"].rsplit(":", 1)[1]
            assert second != name and _job(kube, second) is not None
            complete.set()
            _patch_status(kube, second, COMPLETE)
            thread.join(10)
            assert not thread.is_alive()
        finally:
            complete.set()
    assert outcomes["expert-0"].state == "SUCCEEDED" and outcomes["expert-0"].attempts == 2


def test_cancel_deletes_the_job_and_status_says_cancelled(kube, tmp_path):
    islands = IslandsConfig(default="k8s", island={"k8s": island(kube.coordinator_kubeconfig)})
    manifest = Manifest.open(str(tmp_path / "root"), {"name": "kj"})
    app = components.trainer("s3://b/r/experts/expert-1/job.toml", name="kj-expert-1", image="ddm:dev")
    job = JobSpec("expert-1", "k8s", app, output=str(tmp_path / "out"), is_complete=lambda: False)
    with make_runner(islands) as runner:
        Launcher(manifest, islands, runner)._submit(job)
    handle = manifest.job("expert-1")["handle"]
    with make_runner(islands) as runner:  # a fresh runner, as `ddm cancel` in another process has
        assert cancel_jobs(manifest, runner, {}) == ["expert-1"]
        # Foreground deletion: the Job stays (deleting) until its pods are gone; this server has no
        # garbage collector, so it stays, and its status reads CANCELLED.
        assert runner.status(handle).state == specs.AppState.CANCELLED
    assert manifest.job("expert-1")["state"] == "CANCELLED"
    assert _job(kube, handle.rsplit(":", 1)[1])["metadata"]["deletionTimestamp"]


def test_multi_node_job_on_a_cluster_without_indexed_jobs_is_refused(kube):
    islands = IslandsConfig(default="k8s", island={"k8s": island(kube.coordinator_kubeconfig, j="2x1")})
    app = components.trainer("s3://b/r/job.toml", name="kj-multi", image="ddm:dev", j="2x1")
    with make_runner(islands) as runner:
        with pytest.raises(ValueError, match=r"Indexed Jobs \(Kubernetes >= 1.22\); this cluster runs 1.20"):
            runner.run(app, scheduler="kube_jobs@k8s", cfg=islands.island["k8s"].run_cfg())
    jobs = json.loads(kube.kubectl("get", "jobs.batch", "-n", "ddm", "-o", "json").stdout)["items"]
    assert not [j for j in jobs if j["metadata"]["name"].startswith("kj-multi")]  # nothing half-made
