"""On a real single-node Kubernetes (tests/kube_node.py: kubelet, containerd, runc, scheduler,
controller-manager, kube-proxy on this machine): plain batch/v1 Jobs from coordinator/kube_jobs.py run
in pods. A Job's logs come back through TorchX; a container killed mid-job fails its Job and the
coordinator's launcher submits a new attempt, which finds the first attempt's checkpoint on the
shared run root (a hostPath volume here) and finishes; cancel deletes a running Job's pods.

The node is built once by tests/kube_node_build.sh (``make test-tools``). If this machine cannot run
it, the fixture fails naming why (never skips). Teardown restores the host and fails if it could not.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from kube_node import TEST_IMAGE, KubeNode, NodeUnavailable
from torchx import specs

from ddm.coordinator.islands import Island, IslandsConfig
from ddm.coordinator.kube import make_runner
from ddm.coordinator.launcher import JobSpec, Launcher
from ddm.coordinator.manifest import Manifest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    try:
        n = KubeNode(tmp_path_factory.mktemp("node")).start()
    except NodeUnavailable as e:
        pytest.fail(f"the test Kubernetes node cannot run here: {e}")
    print(f"\nkube node timings: {json.dumps(n.timings)}")
    n.kubectl("create", "namespace", "ddm")
    yield n
    left = n.stop()
    assert not left, f"the node left host state behind: {left}"


def island(node: KubeNode, **kw) -> IslandsConfig:
    isl = Island(scheduler="kube_jobs", kubeconfig=node.kubeconfig, image=TEST_IMAGE, namespace="ddm",
                 cpu=1, memMB=256, **kw)  # fmt: skip
    return IslandsConfig(default="node", island={"node": isl})


def shell_app(name: str, script: str, run_root: str | None = None) -> specs.AppDef:
    mounts = [specs.BindMount(src_path=run_root, dst_path="/run-root")] if run_root else []
    role = specs.Role(name=name, image=TEST_IMAGE, entrypoint="/bin/sh", args=["-c", script],
                      resource=specs.Resource(cpu=1, gpu=0, memMB=256), mounts=mounts)  # fmt: skip
    return specs.AppDef(name=name, roles=[role])


def wait_for(what: str, check, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def pods(node: KubeNode, job: str) -> list[dict]:
    out = node.kubectl("get", "pods", "-n", "ddm", "-l", f"job-name={job}", "-o", "json").stdout
    return json.loads(out)["items"]


def test_a_job_runs_in_a_pod_and_its_logs_come_back(node):
    islands = island(node)
    app = shell_app("hello", 'echo "replica $DDM_REPLICA_ID as $(id -u) on $(hostname)"; echo done')
    with make_runner(islands) as runner:
        handle = runner.run(app, scheduler="kube_jobs@node", cfg=islands.island["node"].run_cfg())
        status = wait_for("the Job to finish", lambda: (s := runner.status(handle)) and s.is_terminal() and s)
        assert status.state == specs.AppState.SUCCEEDED, status
        lines = list(runner.log_lines(handle, "hello", k=0))
    assert lines[0].startswith("replica 0 as 10001 on hello-") and lines[-1].strip() == "done"


def test_a_killed_training_container_is_retried_by_the_coordinator_and_resumes(node, tmp_path):
    """Attempt 1 writes its checkpoint and keeps training; we SIGKILL its container (exit 137): the Job
    fails (backoffLimit 0), the launcher submits attempt 2, which resumes from the checkpoint."""
    root = tmp_path / "run-root"
    root.mkdir()
    root.chmod(0o777)  # the pods run as 10001
    script = (
        "if [ -f /run-root/ckpt ]; then echo resumed from $(cat /run-root/ckpt); echo ok > /run-root/done;"
        " else echo step-3 > /run-root/ckpt; echo training; sleep 600; fi"
    )
    islands = island(node)
    manifest = Manifest.open(str(tmp_path / "manifest"), {"name": "node"})
    job = JobSpec("expert-0", "node", shell_app("node-expert-0", script, str(root)),
                  output=str(tmp_path / "out"), is_complete=(root / "done").exists)  # fmt: skip
    outcomes: dict = {}
    with make_runner(islands) as runner:
        launcher = Launcher(manifest, islands, runner, max_attempts=2, poll_seconds=0.5, lease_seconds=5)
        thread = threading.Thread(target=lambda: outcomes.update(launcher.run([job])), daemon=True)
        thread.start()
        record = manifest.job("expert-0")
        wait_for("attempt 1 running", lambda: record["state"] == "RUNNING" and (root / "ckpt").exists())
        first = record["handle"].rsplit(":", 1)[1]
        [pod] = pods(node, first)
        cid = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
        node.ctr("tasks", "kill", "-s", "SIGKILL", cid)
        thread.join(240)
        assert not thread.is_alive(), f"the launcher did not finish: {record}"
        second = record["handle"].rsplit(":", 1)[1]
        # The launcher ends as soon as the output is complete; the pod's status on the API server may
        # lag behind its container (logs are refused while it still reads ContainerCreating).
        wait_for(
            "attempt 2's Job to complete",
            lambda: runner.status(record["handle"]).state == specs.AppState.SUCCEEDED,
        )
        log = "".join(runner.log_lines(record["handle"], "node-expert-0", k=0))
    assert outcomes["expert-0"].state == "SUCCEEDED" and outcomes["expert-0"].attempts == 2
    assert record["attempts"][0]["state"] == "FAILED" and "exit 137" in record["attempts"][0]["error"]
    assert second != first and "resumed from step-3" in log


def test_cancel_deletes_a_running_jobs_pods(node):
    islands = island(node)
    with make_runner(islands) as runner:
        handle = runner.run(shell_app("sleeper", "sleep 600"), scheduler="kube_jobs@node",
                            cfg=islands.island["node"].run_cfg())  # fmt: skip
        wait_for("RUNNING", lambda: runner.status(handle).state == specs.AppState.RUNNING)
        name = handle.rsplit(":", 1)[1]
        assert pods(node, name)
        runner.cancel(handle)
        wait_for("the Job and its pod gone", lambda: runner.status(handle) is None and not pods(node, name))
