"""Ensemble-level guidance is the monolith's guided flow, in closed form (ddm.expert.analytic).

On class-conditional, partitioned Gaussian-mixture data the exact experts, the exact router
p(k | x_t, t, c) / p(k | x_t, t) and the exact monolith are all known. With full routing the
``ensemble`` guidance mode equals v_u + s (v_c - v_u) of the monolith to float64 round-off; the
``expert`` mode (CFG inside each expert, mixed with the conditional weights) does not, and the gap
is shown. Also: the mixture data itself against direct sums, and ``route_every``'s reuse.
"""

from __future__ import annotations

import pytest
import torch

from ddm.expert.analytic import ClassConditionalMixture
from ddm.expert.guidance import guided
from ddm.expert.sampling import sample
from ddm.router.ensemble import Ensemble

K, C = 3, 2  # partitions, classes


def data() -> ClassConditionalMixture:
    """Three partitions sharing two classes unevenly (partition 2 has no class 1), 4-D (1, 2, 2) images."""
    g = torch.Generator().manual_seed(0)
    weights = torch.tensor([[0.3, 0.1], [0.1, 0.25], [0.25, 0.0]], dtype=torch.float64)
    means = 2.0 * torch.randn(K, C, 1, 2, 2, generator=g, dtype=torch.float64)
    a = torch.randn(K, C, 4, 4, generator=g, dtype=torch.float64)
    covs = 0.3 * a @ a.transpose(-1, -2) / 4 + 0.05 * torch.eye(4, dtype=torch.float64)
    return ClassConditionalMixture(weights, means, covs)


def inputs(n: int = 48, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = 1.5 * torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64).clamp(0.02, 0.98)
    y = torch.randint(0, C, (n,), generator=g)
    return x, t, y


def ensemble(d: ClassConditionalMixture, mode: str, strategy: str = "full", **kw) -> Ensemble:
    return Ensemble([d.expert(k) for k in range(K)], d.router, strategy=strategy, guidance_mode=mode, **kw)


def monolith_guided(d: ClassConditionalMixture, x, t, y, scale: float) -> torch.Tensor:
    return guided(d.velocity(x, t, y), d.velocity(x, t, torch.full_like(y, d.null_label)), scale)


# ------------------------------------------------------------------------------- the data, checked


def test_the_mixture_agrees_with_direct_sums_over_components() -> None:
    """Monolith, experts and router against sums written out from the component Gaussians."""
    d = data()
    x, t, y = inputs(6)
    w = torch.tensor([[0.3, 0.1], [0.1, 0.25], [0.25, 0.0]], dtype=torch.float64)
    w = w / w.sum()
    comps = [[d.components[k][c] for c in range(C)] for k in range(K)]
    for i in range(6):
        xi, ti, ci = x[i : i + 1], t[i : i + 1], int(y[i])
        dens = [[float(comps[k][c].log_prob(xi, ti).exp()) for c in range(C)] for k in range(K)]
        joint = torch.tensor([[w[k, c] * dens[k][c] for c in range(C)] for k in range(K)])
        vel = [[comps[k][c].velocity(xi, ti) for c in range(C)] for k in range(K)]
        p_cond = joint[:, ci] / joint[:, ci].sum()
        p_unc = joint.sum(1) / joint.sum()
        null = torch.tensor([C])
        torch.testing.assert_close(d.router(xi, ti, y[i : i + 1])[0], p_cond, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(d.router(xi, ti, null)[0], p_unc, rtol=1e-9, atol=1e-12)
        v_c = sum(p_cond[k] * vel[k][ci] for k in range(K) if w[k, ci] > 0)
        torch.testing.assert_close(d.velocity(xi, ti, y[i : i + 1]), v_c, rtol=1e-9, atol=1e-12)
        v_u = sum(joint[k, c] / joint.sum() * vel[k][c] for k in range(K) for c in range(C))
        torch.testing.assert_close(d.velocity(xi, ti, null), v_u, rtol=1e-9, atol=1e-12)
        for k in range(K):
            v_k = sum(joint[k, c] / joint[k].sum() * vel[k][c] for c in range(C))
            torch.testing.assert_close(d.expert(k).velocity(xi, ti, null), v_k, rtol=1e-9, atol=1e-12)
    assert float(d.router(x, t, torch.ones_like(y))[:, 2].max()) == 0.0  # partition 2 has no class 1


def test_bad_mixture_parameters_are_named() -> None:
    mu, cov = torch.zeros(2, 2, 4), torch.eye(4).expand(2, 2, 4, 4)
    with pytest.raises(ValueError, match="every partition"):
        ClassConditionalMixture(torch.tensor([[1.0, 1.0], [0.0, 0.0]]), mu, cov)
    with pytest.raises(ValueError, match=r"means must have shape \(K, C, D\)"):
        ClassConditionalMixture(torch.ones(2, 2), torch.zeros(2, 4), cov)
    with pytest.raises(ValueError, match="labels in"):
        ClassConditionalMixture(torch.ones(2, 2), mu, cov).router(
            torch.zeros(1, 4), torch.ones(1), torch.tensor([3])
        )


# -------------------------------------------------------------------------------- the guidance claim


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.0, 4.0])
def test_full_ensemble_guidance_equals_the_guided_monolith_exactly(scale: float) -> None:
    d = data()
    x, t, y = inputs()
    v = ensemble(d, "ensemble").guided(scale).velocity(x, t, y)
    torch.testing.assert_close(v, monolith_guided(d, x, t, y, scale), rtol=1e-10, atol=1e-10)


def test_expert_mode_guidance_is_not_the_guided_monolith() -> None:
    """The per-expert rule is exact at scales 0 and 1 and off by O(1) in between: the gap, shown."""
    d = data()
    x, t, y = inputs()
    for scale in (0.0, 1.0):
        v = ensemble(d, "expert").guided(scale).velocity(x, t, y)
        torch.testing.assert_close(v, monolith_guided(d, x, t, y, scale), rtol=1e-10, atol=1e-10)
    exact = monolith_guided(d, x, t, y, 4.0)
    gap = (ensemble(d, "expert").guided(4.0).velocity(x, t, y) - exact).flatten(1).norm(dim=1)  # (N,)
    scale_of_v = exact.flatten(1).norm(dim=1)
    assert float(gap.max()) > 0.1 * float(scale_of_v.median())  # a real error, not round-off
    assert float((gap > 1e-6).float().mean()) > 0.25  # on many rows, not one corner


def test_sampled_with_ensemble_guidance_the_trajectory_is_the_monolith_s() -> None:
    """The same guided ODE: Euler through the ensemble and through the monolith from the same noise."""
    d = data()
    noise = torch.randn(16, 1, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.arange(16) % C
    ens = ensemble(d, "ensemble").guided(3.0)
    mono = _Guided(d, 3.0)
    torch.testing.assert_close(
        sample(ens, noise, y, steps=12), sample(mono, noise, y, steps=12), rtol=1e-9, atol=1e-9
    )


class _Guided:
    def __init__(self, d: ClassConditionalMixture, scale: float) -> None:
        self.d, self.scale, self.num_classes = d, scale, d.num_classes

    def velocity(self, x, t, y):
        return monolith_guided(self.d, x, t, y, self.scale)


def test_top1_ensemble_guidance_selects_each_half_with_its_own_posterior() -> None:
    """Top-1: v_c from argmax_k p(k | x_t, t, c)'s expert, v_u from argmax_k p(k | x_t, t)'s."""
    d = data()
    x, t, y = inputs()
    null = torch.full_like(y, d.null_label)
    k_c, k_u = d.router(x, t, y).argmax(1), d.router(x, t, null).argmax(1)
    assert bool((k_c != k_u).any())  # the two halves do pick different experts somewhere
    v_c = torch.stack(
        [d.expert(int(k)).velocity(x[i : i + 1], t[i : i + 1], y[i : i + 1])[0] for i, k in enumerate(k_c)]
    )
    v_u = torch.stack(
        [d.expert(int(k)).velocity(x[i : i + 1], t[i : i + 1], null[i : i + 1])[0] for i, k in enumerate(k_u)]
    )
    ens = ensemble(d, "ensemble", strategy="top-k", top_k=1)
    torch.testing.assert_close(
        ens.guided(3.0).velocity(x, t, y), guided(v_c, v_u, 3.0), rtol=1e-10, atol=1e-10
    )
    assert ens.calls.total_rows == 2 * len(y)  # honest cost: one conditional and one unconditional row each
    assert ens.calls.router == 1 and ens.calls.router_rows == 2 * len(y)
    assert max(ens.calls.batches) == 1  # each expert called at most once, with both halves' rows


# ------------------------------------------------------------------------------------ route_every


class _CountingRouter:
    def __init__(self, d: ClassConditionalMixture) -> None:
        self.d, self.calls = d, 0

    def __call__(self, x, t, y):
        self.calls += 1
        return self.d.router(x, t, y)


@pytest.mark.parametrize("route_every, routed", [(1, 7), (2, 4), (3, 3), (7, 1), (100, 1)])
def test_route_every_routes_every_rth_evaluation(route_every: int, routed: int) -> None:
    d = data()
    router = _CountingRouter(d)
    ens = Ensemble([d.expert(k) for k in range(K)], router, strategy="top-k", route_every=route_every)
    noise = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = sample(ens.guided(3.0), noise, torch.arange(8) % C, steps=7)
    assert router.calls == routed == ens.calls.router and torch.isfinite(out).all()
    assert ens.calls.total_rows == 7 * 8 * 2  # the experts still run every step
    if route_every == 1:  # routing every evaluation is the plain guided ensemble, bit for bit
        plain = Ensemble([d.expert(k) for k in range(K)], d.router, strategy="top-k")
        torch.testing.assert_close(
            out, sample(plain.guided(3.0), noise, torch.arange(8) % C, steps=7), rtol=0, atol=0
        )


def test_route_every_reuses_the_decision_and_forgets_it_after_a_failure() -> None:
    d = data()
    router = _CountingRouter(d)
    ens = Ensemble([d.expert(k) for k in range(K)], router, strategy="top-k", route_every=4)
    x, t, y = inputs(8)
    g = ens.guided(3.0)
    first = g.route(x, t, y)
    assert g.route(x + 5.0, t, y) is first and router.calls == 1  # reused, whatever x_t is now
    g.route(x, t, (y + 1) % C)  # other rows: routed afresh
    assert router.calls == 2
    broken = Ensemble([d.expert(0), _Failing(), d.expert(2)], router, strategy="full", route_every=4).guided(
        3.0
    )
    with pytest.raises(RuntimeError, match="down"):
        broken.velocity(x, t, y)
    assert broken._decision is None  # the recomputed step routes again (a dropped expert is not reused)


class _Failing:
    num_classes = C

    def velocity(self, x, t, y):
        raise RuntimeError("expert down")
