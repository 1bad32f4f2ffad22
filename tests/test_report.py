"""`ddm report`: one self-contained HTML page of a run, checked in the real headless Chromium.

The run root here is written by the real writers (manifest, metrics log, image grids, JSON reports) so
the page reads what a run really leaves; tests/test_run_e2e.py renders the report of a whole tiny run.
"""

import json
import re
import subprocess
import sys

import pytest
import torch
from chromium import is_blank, render

from ddm.coordinator.manifest import DONE, RUNNING, Manifest
from ddm.coordinator.report import build_report, write_report
from ddm.core import storage
from ddm.core.metrics_log import MetricsLog
from ddm.expert.images import save_grid


def _curve(output, steps, scale):
    log = MetricsLog(str(output), resume_step=0)
    for s in range(1, steps + 1):
        log.append(step=s, loss=scale / s, lr=1e-3, grad_norm=1.0, images_per_s=100.0, elapsed_s=float(s))
    log.flush()


def _grid(url, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    save_grid(torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8), url, nrow=4)


@pytest.fixture
def run_root(tmp_path):
    """Half a run: experts trained, router and eval written, distill still running."""
    root = tmp_path / "run"
    m = Manifest.open(str(root), {"name": "demo", "mode": "experts", "data": {"source": "image-folder"}})
    for stage, seconds in (
        ("curate", 5.0),
        ("partition", 8.0),
        ("experts", 83.0),
        ("router", 40.0),
        ("eval", 61.0),
    ):
        m.set_stage(stage, DONE, seconds=seconds)
    m.set_stage("distill", RUNNING)
    m.update_job("expert-0", state="SUCCEEDED", island="local", attempts=[{}])
    _grid(str(root / "clusters" / "samples.png"))
    storage.write_json(str(root / "clusters" / "report.json"),
                       {"sizes": [320, 280], "class_counts": [[300, 20, 0], [0, 30, 250]],
                        "class_names": ["cat", "<script>alert(1)</script>", "dog"]})  # fmt: skip
    for k in range(2):
        _curve(root / "experts" / f"expert-{k}", 30, 1.0 + k)
    _curve(root / "router", 20, 0.7)
    storage.write_json(str(root / "router" / "accuracy_vs_t.json"),
                       {"t_mid": [0.25, 0.75], "conditional": [0.9, 0.6], "unconditional": [0.85, 0.55],
                        "prior_accuracy": 0.53, "class_prior_accuracy": 0.8})  # fmt: skip
    for model, fd in (("top-1", 12.5), ("mixture", 14.0)):
        storage.write_json(str(root / "eval" / model / "metrics.json"),
                           {"fd": fd, "kid_mean": 0.01, "precision": 0.7, "recall": 0.6, "class_accuracy": 0.91,
                            "denoiser_calls_per_sample": 8, "seconds_per_image": 0.05, "num_samples": 40})  # fmt: skip
        _grid(str(root / "eval" / model / "samples.png"), seed=1)
    return root


def test_report_has_every_section_with_the_run_figures(run_root):
    page = build_report(str(run_root))
    for heading in ("Stages", "Headline figures", "Clusters", "Training", "Samples", "Distillation"):
        assert f"<h2>{heading}</h2>" in page
    assert "Compute-matched" not in page  # no `ddm compare` yet: no section
    assert re.search(r"<td>experts</td><td><span class=\"state-done\">done</span></td><td>83</td>", page)
    assert "<td>top-1</td><td>12.50</td>" in page and "<td>0.910</td>" in page
    assert "cat 94%" in page and "dog 89%" in page  # class make-up of each cluster, by name
    assert "no distillation table yet" in page  # distill is still running: said, not an error
    # every picture is inside the page: the cluster rows, one loss plot, the router plot, two sample grids
    assert page.count('src="data:image/png;base64,') == 5
    assert 'src="http' not in page and 'src="file' not in page


def test_names_from_the_data_are_escaped(run_root):
    page = build_report(str(run_root))
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_report_of_a_root_that_is_not_a_run_is_a_clean_error(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "ddm", "report", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and "not a run root" in r.stderr and "Traceback" not in r.stderr


def test_cli_writes_the_page_atomically_and_prints_where(run_root):
    r = subprocess.run(
        [sys.executable, "-m", "ddm", "report", str(run_root)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(run_root / "report.html")
    assert (run_root / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert not [p for p in run_root.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


@pytest.mark.slow
def test_the_page_renders_in_chromium(run_root, tmp_path):
    page = tmp_path / "report.html"
    write_report(str(run_root), str(page))
    shown = render(page, tmp_path)
    assert not is_blank(shown.screenshot)
    assert shown.images == 5 and shown.decoded == 5
    assert shown.console == []


@pytest.mark.slow
def test_chromium_check_catches_a_broken_image(tmp_path):
    """The check itself can fail: a page with an undecodable image is caught."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><p>x</p><img src="data:image/png;base64,AAAA"></body></html>')
    shown = render(page, tmp_path)
    assert shown.images == 1 and shown.decoded == 0
    assert json.dumps(shown.console)  # plain strings
