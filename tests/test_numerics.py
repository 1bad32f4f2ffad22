"""The training loop's refactors are numerics-identical: the expert, router and student trainers
reproduce, bit for bit, the per-step losses and final checkpoint tensors pinned in
tests/data/numerics.json (written by ``python tests/numerics.py --write`` before the loop was unified).

A change that is meant to move numerics re-pins that file in its own commit and says why. The pin also
depends on torch's version and the CPU (their kernels); a failure on another machine says so, and is
re-pinned there from a commit whose numerics are trusted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from numerics import PINNED, environment, run_all


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_all(tmp_path_factory.mktemp("numerics"))


@pytest.mark.parametrize("job", ["expert-0", "expert-1", "router", "student-partition", "student-ensemble"])
def test_trainer_is_bit_identical_to_the_pinned_run(figures: dict, job: str) -> None:
    pinned = json.loads(Path(PINNED).read_text())
    where = (
        ""
        if pinned.get("environment") == environment()
        else (
            f" (pinned on {pinned.get('environment')}, running on {environment()}: another torch or CPU has "
            "other kernels; re-pin with `python tests/numerics.py --write` from a commit whose numerics are trusted)"
        )
    )
    assert figures[job]["step"] == pinned[job]["step"]
    assert figures[job]["losses"] == pinned[job]["losses"], "per-step losses moved" + where
    assert figures[job]["tensors"] == pinned[job]["tensors"], (
        "final weights, EMA or optimizer state moved" + where
    )
    if job == "router":
        assert figures[job]["accuracy"] == pinned[job]["accuracy"]
