"""Rectified-flow math (ddm.expert.flow) against its closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from ddm.expert import flow


def _pair(n: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x_0 = torch.randn(n, 2, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 2, 3, 3, generator=g, dtype=torch.float64)
    return x_0, eps


def test_interpolate_endpoints_are_data_and_noise() -> None:
    x_0, eps = _pair()
    n = x_0.shape[0]
    assert torch.equal(flow.interpolate(x_0, eps, torch.zeros(n)), x_0)
    assert torch.equal(flow.interpolate(x_0, eps, torch.ones(n)), eps)
    mid = flow.interpolate(x_0, eps, torch.full((n,), 0.25))
    torch.testing.assert_close(mid, 0.75 * x_0 + 0.25 * eps)


def test_interpolate_uses_one_time_per_sample() -> None:
    x_0, eps = _pair(n=3)
    t = torch.tensor([0.0, 0.5, 1.0])
    x_t = flow.interpolate(x_0, eps, t)
    torch.testing.assert_close(x_t[0], x_0[0])
    torch.testing.assert_close(x_t[1], 0.5 * (x_0[1] + eps[1]))
    torch.testing.assert_close(x_t[2], eps[2])


def test_velocity_target_is_time_derivative_of_interpolate() -> None:
    x_0, eps = _pair()
    n, h = x_0.shape[0], 1e-4
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    fd = (flow.interpolate(x_0, eps, t + h) - flow.interpolate(x_0, eps, t - h)) / (2 * h)
    assert n == t.numel()
    torch.testing.assert_close(fd, flow.velocity_target(x_0, eps), rtol=0, atol=1e-9)


def test_predictions_invert_interpolate_given_true_velocity() -> None:
    x_0, eps = _pair()
    t = torch.tensor([0.0, 0.2, 0.5, 0.8, 1.0], dtype=torch.float64)
    x_t = flow.interpolate(x_0, eps, t)
    u = flow.velocity_target(x_0, eps)
    torch.testing.assert_close(flow.predict_x0(x_t, t, u), x_0)
    torch.testing.assert_close(flow.predict_eps(x_t, t, u), eps)


def test_flow_loss_is_zero_at_target_and_mse_otherwise() -> None:
    x_0, eps = _pair()
    u = flow.velocity_target(x_0, eps)
    assert float(flow.flow_loss(u, x_0, eps)) == 0.0
    assert float(flow.flow_loss(u + 0.5, x_0, eps)) == pytest.approx(0.25)


def test_shift_time_endpoints_identity_monotone_and_closed_form() -> None:
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for shift in (0.3, 1.0, 3.0):
        s = flow.shift_time(t, shift)
        assert float(s[0]) == 0.0 and float(s[-1]) == 1.0
        assert (s[1:] > s[:-1]).all()
    torch.testing.assert_close(flow.shift_time(t, 1.0), t)
    # shift 3 at t = 0.5: 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    assert float(flow.shift_time(torch.tensor(0.5), 3.0)) == pytest.approx(0.75)
    # shift > 1 spends more of the grid at high noise
    assert (flow.shift_time(t[1:-1], 3.0) > t[1:-1]).all()


def test_shift_time_rejects_non_positive_shift() -> None:
    with pytest.raises(ValueError, match="shift"):
        flow.shift_time(torch.tensor(0.5), 0.0)


def test_resolution_shift_closed_form() -> None:
    assert flow.resolution_shift(32) == 1.0
    assert flow.resolution_shift(64) == pytest.approx(2.0)
    assert flow.resolution_shift(32, channels=4) == pytest.approx(2.0)


def test_uniform_times_lie_in_unit_interval() -> None:
    t = flow.sample_t_uniform(10_000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (10_000,) and float(t.min()) >= 0 and float(t.max()) < 1
    assert float(t.mean()) == pytest.approx(0.5, abs=4 * math.sqrt(1 / 12 / 10_000))


def test_logit_normal_times_have_requested_logit_moments() -> None:
    n, mean, std = 20_000, 0.5, 0.8
    t = flow.sample_t_logit_normal(n, mean=mean, std=std, generator=torch.Generator().manual_seed(0))
    assert float(t.min()) > 0 and float(t.max()) < 1
    logit = torch.logit(t.double())
    assert float(logit.mean()) == pytest.approx(mean, abs=4 * std / math.sqrt(n))
    assert float(logit.std()) == pytest.approx(std, abs=4 * std / math.sqrt(2 * n))


def test_time_grid_runs_from_one_to_zero() -> None:
    for steps in (1, 4, 50):
        g = flow.time_grid(steps)
        assert g.shape == (steps + 1,)
        assert float(g[0]) == 1.0 and float(g[-1]) == 0.0
        assert (g[1:] < g[:-1]).all()
    torch.testing.assert_close(flow.time_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    shifted = flow.time_grid(4, shift=3.0)
    torch.testing.assert_close(shifted, flow.shift_time(torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]), 3.0))
    assert float(shifted[2]) == pytest.approx(0.75)


def test_time_grid_rejects_zero_steps() -> None:
    with pytest.raises(ValueError, match="steps"):
        flow.time_grid(0)


def test_derived_time_shift_is_the_sd3_rule_on_what_the_model_denoises() -> None:
    assert flow.BASE_VALUES == 784
    assert flow.derived_time_shift((1, 28, 28)) == 1.0  # the default experts: no shift, numerics unchanged
    assert flow.derived_time_shift((3, 32, 32)) == pytest.approx(math.sqrt(3072 / 784))
    assert flow.derived_time_shift((4, 32, 32)) == pytest.approx(math.sqrt(4096 / 784))  # SD-VAE at 256 px
    assert flow.derived_time_shift((1, 56, 56)) == pytest.approx(2.0)  # 4x the values: twice the shift
    assert flow.derived_time_shift((1, 8, 8), base_values=16) == pytest.approx(2.0)
    assert flow.resolve_time_shift(None, (1, 56, 56)) == pytest.approx(2.0)
    assert flow.resolve_time_shift(3.0, (1, 56, 56)) == 3.0  # a hand-set value overrides
    with pytest.raises(ValueError, match="must be positive"):
        flow.derived_time_shift((0, 28, 28))
