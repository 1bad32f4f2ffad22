"""Samplers (ddm.expert.sampling) and classifier-free guidance (ddm.expert.guidance).

Distribution checks use the exact Gaussian denoiser: sampling N(mu, Sigma) must give back mu and Sigma.
Monte-Carlo tolerances are 5 standard errors of the sample mean / covariance at the sample size used.
Deterministic samplers on a Gaussian are affine maps of the noise, x_0 = A eps + b, so probing them with
the basis vectors gives their output distribution N(b, A A^T) exactly: that measures discretisation
error with no Monte-Carlo noise at all.
"""

from __future__ import annotations

import math

import pytest
import torch

from ddm.expert import flow
from ddm.expert.analytic import GaussianDenoiser, GaussianMixtureDenoiser
from ddm.expert.denoiser import Denoiser, ModuleDenoiser
from ddm.expert.guidance import CFGDenoiser, guided
from ddm.expert.model import DiT, DiTConfig
from ddm.expert.sampling import (
    SAMPLERS,
    CountingDenoiser,
    Step,
    ancestral_fraction,
    denoiser_calls,
    iter_sample,
    sample,
    sample_euler,
    sample_heun,
    sample_stochastic,
    stochastic_update,
)

MU = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=torch.float64)
_L = torch.tensor(
    [[1.0, 0, 0, 0], [0.6, 0.8, 0, 0], [-0.3, 0.2, 0.5, 0], [0.1, -0.4, 0.3, 0.7]], dtype=torch.float64
)
SIGMA = _L @ _L.T  # non-diagonal
GAUSS = GaussianDenoiser(MU.reshape(1, 2, 2), SIGMA)
N_MC = 20_000


def _noise(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _labels(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.long)


def _assert_recovers_gaussian(x: torch.Tensor) -> None:
    n = x.shape[0]
    flat = x.reshape(n, 4)
    var = SIGMA.diagonal()
    tol_mean = 5 * (var / n).sqrt()
    tol_cov = 5 * ((var[:, None] * var[None, :] + SIGMA**2) / n).sqrt()  # se of a sample covariance entry
    assert ((flat.mean(0) - MU).abs() < tol_mean).all(), (flat.mean(0), MU)
    assert ((torch.cov(flat.T) - SIGMA).abs() < tol_cov).all(), (torch.cov(flat.T), SIGMA)


def _exact_output_law(sampler: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean b and covariance A A^T of a deterministic sampler's output on the Gaussian, from 5 probes."""
    probes = torch.cat([torch.zeros(1, 4), torch.eye(4)]).double().reshape(5, 1, 2, 2)
    out = sample(GAUSS, probes, _labels(5), steps=steps, sampler=sampler).reshape(5, 4)
    b, a = out[0], (out[1:] - out[0]).T  # (4,), (4, 4)
    return b, a @ a.T


def _cov_error(sampler: str, steps: int) -> float:
    return float(torch.linalg.matrix_norm(_exact_output_law(sampler, steps)[1] - SIGMA))


# ---------------------------------------------------------------- distribution recovery


def test_euler_with_many_steps_recovers_mean_and_covariance() -> None:
    _assert_recovers_gaussian(sample_euler(GAUSS, _noise(N_MC, 1), _labels(N_MC), steps=200))


def test_heun_with_fewer_steps_recovers_mean_and_covariance() -> None:
    _assert_recovers_gaussian(sample_heun(GAUSS, _noise(N_MC, 2), _labels(N_MC), steps=32))


def test_stochastic_sampler_recovers_mean_and_covariance() -> None:
    x = sample_stochastic(
        GAUSS,
        _noise(N_MC, 3),
        _labels(N_MC),
        steps=200,
        churn=0.5,
        generator=torch.Generator().manual_seed(103),
    )
    _assert_recovers_gaussian(x)


def test_deterministic_samplers_are_exact_in_the_mean_and_converge_at_their_order() -> None:
    """On a Gaussian both keep the mean exactly; the covariance error halves (Euler) or quarters (Heun)
    when the steps double."""
    for sampler in ("euler", "heun"):
        b, _ = _exact_output_law(sampler, 8)
        torch.testing.assert_close(b, MU, rtol=0, atol=1e-12)
    euler = [_cov_error("euler", s) for s in (16, 32, 64)]
    heun = [_cov_error("heun", s) for s in (16, 32, 64)]
    for errs, order in ((euler, 1), (heun, 2)):
        for coarse, fine in zip(errs, errs[1:]):
            assert 0.8 * 2**order < coarse / fine < 1.25 * 2**order, (errs, order)


def test_heun_at_8_steps_is_closer_than_euler_at_8_steps() -> None:
    err_euler, err_heun = _cov_error("euler", 8), _cov_error("heun", 8)
    assert err_heun < err_euler / 5, (err_euler, err_heun)  # measured: 0.544 vs 0.041 (Frobenius)

    # The same shows on samples drawn with the same noise.
    def mc_error(x: torch.Tensor) -> float:
        return float(torch.linalg.matrix_norm(torch.cov(x.reshape(N_MC, 4).T) - SIGMA))

    noise = _noise(N_MC, 4)
    heun_mc = mc_error(sample_heun(GAUSS, noise, _labels(N_MC), steps=8))
    euler_mc = mc_error(sample_euler(GAUSS, noise, _labels(N_MC), steps=8))
    assert heun_mc < 0.1 and euler_mc > 3 * heun_mc, (euler_mc, heun_mc)


def test_time_shift_changes_the_grid_and_still_converges() -> None:
    steps: list[float] = []
    sample(GAUSS, _noise(2, 5), _labels(2), steps=4, time_shift=3.0, callback=lambda s: steps.append(s.t))
    torch.testing.assert_close(torch.tensor(steps), flow.time_grid(4, 3.0)[:-1])
    assert _cov_error("heun", 32) < 0.01


def test_mixture_sampling_recovers_the_mixture_weights() -> None:
    means = torch.tensor([[3.0, 0, 0, 0], [-3.0, 0, 0, 0], [0, 3.0, 0, 3.0]], dtype=torch.float64)
    covs = torch.stack(
        [0.3 * torch.eye(4), 0.2 * SIGMA, torch.diag(torch.tensor([0.1, 0.2, 0.3, 0.4]))]
    ).double()
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    mix = GaussianMixtureDenoiser(w, means.reshape(3, 1, 2, 2), covs)
    n = 10_000
    x = sample_heun(mix, _noise(n, 6), _labels(n), steps=24)
    k = torch.cdist(x.reshape(n, 4), means).argmin(1)
    freq = torch.bincount(k, minlength=3).double() / n
    assert ((freq - w).abs() < 5 * (w * (1 - w) / n).sqrt()).all(), freq
    # and each cluster has its component's mean
    for i in range(3):
        torch.testing.assert_close(x.reshape(n, 4)[k == i].mean(0), means[i], atol=0.05, rtol=0)


# ---------------------------------------------------------------- the stochastic update


def test_stochastic_update_with_zero_churn_is_the_euler_update() -> None:
    g = torch.Generator().manual_seed(7)
    x, v, fresh = (torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    for t, t_next in ((1.0, 0.9), (0.6, 0.35), (0.1, 0.0)):
        torch.testing.assert_close(
            stochastic_update(x, v, t, t_next, 0.0, fresh), x + (t_next - t) * v, rtol=0, atol=1e-13
        )


def test_stochastic_sampler_with_zero_churn_equals_euler() -> None:
    noise = _noise(64, 8)
    x_sto = sample_stochastic(
        GAUSS, noise, _labels(64), steps=10, churn=0.0, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(x_sto, sample_euler(GAUSS, noise, _labels(64), steps=10), rtol=0, atol=1e-12)


def test_stochastic_update_formula() -> None:
    """x' = (1 - t') x0_hat + t' (sqrt(1 - rho^2) eps_hat + rho z), rho = churn * ancestral_fraction."""
    g = torch.Generator().manual_seed(9)
    x, v, z = (torch.randn(2, 1, 2, 2, generator=g, dtype=torch.float64) for _ in range(3))
    t, t_next, churn = 0.7, 0.5, 0.5
    rho = churn * ancestral_fraction(t, t_next)
    x0_hat, eps_hat = x - t * v, x + (1 - t) * v
    expected = (1 - t_next) * x0_hat + t_next * (math.sqrt(1 - rho**2) * eps_hat + rho * z)
    torch.testing.assert_close(stochastic_update(x, v, t, t_next, churn, z), expected)


def test_ancestral_fraction_closed_forms() -> None:
    assert ancestral_fraction(1.0, 0.5) == 1.0  # leaving pure noise: all noise is new
    assert ancestral_fraction(0.5, 0.0) == 0.0
    # (1 - t) t' / ((1 - t') t) = 0.5 * 0.25 / (0.75 * 0.5) = 1/3
    assert ancestral_fraction(0.5, 0.25) == pytest.approx(math.sqrt(1 - 1 / 9))
    # small steps renew ~ sqrt(2 dt / (t (1 - t))) of the noise, so the noise injected vanishes as steps grow
    dt = 1e-6
    assert ancestral_fraction(0.5, 0.5 - dt) == pytest.approx(math.sqrt(2 * dt / 0.25), rel=1e-3)
    with pytest.raises(ValueError):
        ancestral_fraction(0.5, 0.5)


def test_stochastic_sampler_is_reproducible_with_a_generator() -> None:
    noise = _noise(8, 10)
    a = sample_stochastic(GAUSS, noise, _labels(8), steps=5, generator=torch.Generator().manual_seed(1))
    b = sample_stochastic(GAUSS, noise, _labels(8), steps=5, generator=torch.Generator().manual_seed(1))
    c = sample_stochastic(GAUSS, noise, _labels(8), steps=5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.allclose(a, c)


# ---------------------------------------------------------------- progress and call counting


@pytest.mark.parametrize("sampler", SAMPLERS.names())
def test_iter_sample_and_callback_report_every_step(sampler: str) -> None:
    steps, noise = 6, _noise(4, 11)
    seen: list[Step] = []
    out = sample(
        GAUSS,
        noise,
        _labels(4),
        steps=steps,
        sampler=sampler,
        callback=seen.append,
        generator=torch.Generator().manual_seed(0),
    )
    yielded = list(
        iter_sample(
            GAUSS, noise, _labels(4), steps=steps, sampler=sampler, generator=torch.Generator().manual_seed(0)
        )
    )
    for trace in (seen, yielded):
        assert [s.index for s in trace] == list(range(steps)) and all(s.total == steps for s in trace)
        ts = [s.t for s in trace]
        assert ts[0] == 1.0 and all(a > b for a, b in zip(ts, ts[1:]))
        assert [s.t_next for s in trace[:-1]] == ts[1:] and trace[-1].t_next == 0.0
        assert all(s.x.shape == noise.shape and s.x0_pred.shape == noise.shape for s in trace)
    assert torch.equal(seen[-1].x, out) and torch.equal(yielded[-1].x, out)
    # x0_pred is x_t - t v(x_t, t) at the step's start
    x_prev = seen[1].x
    t2 = torch.full((4,), seen[2].t, dtype=torch.float64)
    torch.testing.assert_close(seen[2].x0_pred, flow.predict_x0(x_prev, t2, GAUSS.velocity(x_prev, t2, None)))


@pytest.mark.parametrize(
    "sampler, steps, expected",
    [
        ("euler", 1, 1),
        ("euler", 7, 7),
        ("heun", 1, 1),
        ("heun", 7, 13),
        ("stochastic", 1, 1),
        ("stochastic", 7, 7),
    ],
)
def test_counting_denoiser_counts_calls_per_sampler(sampler: str, steps: int, expected: int) -> None:
    counter = CountingDenoiser(GAUSS)
    sample(counter, _noise(3, 12), _labels(3), steps=steps, sampler=sampler)
    assert counter.calls.total_batches == expected == denoiser_calls(sampler, steps)
    assert counter.calls.total_rows == 3 * expected
    counter.calls.reset()
    assert counter.calls.total_batches == 0 and counter.calls.total_rows == 0


def test_output_keeps_dtype_and_has_no_grad() -> None:
    class Scaled:
        num_classes = 1

        def __init__(self) -> None:
            self.w = torch.tensor(0.5, requires_grad=True)

        def velocity(self, x_t, t, y):
            return self.w * x_t

    noise = torch.randn(2, 1, 2, 2)
    for sampler in SAMPLERS.names():
        out = sample(Scaled(), noise, _labels(2), steps=3, sampler=sampler)
        assert out.dtype == torch.float32 and not out.requires_grad
        assert not any(
            s.x.requires_grad for s in iter_sample(Scaled(), noise, _labels(2), steps=3, sampler=sampler)
        )


# ---------------------------------------------------------------- validation


class _WrongShape:
    num_classes = 1

    def velocity(self, x_t, t, y):
        return x_t[:, :1, :1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=0), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(steps=3, sampler="dpm"), "unknown sampler"),
        (dict(steps=3, churn=1.5), "churn"),
        (dict(steps=3, time_shift=0.0), "shift"),
        (dict(steps=3, noise=torch.zeros(2, 4)), r"\(N, C, H, W\)"),
        (dict(steps=3, noise=torch.zeros(2, 1, 2, 2, dtype=torch.long)), "floating"),
        (dict(steps=3, y=torch.zeros(3, dtype=torch.long)), "y must"),
        (dict(steps=3, y=torch.zeros(2)), "integer"),
        (dict(steps=3, y=torch.tensor([0, 2])), r"\[0, 1\]"),
        (dict(steps=3, denoiser=_WrongShape()), "same shape"),
        (dict(steps=3, denoiser=object()), "Denoiser interface"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict, match: str) -> None:
    args = dict(denoiser=GAUSS, noise=torch.zeros(2, 1, 2, 2), y=_labels(2)) | kwargs
    denoiser, noise, y = args.pop("denoiser"), args.pop("noise"), args.pop("y")
    with pytest.raises(ValueError, match=match):
        sample(denoiser, noise, y, **args)
    with pytest.raises(ValueError, match=match):
        for _ in iter_sample(denoiser, noise, y, **args):
            pass


def test_iter_sample_validates_before_the_first_step() -> None:
    """A streaming server learns about bad requests when it builds the generator, before any expert call."""
    counter = CountingDenoiser(GAUSS)
    with pytest.raises(ValueError, match="y must"):
        iter_sample(counter, torch.zeros(2, 1, 2, 2), _labels(3), steps=3)
    with pytest.raises(ValueError, match="unknown sampler"):
        iter_sample(counter, torch.zeros(2, 1, 2, 2), _labels(2), steps=3, sampler="dpm")
    assert counter.calls.total_batches == 0


def test_null_label_is_accepted() -> None:
    out = sample(GAUSS, torch.zeros(2, 1, 2, 2), torch.tensor([0, GAUSS.num_classes]), steps=2)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- classifier-free guidance


class _LabelAffine:
    """A hand-made class-conditional denoiser: v = a[y] * x_t + t * b[y] (the last row is the null label)."""

    num_classes = 3

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(13)
        self.a = torch.randn(4, generator=g, dtype=torch.float64)
        self.b = torch.randn(4, 1, 2, 2, generator=g, dtype=torch.float64)

    def velocity(self, x_t, t, y):
        return self.a[y].reshape(-1, 1, 1, 1) * x_t + t.reshape(-1, 1, 1, 1) * self.b[y]


def _cfg_inputs(n: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(14)
    x = torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64)
    return x, torch.rand(n, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])[:n]


def test_guided_is_the_cfg_formula() -> None:
    v_c, v_u = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.0])
    torch.testing.assert_close(guided(v_c, v_u, 3.0), torch.tensor([5.0, -5.0]))
    torch.testing.assert_close(guided(v_c, v_u, 1.0), v_c)
    torch.testing.assert_close(guided(v_c, v_u, 0.0), v_u)


def test_cfg_scale_one_is_the_conditional_model_in_one_pass() -> None:
    inner = CountingDenoiser(_LabelAffine())
    x, t, y = _cfg_inputs()
    cfg = CFGDenoiser(inner, 1.0)
    assert isinstance(cfg, Denoiser) and cfg.num_classes == 3
    assert torch.equal(cfg.velocity(x, t, y), inner.inner.velocity(x, t, y))
    assert (inner.calls.total_batches, inner.calls.total_rows) == (1, 5)


def test_cfg_scale_zero_is_the_unconditional_model_in_one_pass() -> None:
    inner = CountingDenoiser(_LabelAffine())
    x, t, y = _cfg_inputs()
    v = CFGDenoiser(inner, 0.0).velocity(x, t, y)
    assert torch.equal(v, inner.inner.velocity(x, t, torch.full_like(y, 3)))
    assert (inner.calls.total_batches, inner.calls.total_rows) == (1, 5)


def test_cfg_scale_w_matches_the_formula_with_one_batched_call() -> None:
    base = _LabelAffine()
    inner = CountingDenoiser(base)
    x, t, y = _cfg_inputs()
    v = CFGDenoiser(inner, 3.0).velocity(x, t, y)
    v_c, v_u = base.velocity(x, t, y), base.velocity(x, t, torch.full_like(y, 3))
    torch.testing.assert_close(v, v_u + 3.0 * (v_c - v_u))
    assert (inner.calls.total_batches, inner.calls.total_rows) == (1, 10)
    # rows already unconditional get the unconditional velocity whatever the scale
    torch.testing.assert_close(CFGDenoiser(base, 3.0).velocity(x, t, torch.full_like(y, 3)), v_u)


def test_cfg_inner_denoiser_is_called_once_per_sampler_step() -> None:
    inner = CountingDenoiser(_LabelAffine())
    x, _, y = _cfg_inputs()
    sample(CFGDenoiser(inner, 4.0), x, y, steps=6, sampler="euler")
    assert (inner.calls.total_batches, inner.calls.total_rows) == (6, 6 * 2 * 5)


def test_cfg_on_a_dit_batches_like_two_separate_passes() -> None:
    torch.manual_seed(15)
    model = DiT(
        DiTConfig(
            image_size=8, in_channels=1, patch_size=4, hidden_size=32, depth=1, num_heads=2, num_classes=3
        )
    )
    with torch.no_grad():
        for p in model.parameters():  # leave adaLN-Zero's zero init so the output depends on the label
            p.normal_(0, 0.2)
    den = ModuleDenoiser(model.eval(), num_classes=3)
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, 0])
    v_c, v_u = den.velocity(x, t, y), den.velocity(x, t, torch.full_like(y, 3))
    assert not torch.allclose(v_c, v_u)
    torch.testing.assert_close(
        CFGDenoiser(den, 2.5).velocity(x, t, y), v_u + 2.5 * (v_c - v_u), rtol=1e-4, atol=1e-5
    )
    out = sample(CFGDenoiser(den, 2.5), torch.randn(4, 1, 8, 8), y, steps=3, sampler="heun")
    assert out.shape == (4, 1, 8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("scale", [-1.0, float("nan"), float("inf")])
def test_cfg_rejects_bad_scales(scale: float) -> None:
    with pytest.raises(ValueError, match="guidance scale"):
        CFGDenoiser(_LabelAffine(), scale)
