"""Against a real kube-apiserver (v1.20, etcd, RBAC on) on 127.0.0.1: the rendered overlays pass
server-side dry-run and apply for real; an expert job goes through our launcher and TorchX's
kubernetes scheduler as the coordinator's service account (so the Role is exercised, not assumed);
the test patches Volcano's status phases in and watches the coordinator react; cancel deletes it.

The server runs no controllers, scheduler or kubelet: pods never run, and nobody but this test writes
a Volcano job's status. Build it once with ../shared/tools/kube-apiserver/build.sh (.ci/run does).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import yaml
from k8s_helpers import COORDINATOR_USER, K8S, KubeAPIServer, render, render_text

from ddm.coordinator import components
from ddm.coordinator.islands import Island, IslandsConfig
from ddm.coordinator.kube import make_runner, scheduler_key
from ddm.coordinator.launcher import JobSpec, Launcher, cancel_jobs
from ddm.coordinator.manifest import Manifest

CRDS = Path(__file__).parent / "k8s" / "volcano-crds.yaml"


@pytest.fixture(scope="session")
def kube(tmp_path_factory):
    try:
        server = KubeAPIServer(tmp_path_factory.mktemp("kube")).start()
    except RuntimeError as e:
        pytest.fail(str(e))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def installed(kube):
    """Volcano's CRDs, then both overlays through server-side dry-run, then the local one for real."""
    kube.kubectl("apply", "--server-side", "-f", str(CRDS))
    kube.kubectl(
        "wait",
        "--for=condition=established",
        "--timeout=30s",
        "crd/jobs.batch.volcano.sh",
        "crd/queues.scheduling.volcano.sh",
    )
    objs = render("local")
    namespace = [o for o in objs if o["kind"] == "Namespace"]
    kube.kubectl(
        "apply", "--server-side", "-f", "-", stdin=yaml.safe_dump_all(namespace)
    )  # dry-run needs it to exist
    dry = {}
    for overlay in ("local", "production"):
        dry[overlay] = kube.kubectl(
            "apply", "--server-side", "--dry-run=server", "-f", "-", stdin=render_text(overlay)
        )
    # docs/deploy.md's training step (everything but the servers), then the serving step (all).
    before = kube.kubectl("apply", "--server-side", "-k", str(K8S / "overlays" / "local"),
                          "-l", "app.kubernetes.io/component notin (router,expert)")  # fmt: skip
    servers_before = json.loads(kube.kubectl("get", "deployments", "-n", "ddm", "-o", "json").stdout)["items"]
    real = kube.kubectl("apply", "--server-side", "-f", "-", stdin=render_text("local"))
    return {"before": before, "servers_before": servers_before, "dry": dry, "real": real, "objs": objs}


def get(kube, *what: str, namespace: str = "ddm") -> dict:
    return json.loads(kube.kubectl("get", *what, "-n", namespace, "-o", "json").stdout)


def test_overlays_pass_server_side_dry_run_and_apply(kube, installed):
    assert "job.batch/ddm-run serverside-applied" in installed["before"].stdout
    assert installed["servers_before"] == [], "the training step of docs/deploy.md must not start servers"
    for overlay, r in installed["dry"].items():
        assert "(server dry run)" in r.stdout, overlay
    assert "deployment.apps/ddm-expert-1 serverside-applied" in installed["real"].stdout
    # What the server stored is what we rendered: nothing was silently dropped (a 1.20 server drops
    # fields it does not know, which is why the local overlay uses exec probes).
    dep = get(kube, "deployment", "ddm-expert-1")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["exec"]["command"][:3] == ["python", "-m", "ddm.proto.probe"]
    assert "--checkpoint=$(DDM_RUN_ROOT)/experts/$(DDM_EXPERT)/checkpoints" in c["args"]
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    svc = get(kube, "service", "ddm-expert-1")
    assert svc["spec"]["clusterIP"] == "None"
    queue = json.loads(kube.kubectl("get", "queues.scheduling.volcano.sh", "ddm", "-o", "json").stdout)
    assert (
        queue["spec"]["capability"] == {"cpu": "2", "memory": "8Gi"} and "namespace" not in queue["metadata"]
    )
    assert (
        get(kube, "networkpolicy", "ddm-expert-ingress")["spec"]["podSelector"]["matchLabels"][
            "app.kubernetes.io/component"
        ]
        == "expert"
    )
    # A Job's pod template is immutable: a changed run config or image needs `kubectl delete job ddm-run`
    # first (docs/deploy.md says so; the run resumes from its manifest).
    r = kube.kubectl(
        "apply", "--server-side", "--dry-run=server", "-f", "-", stdin=render_text("production"), check=False
    )
    assert r.returncode != 0 and 'Job "ddm-run" is invalid' in r.stderr and "field is immutable" in r.stderr


def test_server_side_dry_run_rejects_a_broken_manifest(kube, installed):
    dep = next(
        o for o in render("local") if o["kind"] == "Deployment" and o["metadata"]["name"] == "ddm-router"
    )
    dep["spec"]["selector"]["matchLabels"] = {"app.kubernetes.io/component": "not-the-router"}
    r = kube.kubectl(
        "apply", "--server-side", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(dep), check=False
    )
    assert r.returncode != 0 and "selector" in r.stderr


def test_coordinator_role_allows_exactly_its_work(kube, installed):
    def can(verb: str, what: str, ns: str = "ddm") -> bool:
        resource, _, sub = what.partition("/")
        extra = [f"--subresource={sub}"] if sub else []
        r = kube.kubectl(
            "auth", "can-i", verb, resource, *extra, "-n", ns, f"--as={COORDINATOR_USER}", check=False
        )
        return r.stdout.strip() == "yes"

    assert can("create", "jobs.batch.volcano.sh") and can("delete", "jobs.batch.volcano.sh")
    assert can("get", "jobs.batch.volcano.sh/status") and can("get", "pods/log")
    assert not can("patch", "jobs.batch.volcano.sh/status")  # only Volcano writes status
    assert not can("get", "secrets") and not can("create", "pods/exec") and not can("create", "deployments")
    assert not can("create", "jobs.batch.volcano.sh", ns="default")  # its namespace only


def island(kubeconfig: str) -> Island:
    return Island(scheduler="kubernetes", kubeconfig=kubeconfig, image="ddm:dev", namespace="ddm", queue="ddm",
                  service_account="ddm-workload", env_from_secrets=["ddm-s3"], env_from_configmaps=["ddm-env"],
                  cpu=1, memMB=1024)  # fmt: skip


def wait_for(what: str, check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _patch_status(kube, name: str, phase: str) -> None:
    """kubectl's --subresource needs a 1.24+ server, so the status goes through the API client."""
    from kubernetes import client, config

    api = client.CustomObjectsApi(config.new_client_from_config(config_file=kube.admin_kubeconfig))
    api.patch_namespaced_custom_object_status(
        "batch.volcano.sh", "v1alpha1", "ddm", "jobs", name, {"status": {"state": {"phase": phase}}}
    )


def vcjob(kube, name: str) -> dict | None:
    r = kube.kubectl("get", "jobs.batch.volcano.sh", name, "-n", "ddm", "-o", "json", check=False)
    return json.loads(r.stdout) if r.returncode == 0 else None


def test_expert_job_through_torchx_and_the_coordinator_follows_its_phases(kube, installed, tmp_path):
    islands = IslandsConfig(default="k8s", island={"k8s": island(kube.coordinator_kubeconfig)})
    manifest = Manifest.open(str(tmp_path / "root"), {"name": "k8s"})
    app = components.trainer(
        "s3://ddm-local/tiny/experts/expert-0/job.toml", name="k8s-expert-0", image="ddm:dev"
    )
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
            assert handle.startswith(f"{scheduler_key('k8s', islands.island['k8s'])}://torchx/ddm:")
            name = handle.rsplit(":", 1)[1]
            stored = vcjob(kube, name)  # what TorchX created, as the coordinator's service account
            assert stored["spec"]["queue"] == "ddm" and stored["spec"]["schedulerName"] == "volcano"
            pod = stored["spec"]["tasks"][0]["template"]["spec"]
            assert (
                pod["serviceAccountName"] == "ddm-workload" and pod["securityContext"]["runAsNonRoot"] is True
            )
            assert pod["containers"][0]["envFrom"] == [
                {"configMapRef": {"name": "ddm-env"}},
                {"secretRef": {"name": "ddm-s3"}},
            ]
            assert pod["containers"][0]["command"][-2:] == [
                "--config",
                "s3://ddm-local/tiny/experts/expert-0/job.toml",
            ]

            _patch_status(kube, name, "Pending")
            time.sleep(0.5)  # several polls: waiting in the queue is not running
            assert record["state"] == "SUBMITTED"
            _patch_status(kube, name, "Running")
            wait_for("RUNNING", lambda: record["state"] == "RUNNING")
            _patch_status(kube, name, "Failed")  # the coordinator retries (its retries, not Volcano's)
            wait_for(
                # the attempt is recorded before its submission (write-ahead), its handle once submitted
                "a second attempt",
                lambda: len(record["attempts"]) == 2 and record.get("handle") not in (None, handle),
            )
            assert record["attempts"][0]["state"] == "FAILED" and record["attempts"][0]["error"].startswith(
                "FAILED"
            )
            second = record["handle"].rsplit(":", 1)[1]
            assert vcjob(kube, second) is not None
            _patch_status(kube, second, "Running")
            wait_for("RUNNING again", lambda: record["state"] == "RUNNING")
            complete.set()  # the trainer wrote its last checkpoint ...
            _patch_status(kube, second, "Completed")  # ... and Volcano says the job completed
            thread.join(10)
            assert not thread.is_alive()
        finally:
            complete.set()
    assert outcomes["expert-0"].state == "SUCCEEDED" and outcomes["expert-0"].attempts == 2
    assert Manifest.load(str(tmp_path / "root")).job("expert-0")["state"] == "SUCCEEDED"


def test_cancel_deletes_the_volcano_job(kube, installed, tmp_path):
    islands = IslandsConfig(default="k8s", island={"k8s": island(kube.coordinator_kubeconfig)})
    manifest = Manifest.open(str(tmp_path / "root"), {"name": "k8s"})
    app = components.trainer("s3://b/r/experts/expert-1/job.toml", name="k8s-expert-1", image="ddm:dev")
    job = JobSpec("expert-1", "k8s", app, output=str(tmp_path / "out"), is_complete=lambda: False)
    with make_runner(islands) as runner:
        Launcher(manifest, islands, runner)._submit(job)
    name = manifest.job("expert-1")["handle"].rsplit(":", 1)[1]
    _patch_status(kube, name, "Running")
    with make_runner(islands) as runner:  # a fresh runner, as `ddm cancel` in another process has
        assert cancel_jobs(manifest, runner, {}) == ["expert-1"]
    wait_for("the Volcano job to be deleted", lambda: vcjob(kube, name) is None, timeout=10)
    assert manifest.job("expert-1")["state"] == "CANCELLED"


def test_each_island_uses_its_own_cluster_credentials(kube, installed, tmp_path):
    """Two islands, two kubeconfigs: the one with a revoked token is refused, the other is not."""
    from kubernetes.client.rest import ApiException

    bad = Path(kube.write_kubeconfig("revoked", "not-a-valid-token", "ddm"))
    islands = IslandsConfig(
        default="good", island={"good": island(kube.coordinator_kubeconfig), "bad": island(str(bad))}
    )
    app = components.trainer("s3://b/r/job.toml", name="k8s-islands", image="ddm:dev")
    with make_runner(islands) as runner:
        with pytest.raises(ApiException) as e:
            runner.run(app, scheduler="kubernetes@bad", cfg=islands.island["bad"].run_cfg())
        assert e.value.status == 401
        handle = runner.run(app, scheduler="kubernetes@good", cfg=islands.island["good"].run_cfg())
        runner.cancel(handle)


def test_dry_run_output_is_accepted_by_the_server(kube, installed, tmp_path, capsys, monkeypatch):
    """docs/deploy.md: `ddm run --dry-run | kubectl apply --dry-run=server -f -` checks the Volcano Jobs
    the local overlay's coordinator would submit (its own run.toml and islands.toml) on the cluster."""
    from ddm.coordinator.cli import main

    monkeypatch.chdir(tmp_path)
    overlay = K8S / "overlays" / "local"
    assert (
        main(["run", str(overlay / "run.toml"), "--islands", str(overlay / "islands.toml"), "--dry-run"]) == 0
    )
    stream = capsys.readouterr().out
    docs = [d for d in yaml.safe_load_all(stream) if d]
    assert len(docs) == 4 and all(d["kind"] == "Job" for d in docs)  # 2 experts, router, distill
    r = kube.kubectl("apply", "--server-side", "--dry-run=server", "-n", "ddm", "-f", "-", stdin=stream)
    assert (
        r.stdout.count("created (server dry run)") + r.stdout.count("serverside-applied (server dry run)")
        == 4
    )
