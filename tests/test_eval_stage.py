"""The eval stage's partition mixture: sample class c from expert k with probability n_{k,c} / n_c."""

import numpy as np
import pytest
import torch

from ddm.coordinator.eval_stage import mixture_assignment


def test_mixture_assignment_follows_class_shares():
    counts = np.array([[90, 0, 50], [10, 100, 50]])  # (K=2, C=3)
    y = torch.tensor([0, 1, 2] * 4000)
    owner = mixture_assignment(y, counts, seed=0)
    share = lambda c: (owner[y == c] == 0).float().mean().item()  # noqa: E731
    assert abs(share(0) - 0.9) < 0.02 and share(1) == 0.0 and abs(share(2) - 0.5) < 0.03
    assert torch.equal(owner, mixture_assignment(y, counts, seed=0))  # seeded


def test_class_in_no_partition_is_an_error():
    with pytest.raises(ValueError, match=r"classes \[1\]"):
        mixture_assignment(torch.tensor([0, 1]), np.array([[3, 0], [2, 0]]), seed=0)
