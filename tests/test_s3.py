"""Run-root storage on a real S3 endpoint (moto's server on 127.0.0.1, see s3_fixtures): helpers round
trip, every write is one PUT straight to its final key (or an all-or-nothing multipart upload for large
objects, which a writer SIGKILLed midway leaves unseen), the manifest is a compare-and-swap that two writers cannot both win, checkpoints save and load
on s3://, and the gRPC servers load their checkpoints from s3://."""

from __future__ import annotations

import hashlib
import json
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from grpc_fixtures import expert_checkpoint, router_checkpoint
from s3_fixtures import S3, moto_endpoint_fixture, s3_fixture, subprocess_env  # noqa: F401 - fixtures

from ddm.coordinator.manifest import Manifest, ManifestConflict
from ddm.core import checkpoint, storage

pytestmark = pytest.mark.timeout(120)


def _etag(data: bytes) -> str:
    return '"' + hashlib.md5(data).hexdigest() + '"'


def test_storage_helpers_round_trip(s3: S3) -> None:
    root = s3.url("run")
    storage.write_bytes(storage.join(root, "a", "x.bin"), b"\x00\x01payload")
    storage.write_json(storage.join(root, "a", "y.json"), {"k": [1, 2]})
    assert storage.read_bytes(storage.join(root, "a", "x.bin")) == b"\x00\x01payload"
    assert storage.read_json(storage.join(root, "a", "y.json")) == {"k": [1, 2]}
    assert storage.exists(storage.join(root, "a", "x.bin")) and storage.exists(storage.join(root, "a"))
    assert storage.listdir(storage.join(root, "a")) == ["x.bin", "y.json"]
    assert storage.listdir(storage.join(root, "nothing")) == []
    # Another process's writes are seen at once: listings are not cached.
    s3.client().put_object(Bucket=s3.bucket, Key="run/a/z.txt", Body=b"from elsewhere")
    assert storage.listdir(storage.join(root, "a")) == ["x.bin", "y.json", "z.txt"]
    assert storage.exists(storage.join(root, "a", "z.txt"))
    storage.remove(storage.join(root, "a", "x.bin"))
    assert not storage.exists(storage.join(root, "a", "x.bin"))
    with pytest.raises(FileNotFoundError, match=r"s3://.*/run/a/x\.bin: no such file"):
        storage.read_bytes(storage.join(root, "a", "x.bin"))
    s3.client().put_object(Bucket=s3.bucket, Key="run/bad.json", Body=b'{"half": ')
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        storage.read_json(storage.join(root, "bad.json"))


def test_a_missing_bucket_is_an_error_and_is_not_created(s3: S3) -> None:
    with pytest.raises(FileNotFoundError, match="s3://ddm-no-such-bucket/run/x: .*create the bucket first"):
        storage.write_bytes("s3://ddm-no-such-bucket/run/x", b"1")
    assert "ddm-no-such-bucket" not in [b["Name"] for b in s3.client().list_buckets()["Buckets"]]


def test_writes_are_one_put_to_the_final_key_and_large_ones_one_multipart_upload(s3: S3) -> None:
    small = bytes(range(256)) * 1000
    storage.write_bytes(s3.url("run", "small.bin"), small)
    large = (
        torch.randint(0, 256, (11 * 2**20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        .numpy()
        .tobytes()
    )
    storage.write_bytes(s3.url("run", "large.bin"), large, part_size=5 * 2**20)
    objects = s3.objects("run/")
    # Only the final keys exist (no temporary key, no copy); a plain-MD5 ETag means one PUT of exactly
    # these bytes, "-3" a multipart upload of three parts, which S3 only shows once it is complete.
    assert set(objects) == {"run/small.bin", "run/large.bin"}
    assert objects["run/small.bin"]["ETag"] == _etag(small)
    assert objects["run/large.bin"]["ETag"].endswith('-3"') and objects["run/large.bin"]["Size"] == len(large)
    assert storage.read_bytes(s3.url("run", "large.bin")) == large
    assert s3.client().list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []


def test_checkpoints_save_prune_and_load_on_s3(s3: S3) -> None:
    directory = s3.url("run", "experts", "expert-0", "checkpoints")
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    for step in (10, 20, 30):
        checkpoint.save(
            directory, step, {"model.w": w * step, "ema.w": w}, {"kind": "expert", "name": "expert-0"}, keep=2
        )
    objects = s3.objects("run/experts/expert-0/checkpoints/")
    assert sorted(objects) == [
        f"run/experts/expert-0/checkpoints/{name}"
        for name in (
            "latest.json",
            "step-00000020.json",
            "step-00000020.safetensors",
            "step-00000030.json",
            "step-00000030.safetensors",
        )
    ]
    for key, obj in objects.items():  # every file is one PUT of its final bytes
        raw = s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read()
        assert obj["ETag"] == _etag(raw), key
    ck = checkpoint.load(directory)
    assert ck.url == storage.join(directory, "step-00000030.safetensors") and ck.step == 30
    torch.testing.assert_close(ck.prefixed("model")["w"], w * 30)
    assert checkpoint.list_steps(directory) == [20, 30]


def test_manifest_conflict_between_two_writers_is_refused_not_overwritten(s3: S3) -> None:
    root = s3.url("run")
    mine = Manifest.open(root, {"name": "t"})
    mine.set_stage("curate", "running")
    # A second writer, in its own process, reads the manifest and writes its change first.
    other = textwrap.dedent(f"""
        from ddm.coordinator.manifest import Manifest
        m = Manifest.load({root!r})
        m.update_job("expert-0", state="CANCELLED")
    """)
    done = subprocess.run(
        [sys.executable, "-c", other],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    with pytest.raises(
        ManifestConflict, match=r"s3://.*/run/manifest.json: another writer changed it since it was read"
    ):
        mine.set_stage("curate", "done")
    stored = json.loads(storage.read_bytes(storage.join(root, "manifest.json")))
    assert stored["jobs"]["expert-0"]["state"] == "CANCELLED"  # the other writer's record survived
    assert stored["stages"]["curate"]["state"] == "running"  # and our refused change is not there
    # Reopening reads the current manifest and carries on from it.
    again = Manifest.open(root, {"name": "t"})
    again.set_stage("curate", "done")
    assert storage.read_json(storage.join(root, "manifest.json"))["jobs"]["expert-0"]["state"] == "CANCELLED"


def test_conditional_writes_on_s3(s3: S3) -> None:
    url = s3.url("run", "manifest.json")
    v1 = storage.write_if(url, b"one", version=None)
    with pytest.raises(storage.WriteConflict, match="another writer created it first"):
        storage.write_if(url, b"two", version=None)
    assert storage.read_versioned(url) == storage.Versioned(b"one", v1)
    v2 = storage.write_if(url, b"three", version=v1)
    with pytest.raises(storage.WriteConflict, match="changed it since it was read"):
        storage.write_if(url, b"four", version=v1)
    # A retried PUT whose first try did land (its answer was lost) finds its own bytes: not a conflict.
    assert storage.write_if(url, b"three", version=v1) == v2
    s3.client().delete_object(Bucket=s3.bucket, Key="run/manifest.json")
    with pytest.raises(storage.WriteConflict, match="deleted since it was read"):
        storage.write_if(url, b"five", version=v2)
    assert not storage.exists(url)


def test_a_lost_manifest_create_race_rereads_and_checks_the_winner(s3: S3) -> None:
    root = s3.url("run")
    # The other coordinator created the manifest between our "not found" and our create:
    # If-None-Match: * refuses our create, and open() then treats the winner's manifest as existing.
    winner = Manifest(root, {"format": "ddm-manifest/1", "config": {"name": "t"}, "stages": {}, "jobs": {}})
    winner.save()
    loser = Manifest(root, {"format": "ddm-manifest/1", "config": {"name": "t"}, "stages": {}, "jobs": {}})
    with pytest.raises(ManifestConflict, match="created it first"):
        loser.save()
    reopened = Manifest.open(root, {"name": "t"})
    assert reopened.version == winner.version


def test_expert_and_router_servers_load_their_checkpoints_from_s3(s3: S3, tmp_path: Path) -> None:
    from ddm.expert.load import load_denoiser
    from ddm.expert.sampling import sample
    from ddm.expert.server import ExpertServer
    from ddm.router.client import ExpertClient, RouterClient
    from ddm.router.ensemble import Ensemble
    from ddm.router.model import load_router
    from ddm.router.server import RouterServer, initial_noise

    local = tmp_path / "run"
    dirs = [expert_checkpoint(local, k) for k in range(2)] + [router_checkpoint(local, 2)]
    for d in dirs:  # the same checkpoints, on S3
        for name in storage.listdir(d):
            rel = str(Path(d, name).relative_to(local))
            storage.write_bytes(s3.url("run", rel), storage.read_bytes(str(Path(d, name))))
    experts = [
        ExpertServer(s3.url("run", "experts", f"expert-{k}", "checkpoints"), address="127.0.0.1:0").start(
            timeout=60
        )
        for k in range(2)
    ]
    try:
        x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        t, y = torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0, 1, 3])
        with ExpertClient(experts[1].target) as client:
            v = client.predict(x, t, y)
            info = client.info()
        torch.testing.assert_close(v, load_denoiser(dirs[1]).velocity(x, t, y), atol=1e-6, rtol=1e-6)
        assert (
            info.checkpoint.startswith(f"s3://{s3.bucket}/run/experts/expert-1/checkpoints/")
            and info.step == 7
        )
        router = RouterServer(
            s3.url("run", "router", "checkpoints"), [e.target for e in experts], address="127.0.0.1:0"
        ).start(timeout=60)
        try:
            with RouterClient(router.target) as client:
                _, got = client.sample(
                    2,
                    torch.tensor([0, 2]),
                    guidance=2.0,
                    steps=3,
                    sampler="euler",
                    seed=5,
                    include_float=True,
                    strategy="top-k",
                    top_k=1,
                )
        finally:
            router.stop(0)
        ensemble = Ensemble(
            [load_denoiser(d) for d in dirs[:2]], load_router(dirs[2]), strategy="top-k", top_k=1
        )
        noise, gen = initial_noise(2, (1, 8, 8), 5)
        want = sample(
            ensemble.guided(2.0), noise, torch.tensor([0, 2]), steps=3, sampler="euler", generator=gen
        )
        torch.testing.assert_close(got.samples, want, atol=1e-5, rtol=1e-5)
    finally:
        for e in experts:
            e.stop(0)


def test_jobs_get_the_storage_settings_but_never_credentials(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")
    storage.configure(endpoint_url=s3.endpoint)  # what `[storage] endpoint_url` does for `ddm run`
    from ddm.coordinator import components
    from ddm.coordinator.config import RunConfig
    from ddm.coordinator.islands import IslandsConfig
    from ddm.coordinator.pipeline import Pipeline
    from ddm.coordinator.stages import ROUTER

    cluster = {"scheduler": "kubernetes", "image": "ddm:dev", "namespace": "ddm", "queue": "ddm"}
    islands = IslandsConfig.model_validate({"island": {
        "local": {},
        "cluster": cluster,  # no view of the store of its own: gets the coordinator's
        "configured": {**cluster, "env_from_configmaps": ["ddm-env"]},  # its ConfigMap has the in-cluster endpoint
        "overridden": {**cluster, "env": {"AWS_ENDPOINT_URL_S3": "http://minio.ddm.svc:9000"}},
    }})  # fmt: skip
    pipe = Pipeline(RunConfig(root=s3.url("run")), islands, manifest=None)  # type: ignore[arg-type]

    def env(island: str) -> dict[str, str]:
        job = pipe.job(
            "router",
            ROUTER.router_job(pipe.cfg),
            s3.url("run", "router"),
            island,
            components.trainer,
            lambda: False,
        )
        return job.app.roles[0].env

    for island in ("local", "cluster"):
        assert (
            env(island)["AWS_ENDPOINT_URL_S3"] == s3.endpoint
            and env(island)["AWS_DEFAULT_REGION"] == "us-east-1"
        )
        assert not any("SECRET" in k or "ACCESS_KEY" in k or "TOKEN" in k for k in env(island))
    assert "AWS_ENDPOINT_URL_S3" not in env("configured") and "AWS_DEFAULT_REGION" not in env("configured")
    assert env("overridden")["AWS_ENDPOINT_URL_S3"] == "http://minio.ddm.svc:9000"
    # The job's config went to the configured endpoint, not the one the environment had before.
    assert storage.read_bytes(s3.url("run", "router", "job.toml")).startswith(b'kind = "router"')


def test_storage_endpoint_url_is_validated() -> None:
    from ddm.coordinator.config import load_run_config
    from ddm.core.config import ConfigError

    with pytest.raises(ConfigError, match=r"storage\.endpoint_url.*http:// or https://"):
        load_run_config(None, {"storage.endpoint_url": "127.0.0.1:9000"})


def test_a_local_manifest_is_guarded_the_same_way(tmp_path: Path) -> None:
    """Locally: compare-before-replace under a lock on the directory, with the same errors as on S3."""
    root = str(tmp_path / "run")
    mine = Manifest.open(root, {"name": "t"})
    other = Manifest.load(root)
    other.update_job("expert-0", state="CANCELLED")
    with pytest.raises(ManifestConflict, match="manifest.json: another writer changed it since it was read"):
        mine.set_stage("curate", "running")
    assert storage.read_json(storage.join(root, "manifest.json"))["jobs"]["expert-0"]["state"] == "CANCELLED"
    with pytest.raises(storage.WriteConflict, match="created it first"):
        storage.write_if(storage.join(root, "manifest.json"), b"{}", version=None)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "manifest.json"
    ]  # no temp or lock files left


_PART = 5 * 2**20  # S3's smallest part (moto enforces it too): 32 parts, 4 rounds of s3fs's 10 at once
_WRITER = textwrap.dedent(
    """
    import random, sys
    from ddm.core import storage
    url, size, seed, part = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    data = random.Random(seed).randbytes(size)
    print("uploading", flush=True)
    storage.write_bytes(url, data, part_size=part)
    print("done", flush=True)
    """
)


def _writer(url: str, size: int, seed: int) -> subprocess.Popen:
    """A separate process writing ``size`` seeded random bytes to ``url`` as a multipart upload."""
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER, url, str(size), str(seed), str(_PART)],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_multipart_upload_killed_midway_leaves_the_previous_object_and_a_rerun_completes(s3: S3) -> None:
    url, key = s3.url("run", "ckpt.safetensors"), "run/ckpt.safetensors"
    old = random.Random(1).randbytes(11 * 2**20)
    storage.write_bytes(url, old, part_size=_PART)  # the previous whole version (3 parts)
    size = 32 * _PART
    new = random.Random(2).randbytes(size)

    seen: list[str] = []  # every reader observation during the upload: "missing" or the bytes' sha256
    stop = threading.Event()

    def read_all_the_time() -> None:
        while not stop.is_set():
            try:
                seen.append(hashlib.sha256(storage.read_bytes(url)).hexdigest())
            except FileNotFoundError:
                seen.append("missing")

    reader = threading.Thread(target=read_all_the_time, daemon=True)
    reader.start()
    writer = _writer(url, size, seed=2)
    try:
        assert writer.stdout.readline().strip() == "uploading", writer.stderr.read()
        deadline, parts = time.monotonic() + 60, []
        while not parts and time.monotonic() < deadline:  # wait for some parts, then kill it
            for upload in s3.client().list_multipart_uploads(Bucket=s3.bucket, Prefix=key).get("Uploads", []):
                listed = s3.client().list_parts(Bucket=s3.bucket, Key=key, UploadId=upload["UploadId"])
                parts = listed.get("Parts", [])
            time.sleep(0.01)
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
    finally:
        if writer.poll() is None:
            writer.kill()
        time.sleep(0.3)  # a few more reads after the kill
        stop.set()
        reader.join(10)
    uploads = s3.client().list_multipart_uploads(Bucket=s3.bucket, Prefix=key).get("Uploads", [])
    assert len(uploads) == 1, uploads  # killed mid-upload: an incomplete upload, invisible to readers
    done = s3.client().list_parts(Bucket=s3.bucket, Key=key, UploadId=uploads[0]["UploadId"]).get("Parts", [])
    assert 0 < len(done) < 32, len(done)
    assert set(seen) == {hashlib.sha256(old).hexdigest()} and len(seen) > 1, set(seen)
    assert storage.read_bytes(url) == old and s3.objects("run/")[key]["ETag"].endswith('-3"')

    rerun = _writer(url, size, seed=2)
    out, err = rerun.communicate(timeout=100)
    assert rerun.returncode == 0 and out.split() == ["uploading", "done"], err
    final = s3.objects("run/")[key]
    assert final["Size"] == size and final["ETag"].endswith('-32"')
    assert storage.read_bytes(url) == new
    s3.client().abort_multipart_upload(Bucket=s3.bucket, Key=key, UploadId=uploads[0]["UploadId"])
    storage.remove(url)  # moto keeps objects in memory for the whole session


def test_a_coordinator_takes_over_a_cancellation_written_on_s3(s3: S3) -> None:
    root = s3.url("run")
    ours = Manifest.open(root, {"name": "t"})
    ours.update_job("expert-0", state="RUNNING", handle="local://x/e0", attempts=[{"handle": "local://x/e0"}])
    version = ours.version
    assert ours.adopt_cancellations() == [] and ours.version == version  # nothing foreign: no write at all
    Manifest.load(root).update_job("expert-0", state="CANCELLED", cancelled_at=1.0)  # as `ddm cancel` does
    assert ours.adopt_cancellations() == ["expert-0"] and ours.job("expert-0")["state"] == "CANCELLED"
    ours.update_job("expert-1", state="PENDING")  # our copy is current again: an If-Match write succeeds
    stored = json.loads(storage.read_bytes(storage.join(root, "manifest.json")))["jobs"]
    assert stored["expert-0"]["state"] == "CANCELLED" and stored["expert-1"]["state"] == "PENDING"
