"""The router trainer (router/trainer.py, config.py, train.py) on real Fashion-MNIST partition shards:
it learns to route, writes accuracy vs t, resumes bit for bit, stops on SIGTERM with a checkpoint, and
its checkpoint alone rebuilds the router."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from train_jobs import ENV, interrupt_training, train_command

from ddm.core import checkpoint, heartbeat
from ddm.core.checkpoint import CheckpointError
from ddm.core.metrics_log import read_rows
from ddm.expert.data import load_fashion_mnist
from ddm.expert.shards import write_shards
from ddm.router.config import RouterJobConfig
from ddm.router.model import RouterNet, load_router, load_router_checkpoint
from ddm.router.trainer import accuracy_vs_t, read_partitions, split_holdout, train
from ddm.train import EXIT_CONFIG, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, main

REPO = Path(__file__).resolve().parents[1]


def write_partitions(root: Path, n: int) -> list[int]:
    """Partition 0 = classes 0-4, partition 1 = classes 5-9, from the first n training images."""
    ds = load_fashion_mnist(limit=n)
    sizes = []
    for k, sel in enumerate((ds.labels < 5, ds.labels >= 5)):
        part = ds.subset(sel)
        write_shards(
            str(root / "partitions" / f"expert-{k}"),
            part.images,
            part.labels,
            part.ids,
            num_classes=10,
            shard_size=512,
        )
        sizes.append(len(part))
    return sizes


def job(
    root: Path, output: Path, *, data: dict | None = None, evaluation: dict | None = None, **train: Any
) -> RouterJobConfig:
    settings: dict[str, Any] = dict(
        steps=8, batch_size=8, warmup_steps=2, checkpoint_every=1000, log_every=1, num_threads=1, seed=3
    )
    settings.update(train)
    return RouterJobConfig.model_validate(
        dict(
            name="router",
            output=str(output),
            data=dict(root=str(root), k=2, **(data or {})),
            train=settings,
            eval={"samples_per_bin": 20, **(evaluation or {})},
        )
    )


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("small")
    write_partitions(root, 96)
    return root


# ---------------------------------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[RouterJobConfig, Any, list[int]]:
    """~100 steps on 2,000 real images (two partitions by class group): the run several tests inspect."""
    root = tmp_path_factory.mktemp("fmnist")
    sizes = write_partitions(root, 2000)
    cfg = job(
        root,
        root / "router",
        data=dict(holdout=0.2),
        evaluation=dict(samples_per_bin=100),
        steps=100,
        batch_size=32,
        lr=3e-3,
        warmup_steps=10,
        label_dropout=0.5,  # half the steps train the unconditional (image-only) routing
        ema_decay=0.9,
        log_every=10,
        checkpoint_every=50,
    )
    return cfg, train(cfg, progress=False), sizes


def test_router_learns_to_route_real_partitions(trained) -> None:
    cfg, result, sizes = trained
    out = Path(cfg.output)
    report = json.loads((out / "accuracy_vs_t.json").read_text())
    assert report == result.evaluation and report["step"] == 100 and report["bins"] == 10
    assert (out / "accuracy_vs_t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cond, uncond = report["conditional"], report["unconditional"]
    # Knowing the class makes routing trivial here (classes 0-4 vs 5-9): right at every t.
    assert report["class_prior_accuracy"] == 1.0 and min(cond) > 0.95, cond
    # From the image alone: right most of the time at small t (measured ~0.82 after 100 steps), and
    # no better than the larger partition's share (~0.5) once x_t is nearly pure noise.
    assert uncond[0] > 0.7, uncond
    assert abs(uncond[-1] - report["prior_accuracy"]) < 0.15 and uncond[-1] < uncond[0] - 0.15, uncond
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.75 * first, (first, last)  # starts at log 2 ~ 0.69
    history = json.loads((out / "eval.json").read_text())
    assert [r["step"] for r in history] == [100] and history[-1]["unconditional"] == pytest.approx(
        sum(uncond) / 10
    )
    assert [r["step"] for r in read_rows(str(out / "metrics.csv"))] == list(range(10, 101, 10))
    assert heartbeat.read(str(out))["state"] == "done"

    meta = checkpoint.load(str(out / "checkpoints")).meta
    assert meta["kind"] == "router" and meta["step"] == 100 and meta["arch"] == "Router-T/4"
    assert meta["model"]["num_experts"] == 2 and meta["model"]["num_classes"] == 10
    assert meta["partitions"] == [str(Path(cfg.data.root) / "partitions" / f"expert-{k}") for k in range(2)]
    assert [a + b for a, b in zip(meta["train_counts"], meta["heldout_counts"])] == sizes
    assert meta["heldout_counts"] == report["heldout_counts"] == [round(0.2 * s) for s in sizes]
    assert meta["train"]["time_sampling"] == "uniform"  # the router default, not the expert's logit-normal


def test_load_router_rebuilds_the_evaluated_router(trained) -> None:
    cfg, result, _ = trained
    url = str(Path(cfg.output) / "checkpoints")
    router, meta = load_router_checkpoint(url)
    assert isinstance(router, RouterNet) and not router.training and meta["url"] == result.checkpoint_url
    assert not any(p.requires_grad for p in router.parameters())
    ema = checkpoint.load(url).prefixed("ema")
    for name, value in router.state_dict().items():
        assert torch.equal(value, ema[name]), name
    # Re-evaluating the loaded router on the same held-out split reproduces the report exactly.
    data = read_partitions(cfg.data.urls())
    _, heldout = split_holdout(data, cfg.data.holdout, cfg.train.seed)
    again = accuracy_vs_t(router, heldout, bins=10, samples_per_bin=100, seed=cfg.train.seed, batch_size=64)
    assert again["unconditional"] == result.evaluation["unconditional"]
    assert again["conditional"] == result.evaluation["conditional"]
    raw = load_router(url, ema=False)
    assert any(not torch.equal(a, b) for a, b in zip(raw.parameters(), router.parameters()))


def test_load_router_refuses_other_checkpoints(tmp_path: Path) -> None:
    checkpoint.save(str(tmp_path / "expert"), 1, {"model.w": torch.zeros(1)}, {"kind": "expert", "model": {}})
    with pytest.raises(CheckpointError, match="not a router checkpoint"):
        load_router(str(tmp_path / "expert"))
    with pytest.raises(FileNotFoundError):
        load_router(str(tmp_path / "nothing"))


# ---------------------------------------------------------------------------------- data handling


def test_holdout_split_is_seeded_disjoint_and_per_partition(small_root: Path) -> None:
    data = read_partitions([str(small_root / "partitions" / f"expert-{k}") for k in range(2)])
    assert data.num_partitions == 2 and len(data) == 96 and data.dataset.num_classes == 10
    assert torch.equal(
        data.partition, (data.dataset.labels >= 5).long().sort(stable=True).values
    )  # expert-0 first
    train_a, held_a = split_holdout(data, 0.25, seed=1)
    _, held_b = split_holdout(data, 0.25, seed=1)
    _, held_c = split_holdout(data, 0.25, seed=2)
    assert torch.equal(held_a.dataset.ids, held_b.dataset.ids) and not torch.equal(
        held_a.dataset.ids, held_c.dataset.ids
    )
    assert set(train_a.dataset.ids.tolist()).isdisjoint(held_a.dataset.ids.tolist())
    assert len(train_a) + len(held_a) == 96
    assert held_a.counts() == [round(0.25 * n) for n in data.counts()]
    with pytest.raises(ValueError, match="lower data.holdout"):
        split_holdout(data.subset(torch.tensor([0, 95])), 0.5, seed=0)  # one example per partition


def test_partitions_must_share_an_image_shape(small_root: Path, tmp_path: Path) -> None:
    odd = tmp_path / "odd"
    write_shards(
        str(odd),
        torch.zeros(4, 1, 14, 14, dtype=torch.uint8),
        torch.zeros(4, dtype=torch.long),
        torch.arange(4),
        num_classes=10,
    )
    with pytest.raises(ValueError, match=r"shape \[1, 14, 14\].*one image shape"):
        read_partitions([str(small_root / "partitions" / "expert-0"), str(odd)])


def test_too_few_classes_in_the_model_is_an_error(small_root: Path, tmp_path: Path) -> None:
    cfg = RouterJobConfig.model_validate(
        {**job(small_root, tmp_path).model_dump(), "model": {"num_classes": 5}}
    )
    with pytest.raises(ValueError, match="model.num_classes is 5"):
        train(cfg, progress=False)


def test_an_expert_output_is_not_resumed_as_a_router(small_root: Path, tmp_path: Path) -> None:
    checkpoint.save(
        str(tmp_path / "checkpoints"), 2, {"model.w": torch.zeros(1)}, {"kind": "expert", "model": {}}
    )
    with pytest.raises(ValueError, match="a 'expert' checkpoint, not 'router'"):
        train(job(small_root, tmp_path), progress=False)


# ------------------------------------------------------------------------------- resume and signals


def test_resume_is_bit_identical_to_an_uninterrupted_run(small_root: Path, tmp_path: Path) -> None:
    # 10 images per partition, 1 of each held out: 18 to train on, 2 steps of 8 per epoch, so the run
    # crosses epochs and the resume (after step 5) lands mid-epoch.
    settings = dict(
        steps=8,
        batch_size=8,
        checkpoint_every=3,
        log_every=2,
        data=dict(limit=10, holdout=0.1),
        evaluation=dict(every=4),
    )
    a = train(job(small_root, tmp_path / "a", **settings), progress=False)
    b1 = train(job(small_root, tmp_path / "b", **settings), stop_after=5, progress=False)
    assert b1.interrupted and b1.step == 5 and b1.evaluation["step"] == 4  # eval.every = 4
    b2 = train(job(small_root, tmp_path / "b", **settings), progress=False)
    assert not b2.interrupted and b2.step == 8 and b2.images_seen == 3 * 8
    assert b1.losses + b2.losses == a.losses and len(a.losses) == 8  # exact, step by step
    ta = checkpoint.load(str(tmp_path / "a" / "checkpoints")).tensors
    tb = checkpoint.load(str(tmp_path / "b" / "checkpoints")).tensors
    assert (
        ta.keys() == tb.keys()
        and any(k.startswith("optim.") for k in ta)
        and any(k.startswith("ema.") for k in ta)
    )
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert b2.evaluation == a.evaluation  # the same EMA router evaluated on the same draws
    history = [json.loads((tmp_path / run / "eval.json").read_text()) for run in ("a", "b")]
    assert history[0] == history[1] and [r["step"] for r in history[1]] == [
        4,
        8,
    ]  # eval.every = 4, no duplicates
    rows = read_rows(str(tmp_path / "b" / "metrics.csv"))
    assert [r["step"] for r in rows] == [2, 3, 4, 5, 6, 8]
    again = train(job(small_root, tmp_path / "b", **settings), progress=False)  # finished: a no-op
    assert again.step == 8 and again.images_seen == 0 and again.evaluation is None


def test_sigterm_saves_a_checkpoint_and_stops(small_root: Path, tmp_path: Path) -> None:
    cfg = job(small_root, tmp_path, steps=50)

    def on_step(step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, handled by the trainer's StopSignal

    before = signal.getsignal(signal.SIGTERM)  # not always SIG_DFL: TorchX's local scheduler installs one
    result = train(cfg, progress=False, on_step=on_step)
    assert result.interrupted and result.step == 4  # the loop checks between steps: step 4 was under way
    assert checkpoint.load(str(tmp_path / "checkpoints")).step == 4
    assert heartbeat.read(str(tmp_path))["state"] == "stopped"
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is restored


# ---------------------------------------------------------------------------------- entry point


def toml(cfg: RouterJobConfig) -> str:
    t = cfg.train
    return (
        f'kind = "router"\nname = "{cfg.name}"\noutput = "{cfg.output}"\n'
        f'[data]\nroot = "{cfg.data.root}"\nk = {cfg.data.k}\n'
        f'[model]\narch = "{cfg.model.arch}"\n'
        f"[train]\nsteps = {t.steps}\nbatch_size = {t.batch_size}\nwarmup_steps = {t.warmup_steps}\n"
        f"num_threads = 1\nseed = {t.seed}\nlog_every = 1\n"
        f"[eval]\nsamples_per_bin = 10\nbins = 4\n"
    )


def test_entry_point_trains_and_reports(
    small_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.toml"
    path.write_text(toml(job(small_root, tmp_path / "ignored", steps=50)))
    out = tmp_path / "out"
    assert main(["--config", str(path), "--output", str(out), "--steps", "2", "--no-progress"]) == EXIT_OK
    assert "held-out accuracy" in capsys.readouterr().err
    meta = checkpoint.load(str(out / "checkpoints")).meta
    assert (
        meta["step"] == 2 and meta["train"]["label_dropout"] == 0.2
    )  # router default kept under a [train] table
    assert len(json.loads((out / "accuracy_vs_t.json").read_text())["t_mid"]) == 4
    assert not (tmp_path / "ignored").exists()


def test_a_router_killed_before_its_final_evaluation_is_not_complete_and_its_rerun_evaluates(
    small_root: Path, tmp_path: Path
) -> None:
    """Found by bench/chaos.py: a router trainer SIGKILLed after its last checkpoint but before it wrote
    accuracy_vs_t.json counted as complete, so the run finished without the report. Completeness now
    needs the report; the job's rerun only evaluates (finished_before)."""
    from ddm.coordinator.config import load_run_config
    from ddm.coordinator.layout import router_is_complete

    cfg = load_run_config(None, {"root": str(tmp_path / "run"), "router.train.steps": 2})
    out = tmp_path / "run" / "router"
    path = tmp_path / "job.toml"
    path.write_text(toml(job(small_root, out, steps=2)))
    assert main(["--config", str(path), "--no-progress"]) == EXIT_OK
    assert router_is_complete(cfg)
    (out / "accuracy_vs_t.json").unlink()  # as if killed between the checkpoint and the report
    assert checkpoint.load(str(out / "checkpoints")).step == 2 and not router_is_complete(cfg)
    assert main(["--config", str(path), "--no-progress"]) == EXIT_OK
    assert router_is_complete(cfg) and checkpoint.load(str(out / "checkpoints")).step == 2


@pytest.mark.parametrize(
    "text, match",
    [
        ('kind = "router"\nname = "r"\n', "data: Field required"),
        ('kind = "router"\n[data]\nroot = "x"\n', "set data.partitions"),
        ('kind = "router"\n[data]\npartitions = ["a"]\n', "at least 2"),
        (
            'kind = "router"\n[data]\nroot = "x"\nk = 2\n[model]\narch = "DiT-T/4"\n',
            "model.arch: .*unknown router architecture",
        ),
        ('kind = "router"\n[data]\nroot = "x"\nk = 2\n[train]\nstpes = 3\n', "train.stpes: unknown field"),
        ('kind = "router"\n[data]\nroot = "x"\nk = 2\n[eval]\nbins = 1\n', "eval.bins"),
    ],
)
def test_entry_point_names_config_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, match: str
) -> None:
    path = tmp_path / "job.toml"
    path.write_text(text)
    assert main(["--config", str(path)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert str(path) in err
    import re

    assert re.search(match, err), err


def test_entry_point_reports_a_missing_partition(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "job.toml"
    path.write_text(
        f'kind = "router"\noutput = "{tmp_path / "out"}"\n[data]\nroot = "{tmp_path / "run"}"\nk = 2\n'
    )
    assert main(["--config", str(path), "--no-progress"]) == EXIT_FAILED
    assert "partitions/expert-0/index.json: incomplete partition" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_in_a_real_job_exits_75_and_resumes(small_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    path = tmp_path / "job.toml"
    path.write_text(toml(job(small_root, out, steps=100_000)))
    code, err = interrupt_training(path, out)
    assert code == EXIT_INTERRUPTED, err
    stopped = checkpoint.load(str(out / "checkpoints")).step
    assert 2 <= stopped < 100_000 and "rerun to resume" in err
    done = subprocess.run(
        train_command(path) + ["--steps", str(stopped + 2)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == EXIT_OK, done.stderr
    assert checkpoint.load(str(out / "checkpoints")).step == stopped + 2
    assert (out / "accuracy_vs_t.png").exists()
