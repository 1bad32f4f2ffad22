"""The launcher against TorchX's real local scheduler: real processes, real exit codes, real logs."""

import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from torchx import specs
from torchx.runner import get_runner

from ddm.coordinator.islands import Island, IslandsConfig
from ddm.coordinator.launcher import JobSpec, Launcher
from ddm.coordinator.manifest import Manifest
from ddm.coordinator.pipeline import job_output
from ddm.core import heartbeat


def script_job(name: str, out: str, code: str, island: str = "local") -> JobSpec:
    """A job that runs `code` with OUT set; it is complete when OUT/done exists."""
    app = specs.AppDef(
        name=name,
        roles=[
            specs.Role(
                name=name, image=os.getcwd(), entrypoint=sys.executable, args=["-c", code], env={"OUT": out}
            )
        ],
    )
    return JobSpec(
        name=name,
        island=island,
        app=app,
        output=out,
        is_complete=lambda: os.path.exists(os.path.join(out, "done")),
    )


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
    orphan = subprocess.Popen(
        [sys.executable, "-c", code], env={**os.environ, "OUT": out}, start_new_session=True
    )
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


SLOW_START = (  # a trainer whose interpreter, data and model take a while: first heartbeat after 2 s
    "import json, os, socket, time\n"
    "out = os.environ['OUT']\n"
    "time.sleep(2.0)\n"
    "for step in range(4):\n"
    "    json.dump({'host': socket.gethostname(), 'pid': os.getpid(), 'step': step, 'steps': 4,\n"
    "               'time': time.time(), 'state': 'running'}, open(out + '/heartbeat.json.tmp', 'w'))\n"
    "    os.replace(out + '/heartbeat.json.tmp', out + '/heartbeat.json')\n"
    "    time.sleep(0.25)\n"
    "open(out + '/runs', 'a').write('x')\n"
    "open(out + '/done', 'w').write('ok')\n"
)


@pytest.mark.parametrize("handle", ["local_cwd://ddm-old/starting-1", None], ids=["recorded", "write-ahead"])
def test_a_job_still_starting_when_its_coordinator_died_is_waited_for_not_run_twice(
    tmp_path, outdirs, handle
):
    """The coordinator was SIGKILLed just after launching a job (found by bench/chaos.py): the job's
    process lives on but has not written a heartbeat yet. The rerun must wait for it, not launch a
    second copy. ``None``: killed inside runner.run, so only the write-ahead attempt is on the record."""
    out = outdirs("starting")
    orphan = subprocess.Popen(
        [sys.executable, "-c", SLOW_START], env={**os.environ, "OUT": out}, start_new_session=True
    )
    try:
        manifest = Manifest.open(str(tmp_path), {"name": "t"})
        manifest.update_job("starting", state="SUBMITTED", island="local", handle=handle,
                            attempts=[{"handle": handle, "state": "SUBMITTED", "submitted_at": time.time()}])  # fmt: skip
        with get_runner() as runner:
            # A relaunch would run BROKEN, and the orphan would finish the job on a second attempt.
            outcomes = launcher(tmp_path, runner).run([script_job("starting", out, BROKEN)])
        assert outcomes["starting"].state == "SUCCEEDED" and outcomes["starting"].attempts == 1
        saved = json.loads((tmp_path / "manifest.json").read_text())["jobs"]["starting"]
        assert [a["state"] for a in saved["attempts"]] == ["SUCCEEDED"]
    finally:
        orphan.wait(timeout=20)
    with open(os.path.join(out, "runs")) as f:
        assert f.read() == "x"  # the job's process ran once


def test_an_attempt_is_on_the_record_before_its_process_starts(tmp_path, outdirs):
    """Write-ahead: while runner.run starts the process, the stored manifest already holds the attempt
    (SUBMITTED, no handle yet), so a coordinator killed there leaves a record the next one waits on."""
    seen = []

    class Watching:
        def __init__(self, runner):
            self.runner = runner

        def run(self, *args, **kwargs):
            seen.append(json.loads((tmp_path / "manifest.json").read_text())["jobs"]["ok"])
            return self.runner.run(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.runner, name)

    with get_runner() as runner:
        outcomes = launcher(tmp_path, Watching(runner)).run([script_job("ok", outdirs("ok"), SUCCEED)])
    assert outcomes["ok"].state == "SUCCEEDED" and outcomes["ok"].attempts == 1
    assert [(a["state"], a["handle"]) for a in seen[0]["attempts"]] == [("SUBMITTED", None)]
    assert seen[0]["state"] == "SUBMITTED" and seen[0]["attempts"][0]["submitted_at"] > 0
    saved = json.loads((tmp_path / "manifest.json").read_text())["jobs"]["ok"]
    assert (
        saved["attempts"][0]["handle"].startswith("local")
        and saved["handle"] == saved["attempts"][0]["handle"]
    )


def test_manifest_refuses_a_different_config(tmp_path):
    """Once a stage finished under a config (before that, a new config takes the root: test_stages.py)."""
    Manifest.open(str(tmp_path), {"name": "t", "partition": {"k": 4}}).set_stage("curate", "done")
    with pytest.raises(ValueError, match=r"partition.k: 4 -> 8"):
        Manifest.open(str(tmp_path), {"name": "t", "partition": {"k": 8}})


def test_manifest_takes_new_settings_and_placement_but_not_a_changed_recipe(tmp_path):
    """A root started by an older ddm (no experts.train.device recorded) reopens with the new field;
    moving a job to another device, compiler or parallelism is not a new recipe; its steps are."""
    recorded = {"name": "t", "experts": {"train": {"steps": 10, "precision": "fp32"}}}
    Manifest.open(str(tmp_path), recorded).set_stage("curate", "done")
    newer = {
        "name": "t",
        "experts": {"train": {"steps": 10, "precision": "fp32", "device": "auto", "compile": False}},
    }
    Manifest.open(str(tmp_path), newer)
    moved = {"name": "t", "experts": {"train": {"steps": 10, "precision": "fp32", "device": "cuda", "compile": True,
                                                "parallelism": "fsdp"}}}  # fmt: skip
    Manifest.open(str(tmp_path), moved)
    with pytest.raises(ValueError, match=r"experts.train.steps: 10 -> 20"):
        Manifest.open(
            str(tmp_path), {**moved, "experts": {"train": {**moved["experts"]["train"], "steps": 20}}}
        )


def test_a_root_takes_a_new_config_until_something_was_made(tmp_path):
    """A first stage that failed on a wrong path leaves the root free for the corrected config (the
    failed attempt stays on record); once a stage finished, or a job was launched, it is refused."""
    m = Manifest.open(str(tmp_path), {"name": "t", "data": {"path": "/nonexistent"}})
    m.set_stage("curate", "failed", error="FileNotFoundError: /nonexistent")
    m = Manifest.open(str(tmp_path), {"name": "t", "data": {"path": "/data"}})
    assert m.config_changes == ["data.path: '/nonexistent' -> '/data'"]
    assert m.data["stages"]["curate"]["state"] == "failed" and m.data["config"]["data"]["path"] == "/data"
    m.set_stage("curate", "done")
    with pytest.raises(ValueError, match="stage curate finished under it"):
        Manifest.open(str(tmp_path), {"name": "t", "data": {"path": "/nonexistent"}})


def test_a_launched_job_locks_the_config(tmp_path):
    m = Manifest.open(str(tmp_path), {"name": "t", "partition": {"k": 2}})
    m.update_job("expert-0", state="FAILED", attempts=[{"submitted_at": time.time(), "state": "FAILED"}])
    with pytest.raises(ValueError, match="job expert-0 was launched under it"):
        Manifest.open(str(tmp_path), {"name": "t", "partition": {"k": 3}})


def test_a_skipped_stage_is_decided_again_under_a_new_config(tmp_path):
    """Skipping makes nothing: a monolith run that failed before its first job may become an experts
    run, and its skipped curate and partition run then."""
    m = Manifest.open(str(tmp_path), {"name": "t", "mode": "monolith"})
    m.set_stage("curate", "done", skipped="monolith mode trains on the whole dataset")
    m = Manifest.open(str(tmp_path), {"name": "t", "mode": "experts"})
    assert "curate" not in m.data["stages"] and m.config_changes == ["mode: 'monolith' -> 'experts'"]


def test_ddm_run_takes_the_corrected_path_on_the_same_root(tmp_path):
    """`ddm run` fails at curate on a wrong data path; the same command with the path fixed runs on the
    same root (it used to answer "this run root was started with a different config")."""
    root = tmp_path / "run"
    tiny = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.toml")
    base = [sys.executable, "-m", "ddm", "run", tiny, "--root", str(root), "--stages", "curate", "--quiet",
            "--set", "data.limit=40"]  # fmt: skip
    bad = subprocess.run(
        [*base, "--set", 'data.path="/nonexistent/fm"'], capture_output=True, text=True, timeout=300
    )
    assert bad.returncode != 0 and "/nonexistent/fm" in bad.stderr
    # the data is read (for its shape and classes) before anything is written: nothing locks the root
    assert not (root / "manifest.json").exists()
    good = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stderr
    assert json.loads((root / "manifest.json").read_text())["stages"]["curate"]["state"] == "done"


LONG = (  # a trainer-like job: records each launch, beats every 0.1 s, checkpoints and exits 3 on SIGTERM
    "import json, os, signal, socket, sys, time\n"
    "out = os.environ['OUT']\n"
    "open(out + '/launches', 'a').write(f'{os.getpid()}\\n')\n"
    "def beat(state):\n"
    "    json.dump({'host': socket.gethostname(), 'pid': os.getpid(), 'step': 0, 'steps': 1,\n"
    "               'time': time.time(), 'state': state}, open(out + '/heartbeat.json.tmp', 'w'))\n"
    "    os.replace(out + '/heartbeat.json.tmp', out + '/heartbeat.json')\n"
    "def stop(*_):\n"
    "    beat('stopped'); sys.exit(3)\n"
    "signal.signal(signal.SIGTERM, stop)\n"
    "for _ in range(300):\n"
    "    beat('running'); time.sleep(0.1)\n"
    "open(out + '/done', 'w').write('ok')\n"
)
UNTIL_TOLD = (  # finishes once the test creates OUT/finish
    "import os, time\n"
    "out = os.environ['OUT']\n"
    "while not os.path.exists(out + '/finish'): time.sleep(0.05)\n"
    "open(out + '/done', 'w').write('ok')\n"
)


def _wait_blocked_on_flock(pid, directory, timeout=60.0, required=True):
    """Until /proc/locks lists process ``pid`` waiting ("->") for a flock on ``directory``; False if it
    did not within ``timeout`` (``required``: AssertionError)."""
    st = os.stat(directory)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if "->" in fields and fields[fields.index("->") + 1] == "FLOCK":
                    rest = fields[fields.index("->") + 1 :]  # FLOCK ADVISORY WRITE PID MAJ:MIN:INODE ...
                    if rest[3] == str(pid) and rest[4] == inode:
                        return True
        time.sleep(0.02)
    if not required:
        return False
    raise AssertionError(f"process {pid} never waited for the manifest lock on {directory}")


def _stored_job(root, name):
    path = root / "manifest.json"
    return json.loads(path.read_text())["jobs"].get(name, {}) if path.exists() else {}


@pytest.mark.parametrize("first", ["cancel", "coordinator"])
def test_ddm_cancel_racing_a_live_coordinator_is_not_resubmitted(tmp_path, first):
    """`ddm cancel` (another process) while the coordinator runs the job. The run root's manifest lock
    (the one ``write_if`` takes) is held while the cancel starts, so both write the manifest at the racy
    moment: ``first="cancel"``: the cancel's write is queued first, the coordinator's (the job ended)
    behind it; ``first="coordinator"``: the coordinator's write (another job finished) is queued before
    the cancel's, so it lands between the cancel's read and its write. Either way the job must end
    CANCELLED with its one attempt, the coordinator must report it cancelled (not crash on the
    conflict, not retry it as a failure), `ddm cancel` must succeed, and no second process may start."""
    root = tmp_path / "root"
    # where `ddm cancel` looks for the jobs' heartbeats
    out, other = job_output(str(root), "long"), job_output(str(root), "other")
    os.makedirs(out)
    os.makedirs(other)
    result = {}

    def coordinate():
        jobs = [script_job("long", out, LONG), script_job("other", other, UNTIL_TOLD)]
        with get_runner() as runner:
            try:
                result["outcomes"] = launcher(root, runner, max_attempts=3).run(jobs)
            except Exception as e:  # reported by the asserts below
                result["error"] = e

    coordinator = threading.Thread(target=coordinate, daemon=True)
    coordinator.start()
    deadline = time.time() + 30
    while not (_stored_job(root, "long").get("state") == _stored_job(root, "other").get("state") == "RUNNING"
               and (heartbeat.read(out) or {}).get("state") == "running"):  # fmt: skip
        assert time.time() < deadline and coordinator.is_alive(), f"the jobs did not start: {result}"
        time.sleep(0.05)
    if first == "cancel":  # only "long" is running when the cancel comes
        open(os.path.join(other, "finish"), "w").close()
        while _stored_job(root, "other").get("state") != "SUCCEEDED":
            assert time.time() < deadline and coordinator.is_alive(), f"other did not finish: {result}"
            time.sleep(0.05)
    lock = os.open(root, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # a manifest write in flight: every other writer waits behind it
    try:
        if first == "coordinator":
            open(os.path.join(other, "finish"), "w").close()
            _wait_blocked_on_flock(os.getpid(), root)  # the coordinator saw it end and waits to record it
        cancel = subprocess.Popen([sys.executable, "-m", "ddm.coordinator.cli", "cancel", str(root)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        _wait_blocked_on_flock(cancel.pid, root)  # the cancel has read the manifest and waits to write it
        if first == "cancel":  # before the fix it killed the job by now: the coordinator saw it end
            _wait_blocked_on_flock(os.getpid(), root, timeout=3.0, required=False)
    finally:
        os.close(lock)
    stdout, stderr = cancel.communicate(timeout=60)
    coordinator.join(20)
    time.sleep(1.0)  # a resubmitted process would have recorded its launch by now
    with open(os.path.join(out, "launches")) as f:
        launches = f.read().split()
    assert "error" not in result, f"the coordinator failed: {result.get('error')!r}"
    assert len(launches) == 1, f"the cancelled job was launched again: pids {launches}; ddm cancel: {stderr}"
    # "other" too if the cancel read it running (it finished while the lock was held): its output wins
    assert cancel.returncode == 0 and stdout.strip() in ("cancelled: long", "cancelled: long, other"), stderr
    assert not coordinator.is_alive(), "the coordinator kept running a cancelled job"
    outcomes = result["outcomes"]
    assert outcomes["long"].state == "CANCELLED" and outcomes["long"].attempts == 1
    assert outcomes["other"].state == "SUCCEEDED"
    saved = _stored_job(root, "long")
    assert saved["state"] == "CANCELLED" and [a["state"] for a in saved["attempts"]] == ["CANCELLED"], saved
    assert heartbeat.read(out)["state"] == "stopped"


def test_a_coordinator_takes_over_only_cancellations_from_the_stored_manifest(tmp_path):
    """adopt_cancellations: nothing when nobody wrote; ManifestConflict when anything besides a
    cancellation changed (another coordinator); else the cancelled records, keeping our other changes."""
    from ddm.coordinator.launcher import cancel_jobs
    from ddm.coordinator.manifest import ManifestConflict

    ours = Manifest.open(str(tmp_path), {"name": "t"})
    for name in ("a", "b"):
        handle = f"local://x/{name}"
        ours.update_job(name, state="RUNNING", handle=handle, attempts=[{"handle": handle}])
    assert ours.adopt_cancellations() == []  # nobody else wrote
    with get_runner() as runner:  # `ddm cancel` elsewhere: a's scheduler does not know the handle
        theirs = Manifest.load(str(tmp_path))
        theirs.update_job("b", state="SUCCEEDED")  # as if b had finished before the cancel read it
        assert cancel_jobs(Manifest.load(str(tmp_path)), runner, {}) == ["a"]
    with pytest.raises(ManifestConflict, match="beyond cancelling jobs"):  # b changed too: not a cancel
        ours.adopt_cancellations()
    ours = Manifest.load(str(tmp_path))
    ours.job("a")["note"] = "ours, not saved yet"
    Manifest.load(str(tmp_path)).update_job("b", state="CANCELLED", cancelled_at=1.0)  # a cancel of b
    assert ours.adopt_cancellations() == ["b"]  # b's record taken over, our change to a kept and saved
    saved = json.loads((tmp_path / "manifest.json").read_text())["jobs"]
    assert saved["a"]["state"] == saved["b"]["state"] == "CANCELLED"
    assert saved["a"]["note"] == "ours, not saved yet"
    assert ours.job("b")["state"] == "CANCELLED" and ours.adopt_cancellations() == []
