"""RGB end to end: `ddm run configs/rgb32.toml` on a generated folder of coloured shapes (4 classes),
served with `ddm serve run` and sampled through gRPC; and runs that read webdataset tar shards and
parquet on s3:// (moto) through curation and partitioning."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rgb_shapes import parquet_bytes, shapes, tar_bytes, webdataset_members, write_folder
from s3_fixtures import moto_endpoint_fixture, s3_fixture, subprocess_env  # noqa: F401 - fixtures
from test_grpc_cli import DDM, Proc

from ddm.core import storage
from ddm.expert.images import save_grid
from ddm.expert.shards import read_index
from ddm.router.client import RouterClient

pytestmark = pytest.mark.slow

RGB32 = Path(__file__).resolve().parents[1] / "configs" / "rgb32.toml"

# configs/rgb32.toml at test size: 2 experts of DiT-T/4 (32 px: 64 tokens) for a few steps, pixel
# embeddings, a small router, eval (FD of the pixel images in EfficientNet-Lite0 features), no student.
TINY = {
    "partition.k": 2, "partition.fine_k": 16, "partition.sample_size": 160, "partition.niter": 10,
    "partition.encoder": '"pixels"', "partition.tolerance": 0.2,
    "experts.poll_seconds": 0.3, "experts.model.arch": '"DiT-T/4"',
    "experts.train.steps": 8, "experts.train.batch_size": 16, "experts.train.warmup_steps": 2,
    "experts.train.checkpoint_every": 4, "experts.train.num_threads": 1,
    "router.model.arch": '"Router-XS/4"', "router.train.steps": 6,
    "router.train.batch_size": 16, "router.train.checkpoint_every": 3, "router.eval.samples_per_bin": 4,
    "eval.num_samples": 16, "eval.real_samples": 80, "eval.models": '["top-1"]',
    "eval.sample.steps": 3, "distill.enabled": "false",
}  # fmt: skip


def run(root: Path, data: dict, *args: str, env=None, timeout=600) -> str:
    sets = [x for k, v in {**TINY, **data}.items() for x in ("--set", f"{k}={v}")]
    p = subprocess.run([sys.executable, "-m", "ddm", "run", str(RGB32), "--root", str(root), "--quiet", *sets,
                        *args], capture_output=True, text=True, timeout=timeout, env=env)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_rgb_folder_runs_end_to_end_and_samples_through_grpc(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "shapes", shapes(160, size=32, seed=1))
    root = tmp_path / "run"
    run(root, {"data.path": f'"{folder}"'})
    m = json.loads((root / "manifest.json").read_text())
    assert all(
        m["stages"][s]["state"] == "done" for s in ("curate", "partition", "experts", "router", "eval")
    )
    parts = [read_index(str(root / "partitions" / f"expert-{k}")) for k in range(2)]
    assert sum(p["count"] for p in parts) == json.loads((root / "curate" / "report.json").read_text())["kept"]
    metrics = json.loads((root / "eval" / "top-1" / "metrics.json").read_text())
    assert metrics["num_samples"] == 16 and metrics["fd"] > 0  # FD in pixel space of 3x32x32 images

    stack = Proc([*DDM, "serve", "run", str(root), "--host", "127.0.0.1", "--port", "0", "--steps", "3"])
    try:
        port = stack.wait_for(r"serving router over 2 experts on 127\.0\.0\.1:(\d+)", timeout=120).group(1)
        with RouterClient(f"127.0.0.1:{port}", timeout=120) as client:
            assert client.info().num_classes == 4
            images, info = client.sample(4, labels=[0, 1, 2, 3], seed=7)
        assert images.dtype == torch.uint8 and tuple(images.shape) == (4, 3, 32, 32)
        assert sum(info.expert_calls.values()) > 0 and images.float().std() > 0
        save_grid(images, str(tmp_path / "grpc-samples.png"), nrow=4)
        code, _ = stack.terminate()
        assert code == 0
    finally:
        if stack.p.poll() is None:
            stack.p.kill()


def curated(root: Path) -> tuple[dict, list[int]]:
    report = json.loads((root / "curate" / "report.json").read_text())
    counts = [read_index(str(root / "partitions" / f"expert-{k}"))["count"] for k in range(2)]
    return report, counts


def test_a_run_reads_webdataset_tar_shards(tmp_path: Path) -> None:
    items = shapes(96, size=32, seed=2)
    for k in range(3):
        members = webdataset_members(items[32 * k : 32 * (k + 1)], 32 * k)
        if k == 1:
            members[0] = (members[0][0], b"corrupt image bytes")  # one unreadable record
        (tmp_path / f"shapes-{k:03d}.tar").write_bytes(tar_bytes(members))
    root = tmp_path / "run"
    run(root, {"data.source": '"webdataset"', "data.path": f'"{tmp_path}/shapes-{{000..002}}.tar"',
               "partition.sample_size": 96}, "--stages", "curate,partition")  # fmt: skip
    report, counts = curated(root)
    assert report["images"] == 95 and report["skipped_unreadable"] == 1 and sum(counts) == report["kept"]


def test_a_run_reads_parquet_on_s3(tmp_path: Path, s3) -> None:
    items = shapes(96, size=32, seed=3)
    for k in range(2):
        name = f"train-{k:05d}-of-00002.parquet"
        storage.write_bytes(s3.url("hf", "data", name), parquet_bytes(items[48 * k : 48 * (k + 1)]))
    root = tmp_path / "run"
    run(root, {"data.source": '"parquet"', "data.path": f'"{s3.url("hf")}"', "partition.sample_size": 96},
        "--stages", "curate,partition", env=subprocess_env())  # fmt: skip
    report, counts = curated(root)
    assert report["images"] == 96 and report["skipped_unreadable"] == 0 and sum(counts) == report["kept"]
    clusters = json.loads((root / "clusters" / "report.json").read_text())
    assert clusters["class_names"] == ["circle", "square", "triangle", "cross"]  # from the HF metadata
