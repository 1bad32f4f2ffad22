"""Distillation (router/distill.py, expert/student.py): the shortcut math on a closed form, the guided
teacher against the ensemble's convention, and the trainer on real partition shards (resume, loading,
sampling through every path that takes a denoiser)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_router_train import write_partitions
from torch import nn

from ddm.core import checkpoint
from ddm.expert import flow
from ddm.expert.analytic import GaussianDenoiser
from ddm.expert.config import SampleConfig
from ddm.expert.denoiser import ModuleDenoiser, StepDenoiser
from ddm.expert.guidance import with_guidance
from ddm.expert.load import load_denoiser, load_model
from ddm.expert.model import DiT, DiTConfig, dit_config
from ddm.expert.sampling import sample
from ddm.expert.student import StudentDenoiser
from ddm.router.distill import partition_weights, teacher_velocity, train
from ddm.router.distill_config import DistillJobConfig, ShortcutConfig
from ddm.router.distill_objectives import OBJECTIVES, meanflow_target, shortcut_target, shortcut_times
from ddm.router.ensemble import Ensemble

# ------------------------------------------------------------------------------ the closed form


class ExactShortcut(nn.Module):
    """The exact shortcut of Gaussian data N(mu, Sigma) as a "network" with the student's signature.

    Along each eigenvector of Sigma (eigenvalue lam), x_t ~ N(a mu, a^2 lam + t^2) with a = 1 - t, and
    the probability-flow ODE is linear: x_{t'} = a' mu + sigma_{t'} / sigma_t (x_t - a mu) with
    sigma_t = sqrt(a^2 lam + t^2). So s(x_t, t, d) = (x_t - x_{t-d}) / d exactly, and d -> 0 gives the
    marginal velocity. A perfectly distilled shortcut student is this function.
    """

    def __init__(self, gauss: GaussianDenoiser, image_shape: tuple[int, int, int]):
        super().__init__()
        self.g = gauss
        c, h, _ = image_shape
        self.config = DiTConfig(image_size=h, in_channels=c, patch_size=1, hidden_size=4, depth=1, num_heads=1,
                                num_classes=1, guidance_embed=True, step_embed=True)  # fmt: skip

    def forward(self, x_t, t, y, w=None, d=None):
        n = x_t.shape[0]
        x = x_t.double().reshape(n, -1)
        t = t.double().reshape(n, 1)
        d = (torch.zeros_like(t) if d is None else d.double().reshape(n, 1)).clamp(min=1e-9)
        lam, u, mu = self.g._evals, self.g._evecs, self.g.mean
        z = (x - (1 - t) * mu) @ u  # (N, D) residual in the eigenbasis

        def sigma(s):
            return ((1 - s) ** 2 * lam + s**2).sqrt()

        t_next = t - d
        x_next = (1 - t_next) * mu + (sigma(t_next) / sigma(t) * z) @ u.T
        return ((x - x_next) / d).reshape(x_t.shape).to(x_t.dtype)


@pytest.fixture(scope="module")
def gaussian() -> GaussianDenoiser:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64)
    cov = a @ a.T / 4 + 0.05 * torch.eye(4, dtype=torch.float64)
    return GaussianDenoiser(torch.tensor([0.5, -1.0, 0.25, 2.0]).reshape(1, 2, 2), cov)


def test_exact_shortcut_at_d_zero_is_the_analytic_velocity(gaussian: GaussianDenoiser) -> None:
    s = ExactShortcut(gaussian, (1, 2, 2))
    x = torch.randn(64, 1, 2, 2, dtype=torch.float64)
    t = torch.rand(64, dtype=torch.float64) * 0.98 + 0.01
    v = gaussian.velocity(x, t)
    assert torch.allclose(s(x, t, None, d=torch.full_like(t, 1e-7)), v, atol=1e-5)


def test_self_consistency_target_is_exact_for_the_exact_shortcut(gaussian: GaussianDenoiser) -> None:
    """Two exact half steps compose to the exact full step: the target equals s(x_t, t, D) for every
    D >= 2 min_step, so the bootstrap's signs, times and step sizes are right."""
    s = ExactShortcut(gaussian, (1, 2, 2))
    cfg = ShortcutConfig(min_step=1 / 8)
    t, size = shortcut_times(512, cfg, torch.Generator().manual_seed(1))
    assert set(size.tolist()) == {1.0, 0.5, 0.25, 0.125}
    assert torch.all(t >= size - 1e-7) and torch.all(t <= 1)
    assert torch.allclose(
        torch.remainder(t / size + 1e-6, 1.0), torch.full_like(t, 1e-6), atol=1e-4
    )  # on the grid
    x = gaussian.sample_x0(512, torch.Generator().manual_seed(2), dtype=torch.float64)
    x_t = flow.interpolate(x, torch.randn_like(x), t.double())
    y, w = torch.zeros(512, dtype=torch.long), torch.ones(512)

    def student(x_, t_, y_, w_, d_):
        return s(x_, t_, y_, w_, d_)

    target = shortcut_target(student, x_t, t.double(), y, w, size.double(), cfg.min_step)
    big = size >= 2 * cfg.min_step
    assert torch.allclose(target[big], s(x_t, t.double(), y, d=size.double())[big], atol=1e-9)
    # D = min_step: the halves use d = 0, i.e. two Euler half steps of the flow (the analytic velocity).
    small = ~big
    xs, ts, h = x_t[small], t.double()[small], (size.double()[small] / 2)
    v_1 = gaussian.velocity(xs, ts)
    v_2 = gaussian.velocity(xs - h.reshape(-1, 1, 1, 1) * v_1, ts - h)
    assert small.any() and torch.allclose(target[small], (v_1 + v_2) / 2, atol=1e-5)


def test_the_exact_shortcut_is_the_average_velocity(gaussian: GaussianDenoiser) -> None:
    """s*(x_t, t, d) is MeanFlow's average velocity 1/(t - r) int_r^t v(x_tau, tau) dtau, r = t - d: the
    integral taken numerically (trapezoid along a 400-step Heun solve of the analytic velocity, the
    sum of its increments) matches the closed form, so the sampler test below covers both objectives."""
    s = ExactShortcut(gaussian, (1, 2, 2))
    n = 64
    x = gaussian.sample_x0(n, torch.Generator().manual_seed(4), dtype=torch.float64)
    t = 0.3 + 0.7 * torch.rand(n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    r = t * torch.rand(n, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x_t = flow.interpolate(x, torch.randn_like(x), t)
    z, integral, steps = x_t.clone(), torch.zeros_like(x_t), 400
    h = ((t - r) / steps).reshape(-1, 1, 1, 1)
    for i in range(steps):
        tau = t - i * h.flatten()
        v_1 = gaussian.velocity(z, tau)
        v_2 = gaussian.velocity(z - h * v_1, tau - h.flatten())
        integral += h * (v_1 + v_2) / 2
        z = z - h * (v_1 + v_2) / 2
    u = integral / (t - r).reshape(-1, 1, 1, 1)
    assert torch.allclose(s(x_t, t, None, d=t - r), u, atol=1e-5)


@pytest.mark.parametrize("times", ["grid", "uniform"])
def test_meanflow_target_is_exact_for_the_exact_average_velocity(
    gaussian: GaussianDenoiser, times: str
) -> None:
    """The MeanFlow identity u = v - (t - r) du/dt holds for the exact average velocity: the target built
    by ``meanflow_target`` (jvp with tangents (v, 1, 1)) from s* and the analytic v equals s* itself, at
    the (t, d) each time sampling draws. A wrong tangent or sign moves it: v alone is far from s*."""
    s = ExactShortcut(gaussian, (1, 2, 2))
    cfg = ShortcutConfig(objective="meanflow", min_step=1 / 8, meanflow_times=times)
    t, d = OBJECTIVES.get("meanflow").times(256, cfg, torch.Generator().manual_seed(7))
    assert torch.all(d > 0) and torch.all(d <= t + 1e-7) and torch.all(t <= 1)
    t, d = t.double(), d.double()
    x = gaussian.sample_x0(256, torch.Generator().manual_seed(8), dtype=torch.float64)
    x_t = flow.interpolate(x, torch.randn_like(x), t)
    y, w = torch.zeros(256, dtype=torch.long), torch.ones(256)
    v = gaussian.velocity(x_t, t)
    target = meanflow_target(lambda x_, t_, y_, w_, d_: s(x_, t_, y_, w_, d_), x_t, t, y, w, d, v)
    exact = s(x_t, t, y, d=d)
    assert torch.allclose(target, exact, atol=1e-6)
    big = d >= 0.25
    assert (v[big] - exact[big]).abs().amax() > 0.05
    wrong = meanflow_target(lambda x_, t_, y_, w_, d_: s(x_, t_, y_, w_, d_), x_t, t, y, w, d, -v)
    assert (wrong[big] - exact[big]).abs().amax() > 0.05


@pytest.fixture(scope="module")
def ode_solution(gaussian: GaussianDenoiser) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, its image under the probability-flow ODE): 200 Heun steps of the exact velocity."""
    noise = torch.randn(2000, 1, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return noise, sample(gaussian, noise, torch.zeros(2000, dtype=torch.long), steps=200, sampler="heun")


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_a_perfect_shortcut_student_samples_the_data_in_few_steps(
    gaussian: GaussianDenoiser, ode_solution: tuple[torch.Tensor, torch.Tensor], steps: int
) -> None:
    """The exact shortcut (= the exact average velocity, the target of both objectives) behind
    StudentDenoiser: N Euler steps with d = 1/N land exactly on the
    probability-flow ODE's endpoint (the points a 200-step Heun solve of the exact velocity reaches), so
    the samples have the data's mean and covariance. Without the step size (d = 0) one Euler step is far off."""
    student = StudentDenoiser(ExactShortcut(gaussian, (1, 2, 2)))
    noise, reference = ode_solution
    y = torch.zeros(2000, dtype=torch.long)
    x0 = sample(with_guidance(student, 3.0), noise, y, steps=steps)  # Euler asks for each whole step
    assert (x0 - reference).abs().max() < 1e-3
    flat = x0.reshape(2000, -1)
    assert torch.allclose(flat.mean(0), gaussian.mean, atol=0.1)
    assert torch.allclose(torch.cov(flat.T), gaussian.cov, atol=0.15)
    assert student.calls.total_rows == 2000 * steps  # one pass per step, guidance included
    if steps == 1:
        plain = sample(student, noise, y, steps=1, sampler="stochastic", churn=0.0)  # d = 0: the flow
        assert (plain - reference).abs().max() > 0.1


def test_the_sampler_gives_the_student_its_step(gaussian: GaussianDenoiser) -> None:
    """Euler asks a StepDenoiser for the step t -> t_next (d = t - t_next); Heun and the stochastic
    sampler ask for the instantaneous velocity (d = 0). No grid is copied into the student."""
    seen: list[torch.Tensor] = []

    class Recording(ExactShortcut):
        def forward(self, x_t, t, y, w=None, d=None):
            seen.append(d.clone())
            return super().forward(x_t, t, y, w=w, d=d)

    student = StudentDenoiser(Recording(gaussian, (1, 2, 2)))
    assert isinstance(student, StepDenoiser)
    grid = flow.time_grid(4, 2.0)
    y = torch.zeros(3, dtype=torch.long)
    sample(student, torch.randn(3, 1, 2, 2), y, steps=4, time_shift=2.0)
    assert torch.equal(torch.stack(seen)[:, 0], (grid[:-1].double() - grid[1:].double()).float())
    for sampler in ("heun", "stochastic"):
        seen.clear()
        sample(student, torch.randn(3, 1, 2, 2), y, steps=4, sampler=sampler, time_shift=2.0)
        assert all(not d.any() for d in seen)  # the flow
    assert student.guided(2.5).calls is student.calls
    with pytest.raises(ValueError, match="guidance scale"):
        student.guided(-1)


# ------------------------------------------------------------------------------ the guided teacher


def random_dit(cfg: DiTConfig, seed: int) -> DiT:
    """A DiT with every weight perturbed (a fresh DiT outputs exactly zero: adaLN-Zero)."""
    torch.manual_seed(seed)
    model = DiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def tiny_cfg() -> DiTConfig:
    return dit_config("DiT-T/4", image_size=28, in_channels=1, num_classes=10)


def test_teacher_matches_the_ensembles_guidance_per_row(tiny_cfg: DiTConfig) -> None:
    experts = [ModuleDenoiser(random_dit(tiny_cfg, s), 10) for s in (1, 2)]
    x = torch.randn(6, 1, 28, 28)
    t = torch.rand(6)
    y = torch.tensor([0, 3, 10, 5, 9, 1])  # 10 = null: its guided velocity is the unconditional one
    k = torch.tensor([0, 1, 1, 0, 1, 0])
    w = torch.tensor([1.0, 3.0, 2.0, 0.0, 7.5, 3.0])
    v = teacher_velocity(experts, x, t, y, partition_weights(k, 2), w)
    ens = Ensemble(experts, None, strategy="oracle")
    for i in range(6):
        ref = (
            ens.with_partition(k[i : i + 1])
            .guided(float(w[i]))
            .velocity(x[i : i + 1], t[i : i + 1], y[i : i + 1])
        )
        assert torch.allclose(v[i : i + 1], ref, atol=1e-5), i


# ------------------------------------------------------------------------------ the trainer


def write_expert(path: Path, cfg: DiTConfig, seed: int) -> str:
    model = random_dit(cfg, seed)
    tensors = {f"ema.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"model.{k}": v.clone() for k, v in model.state_dict().items()})
    return checkpoint.save(
        str(path),
        1,
        tensors,
        {"kind": "expert", "name": path.name, "arch": "DiT-T/4", "model": cfg.to_dict()},
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_cfg: DiTConfig) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("distill")
    write_partitions(root, 64)
    experts = [
        write_expert(root / "experts" / f"expert-{k}" / "checkpoints", tiny_cfg, 10 + k) for k in range(2)
    ]
    return root, experts


def job(root: Path, experts: list[str], output: Path, **train) -> DistillJobConfig:
    settings = dict(
        steps=6, batch_size=8, warmup_steps=2, checkpoint_every=1000, log_every=1, num_threads=1, seed=5
    )
    settings.update(train)
    return DistillJobConfig.model_validate(
        dict(
            name="student",
            output=str(output),
            experts=experts,
            data=dict(root=str(root), k=2),
            shortcut=dict(min_step=0.25),
            train=settings,
        )  # fmt: skip
    )


def test_trainer_resumes_exactly_and_the_checkpoint_loads_as_a_student(setup, tmp_path: Path) -> None:
    root, experts = setup
    full = train(job(root, experts, tmp_path / "a"), progress=False)
    assert full.step == 6 and all(math.isfinite(v) for v in full.losses)
    part = train(job(root, experts, tmp_path / "b"), progress=False, stop_after=3)
    assert part.interrupted and part.step == 3
    rest = train(job(root, experts, tmp_path / "b"), progress=False)
    assert rest.step == 6
    a = checkpoint.load(str(tmp_path / "a" / "checkpoints"))
    b = checkpoint.load(str(tmp_path / "b" / "checkpoints"))
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)  # bit for bit
    assert a.meta["kind"] == "student" and a.meta["model"]["guidance_embed"] and a.meta["model"]["step_embed"]
    assert a.meta["teacher"]["kind"] == "partition" and a.meta["experts"] == experts

    student = load_denoiser(str(tmp_path / "a" / "checkpoints"))
    assert isinstance(student, StudentDenoiser) and student.takes_step_size
    _, meta = load_model(str(tmp_path / "a" / "checkpoints"))
    assert meta["kind"] == "student"
    # Initialised from expert 0: at step 0 the student *is* expert 0's conditional velocity.
    zero = train(
        job(root, experts, tmp_path / "c", steps=1, lr=1e-12, warmup_steps=0, ema_decay=0.0), progress=False
    )
    assert zero.step == 1
    s0 = load_denoiser(str(tmp_path / "c" / "checkpoints"))
    e0 = load_denoiser(experts[0])
    x, t, y = torch.randn(3, 1, 28, 28), torch.rand(3), torch.tensor([1, 2, 3])
    assert torch.allclose(s0.velocity(x, t, y), e0.velocity(x, t, y), atol=1e-4)
    # Every path that takes a denoiser: the samplers (guided in one pass per step) and evaluation's generate.
    from ddm.expert.evaluate import generate

    imgs = generate(student, torch.tensor([0, 1, 2, 3]), (1, 28, 28), SampleConfig(steps=2, guidance=3.0),
                    generator=torch.Generator().manual_seed(0), batch_size=4)  # fmt: skip
    assert imgs.shape == (4, 1, 28, 28) and torch.isfinite(imgs).all()
    assert student.calls.total_rows == 8 and student.calls.total_batches == 2


def test_config_errors_name_the_field(setup, tmp_path: Path) -> None:
    from ddm.core.config import ConfigError, parse_config

    root, experts = setup
    base = dict(name="s", output=str(tmp_path), experts=experts, data=dict(root=str(root), k=2))
    with pytest.raises(ConfigError, match="experts"):
        parse_config(DistillJobConfig, {**base, "experts": experts[:1]})
    with pytest.raises(ConfigError, match="teacher"):
        parse_config(DistillJobConfig, {**base, "teacher": {"guidance_min": 4, "guidance_max": 2}})
    with pytest.raises(ConfigError, match="teacher"):
        parse_config(DistillJobConfig, {**base, "teacher": {"kind": "ensemble"}})
    with pytest.raises(ConfigError, match="min_step"):
        parse_config(DistillJobConfig, {**base, "shortcut": {"min_step": 0.3}})
    with pytest.raises(ValueError, match="arch to match"):
        train(
            parse_config(
                DistillJobConfig,
                {**base, "model": {"arch": "DiT-M/4"}, "train": {"steps": 1, "batch_size": 8}},
            ),
            progress=False,
        )


def test_a_meanflow_student_trains_and_loads(setup, tmp_path: Path) -> None:
    """shortcut.objective = "meanflow": the same network and checkpoint kind, trained with the teacher on
    every row and a jvp on the jump rows; the checkpoint records the objective and samples in one pass
    per step. A name outside the registry is refused, naming the field."""
    from ddm.core.config import ConfigError, parse_config

    root, experts = setup
    cfg = job(root, experts, tmp_path / "m", steps=2).model_dump()
    cfg["shortcut"] = {"objective": "meanflow", "min_step": 0.25}
    result = train(DistillJobConfig.model_validate(cfg), progress=False)
    assert result.step == 2 and all(math.isfinite(v) for v in result.losses)
    ckpt = checkpoint.load(str(tmp_path / "m" / "checkpoints"))
    assert ckpt.meta["shortcut"]["objective"] == "meanflow" and ckpt.meta["model"]["step_embed"]
    student = load_denoiser(str(tmp_path / "m" / "checkpoints"))
    x0 = sample(with_guidance(student, 3.0), torch.randn(2, 1, 28, 28), torch.tensor([0, 1]), steps=2)
    assert torch.isfinite(x0).all() and student.calls.total_rows == 4
    cfg["shortcut"] = {"objective": "consistency"}
    with pytest.raises(ConfigError, match="objective"):
        parse_config(DistillJobConfig, cfg)


def test_the_router_weighted_ensemble_as_teacher(setup, tmp_path: Path) -> None:
    from ddm.router.model import RouterNet, router_config

    root, experts = setup
    net = RouterNet(router_config("Router-XS/4", image_size=28, in_channels=1, num_classes=10, num_experts=2))
    state = net.state_dict()
    tensors = {
        **{f"model.{k}": v for k, v in state.items()},
        **{f"ema.{k}": v.clone() for k, v in state.items()},
    }
    router = checkpoint.save(
        str(tmp_path / "router"), 1, tensors, {"kind": "router", "model": net.config.to_dict()}
    )
    cfg = job(root, experts, tmp_path / "s", steps=2).model_dump()
    cfg["teacher"] = {"kind": "ensemble", "router": router, "strategy": "full"}
    result = train(DistillJobConfig.model_validate(cfg), progress=False)
    assert result.step == 2 and all(math.isfinite(v) for v in result.losses)
    assert checkpoint.load(str(tmp_path / "s" / "checkpoints")).meta["teacher"]["kind"] == "ensemble"


def test_a_registered_objective_is_a_choice_of_the_config() -> None:
    """The objectives come from one registry: a new entry validates as shortcut.objective (and so in the
    run's [distill.shortcut] and a job's config) with no other file touched; every entry declares
    whether it needs the teacher."""
    from ddm.router.distill_objectives import Objective

    assert OBJECTIVES.names() == ("shortcut", "meanflow")
    assert [e.teacher for e in OBJECTIVES] == [False, True]
    assert ShortcutConfig().objective == "shortcut"
    OBJECTIVES.add("echo", Objective(times=shortcut_times, target=lambda *a: a[6]), help="test", teacher=True)
    try:
        assert ShortcutConfig(objective="echo").objective == "echo"
    finally:
        OBJECTIVES.remove("echo")
    with pytest.raises(ValueError, match="echo"):
        ShortcutConfig(objective="echo")


@pytest.mark.slow
def test_a_meanflow_student_trained_from_the_analytic_teacher_jumps_along_the_flow() -> None:
    """bench/distill_objectives.py, MeanFlow only and short: an MLP trained from the exact Gaussian velocity
    by the trainer's own times and targets learns the average velocity, so 1, 2 and 4 Euler steps land
    near the exact ODE endpoint, several times closer than Euler on the exact velocity itself gets (the
    best a student without the step size could do). ~15 s quiet, ~50 s at load 20."""
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(repo / "bench/distill_objectives.py"), "--objectives", "meanflow", "--steps", "200"],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    for k, factor in ((1, 0.3), (2, 0.5), (4, 0.5)):
        rms = figures[f"rms_{k}step"]
        assert rms["meanflow"] < factor * rms["exact velocity"], (k, rms)
