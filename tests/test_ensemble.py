"""The ensemble denoiser (router/ensemble.py) against closed forms.

A Gaussian mixture is the exact model of DDM's claim: with its components as the experts and its exact
posterior as the router, the full ensemble's velocity *is* the mixture's marginal velocity. Strategy
mechanics are checked on hand-made routers and label-dependent affine experts whose outputs are known.
"""

from __future__ import annotations

import concurrent.futures

import pytest
import torch

from ddm.expert import flow
from ddm.expert.analytic import GaussianMixtureDenoiser
from ddm.expert.denoiser import Denoiser
from ddm.expert.guidance import guided
from ddm.expert.sampling import sample, sample_heun
from ddm.router.ensemble import Ensemble, select_weights
from ddm.router.model import RouterConfig, RouterNet

_L = torch.tensor(
    [[1.0, 0, 0, 0], [0.6, 0.8, 0, 0], [-0.3, 0.2, 0.5, 0], [0.1, -0.4, 0.3, 0.7]], dtype=torch.float64
)
SIGMA = _L @ _L.T
MEANS = torch.tensor([[3.0, 0, 0, 0], [-3.0, 0, 0, 0], [0, 3.0, 0, 3.0]], dtype=torch.float64)
COVS = torch.stack([0.3 * torch.eye(4), 0.2 * SIGMA, torch.diag(torch.tensor([0.1, 0.2, 0.3, 0.4]))]).double()
W = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
MIX = GaussianMixtureDenoiser(W, MEANS.reshape(3, 1, 2, 2), COVS)


def posterior_router(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return MIX.posterior(x_t, t)


def mixture_ensemble(strategy: str = "full", **kwargs) -> Ensemble:
    experts = [MIX.component(k) for k in range(3)]
    return Ensemble(experts, posterior_router, strategy=strategy, **kwargs)


def noisy_mixture_samples(
    n: int, t: float | torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_t from the mixture's marginal at t, the time (N,), and each row's component."""
    g = torch.Generator().manual_seed(seed)
    x0, k = MIX.sample_x0(n, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t_vec = t if isinstance(t, torch.Tensor) else torch.full((n,), t, dtype=torch.float64)
    return flow.interpolate(x0, eps, t_vec), t_vec, k


def labels(n: int, value: int = 0) -> torch.Tensor:
    return torch.full((n,), value, dtype=torch.long)


# --------------------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("t", [0.0, 1e-6, 0.01, 0.3, 0.7, 0.99, 1 - 1e-6, 1.0])
def test_full_ensemble_of_components_with_exact_posterior_is_the_marginal_velocity(t: float) -> None:
    x_t, t_vec, _ = noisy_mixture_samples(256, t, seed=1)
    v = mixture_ensemble("full").velocity(x_t, t_vec, labels(256))
    torch.testing.assert_close(v, MIX.velocity(x_t, t_vec), rtol=0, atol=1e-10)


def test_full_ensemble_with_a_different_t_per_row() -> None:
    t = torch.rand(512, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t[:4] = torch.tensor([0.0, 1.0, 1e-9, 1 - 1e-9], dtype=torch.float64)
    x_t, t_vec, _ = noisy_mixture_samples(512, t, seed=3)
    ens = mixture_ensemble("full")
    torch.testing.assert_close(
        ens.velocity(x_t, t_vec, labels(512)), MIX.velocity(x_t, t_vec), rtol=0, atol=1e-10
    )
    assert ens.calls.batches == [1, 1, 1] and ens.calls.rows == [512] * 3 and ens.calls.router == 1


def test_top1_is_the_nearest_components_velocity_at_small_t() -> None:
    t = 0.05
    x_t, t_vec, k = noisy_mixture_samples(400, t, seed=4)
    nearest = torch.cdist(x_t.reshape(400, 4), (1 - t) * MEANS).argmin(1)
    assert torch.equal(nearest, k)  # well separated: the nearest scaled mean is the true component
    ens = mixture_ensemble("top-k", top_k=1)
    w = ens.weights(x_t, t_vec, labels(400))
    assert torch.equal(w, torch.nn.functional.one_hot(nearest, 3).double())
    v = ens.velocity(x_t, t_vec, labels(400))
    for i in range(3):
        rows = nearest == i
        assert torch.equal(v[rows], MIX.component(i).velocity(x_t[rows], t_vec[rows]))
    torch.testing.assert_close(v, MIX.velocity(x_t, t_vec), rtol=0, atol=1e-8)  # posterior ~ one-hot here
    assert ens.calls.rows == torch.bincount(nearest, minlength=3).tolist()  # one expert row per sample


# ------------------------------------------------------------- toy label-dependent experts and a router


class AffineExpert:
    """v = a[y] * x_t + t * b[y]; the last row of a and b is the null label's."""

    num_classes = 3

    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.a = torch.randn(4, generator=g, dtype=torch.float64)
        self.b = torch.randn(4, 1, 2, 2, generator=g, dtype=torch.float64)
        self.seen: list[torch.Tensor] = []  # x_t of every call
        self.seen_y: list[torch.Tensor] = []

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.seen.append(x_t.clone())
        self.seen_y.append(y.clone())
        return self.a[y].reshape(-1, 1, 1, 1) * x_t + t.reshape(-1, 1, 1, 1) * self.b[y]


class ToyRouter:
    """probs = softmax(x W + c[y]): depends on both x_t and the label; records the labels it saw."""

    def __init__(self, k: int = 3, seed: int = 20) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(4, k, generator=g, dtype=torch.float64)
        self.c = 2 * torch.randn(4, k, generator=g, dtype=torch.float64)
        self.seen_y: list[torch.Tensor] = []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.seen_y.append(y.clone())
        return torch.softmax(x_t.reshape(-1, 4) @ self.w + self.c[y], dim=1)


def toy_inputs(n: int = 64, seed: int = 30) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=g)  # includes the null label 3
    return x, t, y


def toy_ensemble(strategy: str = "full", **kwargs) -> tuple[Ensemble, list[AffineExpert], ToyRouter]:
    experts, router = [AffineExpert(seed) for seed in (10, 11, 12)], ToyRouter()
    return Ensemble(experts, router, strategy=strategy, **kwargs), experts, router


def _clear(experts: list[AffineExpert], router: ToyRouter) -> None:
    for e in experts:
        e.seen.clear()
        e.seen_y.clear()
    router.seen_y.clear()


def _mixture(w: torch.Tensor, experts: list[AffineExpert], x, t, y) -> torch.Tensor:
    return sum(w[:, k].reshape(-1, 1, 1, 1) * e.velocity(x, t, y) for k, e in enumerate(experts))


STRATEGY_CASES = [("full", {}), ("top-k", {"top_k": 2}), ("threshold", {"threshold": 0.3})]


@pytest.mark.parametrize("strategy, kwargs", STRATEGY_CASES)
@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0])
def test_expert_mode_guidance_is_the_defined_formula(strategy: str, kwargs: dict, scale: float) -> None:
    """guidance_mode 'expert': CFG inside each expert the conditional routing selects, mixed with those
    weights; scale 0 (unconditional) routes with the null label, never by class."""
    ens, experts, router = toy_ensemble(strategy, guidance_mode="expert", **kwargs)
    x, t, y = toy_inputs()
    null = torch.full_like(y, 3)
    routed_with = null if scale == 0.0 else y
    w = select_weights(router(x, t, routed_with), strategy, **kwargs)
    expected = sum(
        w[:, k].reshape(-1, 1, 1, 1) * guided(e.velocity(x, t, y), e.velocity(x, t, null), scale)
        for k, e in enumerate(experts)
    )
    _clear(experts, router)
    v = ens.guided(scale).velocity(x, t, y)
    torch.testing.assert_close(v, expected, rtol=0, atol=1e-12)
    assert len(router.seen_y) == 1 and torch.equal(router.seen_y[0], routed_with)  # routed once
    per_pass = 2 if scale not in (0.0, 1.0) else 1
    for k, e in enumerate(experts):
        n_k = int((w[:, k] > 0).sum())
        assert len(e.seen) == (1 if n_k else 0) and ens.calls.batches[k] == len(e.seen)  # one batched call
        assert ens.calls.rows[k] == per_pass * n_k
        if n_k and per_pass == 2:  # [rows; rows with the null label]
            assert torch.equal(e.seen_y[0][n_k:], torch.full((n_k,), 3))
    if scale == 1.0:
        torch.testing.assert_close(v, ens.velocity(x, t, y), rtol=0, atol=0)


@pytest.mark.parametrize("strategy, kwargs", STRATEGY_CASES)
@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0])
def test_ensemble_mode_guidance_is_the_defined_formula(strategy: str, kwargs: dict, scale: float) -> None:
    """guidance_mode 'ensemble': v_u + s (v_c - v_u), v_c routed with y, v_u routed with the null label,
    each with its own strategy weights; one router pass and one call per selected expert."""
    ens, experts, router = toy_ensemble(strategy, guidance_mode="ensemble", **kwargs)
    x, t, y = toy_inputs()
    null = torch.full_like(y, 3)
    w_c = select_weights(router(x, t, y), strategy, **kwargs)
    w_u = select_weights(router(x, t, null), strategy, **kwargs)
    v_c, v_u = _mixture(w_c, experts, x, t, y), _mixture(w_u, experts, x, t, null)
    expected = {0.0: v_u, 1.0: v_c}.get(scale, guided(v_c, v_u, scale))
    _clear(experts, router)
    v = ens.guided(scale).velocity(x, t, y)
    torch.testing.assert_close(v, expected, rtol=0, atol=1e-12)
    routed_with = {0.0: null, 1.0: y}.get(scale, torch.cat([y, null]))
    assert len(router.seen_y) == 1 and torch.equal(router.seen_y[0], routed_with)
    assert ens.calls.router_rows == routed_with.numel()
    for k, e in enumerate(experts):
        n_c, n_u = int((w_c[:, k] > 0).sum()), int((w_u[:, k] > 0).sum())
        rows = {0.0: n_u, 1.0: n_c}.get(scale, n_c + n_u)  # each half's selected rows, no more
        assert len(e.seen) == (1 if rows else 0) and ens.calls.batches[k] == len(e.seen)
        assert ens.calls.rows[k] == rows


def test_the_two_guidance_modes_differ_only_when_guiding() -> None:
    x, t, y = toy_inputs()
    for scale, same in ((0.0, True), (1.0, True), (3.0, False)):
        a = toy_ensemble("top-k", guidance_mode="ensemble")[0].guided(scale).velocity(x, t, y)
        b = toy_ensemble("top-k", guidance_mode="expert")[0].guided(scale).velocity(x, t, y)
        assert torch.equal(a, b) == same


def test_guided_ensemble_plugs_into_the_sampler() -> None:
    ens, _, _ = toy_ensemble("top-k", top_k=1)
    x, _, y = toy_inputs(8)
    out = sample(ens.guided(2.0), x, y, steps=5, sampler="heun")
    assert isinstance(ens.guided(2.0), Denoiser) and out.shape == x.shape and torch.isfinite(out).all()
    assert ens.calls.router == 9  # heun, 5 steps: 2 * 5 - 1 velocity calls, one router call each
    assert ens.calls.total_rows == 9 * 8 * 2  # top-1 under CFG: two expert rows per sample per call


def test_with_guidance_lets_the_ensemble_guide_itself() -> None:
    """Wrapping the ensemble in the generic CFG wrapper would route the null rows on their own (the
    router would see the null label); with_guidance must pick the ensemble's own guidance instead."""
    from ddm.expert.guidance import CFGDenoiser, with_guidance

    ens, experts, _ = toy_ensemble("top-k", top_k=1)
    x, t, y = toy_inputs(16)
    torch.testing.assert_close(
        with_guidance(ens, 3.0).velocity(x, t, y), ens.guided(3.0).velocity(x, t, y), rtol=0, atol=0
    )
    assert isinstance(with_guidance(experts[0], 3.0), CFGDenoiser)


# ------------------------------------------------------------------------------------ strategy mechanics


def test_select_weights_renormalises_the_selected_probabilities() -> None:
    p = torch.tensor([[0.5, 0.3, 0.2], [0.05, 0.05, 0.9], [0.2, 0.25, 0.55]], dtype=torch.float64)
    torch.testing.assert_close(select_weights(p, "full"), p)
    torch.testing.assert_close(
        select_weights(p, "top-k", top_k=2),
        torch.tensor(
            [[0.625, 0.375, 0], [0.05 / 0.95, 0, 0.9 / 0.95], [0, 0.25 / 0.8, 0.55 / 0.8]],
            dtype=torch.float64,
        ),
    )
    torch.testing.assert_close(
        select_weights(p, "threshold", threshold=0.25),
        torch.tensor([[0.625, 0.375, 0], [0, 0, 1], [0, 0.25 / 0.8, 0.55 / 0.8]], dtype=torch.float64),
    )
    # threshold keeps at least the argmax, even when nothing reaches it
    torch.testing.assert_close(
        select_weights(p, "threshold", threshold=0.95),
        torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 0, 1]]).double(),
    )
    for s, kw in (("top-k", {"top_k": 1}), ("top-k", {"top_k": 2}), ("threshold", {"threshold": 0.1})):
        w = select_weights(p, s, **kw)
        torch.testing.assert_close(w.sum(1), torch.ones(3, dtype=torch.float64))


def test_top_k_with_k_at_least_the_number_of_experts_is_full() -> None:
    x, t, y = toy_inputs()
    full, _, _ = toy_ensemble("full")
    for k in (3, 7):
        topk, _, _ = toy_ensemble("top-k", top_k=k)
        assert torch.equal(topk.weights(x, t, y), full.weights(x, t, y))
        assert torch.equal(topk.velocity(x, t, y), full.velocity(x, t, y))


@pytest.mark.parametrize(
    "strategy, kwargs", [("top-k", {"top_k": 1}), ("top-k", {"top_k": 2}), ("threshold", {"threshold": 0.3})]
)
def test_each_expert_sees_only_its_rows(strategy: str, kwargs: dict) -> None:
    ens, experts, router = toy_ensemble(strategy, **kwargs)
    x, t, y = toy_inputs(200)
    w = select_weights(router(x, t, y), strategy, **kwargs)
    ens.velocity(x, t, y)
    for k, e in enumerate(experts):
        rows = (w[:, k] > 0).nonzero().squeeze(1)
        if rows.numel():
            assert len(e.seen) == 1 and torch.equal(e.seen[0], x[rows])
        else:
            assert e.seen == []  # never called
        assert ens.calls.rows[k] == rows.numel()
    per_row = (w > 0).sum(1)
    assert ens.calls.total_rows == int(per_row.sum())
    if strategy == "top-k":
        assert bool((per_row == kwargs["top_k"]).all())
    ens.calls.reset()
    assert ens.calls.rows == [0, 0, 0] and ens.calls.batches == [0, 0, 0] and ens.calls.router == 0


def test_oracle_uses_the_given_partition_labels() -> None:
    x_t, t_vec, k = noisy_mixture_samples(300, 0.6, seed=5)  # at t = 0.6 the router would often be wrong
    experts = [MIX.component(i) for i in range(3)]
    ens = Ensemble(experts, None, strategy="oracle")
    v = ens.with_partition(k).velocity(x_t, t_vec, labels(300))
    for i in range(3):
        assert torch.equal(v[k == i], experts[i].velocity(x_t[k == i], t_vec[k == i]))
    assert ens.calls.batches == [1, 1, 1] and ens.calls.rows == torch.bincount(k, minlength=3).tolist()
    with pytest.raises(ValueError, match="with_partition"):
        ens.velocity(x_t, t_vec, labels(300))
    with pytest.raises(ValueError, match="rows"):
        ens.with_partition(k[:10]).velocity(x_t, t_vec, labels(300))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        ens.with_partition(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="integer"):
        ens.with_partition(torch.tensor([0.0, 1.0]))


def test_oracle_guidance_uses_only_each_rows_expert() -> None:
    ens, experts, _ = toy_ensemble("top-k")
    x, t, y = toy_inputs(30)
    k = torch.arange(30) % 3
    v = ens.with_partition(k).guided(2.5).velocity(x, t, y)
    null = torch.full_like(y, 3)
    for i, e in enumerate(experts):
        rows = k == i
        want = guided(e.velocity(x[rows], t[rows], y[rows]), e.velocity(x[rows], t[rows], null[rows]), 2.5)
        torch.testing.assert_close(v[rows], want, rtol=0, atol=1e-12)


def test_an_executor_gives_the_same_numbers_as_serial() -> None:
    x, t, y = toy_inputs(128)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        for strategy, kw in (("full", {}), ("top-k", {"top_k": 2}), ("threshold", {"threshold": 0.2})):
            serial, _, _ = toy_ensemble(strategy, **kw)
            parallel, _, _ = toy_ensemble(strategy, executor=pool, **kw)
            assert torch.equal(parallel.velocity(x, t, y), serial.velocity(x, t, y))
            assert torch.equal(parallel.guided(3.0).velocity(x, t, y), serial.guided(3.0).velocity(x, t, y))
            assert parallel.calls.rows == serial.calls.rows and parallel.calls.batches == serial.calls.batches


def test_a_router_net_can_route() -> None:
    torch.manual_seed(0)
    net = RouterNet(
        RouterConfig(
            image_size=2,
            in_channels=1,
            patch_size=1,
            hidden_size=16,
            depth=1,
            num_heads=2,
            num_classes=3,
            num_experts=3,
        )
    )
    ens = Ensemble([AffineExpert(s) for s in (1, 2, 3)], net, strategy="top-k", top_k=2)
    x, t, y = toy_inputs(16)
    p = ens.probabilities(x, t, y)
    assert p.shape == (16, 3) and not p.requires_grad
    torch.testing.assert_close(p.sum(1), torch.ones(16))
    v = ens.velocity(x, t, y)
    assert v.shape == x.shape and v.dtype == torch.float64 and (ens.weights(x, t, y) > 0).sum(1).eq(2).all()
    wrong_k = RouterNet(
        RouterConfig(
            image_size=2, patch_size=1, hidden_size=16, depth=1, num_heads=2, num_classes=3, num_experts=4
        )
    )
    with pytest.raises(ValueError, match="router: the router has 4 outputs but there are 3 experts"):
        Ensemble([AffineExpert(s) for s in (1, 2, 3)], wrong_k)
    wrong_c = RouterNet(
        RouterConfig(
            image_size=2, patch_size=1, hidden_size=16, depth=1, num_heads=2, num_classes=10, num_experts=3
        )
    )
    with pytest.raises(ValueError, match="router: the router has num_classes 10"):
        Ensemble([AffineExpert(s) for s in (1, 2, 3)], wrong_c)


# ------------------------------------------------------------------------------------------- validation


class OtherClasses(AffineExpert):
    num_classes = 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(strategy="top-2"), "strategy: unknown strategy 'top-2'"),
        (dict(top_k=0), "top_k must be an integer >= 1"),
        (dict(top_k=1.5), "top_k must be an integer >= 1"),
        (dict(top_k=True), "top_k must be an integer >= 1"),
        (dict(threshold=0.0), r"threshold must be a number in \(0, 1\]"),
        (dict(threshold=1.5), r"threshold must be a number in \(0, 1\]"),
        (dict(experts=[]), "experts: need at least one expert"),
        (
            dict(experts=[AffineExpert(1), OtherClasses(2)]),
            r"experts: all experts must have the same num_classes.*\[3, 5\]",
        ),
        (
            dict(experts=[AffineExpert(1), object()]),
            r"experts\[1\] \(object\) does not implement the Denoiser",
        ),
        (dict(router=None), "router: strategy 'top-k' needs a router"),
        (dict(router=42), "router must be a RouterNet or a callable"),
        (dict(executor="pool"), "executor must be a concurrent.futures.Executor"),
        (
            dict(guidance_mode="both"),
            "guidance_mode: unknown guidance mode 'both'; choose one of ensemble, expert",
        ),
        (dict(route_every=0), r"route_every must be an integer >= 1"),
        (dict(route_every=2.0), r"route_every must be an integer >= 1"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_field(kwargs: dict, match: str) -> None:
    args = dict(experts=[AffineExpert(s) for s in (1, 2, 3)], router=ToyRouter()) | kwargs
    with pytest.raises(ValueError, match=match):
        Ensemble(args.pop("experts"), args.pop("router"), **args)


@pytest.mark.parametrize("scale", [-1.0, float("nan"), float("inf"), True])
def test_bad_guidance_scales_are_rejected(scale: float) -> None:
    ens, _, _ = toy_ensemble()
    with pytest.raises(ValueError, match="guidance scale"):
        ens.guided(scale)
    with pytest.raises(ValueError, match="guidance scale"):
        ens.with_partition(torch.tensor([0])).guided(scale)


@pytest.mark.parametrize(
    "router, match",
    [
        (
            lambda x, t, y: torch.full((x.shape[0], 2), 0.5, dtype=torch.float64),
            r"router output must have shape \(N, K\) = \(8, 3\), got \(8, 2\)",
        ),
        (
            lambda x, t, y: torch.full((x.shape[0] + 1, 3), 0.3, dtype=torch.float64),
            r"router output must have shape",
        ),
        (lambda x, t, y: [[1.0, 0, 0]] * x.shape[0], r"router output must have shape .* got list"),
        (lambda x, t, y: torch.full((x.shape[0], 3), -0.1, dtype=torch.float64), "non-negative"),
        (lambda x, t, y: torch.full((x.shape[0], 3), float("nan"), dtype=torch.float64), "finite"),
    ],
)
def test_router_output_is_checked(router, match: str) -> None:
    ens = Ensemble([AffineExpert(s) for s in (1, 2, 3)], router, strategy="full")
    x, t, y = toy_inputs(8)
    with pytest.raises(ValueError, match=match):
        ens.velocity(x, t, y)


def test_an_expert_returning_the_wrong_shape_is_named() -> None:
    class Broken(AffineExpert):
        def velocity(self, x_t, t, y):
            return super().velocity(x_t, t, y)[:, :, :1]

    ens = Ensemble([AffineExpert(1), Broken(2), AffineExpert(3)], ToyRouter(), strategy="full")
    x, t, y = toy_inputs(8)
    with pytest.raises(ValueError, match=r"experts\[1\]\.velocity returned shape"):
        ens.velocity(x, t, y)


# ---------------------------------------------------------------------------------------------- sampling


def test_sampling_the_full_ensemble_recovers_the_mixture() -> None:
    n = 10_000
    noise = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    ens = mixture_ensemble("full")
    x = sample_heun(ens, noise, labels(n), steps=24)
    k = torch.cdist(x.reshape(n, 4), MEANS).argmin(1)
    freq = torch.bincount(k, minlength=3).double() / n
    assert ((freq - W).abs() < 5 * (W * (1 - W) / n).sqrt()).all(), freq
    for i in range(3):
        torch.testing.assert_close(x.reshape(n, 4)[k == i].mean(0), MEANS[i], atol=0.05, rtol=0)
    # and it is the mixture's own sampler, step for step, to float64 round-off
    torch.testing.assert_close(x, sample_heun(MIX, noise, labels(n), steps=24), rtol=0, atol=1e-9)
    assert ens.calls.batches == [47] * 3 and ens.calls.router == 47  # heun 24 steps: 47 velocity calls
