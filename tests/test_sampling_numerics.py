"""Sampling's refactors are numerics-identical: every sampler x time grid, every ensemble strategy
(guided and not) and the student reproduce, bit for bit, the samples, x0 predictions, grids and call
counts pinned in tests/data/sampling_numerics.json (``python tests/sampling_numerics.py --write``,
written before the samplers became a registry). Re-pin only for a change meant to move numerics."""

from __future__ import annotations

import json

import pytest
from numerics import environment
from sampling_numerics import PINNED, run_all


@pytest.fixture(scope="module")
def figures() -> dict:
    return run_all()


def _pinned() -> dict:
    return json.loads(PINNED.read_text())


@pytest.mark.parametrize("run", sorted(k for k in _pinned() if k != "environment"))
def test_sampling_is_bit_identical_to_the_pinned_run(figures: dict, run: str) -> None:
    pinned = _pinned()
    where = (
        ""
        if pinned["environment"] == environment()
        else (
            f" (pinned on {pinned['environment']}, running on {environment()}: re-pin with "
            "`python tests/sampling_numerics.py --write` from a commit whose numerics are trusted)"
        )
    )
    assert figures[run] == pinned[run], f"{run} moved" + where


def test_every_run_is_pinned(figures: dict) -> None:
    assert sorted(figures) == sorted(k for k in _pinned() if k != "environment")
