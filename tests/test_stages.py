"""The stages of ``ddm run`` as objects of one shape, used alike by the pipeline, the dry run and
``ddm status``; stage times across killed coordinators; and ``ddm status`` / ``ddm logs`` answering
without torch or grpc."""

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from light_cli import ddm_fresh

from ddm.coordinator.config import load_run_config
from ddm.coordinator.data_shape import resolve_run_config
from ddm.coordinator.manifest import Manifest
from ddm.coordinator.pipeline import Pipeline, RunFailed
from ddm.coordinator.stages import ALL, BY_NAME, NAMES, Stage
from ddm.expert.data import FASHION_MNIST_CLASSES

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"


# What resolving the shape from Fashion-MNIST gives (tests/test_data_shape.py reads the data itself),
# so these tests' pipelines and manifests take a resolved config without reading 60,000 images.
FASHION_MNIST = SimpleNamespace(
    image_shape=(1, 28, 28), num_classes=10, class_names=list(FASHION_MNIST_CLASSES)
)


def tiny(root: Path, **overrides):
    return resolve_run_config(load_run_config(str(TINY), {"root": str(root), **overrides}), FASHION_MNIST)


def test_stages_in_order_each_needing_only_earlier_ones():
    assert NAMES == ("curate", "partition", "experts", "router", "eval", "distill")
    for i, stage in enumerate(ALL):
        assert set(stage.needs) <= set(NAMES[:i]), stage
        assert BY_NAME[stage.name] is stage


@pytest.mark.parametrize(
    ("overrides", "skipped"),
    [
        ({}, set()),
        ({"mode": "monolith"}, {"curate", "partition", "router", "distill"}),
        ({"router.enabled": False}, {"router"}),
        ({"partition.k": 1, "partition.fine_k": 4}, {"router", "distill"}),
        ({"eval.enabled": False, "distill.enabled": False}, {"eval", "distill"}),
    ],
)
def test_skip_rules_and_the_jobs_each_stage_would_submit(tmp_path, overrides, skipped):
    """One rule per stage: the dry run's jobs are exactly the job names of the stages not skipped
    (the names ``ddm status`` uses), and nothing is written."""
    from ddm.coordinator.dryrun import run_jobs
    from ddm.coordinator.islands import load_islands

    cfg = tiny(tmp_path / "run", **overrides)
    assert {s.name for s in ALL if s.skipped(cfg)} == skipped
    pipe = Pipeline(cfg, load_islands(None), None, dry_run=True)  # type: ignore[arg-type]
    names = [n for s in ALL if not s.skipped(cfg) for n in s.job_names(cfg)]
    assert [j.name for j in run_jobs(pipe)] == names
    assert not (tmp_path / "run").exists()


class Sleep(Stage):
    """A stand-in stage: sleeps, records what it was given."""

    def __init__(self, name: str, seconds: float = 0.05, fail: bool = False):
        self.name, self.seconds, self.fail = name, seconds, fail

    def run(self, ctx):
        time.sleep(self.seconds)
        if self.fail:
            raise FileNotFoundError("/nonexistent/data: not found")
        return {"slept": self.seconds}


def test_a_killed_coordinators_attempt_counts_toward_the_stage_time(tmp_path):
    """The experts stage read 190 s after a kill and a rerun when its wall time was 378 s: the rerun's
    record replaced the killed attempt's. Each attempt counts now, the killed one up to the last beat
    of its coordinator's clock, and the wall span runs from the first start."""
    cfg = tiny(tmp_path / "run")
    m = Manifest.open(cfg.root, cfg.model_dump(mode="json"))
    t0 = m.start_stage("curate")  # the first coordinator starts the stage ...
    first = m.data["stages"]["curate"]["attempts"][0]
    first["started_at"] = t0 - 100.0  # ... 100 s ago, was last heard from 40 s ago, and was killed
    m.data["stages"]["curate"]["started_at"] = t0 - 100.0
    m.save()
    (tmp_path / "run" / "coordinator.json").write_text(
        json.dumps(
            {"stage": "curate", "attempt_started_at": t0 - 100.0, "time": t0 - 40.0, "pid": 1, "host": "h"}
        )
    )
    again = Manifest.open(cfg.root, cfg.model_dump(mode="json"))
    Pipeline(cfg, None, again, say=lambda _: None).run([Sleep("curate", 0.2)])  # type: ignore[arg-type]
    st = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["curate"]
    assert st["state"] == "done" and [a["end"] for a in st["attempts"]] == ["killed", "done"]
    assert st["attempts"][0]["seconds"] == pytest.approx(60.0, abs=0.5)
    assert st["seconds"] == pytest.approx(60.2, abs=1.0)  # the stage's own time: both attempts
    assert st["wall_seconds"] == pytest.approx(100.2, abs=1.0)  # first start to done


def test_a_stage_left_running_by_an_older_ddm_reads_as_one_open_attempt(tmp_path):
    """Manifests written before attempts were kept: a killed stage had only ``running_at``; its attempt
    ends at the manifest's last write."""
    from ddm.coordinator.manifest import stage_times

    cfg = tiny(tmp_path / "run")
    m = Manifest.open(cfg.root, cfg.model_dump(mode="json"))
    now = time.time()
    m.data["stages"]["curate"] = {"state": "running", "running_at": now - 50.0}
    m.data["stages"]["partition"] = {
        "state": "done",
        "running_at": now - 90,
        "done_at": now - 60,
        "seconds": 30.0,
    }
    m.save()
    data = json.loads((tmp_path / "run" / "manifest.json").read_text())
    data["updated"] = now - 20.0
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(data))
    assert stage_times(data["stages"]["partition"]) == (30.0, 30.0)
    again = Manifest.open(cfg.root, cfg.model_dump(mode="json"))
    Pipeline(cfg, None, again, say=lambda _: None).run([Sleep("curate")])  # type: ignore[arg-type]
    st = again.data["stages"]["curate"]
    assert st["attempts"][0]["end"] == "killed" and st["attempts"][0]["seconds"] == pytest.approx(
        30.0, abs=0.5
    )
    assert st["wall_seconds"] == pytest.approx(50.0, abs=1.0)


def test_a_stage_needs_the_stages_before_it(tmp_path):
    cfg = tiny(tmp_path / "run")
    m = Manifest.open(cfg.root, cfg.model_dump(mode="json"))
    with pytest.raises(RunFailed, match="needs experts, router"):
        Pipeline(cfg, None, m, say=lambda _: None).run(["eval"])  # type: ignore[arg-type]
    mono = tiny(tmp_path / "mono", mode="monolith")  # partition is skipped there: experts may run first
    assert BY_NAME["experts"].needs == ("partition",) and BY_NAME["partition"].skipped(mono)


def fake_run_root(root: Path) -> None:
    """A run root as a coordinator leaves it mid-experts: curate and partition done, expert-0 training
    (heartbeat, a checkpoint, local scheduler logs), the coordinator's clock fresh."""
    import torch

    from ddm.core import checkpoint
    from ddm.core.heartbeat import Heartbeat

    cfg = tiny(root)
    m = Manifest.open(cfg.root, cfg.model_dump(mode="json"))
    for name, info in (("curate", {"images": 600, "kept": 598}), ("partition", {"sizes": [300, 298]})):
        m.start_stage(name)
        m.end_stage(name, "done", **info)
    started = m.start_stage("experts")
    handle = "local_cwd://torchx/tiny-expert-0-abc123"
    m.update_job("expert-0", state="RUNNING", handle=handle, island="local",
                 attempts=[{"submitted_at": started - 20, "handle": handle, "state": "RUNNING"}])  # fmt: skip
    out = root / "experts" / "expert-0"
    checkpoint.save(str(out / "checkpoints"), 10, {"w": torch.zeros(2)}, {"kind": "expert"})
    Heartbeat(str(out), steps=30).beat(10, force=True)
    log = root / "logs" / "torchx" / "tiny-expert-0-abc123" / "tiny-expert-0" / "0"
    log.mkdir(parents=True)
    (log / "stderr.log").write_text("expert-0: step 10, loss 0.9\n")
    (root / "coordinator.json").write_text(json.dumps({"stage": "experts", "attempt_started_at": started,
                                                       "time": time.time(), "pid": 1, "host": "h"}))  # fmt: skip


def test_status_and_logs_load_neither_torch_nor_grpc(tmp_path):
    root = tmp_path / "run"
    fake_run_root(root)
    out, loaded = ddm_fresh("status", str(root))
    assert loaded == [], loaded
    stages, jobs = out.split("\n\n")
    lines = {line.split()[0]: line for line in [*stages.splitlines()[1:], *jobs.splitlines()]}
    assert "598/600 images kept" in lines["curate"] and "cluster sizes [300, 298]" in lines["partition"]
    assert lines["experts"].split()[1] == "running" and lines["router"].split()[1] == "pending"
    assert "10/30" in lines["expert-0"] and "~" in lines["expert-0"]  # progress and an ETA
    out, loaded = ddm_fresh("logs", str(root), "expert-0", "--tail", "5")
    assert loaded == [] and "step 10, loss 0.9" in out


def test_status_calls_a_stage_stopped_when_its_coordinator_went_quiet(tmp_path):
    from ddm.coordinator.status_cmd import stage_rows

    cfg = tiny(tmp_path / "run")
    m = Manifest.open(cfg.root, cfg.model_dump(mode="json"))
    started = m.start_stage("curate")
    rows = {r["stage"]: r for r in stage_rows(m, cfg, alive_at=started + 5, now=started + 500)}
    assert rows["curate"]["state"] == "stopped" and rows["curate"]["seconds"] == pytest.approx(5, abs=0.5)
    rows = {r["stage"]: r for r in stage_rows(m, cfg, alive_at=started + 495, now=started + 500)}
    assert rows["curate"]["state"] == "running" and rows["curate"]["wall_seconds"] == pytest.approx(
        500, abs=0.5
    )
