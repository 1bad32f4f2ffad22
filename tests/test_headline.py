"""The compute-matched headline has its own config (configs/headline.toml), which `ddm compare` runs on a
root that holds no run yet; docs/compare.md's table was made with it."""

from pathlib import Path

from ddm.coordinator import compare_cmd
from ddm.coordinator.cli import main
from ddm.coordinator.config import load_run_config

REPO = Path(__file__).resolve().parents[1]


def test_headline_config_is_the_budget_docs_compare_md_reports():
    assert compare_cmd.HEADLINE == REPO / "configs" / "headline.toml"
    cfg = load_run_config(str(compare_cmd.HEADLINE))
    e, r = cfg.experts, cfg.router
    assert (cfg.partition.k, e.model.arch, e.train.steps, e.train.batch_size) == (4, "DiT-T/4", 800, 64)
    assert (r.model.arch, r.train.steps, r.train.batch_size) == ("Router-T/4", 1000, 128)
    assert (cfg.eval.num_samples, cfg.eval.real_samples, cfg.eval.sample.steps, cfg.eval.sample.guidance) == (
        1000, 10000, 32, 3.0)  # fmt: skip
    doc = (REPO / "docs" / "compare.md").read_text()
    assert "configs/headline.toml" in doc and "4 × DiT-T/4, 800 steps × batch 64" in doc
    assert "Router-T/4, 1000 steps × batch 128" in doc


def test_compare_on_a_root_with_no_run_runs_the_config_first(tmp_path, capsys):
    bad = tmp_path / "bad.toml"  # the run stops before writing anything: nothing to compare
    bad.write_text(
        compare_cmd.HEADLINE.read_text().replace("/usr/share/datasets/fashion-mnist", str(tmp_path / "no"))
    )
    root = tmp_path / "new"
    assert main(["compare", str(root), "--config", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert (
        f"{root} holds no run: running {bad} there first" in err
        and "Fashion-MNIST directory not found" in err
    )
    assert not root.exists()
