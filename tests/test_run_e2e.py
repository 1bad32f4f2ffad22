"""`ddm run` end to end on a tiny config: real faiss, real TorchX local scheduler, real expert processes.

Also the promise that matters most: kill the coordinator at any point, run it again, and it carries on
without launching any job twice.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from light_cli import ddm_fresh

from ddm.core import checkpoint
from ddm.expert.shards import read_index

pytestmark = pytest.mark.slow

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"  # the shipped smoke-test config


def ddm(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "ddm", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def write_config(tmp_path, steps, eval=False):
    """configs/tiny.toml with this test's root and budget, as a config file of its own."""
    root = tmp_path / "run"
    cfg = tmp_path / "tiny.toml"
    text = TINY.read_text().replace('root = "runs/tiny"', f'root = "{root}"')
    text = text.replace("steps = 30\n", f"steps = {steps}\n").replace(
        "poll_seconds = 0.5", "poll_seconds = 0.3\nlease_seconds = 30"
    )
    flag = "true" if eval else "false"
    text = text.replace("[router.model]", f"[router]\nenabled = {flag}\n\n[router.model]")
    text = text.replace("[eval]\n", f"[eval]\nenabled = {flag}\n")
    text = text.replace("[distill.shortcut]", f"[distill]\nenabled = {flag}\n\n[distill.shortcut]")
    cfg.write_text(text)
    return cfg, root


def manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def check_finished_run(root: Path, steps: int, kept: int | None = None):
    m = manifest(root)
    assert [m["stages"][s]["state"] for s in ("curate", "partition", "experts", "router", "eval")] == [
        "done"
    ] * 5
    counts = []
    for k in range(2):
        name = f"expert-{k}"
        assert m["jobs"][name]["state"] == "SUCCEEDED"
        latest = checkpoint.latest(str(root / "experts" / name / "checkpoints"))
        ck = checkpoint.load(latest)
        assert ck.step == steps and ck.meta["data"]["path"].endswith(f"partitions/{name}")
        counts.append(read_index(str(root / "partitions" / name))["count"])
    report = json.loads((root / "curate" / "report.json").read_text())
    assert sum(counts) == report["kept"] and report["images"] == 600
    assert abs(counts[0] - counts[1]) <= 0.2 * sum(counts) / 2  # balanced within tolerance
    assert (root / "clusters" / "samples.png").stat().st_size > 0
    return m


def test_ddm_run_trains_isolated_experts_and_skips_everything_on_rerun(tmp_path):
    cfg, root = write_config(tmp_path, steps=20, eval=True)
    p = ddm("run", str(cfg))
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    m = check_finished_run(root, 20)
    assert all(len(m["jobs"][f"expert-{k}"]["attempts"]) == 1 for k in range(2))
    assert f"ddm run: report {root / 'report.html'}" in out and (root / "report.html").stat().st_size > 0
    metrics = json.loads((root / "eval" / "mixture" / "metrics.json").read_text())
    assert (
        metrics["num_samples"] == 40
        and metrics["fd"] > 0
        and sum(metrics["extra"]["samples_per_expert"]) == 40
    )
    assert (
        metrics["denoiser_calls_per_sample"] == 2 * 4
    )  # guided: a conditional and an unconditional row per step
    assert (root / "eval" / "mixture" / "samples.png").exists()
    # The router trained as its own job; top-1 routing calls one expert per sample per step (x2 for guidance).
    assert m["jobs"]["router"]["state"] == "SUCCEEDED"
    assert checkpoint.load(str(root / "router" / "checkpoints")).meta["kind"] == "router"
    top1 = json.loads((root / "eval" / "top-1" / "metrics.json").read_text())
    assert top1["denoiser_calls_per_sample"] == 2 * 4 and np.isfinite(top1["fd"])
    # Every expert ran as its own TorchX job with its own log directory.
    handles = {m["jobs"][f"expert-{k}"]["handle"] for k in range(2)}
    assert len(handles) == 2 and all(h.startswith("local_cwd://") for h in handles)
    # The student: its own TorchX job, then the table (ensemble and student rows, one process).
    assert m["stages"]["distill"]["state"] == "done" and m["jobs"]["distill"]["state"] == "SUCCEEDED"
    student = checkpoint.load(str(root / "distill" / "checkpoints"))
    assert student.meta["kind"] == "student" and student.step == 6 and student.meta["model"]["guidance_embed"]
    table = json.loads((root / "distill" / "eval" / "table.json").read_text())
    calls = {(r["model"], r["steps"]): r["expert_calls_per_sample"] for r in table["rows"]}
    assert calls == {("ensemble", 4): 2 * 4, ("student", 1): 1, ("student", 2): 2, ("student", 4): 4}
    assert table["fd_ratio_4step"] is None  # the tiny table has no 32-step ensemble row
    assert (root / "distill" / "eval" / "student-4" / "samples.png").stat().st_size > 0

    again = ddm("run", str(cfg))
    out2, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out2
    assert out2.count("already done") == 6
    assert manifest(root)["jobs"] == m["jobs"]  # nothing launched again

    # `ddm status` and `ddm logs` on the real root answer without loading torch or grpc.
    status, loaded = ddm_fresh("status", str(root))
    assert "expert-1" in status and "SUCCEEDED" in status and loaded == [], loaded
    table = {line.split()[0]: line for line in status.split("\n\n")[0].splitlines()[1:]}  # the stage table
    assert all(
        table[s].split()[1] == "done" for s in ("curate", "partition", "experts", "router", "eval", "distill")
    )
    assert "mixture FD" in table["eval"] and "top-1 FD" in table["eval"] and "total" in table

    # New data lands in the existing clusters: the training images themselves go where they were put.
    assign = subprocess.run(
        [sys.executable, "-m", "ddm", "assign", str(root), "--source", "fashion-mnist", "--split", "train",
         "--path", "/usr/share/datasets/fashion-mnist", "--limit", "600", "--out", str(tmp_path / "assign.json")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert assign.returncode == 0, assign.stderr
    placed = json.loads((tmp_path / "assign.json").read_text())
    from ddm.expert.shards import read_shards

    for k in range(2):
        ids = read_shards(str(root / "partitions" / f"expert-{k}")).ids.tolist()
        same = sum(placed["expert"][i] == k for i in ids)
        assert same >= 0.95 * len(ids), f"expert-{k}: only {same}/{len(ids)} reassigned to their cluster"

    logs, loaded = ddm_fresh("logs", str(root), "expert-0", "--tail", "50")
    assert logs.strip() and loaded == [], loaded

    # The headline comparison: a compute-matched monolith (batch x K, same steps) trained as its own
    # run, then scored beside the ensembles under one evaluation context; a rerun reuses every score.
    compare = subprocess.run([sys.executable, "-m", "ddm", "compare", str(root), "--models", "top-1,full", "--quiet"],
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert compare.returncode == 0, compare.stderr
    mono = checkpoint.load(
        checkpoint.latest(str(root / "compare" / "monolith" / "experts" / "monolith" / "checkpoints"))
    )
    assert mono.step == 20 and mono.meta["train"]["batch_size"] == 2 * 16
    report = json.loads((root / "compare" / "results.json").read_text())
    assert [r["model"] for r in report["results"]] == ["monolith", "top-1", "full"]
    assert report["training"]["monolith"]["images"] == report["training"]["experts"]["images"] == 20 * 16 * 2
    assert report["training"]["monolith"]["flops"] == report["training"]["experts"]["flops"] > 0
    calls = {r["model"]: r["denoiser_calls_per_sample"] for r in report["results"]}
    assert calls == {"monolith": 2 * 4, "top-1": 2 * 4, "full": 2 * 2 * 4}  # full: both experts every step
    assert "| monolith |" in compare.stdout and "| full |" in compare.stdout
    assert (root / "compare" / "grid.png").stat().st_size > 0
    again = subprocess.run([sys.executable, "-m", "ddm", "compare", str(root), "--models", "top-1,full", "--quiet"],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0 and again.stderr.count("reused") == 3, again.stderr
    assert "already done" in again.stderr  # the monolith run was not trained again

    # The run report, now with compare's table, as a person sees it: the real headless Chromium.
    from chromium import is_blank, render

    page = subprocess.run(
        [sys.executable, "-m", "ddm", "report", str(root)], capture_output=True, text=True, timeout=300
    )
    assert page.returncode == 0, page.stderr
    html = (root / "report.html").read_text()
    assert "Compute-matched comparison" in html and "<td>monolith</td>" in html and "expert-1" in html
    shown = render(root / "report.html", tmp_path)
    # clusters, loss curves, router accuracy, 2 eval grids, the distillation grids (1 ensemble + 3 student), compare grid
    assert shown.images == html.count('src="data:image/png') == 1 + 2 + 2 + 4 + 1
    assert shown.decoded == shown.images and shown.console == [] and not is_blank(shown.screenshot)


def test_coordinator_killed_mid_training_carries_on_without_relaunching(tmp_path):
    cfg, root = write_config(tmp_path, steps=80)
    p = ddm("run", str(cfg))
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # wait until both experts are training
            beats = [root / "experts" / f"expert-{k}" / "heartbeat.json" for k in range(2)]
            if all(b.exists() for b in beats):
                break
            time.sleep(0.2)
        else:
            pytest.fail("experts never started")
        time.sleep(3)  # the experts stage has run a while when the coordinator dies
        p.send_signal(signal.SIGKILL)  # no clean-up at all: the worst case
        killed_at = time.time()
        p.wait(timeout=30)
        before = manifest(root)["jobs"]
        assert all(before[f"expert-{k}"]["state"] in ("SUBMITTED", "RUNNING") for k in range(2))
        first_start = manifest(root)["stages"]["experts"]["running_at"]

        again = ddm("run", str(cfg))
        out, _ = again.communicate(timeout=600)
        assert again.returncode == 0, out
        assert "adopted" in out
        m = check_finished_run(root, 80)
        # The orphaned trainers finished the work: no expert was launched a second time.
        assert all(len(m["jobs"][f"expert-{k}"]["attempts"]) == 1 for k in range(2)), m["jobs"]
        # The stage's time counts both coordinators (the killed one up to its last beat, at most a poll
        # or a clock period before the kill), and its wall span runs from the first start.
        st = m["stages"]["experts"]
        assert [a["end"] for a in st["attempts"]] == ["killed", "done"], st
        assert st["attempts"][0]["seconds"] >= killed_at - first_start - 3, st
        assert st["wall_seconds"] == pytest.approx(st["done_at"] - first_start, abs=0.5)
        assert st["seconds"] == pytest.approx(sum(a["seconds"] for a in st["attempts"]), abs=0.2)
    finally:
        if p.poll() is None:
            p.kill()


def test_coordinator_killed_during_curation_resumes(tmp_path):
    cfg, root = write_config(tmp_path, steps=10)
    p = ddm("run", str(cfg))
    deadline = time.time() + 120
    while not (root / "manifest.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    again = ddm("run", str(cfg))
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    check_finished_run(root, 10)


def test_changed_config_on_the_same_root_is_refused(tmp_path):
    cfg, root = write_config(tmp_path, steps=10)
    p = ddm("run", str(cfg), "--stages", "curate")
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    p = ddm("run", str(cfg), "--set", "partition.k=3", "--stages", "curate")
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 2 and "partition.k: 2 -> 3" in out


def test_monolith_mode_trains_one_model_on_everything_and_evaluates_it(tmp_path):
    cfg, root = write_config(tmp_path, steps=10, eval=True)
    p = ddm("run", str(cfg), "--set", 'mode="monolith"')
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    m = manifest(root)
    assert list(m["jobs"]) == ["monolith"] and m["jobs"]["monolith"]["state"] == "SUCCEEDED"
    ck = checkpoint.load(str(root / "experts" / "monolith" / "checkpoints"))
    assert ck.step == 10 and ck.meta["data"]["source"] == "fashion-mnist" and ck.meta["data"]["limit"] == 600
    metrics = json.loads((root / "eval" / "monolith" / "metrics.json").read_text())
    assert metrics["num_samples"] == 40 and np.isfinite(metrics["fd"])
