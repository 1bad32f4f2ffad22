"""Truncated or corrupted files on the run root: every reader names the file and says what is wrong, and
nothing is overwritten by the failed attempt (the bad file is left as it was, for a person to look at)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from grpc_fixtures import expert_checkpoint

from ddm.coordinator.config import load_run_config
from ddm.coordinator.islands import load_islands
from ddm.coordinator.manifest import Manifest
from ddm.core import checkpoint
from ddm.expert.load import load_model
from ddm.expert.shards import read_shards, write_shards


def _truncate(path: Path) -> bytes:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path.read_bytes()


def test_truncated_manifest_is_named_and_left_alone(tmp_path: Path) -> None:
    Manifest.open(str(tmp_path), {"name": "run"})
    bad = _truncate(tmp_path / "manifest.json")
    with pytest.raises(ValueError, match=r"manifest\.json: not valid JSON"):
        Manifest.open(str(tmp_path), {"name": "run"})
    assert (tmp_path / "manifest.json").read_bytes() == bad  # not "repaired" by a fresh one


def test_corrupted_configs_are_named(tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text('name = "x"\n[partition]\nk = ')  # cut off mid-line
    with pytest.raises(ValueError, match=r"run\.toml"):
        load_run_config(str(cfg))
    islands = tmp_path / "islands.toml"
    islands.write_text("[island.gpu]\nscheduler = 7\n")
    with pytest.raises(ValueError, match=r"(?s)islands\.toml.*island\.gpu\.scheduler"):
        load_islands(str(islands))


def test_truncated_checkpoint_latest_pointer_and_sidecar_are_named(tmp_path: Path) -> None:
    d = Path(expert_checkpoint(tmp_path, 0))
    weights = d / checkpoint.file_name(7)
    original = weights.read_bytes()
    _truncate(weights)
    with pytest.raises(ValueError, match=r"step-00000007\.safetensors"):
        load_model(str(d))
    weights.write_bytes(original)
    _truncate(d / "latest.json")
    with pytest.raises(ValueError, match=r"latest\.json: not valid JSON"):
        load_model(str(d))


def test_corrupted_shard_and_index_are_named(tmp_path: Path) -> None:
    url = str(tmp_path / "part")
    write_shards(url, torch.zeros(5, 1, 4, 4, dtype=torch.uint8), torch.zeros(5, dtype=torch.long),
                 torch.arange(5), num_classes=2, shard_size=8)  # fmt: skip
    shard = tmp_path / "part" / "shard-00000.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"shard-00000\.safetensors: checksum mismatch"):
        read_shards(url)
    index = tmp_path / "part" / "index.json"
    index.write_text(json.dumps({"format": "nonsense"}))
    with pytest.raises(ValueError, match=r"index\.json"):
        read_shards(url)
