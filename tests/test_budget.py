"""The cost estimate `ddm run --dry-run` and `ddm run` print before anything runs (issue 13: nothing
helped size a budget, and evaluation took longer than training)."""

from types import SimpleNamespace

import pytest

from ddm.coordinator.budget import CPU_RATE, estimate, format_table, warnings
from ddm.coordinator.cli import main
from ddm.coordinator.compare import matched_monolith, training_cost
from ddm.coordinator.config import load_run_config
from ddm.coordinator.data_shape import resolve_run_config
from ddm.expert.model import dit_config
from ddm.expert.model_cost import dit_cost

FASHION_MNIST = SimpleNamespace(image_shape=(1, 28, 28), num_classes=10, class_names=None)


def cfg_with(**overrides):
    return resolve_run_config(load_run_config(None, overrides), FASHION_MNIST)


def test_training_matches_compares_budget_and_eval_is_rows_times_passes():
    cfg = cfg_with(**{"eval.models": ["top-1", "mixture"]})
    by = {c.stage: c.flops for c in estimate(cfg)}
    spent = training_cost(cfg, matched_monolith(cfg, "/tmp/m"))  # docs/compare.md's training table
    assert by["experts"] == spent["experts"]["flops"] and by["router"] == spent["router"]["flops"]
    expert = dit_cost(dit_config("DiT-T/4", image_size=28, in_channels=1, num_classes=10)).flops
    rows = 1000 * 32 * 2  # samples x steps x (conditional + unconditional)
    router_per_row = (
        by["eval"] - 2 * rows * expert
    ) / rows  # top-1: one expert + the router; mixture: one expert
    assert 0 < router_per_row < expert
    assert set(by) == {"experts", "router", "eval", "distill"}


def test_eval_costlier_than_training_is_warned_and_printed_by_the_dry_run(capsys):
    cheap = cfg_with(**{"experts.train.steps": 10, "eval.num_samples": 5000, "eval.models": ["full"]})
    (w,) = warnings(estimate(cheap))
    assert w.startswith("eval would cost") and "eval.num_samples" in w
    assert "warning: eval would cost" in format_table(estimate(cheap))
    assert not warnings(estimate(cfg_with()))  # the default trains far more than it evaluates
    assert (
        main(["run", "--dry-run", "--set", "experts.train.steps=10", "--set", "eval.num_samples=5000"]) == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("# what each stage will cost:\n# stage") and "# warning: eval would cost" in out
    assert f"{CPU_RATE / 1e9:.0f} GFLOP/s" in out


@pytest.mark.parametrize("mode", ["monolith"])
def test_a_monolith_run_has_no_router_or_distill_rows(mode):
    assert [c.stage for c in estimate(cfg_with(mode=mode))] == ["experts", "eval"]
