"""The distilled student behind the router's Sample API (SampleRequest.model = "student") on 127.0.0.1:
the images equal the in-process student's for the same seed, one pass per step and no expert call;
a router without a student refuses the field by name; ``ddm sample`` samples a student checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_fixtures import EXPERT_CFG, _randomise

from ddm.coordinator.cli import main as ddm_main
from ddm.core import checkpoint
from ddm.expert.guidance import with_guidance
from ddm.expert.load import load_denoiser
from ddm.expert.model import DiT
from ddm.expert.sampling import sample
from ddm.expert.server import ExpertServer
from ddm.expert.student import StudentDenoiser
from ddm.router.client import RouterClient
from ddm.router.server import RouterServer, initial_noise

STUDENT_CFG = EXPERT_CFG.__class__(**{**EXPERT_CFG.to_dict(), "guidance_embed": True, "step_embed": True})


def student_checkpoint(root: Path) -> str:
    model = DiT(STUDENT_CFG)
    _randomise(model, seed=7)
    state = model.state_dict()
    tensors = {
        **{f"model.{n}": v for n, v in state.items()},
        **{f"ema.{n}": v.clone() for n, v in state.items()},
    }
    directory = str(root / "distill" / "checkpoints")
    checkpoint.save(
        directory, 5, tensors, {"kind": "student", "name": "student", "model": STUDENT_CFG.to_dict()}
    )
    return directory


def expert_rows(server: ExpertServer) -> float | None:
    """Rows the expert server has computed (its Prometheus counter)."""
    m = server.metrics
    return m.registry.get_sample_value("ddm_expert_rows_total", {"expert": m.name})


@pytest.fixture(scope="module")
def run_root(served_root: Path) -> Path:
    student_checkpoint(served_root)  # the module's own copy of the shared two-expert root, plus a student
    return served_root


@pytest.fixture(scope="module")
def stack(run_root: Path) -> Iterator[tuple[RouterServer, list[ExpertServer]]]:
    experts = [
        ExpertServer(str(run_root / f"experts/expert-{k}/checkpoints")).start(timeout=30) for k in range(2)
    ]
    router = RouterServer(
        str(run_root / "router/checkpoints"),
        [e.target for e in experts],
        student=str(run_root / "distill/checkpoints"),
    ).start(timeout=30)
    yield router, experts
    router.stop(0)
    for e in experts:
        e.stop(0)


@pytest.mark.parametrize("steps, sampler, guidance", [(1, "euler", 3.0), (4, "euler", 2.0), (3, "heun", 1.5)])
def test_student_through_the_router_equals_the_in_process_student(
    stack, run_root: Path, steps: int, sampler: str, guidance: float
) -> None:
    router, experts = stack
    y = torch.tensor([0, 1, 2, 3, 1])
    with RouterClient(router.target) as client:
        assert list(client.info().models) == ["ensemble", "student"]
        before = [expert_rows(e) for e in experts]
        images, info = client.sample(
            5, y, guidance=guidance, steps=steps, sampler=sampler, seed=3, model="student", include_float=True
        )
    student = load_denoiser(str(run_root / "distill/checkpoints"))
    assert isinstance(student, StudentDenoiser)
    noise, gen = initial_noise(5, (1, 8, 8), 3)
    want = sample(with_guidance(student, guidance), noise, y,
                  steps=steps, sampler=sampler, generator=gen)  # fmt: skip
    torch.testing.assert_close(info.samples, want, atol=1e-5, rtol=1e-5)
    passes = 2 * steps - 1 if sampler == "heun" else steps
    assert info.expert_calls == {"student": passes} and info.expert_rows == {"student": 5 * passes}
    assert [expert_rows(e) for e in experts] == before  # no expert was asked
    assert images.shape == (5, 1, 8, 8)


def test_a_router_without_a_student_refuses_the_model_by_name(run_root: Path) -> None:
    experts = [
        ExpertServer(str(run_root / f"experts/expert-{k}/checkpoints")).start(timeout=30) for k in range(2)
    ]
    router = RouterServer(str(run_root / "router/checkpoints"), [e.target for e in experts]).start(timeout=30)
    try:
        with RouterClient(router.target) as client:
            assert list(client.info().models) == ["ensemble"]
            with pytest.raises(grpc.RpcError) as err:
                client.sample(2, model="student", steps=2)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "model" in err.value.details()
            _, info = client.sample(2, model="ensemble", steps=2, seed=1)
            assert set(info.expert_calls) == {"expert-0", "expert-1"}
    finally:
        router.stop(0)
        for e in experts:
            e.stop(0)


def test_ddm_sample_of_a_student_checkpoint_and_through_the_router(
    stack, run_root: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "local.png"
    ckpt = str(run_root / "distill/checkpoints")
    assert (
        ddm_main(
            ["sample", "--checkpoint", ckpt, "--n", "4", "--steps", "2", "--guidance", "3", "--out", str(out)]
        )
        == 0
    )
    assert out.stat().st_size > 0
    remote = tmp_path / "remote.png"
    args = [
        "sample",
        "--router",
        stack[0].target,
        "--model",
        "student",
        "--n",
        "4",
        "--steps",
        "2",
        "--out",
        str(remote),
    ]
    assert ddm_main(args) == 0
    assert "student 2" in capsys.readouterr().out and remote.stat().st_size > 0
