"""The expert trainer (expert/trainer.py, ema.py, metrics_log.py, train.py): exact resume, learning,
the components' math, signals, and the job entry point. Tiny DiT-T/4 runs on real Fashion-MNIST."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from train_jobs import ENV, interrupt_training, train_command

from ddm.core import checkpoint, heartbeat
from ddm.core.distributed import Distributed
from ddm.core.ema import EMA, ema_decay_at
from ddm.core.metrics_log import read_rows
from ddm.core.schedule import BatchOrder, derive_seed, lr_at
from ddm.expert.config import ExpertJobConfig
from ddm.expert.load import load_model
from ddm.expert.trainer import ExpertTrainer, drop_labels, train
from ddm.train import EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_OK, main

REPO = Path(__file__).resolve().parents[1]


def tiny_job(output: Path | str, *, limit: int = 256, **train: Any) -> ExpertJobConfig:
    settings: dict[str, Any] = dict(
        steps=8, batch_size=16, warmup_steps=2, checkpoint_every=1000, log_every=1, num_threads=1, seed=3
    )
    settings.update(train)
    return ExpertJobConfig.model_validate(
        dict(
            name="tiny",
            output=str(output),
            data=dict(limit=limit),
            model=dict(arch="DiT-T/4"),
            train=settings,
        )
    )


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return repr(value)


def job_toml(job: ExpertJobConfig) -> str:
    """The job as TOML (what the coordinator writes for each expert)."""
    lines = [
        f"kind = {toml_value(job.kind)}",
        f"name = {toml_value(job.name)}",
        f"output = {toml_value(job.output)}",
    ]
    for section in ("data", "model", "train"):
        lines.append(f"[{section}]")
        lines += [
            f"{k} = {toml_value(v)}" for k, v in getattr(job, section).model_dump().items() if v is not None
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# components


def test_drop_labels_uses_the_null_class_at_the_configured_rate() -> None:
    g = torch.Generator().manual_seed(0)
    n, null = 200_000, 10
    y = torch.randint(0, 10, (n,), generator=g)
    u = torch.rand(n, generator=g)
    out = drop_labels(y, u, 0.1, null)
    dropped = out == null
    # Binomial(n, 0.1): std of the rate = sqrt(0.1 * 0.9 / n) ~ 0.00067; allow 5 sigma.
    assert abs(dropped.float().mean().item() - 0.1) < 0.0034
    assert torch.equal(out[~dropped], y[~dropped])  # the rest are untouched
    assert torch.equal(dropped, u < 0.1)  # exactly the draws below p
    assert torch.equal(drop_labels(y, u, 0.0, null), y)
    assert bool((drop_labels(y, u, 1.0, null) == null).all())


def test_lr_warms_up_linearly_then_stays_constant() -> None:
    tc = tiny_job("unused", lr=1e-3, warmup_steps=4).train
    assert [lr_at(s, tc) for s in (1, 2, 3, 4, 5, 1000)] == pytest.approx(
        [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3]
    )
    assert lr_at(1, tiny_job("unused", warmup_steps=0).train) == tiny_job("unused").train.lr


def test_ema_is_the_bias_corrected_exponential_average_of_the_weights() -> None:
    # Closed form: after steps 1..T with weights w_1..w_T, ema_T = sum_i d^(T-i) (1-d) w_i / (1 - d^T).
    d, steps = 0.9, 7
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=d)
    history = []
    with torch.no_grad():
        for step in range(1, steps + 1):
            for p in model.parameters():
                p.normal_()
            history.append([p.detach().clone() for p in model.parameters()])
            ema.update(step)
            if step == 1:  # the initial weights get no weight at all
                for e, m in zip(ema.module.parameters(), model.parameters(), strict=True):
                    assert torch.equal(e, m)
    norm = 1 - d**steps
    for k, e in enumerate(ema.module.parameters()):
        expected = sum(d ** (steps - i) * (1 - d) * history[i - 1][k] for i in range(1, steps + 1)) / norm
        torch.testing.assert_close(e, expected, rtol=1e-5, atol=1e-6)
        assert not e.requires_grad
    assert ema_decay_at(1, 0.999) == 0.0 and ema_decay_at(10**6, 0.999) == pytest.approx(0.999)


def test_batch_order_is_a_permutation_per_epoch_and_a_function_of_the_step() -> None:
    order = BatchOrder(50, 16, seed=7)  # 3 steps per epoch, 2 examples dropped each epoch
    epoch0 = torch.cat([order.indices(s) for s in (1, 2, 3)])
    epoch1 = torch.cat([order.indices(s) for s in (4, 5, 6)])
    assert len(set(epoch0.tolist())) == 48 and len(set(epoch1.tolist())) == 48
    assert not torch.equal(epoch0, epoch1)  # reshuffled
    fresh = BatchOrder(50, 16, seed=7)  # what a resumed process builds
    assert torch.equal(fresh.indices(5), order.indices(5))
    assert not torch.equal(BatchOrder(50, 16, seed=8).indices(5), order.indices(5))
    assert derive_seed(0, "step", 1) != derive_seed(0, "data", 1)
    with pytest.raises(ValueError, match="batch_size"):
        BatchOrder(10, 16, seed=0)


def test_batch_size_must_divide_by_the_world_size(tmp_path: Path) -> None:
    trainer = ExpertTrainer(tiny_job(tmp_path), progress=False)
    trainer.d = Distributed(rank=0, world_size=3, local_rank=0, device=torch.device("cpu"), owns_group=False)
    trainer.device = trainer.d.device
    with pytest.raises(ValueError, match="batch_size 16 does not divide by the 3"):
        trainer._run()


# ---------------------------------------------------------------------------------------------------
# whole runs


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path: Path) -> None:
    # limit 24 / batch 8 = 3 steps per epoch, so the run crosses epochs and resumes mid-epoch.
    settings = dict(steps=8, batch_size=8, checkpoint_every=3, log_every=2, limit=24)
    a = train(tiny_job(tmp_path / "a", **settings), progress=False)
    b1 = train(tiny_job(tmp_path / "b", **settings), stop_after=4, progress=False)
    assert b1.interrupted and b1.step == 4 and b1.checkpoint_url.endswith("step-00000004.safetensors")
    b2 = train(tiny_job(tmp_path / "b", **settings), progress=False)
    assert not b2.interrupted and b2.step == 8 and b2.images_seen == 4 * 8

    assert len(a.losses) == 8
    assert b1.losses + b2.losses == a.losses  # exact float equality, step by step
    ta = checkpoint.load(str(tmp_path / "a" / "checkpoints")).tensors
    tb = checkpoint.load(str(tmp_path / "b" / "checkpoints")).tensors
    assert ta.keys() == tb.keys()
    assert any(k.startswith("ema.") for k in ta) and any(k.startswith("optim.") for k in ta)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k  # model, EMA and optimizer state all bit-identical

    rows_a = read_rows(str(tmp_path / "a" / "metrics.csv"))
    rows_b = read_rows(str(tmp_path / "b" / "metrics.csv"))
    assert [r["step"] for r in rows_b] == [2, 3, 4, 6, 8]  # log_every, checkpoints and the end; no duplicates
    assert [(r["step"], r["loss"]) for r in rows_b] == [(r["step"], r["loss"]) for r in rows_a]
    assert (tmp_path / "b" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert heartbeat.read(str(tmp_path / "b"))["state"] == "done"

    again = train(tiny_job(tmp_path / "b", **settings), progress=False)  # a finished job is a no-op
    assert again.step == 8 and again.images_seen == 0 and again.final_loss == a.losses[-1]


def test_loss_goes_down_on_fashion_mnist(tmp_path: Path) -> None:
    # At step 1 the adaLN-Zero DiT predicts v = 0, so the loss is E|eps - x_0|^2 (about 1.4 here); a
    # network that learns anything about the data lowers it. Seeds 0-2 gave last/first ~ 0.5.
    result = train(
        tiny_job(tmp_path, steps=30, batch_size=16, lr=3e-3, warmup_steps=3, limit=2048, log_every=10),
        progress=False,
    )
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert all(math.isfinite(v) for v in result.losses)
    assert last < 0.7 * first, (first, last)


def test_bf16_autocast_trains(tmp_path: Path) -> None:
    result = train(tiny_job(tmp_path, steps=3, precision="bf16"), progress=False)
    assert len(result.losses) == 3 and all(math.isfinite(v) for v in result.losses)
    model, meta = load_model(result.checkpoint_url)
    assert meta["train"]["precision"] == "bf16" and next(model.parameters()).dtype == torch.float32


def test_resume_false_starts_over(tmp_path: Path) -> None:
    first = train(tiny_job(tmp_path, steps=4, checkpoint_every=2), progress=False)
    second = train(tiny_job(tmp_path, steps=2), resume=False, progress=False)
    assert second.step == 2 and second.losses == first.losses[:2]  # same seed, from scratch
    assert checkpoint.list_steps(str(tmp_path / "checkpoints")) == [2]  # the old run's step 4 is gone
    assert [r["step"] for r in read_rows(str(tmp_path / "metrics.csv"))] == [1, 2]


def test_output_may_be_any_fsspec_url() -> None:
    """The run root may be object storage; fsspec's in-memory filesystem stands in for s3:// here."""
    root = f"memory://ddm-test-{os.getpid()}/expert"
    result = train(tiny_job(root, steps=2, checkpoint_every=1), progress=False)
    assert result.checkpoint_url == f"{root}/checkpoints/step-00000002.safetensors"
    assert checkpoint.list_steps(f"{root}/checkpoints") == [1, 2]
    assert [r["step"] for r in read_rows(f"{root}/metrics.csv")] == [1, 2]
    _, meta = load_model(f"{root}/checkpoints")
    assert meta["step"] == 2 and heartbeat.read(root)["state"] == "done"


# ---------------------------------------------------------------------------------------------------
# the job entry point


def test_entry_point_reports_config_errors_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "job.toml"
    bad.write_text('kind = "expert"\nname = "x"\n[train]\nstpes = 3\n')
    assert main(["--config", str(bad)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert str(bad) in err and "train.stpes" in err
    assert main(["--config", str(tmp_path / "missing.toml")]) == EXIT_CONFIG
    assert "not found" in capsys.readouterr().err
    good = tmp_path / "good.toml"
    good.write_text(job_toml(tiny_job(tmp_path / "out")))
    assert main(["--config", str(good), "--steps", "0"]) == EXIT_CONFIG  # overrides are validated too
    assert "train.steps" in capsys.readouterr().err


def test_entry_point_overrides_output_and_steps(tmp_path: Path) -> None:
    cfg = tmp_path / "job.toml"
    cfg.write_text(job_toml(tiny_job(tmp_path / "ignored", steps=50)))
    out = tmp_path / "elsewhere"
    assert main(["--config", str(cfg), "--output", str(out), "--steps", "2", "--no-progress"]) == EXIT_OK
    assert checkpoint.list_steps(str(out / "checkpoints")) == [2]
    assert not (tmp_path / "ignored").exists()


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_entry_point_takes_the_device_policy_and_says_what_it_chose(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], device: str
) -> None:
    cfg = tmp_path / "job.toml"
    cfg.write_text(job_toml(tiny_job(tmp_path / "out", steps=1)))
    assert main(["--config", str(cfg), "--device", device, "--no-progress"]) == EXIT_OK
    err = capsys.readouterr().err
    why = "; no CUDA device" if device == "auto" else ""
    assert "ddm: tiny (expert DiT-T/4, " in err and f"on cpu (1 threads) (device = {device!r}{why})" in err, (
        err
    )
    _, meta = load_model(str(tmp_path / "out" / "checkpoints"))
    assert meta["train"]["device"] == device


def test_entry_point_refuses_cuda_without_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "job.toml"
    cfg.write_text(job_toml(tiny_job(tmp_path / "out", steps=1)))
    assert main(["--config", str(cfg), "--device", "cuda", "--no-progress"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "train.device = 'cuda' but torch sees no CUDA device" in err and "'cpu' or 'auto'" in err
    with pytest.raises(SystemExit):  # not a device at all: argparse names the choices
        main(["--config", str(cfg), "--device", "gpu0"])
    assert "'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'" in capsys.readouterr().err


def test_entry_point_rejects_an_unknown_job_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "job.toml"
    cfg.write_text('kind = "teacher"\nname = "x"\noutput = "y"\n')
    assert main(["--config", str(cfg)]) == EXIT_CONFIG
    assert (
        "kind = 'teacher' is not a job kind; set kind to one of 'expert', 'router', 'student'"
        in capsys.readouterr().err
    )
    cfg.write_text('name = "x"\noutput = "y"\n')
    assert main(["--config", str(cfg)]) == EXIT_CONFIG
    assert "has no kind; set kind to one of" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_job_resumes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = tmp_path / "job.toml"
    cfg.write_text(job_toml(tiny_job(out, steps=100_000, checkpoint_every=100_000, log_every=1)))
    code, err = interrupt_training(cfg, out)
    assert code == EXIT_INTERRUPTED, err
    assert "rerun to resume" in err
    url = checkpoint.latest(str(out / "checkpoints"))
    _, meta = load_model(url)
    stopped = meta["step"]
    assert 2 <= stopped < 100_000 and heartbeat.read(str(out))["state"] == "stopped"

    done = subprocess.run(
        train_command(cfg) + ["--steps", str(stopped + 2)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == EXIT_OK, done.stderr
    assert checkpoint.load(str(out / "checkpoints")).step == stopped + 2
    assert [r["step"] for r in read_rows(str(out / "metrics.csv"))] == list(range(1, stopped + 3))
