"""`ddm run` end to end with its run root on S3 (moto's server on 127.0.0.1): the coordinator, the expert
and router TorchX jobs (separate processes) and `ddm status` / `ddm sample` all read and write only
s3://, and find the endpoint through the run config / CLI, the credentials through the environment."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from s3_fixtures import S3, moto_endpoint_fixture, s3_fixture, subprocess_env  # noqa: F401 - fixtures

from ddm.coordinator.cli import main as cli_main
from ddm.coordinator.config import RunConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"  # the shipped smoke-test config
SMALLER = [  # tiny.toml, smaller still: this test is about storage, not quality
    "experts.train.steps=10", "router.train.steps=10", "eval.models=[\"top-1\"]", "eval.num_samples=10",
    "eval.real_samples=50", "data.limit=300", "experts.poll_seconds=0.3",
]  # fmt: skip
if "distill" in RunConfig.model_fields:  # a later stage, not needed to show the storage works
    SMALLER.append("distill.enabled=false")


def ddm(*args: str, env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ddm", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_ddm_run_with_its_root_on_s3(
    s3: S3, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = s3.url("run")
    monkeypatch.setenv(
        "DDM_CACHE", str(tmp_path / "cache")
    )  # job logs of an S3 run land in this machine's cache
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    # The coordinator learns the endpoint from the run config only; its jobs must get it from the
    # coordinator. Credentials and region come from the environment (the standard AWS chain).
    env = subprocess_env()
    del env["AWS_ENDPOINT_URL_S3"]
    sets = [a for s in [*SMALLER, f'storage.endpoint_url="{s3.endpoint}"'] for a in ("--set", s)]
    run = ddm("run", str(TINY), "--root", root, "--quiet", *sets, env=env, cwd=cwd)
    assert run.returncode == 0, run.stdout + run.stderr[-6000:]

    objects = s3.objects("run/")
    manifest = json.loads(s3.client().get_object(Bucket=s3.bucket, Key="run/manifest.json")["Body"].read())
    assert [manifest["stages"][s]["state"] for s in ("curate", "partition", "experts", "router", "eval")] == [
        "done"
    ] * 5
    print({name: stage.get("seconds") for name, stage in manifest["stages"].items()})
    assert {n: (j["state"], len(j["attempts"])) for n, j in manifest["jobs"].items()} == {
        "expert-0": ("SUCCEEDED", 1), "expert-1": ("SUCCEEDED", 1), "router": ("SUCCEEDED", 1),
    }  # fmt: skip
    expected = [
        "curate/embeddings.safetensors", "curate/keep.npy", "curate/report.json",
        "clusters/report.json", "clusters/samples.png",
        "partitions/expert-0/index.json", "partitions/expert-1/index.json",
        *[f"experts/expert-{k}/{f}" for k in range(2) for f in ("job.toml", "checkpoints/latest.json",
          "checkpoints/step-00000010.safetensors", "metrics.csv", "heartbeat.json")],
        "router/job.toml", "router/checkpoints/latest.json", "router/accuracy_vs_t.json",
        "eval/top-1/metrics.json", "eval/top-1/samples.png",
    ]  # fmt: skip
    assert [k for k in expected if f"run/{k}" not in objects] == []
    # Every object went up as one PUT of its final bytes: no temporary keys, plain-MD5 ETags.
    assert [k for k in objects if ".tmp" in k] == []
    for key, obj in objects.items():
        raw = s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read()
        assert obj["ETag"] == '"' + hashlib.md5(raw).hexdigest() + '"', key
    beat = json.loads(
        s3.client().get_object(Bucket=s3.bucket, Key="run/experts/expert-0/heartbeat.json")["Body"].read()
    )
    assert beat["state"] == "done" and beat["step"] == 10
    assert list(cwd.iterdir()) == []  # nothing landed on local disk beside the coordinator

    # Run again: every stage is skipped, nothing is launched twice (the manifest is read from S3).
    again = ddm("run", str(TINY), "--root", root, "--quiet", *sets, env=env, cwd=cwd)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stderr.count("already done") == len(manifest["stages"]) >= 5
    after = json.loads(s3.client().get_object(Bucket=s3.bucket, Key="run/manifest.json")["Body"].read())
    assert after["jobs"] == manifest["jobs"]

    assert cli_main(["status", root]) == 0  # in this process: the manifest and checkpoints read from S3
    shown = capsys.readouterr().out
    assert "expert-1" in shown and "SUCCEEDED" in shown and "step-00000010.safetensors" in shown, shown
    assert cli_main(["logs", root, "expert-0"]) == 0  # a later process finds the job's log files
    assert "expert-0: step 10, loss" in capsys.readouterr().out
    out = s3.url("samples", "grid.png")
    sample = ddm("--s3-endpoint-url", s3.endpoint, "sample", "--checkpoint", s3.url("run", "experts", "expert-1", "checkpoints"),
                 "--n", "4", "--steps", "2", "--out", out, env=env, cwd=cwd)  # fmt: skip
    assert sample.returncode == 0, sample.stderr[-4000:]
    png = s3.client().get_object(Bucket=s3.bucket, Key="samples/grid.png")["Body"].read()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
