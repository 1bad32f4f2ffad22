"""Exact Gaussian / Gaussian-mixture denoisers (ddm.expert.analytic) against independent computations.

"Independent" means: plain full-matrix Gaussian conditioning in numpy (not the eigenbasis used by the
code), scipy's multivariate normal density, and Monte-Carlo checks of the defining property
E[(u - v(x_t)) g(x_t)] = 0 (the velocity is the regression of u = eps - x_0 on x_t).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from ddm.expert import flow
from ddm.expert.analytic import GaussianDenoiser, GaussianMixtureDenoiser
from ddm.expert.denoiser import Denoiser

MU = np.array([0.5, -1.0, 0.0, 2.0])
_L = np.array([[1.0, 0, 0, 0], [0.6, 0.8, 0, 0], [-0.3, 0.2, 0.5, 0], [0.1, -0.4, 0.3, 0.7]])
SIGMA = _L @ _L.T  # non-diagonal, well conditioned


def _gaussian() -> GaussianDenoiser:
    return GaussianDenoiser(torch.tensor(MU).reshape(1, 2, 2), torch.tensor(SIGMA))


def _mixture() -> GaussianMixtureDenoiser:
    means = np.array([[3.0, 0, 0, 0], [-3.0, 0, 0, 0], [0, 3.0, 0, 3.0]])
    covs = np.stack([0.3 * np.eye(4), 0.2 * SIGMA, np.diag([0.1, 0.2, 0.3, 0.4])])
    return GaussianMixtureDenoiser(
        torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
        torch.tensor(means).reshape(3, 1, 2, 2),
        torch.tensor(covs),
    )


def _direct_velocity(x: np.ndarray, t: float, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """E[eps | x_t] - E[x_0 | x_t] by full-matrix Gaussian conditioning. x (N, D) -> (N, D)."""
    a = 1 - t
    s = a * a * sigma + t * t * np.eye(len(mu))
    r = np.linalg.solve(s, (x - a * mu).T).T  # S^{-1} (x - a mu), (N, D)
    return t * r - (mu + a * r @ sigma.T)


def _rand_x(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return 2 * torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_analytic_denoisers_implement_the_protocol() -> None:
    assert isinstance(_gaussian(), Denoiser) and isinstance(_mixture(), Denoiser)
    assert _gaussian().num_classes == 1 and _mixture().null_label == 1


@pytest.mark.parametrize("t", [0.0, 1e-3, 0.3, 0.7, 1.0])
def test_gaussian_velocity_matches_full_matrix_conditioning(t: float) -> None:
    x = _rand_x(7, seed=1)
    v = _gaussian().velocity(x, torch.full((7,), t, dtype=torch.float64), torch.zeros(7, dtype=torch.long))
    assert v.shape == x.shape and v.dtype == torch.float64
    expected = _direct_velocity(x.reshape(7, 4).numpy(), t, MU, SIGMA)
    np.testing.assert_allclose(v.reshape(7, 4).numpy(), expected, rtol=1e-10, atol=1e-10)


def test_gaussian_velocity_takes_one_time_per_sample_and_keeps_dtype() -> None:
    x = _rand_x(3, seed=2, dtype=torch.float32)
    t = torch.tensor([0.0, 0.5, 1.0])
    v = _gaussian().velocity(x, t, torch.zeros(3, dtype=torch.long))
    assert v.dtype == torch.float32
    for i in range(3):
        expected = _direct_velocity(x[i].reshape(1, 4).double().numpy(), float(t[i]), MU, SIGMA)
        np.testing.assert_allclose(v[i].reshape(1, 4).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_gaussian_velocity_closed_forms_at_the_endpoints() -> None:
    """t = 0: eps is independent of x_0 = x, so v = -x. t = 1: x = eps, so v = x - E[x_0]."""
    g, x = _gaussian(), _rand_x(5, seed=3)
    torch.testing.assert_close(g.velocity(x, torch.zeros(5), None), -x)
    torch.testing.assert_close(g.velocity(x, torch.ones(5), None), x - torch.tensor(MU).reshape(1, 1, 2, 2))


def test_gaussian_velocity_is_the_regression_of_u_on_x_t() -> None:
    """E[(u - v(x_t)) (1, x_t)] = 0, checked by Monte Carlo; a 10%-wrong velocity must fail the same check."""
    g, n, t = _gaussian(), 100_000, 0.4
    gen = torch.Generator().manual_seed(4)
    x_0 = g.sample_x0(n, generator=gen, dtype=torch.float64)  # (n, 1, 2, 2)
    eps = torch.randn(x_0.shape, generator=gen, dtype=torch.float64)
    x_t = flow.interpolate(x_0, eps, torch.full((n,), t))
    u = flow.velocity_target(x_0, eps).reshape(n, 4)
    v = g.velocity(x_t, torch.full((n,), t), None).reshape(n, 4)
    feats = torch.cat([torch.ones(n, 1, dtype=torch.float64), x_t.reshape(n, 4)], 1)  # (n, 5)

    def moments_ok(v_try: torch.Tensor) -> bool:
        prod = (u - v_try)[:, :, None] * feats[:, None, :]  # (n, 4, 5)
        se = prod.std(0) / math.sqrt(n)
        return bool((prod.mean(0).abs() < 5 * se).all())

    assert moments_ok(v)
    assert not moments_ok(1.1 * v)


def test_gaussian_log_prob_matches_scipy() -> None:
    x = _rand_x(6, seed=5)
    for t in (0.0, 0.25, 0.9, 1.0):
        a = 1 - t
        expected = multivariate_normal(a * MU, a * a * SIGMA + t * t * np.eye(4)).logpdf(
            x.reshape(6, 4).numpy()
        )
        np.testing.assert_allclose(
            _gaussian().log_prob(x, torch.full((6,), t, dtype=torch.float64)).numpy(), expected, rtol=1e-10
        )


def test_gaussian_sample_x0_has_the_data_moments() -> None:
    n = 50_000
    x = _gaussian().sample_x0(n, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert x.shape == (n, 1, 2, 2)
    flat = x.reshape(n, 4).numpy()
    np.testing.assert_allclose(flat.mean(0), MU, atol=5 * math.sqrt(SIGMA.diagonal().max() / n))
    np.testing.assert_allclose(np.cov(flat.T), SIGMA, atol=5 * math.sqrt(2 * SIGMA.diagonal().max() ** 2 / n))


def test_mixture_with_one_component_is_the_gaussian() -> None:
    g = _gaussian()
    m = GaussianMixtureDenoiser(
        torch.tensor([1.0]), torch.tensor(MU).reshape(1, 1, 2, 2), torch.tensor(SIGMA)[None]
    )
    x, t = _rand_x(8, seed=7), torch.linspace(0, 1, 8)
    torch.testing.assert_close(m.velocity(x, t, None), g.velocity(x, t, None), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.posterior(x, t), torch.ones(8, 1, dtype=torch.float64))


@pytest.mark.parametrize("t", [0.0, 1e-3, 0.2, 0.5, 0.9, 1.0])
def test_mixture_velocity_is_posterior_weighted_component_velocities(t: float) -> None:
    m = _mixture()
    x = _rand_x(16, seed=8)
    flat = x.reshape(16, 4).numpy()
    a = 1 - t
    means = [c.mean.numpy() for c in m.components]
    covs = [c.cov.numpy() for c in m.components]
    log_joint = np.stack(
        [
            np.log(w) + multivariate_normal(a * mu, a * a * s + t * t * np.eye(4)).logpdf(flat)
            for w, mu, s in zip([0.5, 0.3, 0.2], means, covs)
        ],
        1,
    )  # (16, 3)
    post = np.exp(log_joint - logsumexp(log_joint, axis=1, keepdims=True))
    v = sum(post[:, k : k + 1] * _direct_velocity(flat, t, means[k], covs[k]) for k in range(3))
    tt = torch.full((16,), t, dtype=torch.float64)
    np.testing.assert_allclose(m.posterior(x, tt).numpy(), post, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(m.velocity(x, tt, None).reshape(16, 4).numpy(), v, rtol=1e-9, atol=1e-9)


def test_mixture_posterior_sums_to_one_and_is_the_prior_at_t1() -> None:
    m = _mixture()
    x = _rand_x(32, seed=9, dtype=torch.float32)
    t = torch.rand(32, generator=torch.Generator().manual_seed(9))
    p = m.posterior(x, t)
    assert p.shape == (32, 3) and p.dtype == torch.float32 and (p >= 0).all()
    torch.testing.assert_close(p.sum(1), torch.ones(32))
    torch.testing.assert_close(m.posterior(x, torch.ones(32)), torch.tensor([[0.5, 0.3, 0.2]]).expand(32, 3))


def test_mixture_posterior_near_t0_picks_the_nearest_mean() -> None:
    m = _mixture()
    gen = torch.Generator().manual_seed(10)
    x_0, k = m.sample_x0(300, generator=gen, dtype=torch.float64)
    t = torch.full((300,), 1e-3)
    x_t = flow.interpolate(x_0, torch.randn(x_0.shape, generator=gen, dtype=torch.float64), t)
    means = torch.stack([c.mean for c in m.components])  # (3, 4)
    nearest = torch.cdist(x_t.reshape(300, 4), means).argmin(1)
    p = m.posterior(x_t, t)
    assert torch.equal(p.argmax(1), nearest) and torch.equal(nearest, k)
    assert float(p.max(1).values.min()) > 0.999


def test_mixture_posterior_extreme_distances_stay_finite() -> None:
    """Far from every component all log densities underflow exp(); the log-domain softmax must not."""
    m = _mixture()
    x = torch.full((2, 1, 2, 2), 1e3, dtype=torch.float64)
    for t in (0.0, 1e-4, 0.5):
        p = m.posterior(x, torch.full((2,), t))
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.sum(1), torch.ones(2, dtype=torch.float64))
        assert torch.isfinite(m.velocity(x, torch.full((2,), t), None)).all()


def test_mixture_velocity_closed_forms_at_the_endpoints() -> None:
    m, x = _mixture(), _rand_x(5, seed=11)
    torch.testing.assert_close(m.velocity(x, torch.zeros(5), None), -x)
    mean = sum(w * c.mean for w, c in zip([0.5, 0.3, 0.2], m.components)).reshape(1, 1, 2, 2)
    torch.testing.assert_close(m.velocity(x, torch.ones(5), None), x - mean)


def test_mixture_posterior_and_velocity_are_calibrated_regressions() -> None:
    """E[(onehot(k) - p(k | x_t)) g] = 0 and E[(u - v) g] = 0 for g in (1, x_t), by Monte Carlo."""
    m, n = _mixture(), 60_000
    gen = torch.Generator().manual_seed(12)
    x_0, k = m.sample_x0(n, generator=gen, dtype=torch.float64)
    eps = torch.randn(x_0.shape, generator=gen, dtype=torch.float64)
    t = torch.rand(n, generator=gen, dtype=torch.float64)  # each sample its own t
    x_t = flow.interpolate(x_0, eps, t)
    feats = torch.cat([torch.ones(n, 1, dtype=torch.float64), x_t.reshape(n, 4)], 1)  # (n, 5)
    resid_k = torch.nn.functional.one_hot(k, 3).double() - m.posterior(x_t, t)  # (n, 3)
    resid_v = (flow.velocity_target(x_0, eps) - m.velocity(x_t, t, None)).reshape(n, 4)  # (n, 4)
    for resid in (resid_k, resid_v):
        prod = (resid[:, :, None] * feats[:, None, :]).reshape(n, -1)
        assert (prod.mean(0).abs() < 5 * prod.std(0) / math.sqrt(n)).all()


def test_mixture_sample_x0_labels_follow_the_weights() -> None:
    n = 40_000
    x, k = _mixture().sample_x0(n, generator=torch.Generator().manual_seed(13))
    assert x.shape == (n, 1, 2, 2) and x.dtype == torch.float32 and k.dtype == torch.long
    freq = torch.bincount(k, minlength=3).double() / n
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    assert ((freq - w).abs() < 5 * (w * (1 - w) / n).sqrt()).all()
    torch.testing.assert_close(
        x[k == 1].reshape(-1, 4).mean(0).double(),
        torch.tensor([-3.0, 0, 0, 0], dtype=torch.float64),
        atol=0.03,
        rtol=0,
    )


def test_component_returns_the_kth_gaussian() -> None:
    m = _mixture()
    c = m.component(1)
    assert isinstance(c, GaussianDenoiser)
    torch.testing.assert_close(c.mean, torch.tensor([-3.0, 0, 0, 0], dtype=torch.float64))
    with pytest.raises(ValueError, match="component index"):
        m.component(3)


def test_weights_are_normalised() -> None:
    m = GaussianMixtureDenoiser([2.0, 6.0], torch.zeros(2, 4), torch.eye(4).expand(2, 4, 4))
    torch.testing.assert_close(m.weights, torch.tensor([0.25, 0.75], dtype=torch.float64))


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: GaussianDenoiser(torch.zeros(4), torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.0]))),
            "positive definite",
        ),
        (lambda: GaussianDenoiser(torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]])), "symmetric"),
        (lambda: GaussianDenoiser(torch.zeros(3), torch.eye(4)), r"cov must have shape"),
        (lambda: GaussianDenoiser(torch.tensor([0.0, float("nan")]), torch.eye(2)), "finite"),
        (
            lambda: GaussianMixtureDenoiser([0.5, -0.5], torch.zeros(2, 4), torch.eye(4).expand(2, 4, 4)),
            "positive",
        ),
        (
            lambda: GaussianMixtureDenoiser([0.5, 0.5], torch.zeros(3, 4), torch.eye(4).expand(2, 4, 4)),
            "means must",
        ),
        (lambda: GaussianMixtureDenoiser([0.5, 0.5], torch.zeros(2, 4), torch.eye(4)), "covs must"),
    ],
)
def test_bad_parameters_raise_value_error(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_inputs_raise_value_error() -> None:
    g = _gaussian()
    with pytest.raises(ValueError, match="values per sample"):
        g.velocity(torch.zeros(2, 1, 3, 3), torch.zeros(2), None)
    with pytest.raises(ValueError, match=r"t must have shape"):
        g.velocity(torch.zeros(2, 1, 2, 2), torch.zeros(3), None)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        _mixture().posterior(torch.zeros(2, 1, 2, 2), torch.tensor([0.5, 1.5]))


def test_posterior_weighted_components_give_the_mixture_velocity() -> None:
    """The DDM identity v = sum_k p(k | x_t) v_k with p from ``posterior`` and v_k from ``component(k)``:
    what an oracle router over oracle experts computes."""
    m = _mixture()
    x = _rand_x(10, seed=14, dtype=torch.float32)
    t = torch.linspace(0, 1, 10)
    p = m.posterior(x, t)  # (10, 3)
    v = sum(p[:, k, None, None, None] * m.component(k).velocity(x, t, None) for k in range(3))
    torch.testing.assert_close(v, m.velocity(x, t, None), rtol=1e-5, atol=1e-5)
