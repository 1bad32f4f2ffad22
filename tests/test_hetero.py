"""Heterogeneous experts: a mixed ensemble (two DiT sizes, eps- and x0-prediction) trains, serves and
samples, and the router does not care what is behind each expert (docs/heterogeneous.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from grpc_fixtures import _randomise

from ddm.coordinator.config import load_run_config
from ddm.coordinator.stages import Experts
from ddm.core import checkpoint
from ddm.core.config import TrainConfig
from ddm.expert.config import DataConfig, ExpertJobConfig, ModelConfig
from ddm.expert.load import load_denoiser
from ddm.expert.sampling import sample
from ddm.expert.server import ExpertServer
from ddm.expert.trainer import train
from ddm.router.client import RouterClient
from ddm.router.ensemble import Ensemble
from ddm.router.model import RouterConfig, RouterNet, load_router
from ddm.router.server import RouterServer, initial_noise

MIXED = {"expert-0": ("DiT-T/4", "eps"), "expert-1": ("DiT-M/4", "x0")}


def test_the_run_config_gives_each_expert_its_override() -> None:
    cfg = load_run_config(
        "configs/tiny.toml",
        {f"experts.overrides.{n}.model": {"arch": a, "objective": o} for n, (a, o) in MIXED.items()},
    )
    jobs = {n: Experts().expert_job(cfg, n) for n in MIXED}
    assert {n: (j.model.arch, j.model.objective) for n, j in jobs.items()} == MIXED
    plain = load_run_config("configs/tiny.toml")
    assert Experts().expert_job(plain, "expert-1").model == plain.experts.model  # no override: unchanged


def _router(root: Path) -> str:
    cfg = RouterConfig(image_size=28, patch_size=7, hidden_size=32, depth=1, num_heads=2, num_experts=2)
    net = RouterNet(cfg)
    _randomise(net, seed=4, std=0.1)  # mild logits: both experts are routed to
    state = net.state_dict()
    tensors = {
        **{f"model.{k}": v for k, v in state.items()},
        **{f"ema.{k}": v.clone() for k, v in state.items()},
    }
    directory = str(root / "router" / "checkpoints")
    checkpoint.save(directory, 1, tensors, {"kind": "router", "name": "router", "model": cfg.to_dict()})
    return directory


@pytest.mark.slow  # ~50 s here: two trainings and three servers
def test_a_mixed_ensemble_trains_serves_and_samples(tmp_path: Path) -> None:
    train_cfg = TrainConfig(steps=2, batch_size=4, warmup_steps=1, checkpoint_every=2, num_threads=1)
    dirs = []
    for k, (name, (arch, objective)) in enumerate(MIXED.items()):
        job = ExpertJobConfig(
            name=name,
            output=str(tmp_path / "experts" / name),
            data=DataConfig(limit=8 + k),
            model=ModelConfig(arch=arch, objective=objective),
            train=train_cfg.model_copy(update={"seed": k}),
        )
        result = train(job, progress=False)
        assert result.step == 2 and torch.isfinite(torch.tensor(result.losses)).all()
        meta = checkpoint.load(result.checkpoint_url).meta
        assert (meta["arch"], meta["objective"]) == (arch, objective)  # recorded for serving
        dirs.append(str(tmp_path / "experts" / name / "checkpoints"))
    router_dir = _router(tmp_path)

    experts = [ExpertServer(d).start(timeout=60) for d in dirs]
    try:
        router = RouterServer(router_dir, [e.target for e in experts]).start(timeout=60)
        try:
            with RouterClient(router.target) as client:
                listed = {s.name: (s.info.arch, s.info.objective) for s in client.list_experts()}
                assert listed == MIXED  # Info says what is behind each expert; the router mixes them alike
                y = torch.tensor([0, 3, 7, 10])  # 10 = unconditional
                images, info = client.sample(
                    4, y, steps=3, guidance=2.0, strategy="full", seed=5, include_float=True
                )
        finally:
            router.stop(0)
    finally:
        for e in experts:
            e.stop(0)

    # the same ensemble in process, converting at each expert's denoiser boundary, gives the same images
    ensemble = Ensemble([load_denoiser(d) for d in dirs], load_router(router_dir), strategy="full")
    assert [e.objective.name for e in ensemble.experts] == ["eps", "x0"]
    noise, gen = initial_noise(4, (1, 28, 28), 5)
    want = sample(ensemble.guided(2.0), noise, y, steps=3, sampler="euler", generator=gen)
    assert images.shape == (4, 1, 28, 28) and torch.isfinite(info.samples).all()
    torch.testing.assert_close(info.samples, want, atol=1e-4, rtol=1e-4)
    assert min(info.expert_rows.values()) > 0  # both experts answered


def test_a_student_is_not_initialised_from_an_eps_expert(tmp_path: Path) -> None:
    """Distillation's model.init = 'expert' copies expert 0's weights into a velocity student: refused
    for an expert predicting eps or x0 (no head start, a wrong one)."""
    from ddm.expert.model import DiT, dit_config
    from ddm.router.distill import build_student, student_config
    from ddm.router.distill_config import DistillJobConfig

    cfg = dit_config("DiT-T/4", image_size=28, in_channels=1, num_classes=10)
    state = DiT(cfg).state_dict()
    urls = [
        checkpoint.save(
            str(tmp_path / f"expert-{k}"),
            1,
            {f"ema.{n}": v for n, v in state.items()},
            {
                "kind": "expert",
                "name": f"expert-{k}",
                "arch": "DiT-T/4",
                "model": cfg.to_dict(),
                "objective": objective,
            },
        )  # fmt: skip
        for k, objective in enumerate(("eps", "velocity"))
    ]
    job = DistillJobConfig.model_validate(
        dict(name="student", output=str(tmp_path / "s"), experts=urls, data=dict(root=str(tmp_path), k=2))
    )
    with pytest.raises(ValueError, match="predicts eps .*set model.init = 'random'"):
        build_student(job, student_config(job, (1, 28, 28), 10))
    velocity_first = job.model_copy(update={"experts": urls[::-1]})
    assert build_student(velocity_first, student_config(job, (1, 28, 28), 10)) is not None


def test_resuming_with_another_objective_is_refused(tmp_path: Path) -> None:
    job = ExpertJobConfig(
        name="expert-0",
        output=str(tmp_path / "expert-0"),
        data=DataConfig(limit=4),
        model=ModelConfig(objective="eps"),
        train=TrainConfig(steps=2, batch_size=2, warmup_steps=1, checkpoint_every=1, num_threads=1),
    )
    assert train(job, progress=False, stop_after=1).step == 1
    changed = job.model_copy(update={"model": ModelConfig(objective="x0")})
    with pytest.raises(ValueError, match="trained with objective 'eps', but model.objective is 'x0'"):
        train(changed, progress=False)
    assert train(job, progress=False).step == 2  # the same objective resumes
