"""Training objectives (ddm.expert.objectives): each conversion to the velocity interface is exact.

The oracle is a Gaussian N(mu, diag(lam)), whose exact posterior means are closed forms independent of
the code under test: with a = 1 - t and s = a^2 lam + t^2,

    E[x_0 | x_t] = mu + a lam (x_t - a mu) / s,    E[eps | x_t] = t (x_t - a mu) / s,

and ``GaussianDenoiser`` (expert/analytic.py) gives the exact velocity E[eps - x_0 | x_t]. Converting
the exact eps- and x0-predictors must give that velocity; at the singular ends the conversion is
evaluated at the clamped time and is exact there, finite and bounded.
"""

from __future__ import annotations

import pytest
import torch

from ddm.expert import flow
from ddm.expert.analytic import GaussianDenoiser
from ddm.expert.denoiser import ModuleDenoiser
from ddm.expert.objectives import EDGE, OBJECTIVES, objective_of

SHAPE = (1, 2, 3)  # (C, H, W), D = 6
MU = torch.linspace(-0.6, 0.8, 6, dtype=torch.float64)
LAM = torch.tensor([0.05, 0.3, 1.0, 0.02, 0.5, 2.0], dtype=torch.float64)
GAUSS = GaussianDenoiser(MU.reshape(SHAPE), torch.diag(LAM))


def exact_predictions(x_t: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """E[x_0 | x_t], E[eps | x_t] and E[eps - x_0 | x_t] (the last from analytic.py), float64 (N, C, H, W)."""
    n = x_t.shape[0]
    x = x_t.reshape(n, -1)
    tc = t.reshape(n, 1).double()
    a = 1 - tc
    s = a**2 * LAM + tc**2
    x0 = MU + a * LAM * (x - a * MU) / s
    eps = tc * (x - a * MU) / s
    return {
        "x0": x0.reshape(x_t.shape),
        "eps": eps.reshape(x_t.shape),
        "velocity": GAUSS.velocity(x_t, t).double(),
    }


class Oracle(torch.nn.Module):
    """A 'network' predicting one objective's target exactly (forward(x_t, t, y) like the DiT)."""

    def __init__(self, objective: str):
        super().__init__()
        self.objective = objective

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return exact_predictions(x_t, t)[self.objective]


def _points(t: list[float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = len(t)
    x_0 = (MU + LAM.sqrt() * torch.randn(n, 6, generator=g, dtype=torch.float64)).reshape(n, *SHAPE)
    eps = torch.randn(n, *SHAPE, generator=g, dtype=torch.float64)
    tt = torch.tensor(t, dtype=torch.float64)
    return flow.interpolate(x_0, eps, tt), tt


INTERIOR = [0.05, 0.2, 0.5, 0.7, 0.9, 0.97]


@pytest.mark.parametrize("name", ["velocity", "eps", "x0"])
def test_the_exact_predictor_converted_is_the_exact_velocity(name: str) -> None:
    x_t, t = _points(INTERIOR)
    objective = OBJECTIVES.get(name)
    v = objective.velocity(Oracle(name), x_t, t, torch.zeros(len(t), dtype=torch.long))
    want = GAUSS.velocity(x_t, t).double()
    torch.testing.assert_close(v.double(), want, atol=1e-5, rtol=1e-5)  # float32 out of the boundary
    # and in float64 the conversion itself is exact to rounding
    pred = exact_predictions(x_t, t)[name]
    torch.testing.assert_close(objective.to_velocity(pred, x_t, t), want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", ["velocity", "eps", "x0"])
def test_each_target_is_what_the_path_says(name: str) -> None:
    """target(x_0, eps) converted at x_t is the conditional velocity eps - x_0, at every t."""
    g = torch.Generator().manual_seed(3)
    x_0, eps = torch.randn(2, 5, *SHAPE, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.5, 0.8, 0.95], dtype=torch.float64)
    x_t = flow.interpolate(x_0, eps, t)
    objective = OBJECTIVES.get(name)
    v = objective.to_velocity(objective.target(x_0, eps), x_t, t)
    torch.testing.assert_close(v, flow.velocity_target(x_0, eps), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name, end", [("eps", 1.0), ("x0", 0.0)])
def test_the_singular_end_is_evaluated_at_the_clamped_time(name: str, end: float) -> None:
    """At t = 1 (eps) or t = 0 (x0) the conversion is 0/0; the boundary clamps t EDGE away, where it is
    exact, so the velocity is finite, equals the exact velocity at the clamped time and is within
    O(EDGE) of the exact velocity at the end itself."""
    objective = OBJECTIVES.get(name)
    assert objective.singular == end
    x_t, t = _points([end] * 4, seed=5)
    v = objective.velocity(Oracle(name), x_t, t, torch.zeros(4, dtype=torch.long)).double()
    assert torch.isfinite(v).all()
    clamped = torch.full_like(t, 1 - EDGE if end == 1.0 else EDGE)
    torch.testing.assert_close(objective.net_time(t), clamped)
    torch.testing.assert_close(v, GAUSS.velocity(x_t, clamped).double(), atol=1e-5, rtol=1e-5)
    at_end = GAUSS.velocity(x_t, t).double()  # closed form at the end: x - mu at t = 1, -x at t = 0
    torch.testing.assert_close(at_end, x_t - MU.reshape(SHAPE) if end == 1.0 else -x_t)
    assert (v - at_end).abs().max() < 10 * EDGE * (1 + x_t.abs().max())
    # without the clamp the same exact predictor gives nan (0/0) or a blow-up: the clamp is needed
    raw = objective.to_velocity(exact_predictions(x_t, t)[name], x_t, t)
    assert not torch.isfinite(raw).all() or raw.abs().max() > 1e6


def test_velocity_is_not_clamped_and_passes_through() -> None:
    objective = OBJECTIVES.get("velocity")
    t = torch.tensor([0.0, 1e-9, 0.5, 1.0])
    assert torch.equal(objective.net_time(t), t)
    pred = torch.randn(4, *SHAPE)
    assert objective.to_velocity(pred, torch.zeros_like(pred), t) is pred


def test_the_training_loss_regresses_the_objectives_target() -> None:
    """One call: the loss of an oracle predicting the target is 0, of a zero network the target's power."""
    g = torch.Generator().manual_seed(1)
    x_0, eps = torch.randn(2, 8, *SHAPE, generator=g)
    t = torch.rand(8, generator=g)
    y = torch.zeros(8, dtype=torch.long)
    x_t = flow.interpolate(x_0, eps, t)
    for name in OBJECTIVES.names():
        objective = OBJECTIVES.get(name)
        target = objective.target(x_0, eps)

        def oracle(xt: torch.Tensor, tt: torch.Tensor, yy: torch.Tensor, target=target) -> torch.Tensor:
            torch.testing.assert_close(xt, x_t)  # the loss builds x_t on the flow path
            return target

        assert objective.training_loss(oracle, x_0, eps, t, y).item() == pytest.approx(0.0, abs=1e-12)
        zero = objective.training_loss(lambda xt, tt, yy: torch.zeros_like(xt), x_0, eps, t, y)
        assert zero.item() == pytest.approx(float((target**2).mean()))
    # velocity: the loss the expert trainer always had (flow.flow_loss), bit for bit
    v_pred = torch.randn(8, *SHAPE, generator=g)
    velocity = OBJECTIVES.get("velocity").training_loss(lambda *a: v_pred, x_0, eps, t, y)
    assert torch.equal(velocity, flow.flow_loss(v_pred, x_0, eps))


def test_the_module_denoiser_converts_at_the_boundary() -> None:
    x_t, t = _points(INTERIOR + [1.0, 0.0], seed=7)
    x_t, t = x_t.float(), t.float()
    y = torch.zeros(len(t), dtype=torch.long)
    velocities = {
        name: ModuleDenoiser(Oracle(name), num_classes=1, objective=name).velocity(x_t, t, y)
        for name in ("velocity", "eps", "x0")
    }
    for v in velocities.values():
        assert v.dtype == torch.float32 and torch.isfinite(v).all()
    inner = slice(0, len(INTERIOR))
    for name in ("eps", "x0"):
        torch.testing.assert_close(
            velocities[name][inner], velocities["velocity"][inner], atol=1e-4, rtol=1e-4
        )
    with pytest.raises(ValueError, match="objective: unknown objective 'v'; choose one of velocity, eps, x0"):
        ModuleDenoiser(Oracle("eps"), num_classes=1, objective="v")


def test_checkpoint_metadata_names_the_objective() -> None:
    assert objective_of({}).name == "velocity"  # checkpoints from before objectives
    assert objective_of({"objective": "x0"}).name == "x0"
    with pytest.raises(ValueError, match="ckpt.safetensors: metadata names objective 'score'"):
        objective_of({"objective": "score"}, "ckpt.safetensors")


def test_a_registered_objective_is_everywhere() -> None:
    """One entry in OBJECTIVES reaches the model config (and so the run config's overrides), the
    denoiser boundary and checkpoint metadata; a name not registered is refused by each."""
    from ddm.coordinator.config import load_run_config
    from ddm.core.config import ConfigError
    from ddm.expert.config import ModelConfig
    from ddm.expert.objectives import Objective, register

    half = Objective(
        "half-velocity-test", target=lambda x_0, eps: 0.5 * (eps - x_0), convert=lambda p, x_t, t: 2 * p
    )
    register(half, help="half the velocity (test)")
    try:
        assert ModelConfig(objective="half-velocity-test").objective == "half-velocity-test"
        cfg = load_run_config(
            "configs/tiny.toml", {"experts.overrides.expert-1.model": {"objective": "half-velocity-test"}}
        )
        assert cfg.expert_model("expert-1").objective == "half-velocity-test"
        x_t, t = _points(INTERIOR)
        y = torch.zeros(len(t), dtype=torch.long)
        denoiser = ModuleDenoiser(lambda x, tt, yy: 0.5 * GAUSS.velocity(x, tt), 1, "half-velocity-test")
        torch.testing.assert_close(denoiser.velocity(x_t, t, y).double(), GAUSS.velocity(x_t, t).double())
        assert objective_of({"objective": "half-velocity-test"}) is half
    finally:
        OBJECTIVES.remove("half-velocity-test")
    with pytest.raises(ConfigError, match="unknown objective 'half-velocity-test'"):
        load_run_config(
            "configs/tiny.toml", {"experts.overrides.expert-1.model": {"objective": "half-velocity-test"}}
        )
