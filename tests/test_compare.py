"""ddm compare's compute-matched monolith (coordinator/compare.py): the experts' recipe with batch x K."""

from __future__ import annotations

import pytest

from ddm.coordinator.compare import matched_monolith
from ddm.coordinator.config import load_run_config


@pytest.mark.parametrize("threads, expected", [(None, None), (1, 2)])
def test_matched_monolith_multiplies_the_batch_and_keeps_unset_threads_unset(threads, expected) -> None:
    cfg = load_run_config("configs/tiny.toml", {"experts": {"train": {"num_threads": threads}}})
    mono = matched_monolith(cfg, "/tmp/root/compare/monolith")
    assert mono.mode == "monolith" and mono.root == "/tmp/root/compare/monolith"
    assert mono.experts.train.batch_size == cfg.experts.train.batch_size * cfg.partition.k
    assert mono.experts.train.num_threads == expected
    assert mono.experts.train.steps == cfg.experts.train.steps  # same steps: same images, same FLOPs
