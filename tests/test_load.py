"""Self-describing expert checkpoints (expert/load.py): rebuild the model from the file alone,
refuse a resume onto a different model, and name the file in every error."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import ddm
from ddm.core import checkpoint
from ddm.core.checkpoint import CheckpointError
from ddm.core.trainer import TrainResult
from ddm.expert.config import ExpertJobConfig
from ddm.expert.denoiser import Denoiser
from ddm.expert.load import load_denoiser, load_model
from ddm.expert.model import DiT, DiTConfig
from ddm.expert.trainer import train


def tiny_job(output: Path | str, arch: str = "DiT-T/4", **train_settings: Any) -> ExpertJobConfig:
    settings: dict[str, Any] = dict(
        steps=3, batch_size=8, warmup_steps=1, checkpoint_every=1000, num_threads=1, lr=3e-3
    )
    settings.update(train_settings)
    return ExpertJobConfig.model_validate(
        dict(name="expert-2", output=str(output), data=dict(limit=64), model=dict(arch=arch), train=settings)
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainResult]:
    out = tmp_path_factory.mktemp("expert")
    return out, train(tiny_job(out), progress=False)


def test_checkpoint_carries_all_metadata(trained: tuple[Path, TrainResult]) -> None:
    _, result = trained
    meta = checkpoint.load(result.checkpoint_url).meta
    assert meta["kind"] == "expert" and meta["name"] == "expert-2" and meta["arch"] == "DiT-T/4"
    assert meta["step"] == 3 and meta["world_size"] == 1 and meta["ddm_version"] == ddm.__version__
    assert "git_commit" in meta  # None outside a git checkout with commits
    assert meta["model"] == DiTConfig(patch_size=4, hidden_size=128, depth=4, num_heads=4).to_dict()
    assert meta["data"]["limit"] == 64 and meta["data"]["source"] == "fashion-mnist"
    assert meta["train"]["batch_size"] == 8 and meta["train"]["steps"] == 3
    assert meta["loss"] == result.final_loss


def test_load_model_rebuilds_the_network_from_the_checkpoint_alone(trained: tuple[Path, TrainResult]) -> None:
    out, result = trained
    ckpt = checkpoint.load(result.checkpoint_url)
    ema_model, meta = load_model(str(out / "checkpoints"))  # a directory resolves to the latest file
    raw_model, _ = load_model(result.checkpoint_url, ema=False)
    assert isinstance(ema_model, DiT) and meta["url"] == result.checkpoint_url
    assert not ema_model.training and not any(p.requires_grad for p in ema_model.parameters())
    for name, value in ema_model.state_dict().items():
        assert torch.equal(value, ckpt.tensors[f"ema.{name}"])
    for name, value in raw_model.state_dict().items():
        assert torch.equal(value, ckpt.tensors[f"model.{name}"])
    # EMA and raw weights differ after training (the EMA lags), so ema= picks a real choice.
    assert not torch.equal(ema_model.final_layer.linear.weight, raw_model.final_layer.linear.weight)

    den = load_denoiser(result.checkpoint_url)
    assert isinstance(den, Denoiser) and den.num_classes == 10
    x_t, t, y = torch.randn(3, 1, 28, 28), torch.rand(3), torch.tensor([0, 9, 10])  # 10 = null class
    v = den.velocity(x_t, t, y)
    assert v.shape == (3, 1, 28, 28)
    torch.testing.assert_close(v, ema_model(x_t, t, y))


def test_resume_onto_a_different_model_is_refused(trained: tuple[Path, TrainResult], tmp_path: Path) -> None:
    out, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with pytest.raises(ValueError) as err:
        train(tiny_job(copy, arch="DiT-T/2"), progress=False)
    message = str(err.value)
    assert "step-00000003.safetensors" in message
    assert "'patch_size': 4" in message and "'patch_size': 2" in message  # both configs named
    assert "--no-resume" in message
    assert checkpoint.list_steps(str(copy / "checkpoints")) == [3]  # nothing was overwritten


def test_truncated_checkpoint_error_names_the_file(trained: tuple[Path, TrainResult], tmp_path: Path) -> None:
    _, result = trained
    raw = Path(result.checkpoint_url).read_bytes()
    cut_header = tmp_path / "cut-header.safetensors"
    cut_header.write_bytes(raw[:100])  # inside the JSON header
    with pytest.raises(CheckpointError, match=str(cut_header)):
        load_model(str(cut_header))
    cut_tensors = tmp_path / "cut-tensors.safetensors"
    cut_tensors.write_bytes(raw[: len(raw) - 1000])  # header intact, tensor data short
    with pytest.raises(CheckpointError, match=str(cut_tensors)):
        load_model(str(cut_tensors))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
        load_model(str(tmp_path / "empty"))


def test_resume_from_a_truncated_latest_checkpoint_names_the_file(
    trained: tuple[Path, TrainResult], tmp_path: Path
) -> None:
    out, result = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    target = copy / "checkpoints" / Path(result.checkpoint_url).name
    target.write_bytes(target.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=str(target)):
        train(tiny_job(copy), progress=False)


def test_load_model_rejects_checkpoints_of_another_kind(tmp_path: Path) -> None:
    url = checkpoint.save(str(tmp_path), 1, {"model.w": torch.zeros(2)}, {"kind": "router"})
    with pytest.raises(CheckpointError, match=f"{url}.*not an expert"):
        load_model(url)
    url = checkpoint.save(
        str(tmp_path / "b"), 1, {"ema.w": torch.zeros(2)}, {"kind": "expert", "model": {"depth": 2}}
    )
    with pytest.raises(CheckpointError, match=f"{url}.*weights do not fit"):
        load_model(url)
