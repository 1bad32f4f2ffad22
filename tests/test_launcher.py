"""The launcher against TorchX's real local scheduler: real processes, real exit codes, real logs."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from torchx import specs
from torchx.runner import get_runner

from ddm.coordinator.islands import Island, IslandsConfig
from ddm.coordinator.launcher import JobSpec, Launcher
from ddm.coordinator.manifest import Manifest
from ddm.core import heartbeat


def script_job(name: str, out: str, code: str, island: str = "local") -> JobSpec:
    """A job that runs `code` with OUT set; it is complete when OUT/done exists."""
    app = specs.AppDef(
        name=name,
        roles=[specs.Role(name=name, image=os.getcwd(), entrypoint=sys.executable, args=["-c", code], env={"OUT": out})],
    )
    return JobSpec(name=name, island=island, app=app, output=out, is_complete=lambda: os.path.exists(os.path.join(out, "done")))


SUCCEED = "import os, time; time.sleep(0.5); open(os.path.join(os.environ['OUT'], 'done'), 'w').write('ok')"
FLAKY = (  # fails on its first run, succeeds on the second
    "import os, sys; p = os.path.join(os.environ['OUT'], 'tries'); n = int(open(p).read()) if os.path.exists(p) else 0\n"
    "open(p, 'w').write(str(n + 1))\n"
    "if n == 0: print('first try fails on purpose', file=sys.stderr); sys.exit(3)\n"
    "open(os.path.join(os.environ['OUT'], 'done'), 'w').write('ok')"
)
BROKEN = "import sys; print('boom: the partition is missing', file=sys.stderr); sys.exit(7)"


@pytest.fixture
def outdirs(tmp_path):
    def make(name):
        d = tmp_path / "jobs" / name
        d.mkdir(parents=True)
        return str(d)

    return make


def launcher(root, runner, *, max_concurrent=2, max_attempts=3):
    islands = IslandsConfig(island={"local": Island(max_concurrent=max_concurrent)})
    manifest = Manifest.open(str(root), {"name": "t"})
    return Launcher(manifest, islands, runner, max_attempts=max_attempts, poll_seconds=0.2, lease_seconds=5,
                    log_dir=str(root / "logs"))  # fmt: skip


def test_jobs_succeed_retry_and_fail_with_their_logs(tmp_path, outdirs):
    jobs = [script_job("ok", outdirs("ok"), SUCCEED), script_job("flaky", outdirs("flaky"), FLAKY),
            script_job("broken", outdirs("broken"), BROKEN)]  # fmt: skip
    with get_runner() as runner:
        la = launcher(tmp_path, runner, max_attempts=2)
        outcomes = la.run(jobs)
    assert outcomes["ok"].state == "SUCCEEDED" and outcomes["ok"].attempts == 1
    assert outcomes["flaky"].state == "SUCCEEDED" and outcomes["flaky"].attempts == 2
    assert outcomes["broken"].state == "FAILED" and outcomes["broken"].attempts == 2
    assert "boom: the partition is missing" in outcomes["broken"].error
    saved = json.loads((tmp_path / "manifest.json").read_text())["jobs"]
    assert [a["state"] for a in saved["flaky"]["attempts"]] == ["FAILED", "SUCCEEDED"]
    assert saved["broken"]["state"] == "FAILED" and len(saved["broken"]["attempts"]) == 2


def test_concurrency_limit_per_island(tmp_path, outdirs):
    code = (
        "import os, time; t0 = time.time(); time.sleep(1.0)\n"
        "open(os.path.join(os.environ['OUT'], 'done'), 'w').write(f'{t0} {time.time()}')"
    )
    jobs = [script_job(f"j{i}", outdirs(f"j{i}"), code) for i in range(3)]
    with get_runner() as runner:
        outcomes = launcher(tmp_path, runner, max_concurrent=1).run(jobs)
    assert all(o.state == "SUCCEEDED" for o in outcomes.values())
    spans = sorted(tuple(map(float, open(os.path.join(j.output, "done")).read().split())) for j in jobs)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end - 0.05, f"jobs overlapped on a max_concurrent=1 island: {spans}"


def test_complete_job_is_never_launched(tmp_path, outdirs):
    out = outdirs("done-already")
    open(os.path.join(out, "done"), "w").write("ok")
    with get_runner() as runner:
        outcomes = launcher(tmp_path, runner).run([script_job("done-already", out, BROKEN)])
    assert outcomes["done-already"].state == "SUCCEEDED" and outcomes["done-already"].attempts == 0


def test_running_job_from_an_earlier_coordinator_is_adopted_not_relaunched(tmp_path, outdirs):
    """The manifest says RUNNING with a handle this runner has never seen (the coordinator restarted);
    the job's own heartbeat is fresh, so the launcher waits for it instead of starting a second copy."""
    out = outdirs("orphan")
    code = (
        "import json, os, socket, time\n"
        "out = os.environ['OUT']\n"
        "for step in range(8):\n"
        "    json.dump({'host': socket.gethostname(), 'pid': os.getpid(), 'step': step, 'steps': 8,\n"
        "               'time': time.time(), 'state': 'running'}, open(out + '/heartbeat.json.tmp', 'w'))\n"
        "    os.replace(out + '/heartbeat.json.tmp', out + '/heartbeat.json')\n"
        "    time.sleep(0.25)\n"
        "open(out + '/done', 'w').write('ok')\n"
    )
    orphan = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OUT": out}, start_new_session=True)
    try:
        deadline = time.time() + 10
        while heartbeat.read(out) is None and time.time() < deadline:
            time.sleep(0.05)
        manifest = Manifest.open(str(tmp_path), {"name": "t"})
        manifest.update_job("orphan", state="RUNNING", island="local", handle="local_cwd://ddm-old/orphan-xyz",
                            attempts=[{"handle": "local_cwd://ddm-old/orphan-xyz", "state": "SUBMITTED"}])  # fmt: skip
        with get_runner() as runner:
            # A relaunch would run BROKEN and fail: success proves the orphan was adopted.
            outcomes = launcher(tmp_path, runner).run([script_job("orphan", out, BROKEN)])
        assert outcomes["orphan"].state == "SUCCEEDED" and outcomes["orphan"].attempts == 1
    finally:
        orphan.wait(timeout=20)


def test_dead_job_with_stale_heartbeat_is_relaunched(tmp_path, outdirs):
    out = outdirs("dead")
    json.dump({"host": socket.gethostname(), "pid": 2**22 + 12345, "step": 3, "steps": 8, "time": time.time(), "state": "running"},
              open(os.path.join(out, "heartbeat.json"), "w"))  # fmt: skip
    manifest = Manifest.open(str(tmp_path), {"name": "t"})
    manifest.update_job("dead", state="RUNNING", island="local", handle="local_cwd://ddm-old/dead-1",
                        attempts=[{"handle": "local_cwd://ddm-old/dead-1", "state": "SUBMITTED"}])  # fmt: skip
    with get_runner() as runner:
        outcomes = launcher(tmp_path, runner).run([script_job("dead", out, SUCCEED)])
    assert outcomes["dead"].state == "SUCCEEDED" and outcomes["dead"].attempts == 2
    saved = json.loads((tmp_path / "manifest.json").read_text())["jobs"]["dead"]
    assert "lost" in saved["attempts"][0]["error"]


def test_manifest_refuses_a_different_config(tmp_path):
    Manifest.open(str(tmp_path), {"name": "t", "partition": {"k": 4}})
    with pytest.raises(ValueError, match=r"partition.k: 4 -> 8"):
        Manifest.open(str(tmp_path), {"name": "t", "partition": {"k": 8}})


def test_manifest_takes_new_settings_and_placement_but_not_a_changed_recipe(tmp_path):
    """A root started by an older ddm (no experts.train.device recorded) reopens with the new field;
    moving a job to another device, compiler or parallelism is not a new recipe; its steps are."""
    recorded = {"name": "t", "experts": {"train": {"steps": 10, "precision": "fp32"}}}
    Manifest.open(str(tmp_path), recorded)
    newer = {"name": "t", "experts": {"train": {"steps": 10, "precision": "fp32", "device": "auto", "compile": False}}}
    Manifest.open(str(tmp_path), newer)
    moved = {"name": "t", "experts": {"train": {"steps": 10, "precision": "fp32", "device": "cuda", "compile": True,
                                                "parallelism": "fsdp"}}}  # fmt: skip
    Manifest.open(str(tmp_path), moved)
    with pytest.raises(ValueError, match=r"experts.train.steps: 10 -> 20"):
        Manifest.open(str(tmp_path), {**moved, "experts": {"train": {**moved["experts"]["train"], "steps": 20}}})
