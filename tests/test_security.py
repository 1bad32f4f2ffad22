"""Nothing from storage is unpickled: a malicious pickle (its ``__reduce__`` would create a marker file)
planted where each kind of file should be is refused by every loader, and the marker never appears.
Checksummed files (partition shards, the clustering) get a matching checksum, so the pickle reaches
the tensor decoder itself. Secrets: a token given by file or environment never shows up in logs."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_fixtures import expert_checkpoint

from ddm.core import checkpoint
from ddm.expert.load import load_model
from ddm.expert.server import ExpertServer
from ddm.expert.shards import read_shards, write_shards
from ddm.proto import rpc
from ddm.router.client import ExpertClient
from ddm.router.model import load_router_checkpoint


class Payload:
    """Unpickling this runs ``os.system("touch MARKER")``: proof of code execution if it ever happens."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil(marker: Path) -> bytes:
    raw = pickle.dumps({"model.w": Payload(marker)})
    pickle.loads(pickle.dumps(Payload(marker.with_suffix(".selftest"))))  # the payload really works...
    assert marker.with_suffix(".selftest").exists()
    return raw


def _plant_checkpoint(tmp: Path, evil: bytes) -> str:
    d = tmp / "ckpt"
    d.mkdir()
    (d / "step-00000001.safetensors").write_bytes(evil)
    (d / "latest.json").write_text(json.dumps({"step": 1, "file": "step-00000001.safetensors"}))
    return str(d)


def _plant_shards(tmp: Path, evil: bytes) -> str:
    url = str(tmp / "part")
    write_shards(
        url,
        torch.zeros(3, 1, 4, 4, dtype=torch.uint8),
        torch.zeros(3, dtype=torch.long),
        torch.arange(3),
        num_classes=2,
        shard_size=8,
    )
    (tmp / "part" / "shard-00000.safetensors").write_bytes(evil)
    index = json.loads((tmp / "part" / "index.json").read_text())
    index["shards"][0]["sha256"] = hashlib.sha256(
        evil
    ).hexdigest()  # the checksum matches: only decoding is left
    (tmp / "part" / "index.json").write_text(json.dumps(index))
    return url


def _plant_clustering(tmp: Path, evil: bytes) -> str:
    from ddm.coordinator.cluster import ClusterConfig, fit_clustering

    x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    clustering, _ = fit_clustering(x, ClusterConfig(k=2, fine_k=4, balanced=False))
    url = str(tmp / "clustering")
    clustering.save(url)
    (tmp / "clustering" / "clustering.safetensors").write_bytes(evil)
    meta = json.loads((tmp / "clustering" / "clustering.json").read_text())
    meta["sha256"] = hashlib.sha256(evil).hexdigest()
    (tmp / "clustering" / "clustering.json").write_text(json.dumps(meta))
    return url


def _expert_server(url: str) -> None:
    server = ExpertServer(url).start(wait=False)
    try:
        server.wait_ready(30)
    finally:
        server.stop(0)


def _embeddings_cache(tmp: Path, evil: bytes) -> None:
    from ddm.coordinator.config import PartitionConfig
    from ddm.coordinator.curate import embed_dataset
    from ddm.expert.data import ImageDataset

    cache = tmp / "embeddings.safetensors"
    cache.write_bytes(evil)
    data = ImageDataset(
        images=torch.zeros(2, 1, 4, 4, dtype=torch.uint8),
        labels=torch.zeros(2, dtype=torch.long),
        ids=torch.arange(2),
        num_classes=2,
    )
    embed_dataset(data, PartitionConfig(), str(cache), progress=False)


def _npy(tmp: Path, evil: bytes) -> None:
    from ddm.coordinator.stages import load_npy

    load_npy(evil)


def _torchscript(tmp: Path, evil: bytes) -> None:
    from ddm.expert.features import build_features

    path = tmp / "encoder.pt"
    path.write_bytes(evil)
    build_features(f"torchscript:{path}", image_size=32)


LOADERS: dict[str, Callable[[Path, bytes], object]] = {
    "checkpoint.load": lambda tmp, evil: checkpoint.load(_plant_checkpoint(tmp, evil)),
    "load_model (expert)": lambda tmp, evil: load_model(_plant_checkpoint(tmp, evil)),
    "load_router_checkpoint": lambda tmp, evil: load_router_checkpoint(_plant_checkpoint(tmp, evil)),
    "ExpertServer": lambda tmp, evil: _expert_server(_plant_checkpoint(tmp, evil)),
    "read_shards": lambda tmp, evil: read_shards(_plant_shards(tmp, evil)),
    "Clustering.load": lambda tmp, evil: __import__(
        "ddm.coordinator.cluster", fromlist=["Clustering"]
    ).Clustering.load(_plant_clustering(tmp, evil)),
    "embeddings cache": _embeddings_cache,  # names the file: delete it to recompute
    "keep.npy": _npy,
    "TorchScript encoder": _torchscript,
}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_every_loader_refuses_a_malicious_pickle(tmp_path: Path, loader: str) -> None:
    marker = tmp_path / "pwned"
    evil = _evil(marker)
    with pytest.raises(Exception) as err:
        LOADERS[loader](tmp_path, evil)
    assert not marker.exists(), f"{loader} unpickled the payload"
    assert isinstance(err.value, ValueError), repr(err.value)  # refused as bad data, not a crash
    if loader != "keep.npy":  # (bytes in memory: its caller knows the file)
        assert str(tmp_path) in str(err.value), err.value  # and the message names the file


def test_tokens_from_file_or_env_never_reach_the_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_file, secret_env = "file-s3cret-token-4711", "env-s3cret-token-0815"
    token_file = tmp_path / "token"
    token_file.write_text(secret_file + "\n")
    monkeypatch.setenv(rpc.TOKEN_ENV, secret_env)
    caplog.set_level(logging.DEBUG)
    ckpt = expert_checkpoint(tmp_path, 0)
    for token in (rpc.read_token(token_file), rpc.read_token(None)):
        server = ExpertServer(ckpt, token=token).start(timeout=30)
        try:
            x_t, t, y = torch.zeros(2, 1, 8, 8), torch.full((2,), 0.5), torch.zeros(2, dtype=torch.long)
            with ExpertClient(server.target, token="wrong") as bad, pytest.raises(grpc.RpcError) as denied:
                bad.predict(x_t, t, y)
            assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert server.batcher.stats.requests == 0  # refused before any work
            with ExpertClient(server.target, token=token) as good:
                assert good.info().name == "expert-0"
        finally:
            server.stop(0)
    text = caplog.text + "".join(repr(r.args) for r in caplog.records)
    assert text and secret_file not in text and secret_env not in text
