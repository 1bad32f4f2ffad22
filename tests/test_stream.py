"""Streamed partitions (expert/stream.py, core/loader.py): the same batches as the in-memory reader, read
lazily (shards nobody asks for are never opened), verified once, cached once from remote URLs, through
DataLoader workers in step order, and an expert resumed through them equals an uninterrupted run."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from s3_fixtures import S3, moto_endpoint_fixture, s3_fixture  # noqa: F401 - fixtures
from train_jobs import interrupt_training

from ddm.core import checkpoint, storage
from ddm.core.config import to_toml
from ddm.core.loader import step_loader
from ddm.core.schedule import BatchOrder, StepBatches
from ddm.expert.config import ExpertJobConfig
from ddm.expert.data import load_fashion_mnist
from ddm.expert.shards import ShardError, read_shards, write_shards
from ddm.expert.stream import CACHE_ENV, StreamedDataset, open_partitions, open_shards
from ddm.expert.trainer import train
from ddm.router.trainer import read_partitions
from ddm.train import EXIT_INTERRUPTED


def partition(n: int, seed: int = 0, shape: tuple[int, int, int] = (3, 5, 7), num_classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return images, labels, torch.arange(n) * 7 + seed


def test_batches_equal_the_in_memory_reader(tmp_path: Path) -> None:
    url = str(tmp_path / "p")
    write_shards(url, *partition(103), num_classes=4, shard_size=10)
    whole, streamed = read_shards(url), open_shards(url)
    assert (
        isinstance(streamed, StreamedDataset) and len(streamed) == 103 and streamed.image_shape == (3, 5, 7)
    )
    assert streamed.opened_shards() == []  # opening read the index only
    g = torch.Generator().manual_seed(1)
    for index in [torch.randint(0, 103, (17,), generator=g) for _ in range(10)] + [
        torch.arange(5, 45),
        torch.tensor([-1]),
    ]:
        x_a, y_a = whole.batch_uint8(index)
        x_b, y_b = streamed.batch_uint8(index)
        assert torch.equal(x_a, x_b) and torch.equal(y_a, y_b) and x_b.is_contiguous()
    assert torch.equal(streamed.batch(torch.tensor([3, 4]))[0], whole.batch(torch.tensor([3, 4]))[0])
    assert torch.equal(streamed.labels, whole.labels) and torch.equal(streamed.ids, whole.ids)
    view = streamed.subset(torch.tensor([90, 3, 50]))
    assert torch.equal(view.ids, whole.ids[[90, 3, 50]])
    assert torch.equal(view.batch_uint8(torch.tensor([2, 0]))[0], whole.images[[50, 90]])
    limited = open_shards(url, limit=25)
    assert len(limited) == 25 and torch.equal(limited.ids, whole.ids[:25])
    with pytest.raises(IndexError):
        limited.batch_uint8(torch.tensor([25]))


def test_partitions_concatenate_in_order(tmp_path: Path) -> None:
    urls = [str(tmp_path / f"p{k}") for k in range(3)]
    parts = [partition(n, seed=k) for k, n in enumerate((12, 30, 7))]
    for url, (images, labels, ids) in zip(urls, parts):
        write_shards(url, images, labels, ids, num_classes=4, shard_size=8)
    streamed, counts = open_partitions(urls, limit=20)
    assert counts == [12, 20, 7] and len(streamed) == 39
    want = torch.cat([parts[0][0], parts[1][0][:20], parts[2][0]])
    index = torch.randperm(39, generator=torch.Generator().manual_seed(0))
    assert torch.equal(streamed.batch_uint8(index)[0], want[index])
    data = read_partitions(urls, limit=20)
    assert data.counts() == [12, 20, 7] and not data.in_memory
    assert torch.equal(data.batch_uint8(index)[2], data.partition[index])


def test_the_reader_opens_only_the_shards_a_batch_asks_for(tmp_path: Path) -> None:
    url = str(tmp_path / "p")
    write_shards(url, *partition(50), num_classes=4, shard_size=10)  # shards 0..4 of 10 rows
    storage.remove(storage.join(url, "shard-00001.safetensors"))
    shard = tmp_path / "p" / "shard-00003.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x01
    shard.write_bytes(bytes(raw))
    ds = open_shards(url)
    x, _ = ds.batch_uint8(torch.tensor([25, 2, 41, 9]))  # shards 2, 0, 4: none of the damaged ones
    assert x.shape == (4, 3, 5, 7) and ds.opened_shards() == [0, 2, 4]
    with pytest.raises(ShardError, match=r"shard-00003\.safetensors: checksum mismatch"):
        ds.batch_uint8(torch.tensor([30]))
    with pytest.raises(ShardError, match=r"shard-00001\.safetensors: shard listed in index.json is missing"):
        ds.batch_uint8(torch.tensor([10]))
    assert ds.opened_shards() == [0, 2, 4]
    assert open_shards(url, verify=False).batch_uint8(torch.tensor([30]))[0].shape == (1, 3, 5, 7)


def test_shard_headers_are_checked_against_the_index(tmp_path: Path) -> None:
    url = str(tmp_path / "p")
    write_shards(url, *partition(8), num_classes=4, shard_size=4)
    storage.write_bytes(storage.join(url, "shard-00000.safetensors"), b"garbage!" * 3)
    with pytest.raises(ShardError, match="shard-00000.safetensors: not a readable safetensors"):
        open_shards(url, verify=False).batch_uint8(torch.tensor([0]))
    write_shards(url, *partition(8), num_classes=4, shard_size=4)
    index = storage.read_json(storage.join(url, "index.json"))
    index["num_classes"] = 1
    storage.write_json(storage.join(url, "index.json"), index)
    with pytest.raises(ShardError, match=r"shard-00001.safetensors: labels span .* outside \[0, 1\)"):
        open_shards(url).batch_uint8(torch.tensor([5]))


def test_loader_yields_the_batch_order_through_workers_and_verifies_once(tmp_path: Path) -> None:
    url = str(tmp_path / "p")
    write_shards(url, *partition(60), num_classes=4, shard_size=7)
    ds, whole = open_shards(url), read_shards(url)
    order = BatchOrder(len(ds), 16, seed=5)  # 3 steps per epoch: the run crosses epochs
    rows = slice(4, 12)  # one rank's share of the global batch
    for start in (0, 4):  # a fresh start and a resume at step 4
        loader = step_loader(ds, StepBatches(order, start, 9, rows), workers=2, prefetch=2)
        assert loader.num_workers == 2
        got = list(loader)
        assert len(got) == 9 - start
        for step, (images, labels) in zip(range(start + 1, 10), got):
            index = BatchOrder(len(ds), 16, seed=5).indices(step)[rows]
            assert torch.equal(images, whole.images[index]) and torch.equal(labels, whole.labels[index])
    assert ds._set.verified.tolist() == [1] * 9  # the workers' checks are seen by every process
    assert step_loader(whole, StepBatches(order, 0, 1), workers=2, prefetch=2).num_workers == 0  # in memory


def test_a_corrupt_shard_fails_with_its_name_through_the_workers(tmp_path: Path) -> None:
    url = str(tmp_path / "p")
    write_shards(url, *partition(20), num_classes=4, shard_size=10)
    shard = tmp_path / "p" / "shard-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    loader = step_loader(
        open_shards(url), StepBatches(BatchOrder(20, 20, seed=0), 0, 1), workers=1, prefetch=1
    )
    with pytest.raises(ShardError, match=r"shard-00001\.safetensors: checksum mismatch"):
        list(loader)


def test_remote_shards_are_cached_once_and_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    bucket = f"stream-{uuid.uuid4().hex}"
    url = f"memory://{bucket}/p"
    try:
        index = write_shards(url, *partition(30), num_classes=4, shard_size=10)
        whole = read_shards(url)
        downloads: list[str] = []
        memory = fsspec.filesystem("memory")
        real_open = type(memory).open

        def counting_open(self, path, mode="rb", **kw):
            if "shard-" in path and "r" in mode:
                downloads.append(path.rsplit("/", 1)[-1])
            return real_open(self, path, mode, **kw)

        monkeypatch.setattr(type(memory), "open", counting_open)
        ds = open_shards(url)
        assert torch.equal(ds.batch_uint8(torch.tensor([25, 3]))[0], whole.images[[25, 3]])
        assert sorted(downloads) == ["shard-00000.safetensors", "shard-00002.safetensors"]
        cached = sorted(p.name for p in (tmp_path / "cache").glob("*.safetensors"))
        assert cached == sorted(f"{index['shards'][i]['sha256']}.safetensors" for i in (0, 2))
        again = open_shards(url)  # another job on this machine: the verified copies are reused
        assert torch.equal(again.batch_uint8(torch.tensor([4, 26]))[0], whole.images[[4, 26]])
        assert len(downloads) == 2
        raw = bytearray(storage.read_bytes(storage.join(url, "shard-00001.safetensors")))
        raw[-1] ^= 0xFF
        storage.write_bytes(storage.join(url, "shard-00001.safetensors"), bytes(raw))
        with pytest.raises(ShardError, match=r"memory://.*shard-00001\.safetensors: checksum mismatch"):
            again.batch_uint8(torch.tensor([15]))
        assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # the bad copy never became visible
    finally:
        fsspec.filesystem("memory").rm(f"/{bucket}", recursive=True)


@pytest.mark.slow  # ~15-30 s: three short expert runs, two of them with two loader workers
def test_an_expert_resumed_through_the_streamed_loader_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    ds = load_fashion_mnist(limit=40)
    write_shards(str(tmp_path / "part"), ds.images, ds.labels, ds.ids, num_classes=10, shard_size=9)

    def job(name: str, workers: int) -> ExpertJobConfig:
        return ExpertJobConfig.model_validate(dict(
            name=name, output=str(tmp_path / name), data=dict(source="shards", path=str(tmp_path / "part")),
            model=dict(arch="DiT-T/4"),
            train=dict(steps=7, batch_size=16, warmup_steps=2, checkpoint_every=1000, log_every=1, num_threads=1,
                       seed=3, loader_workers=workers, loader_prefetch=2),
        ))  # fmt: skip

    whole = train(job("whole", 0), progress=False)  # read in the training process
    first = train(job("resumed", 2), stop_after=3, progress=False)  # 2 steps per epoch: resumes mid-epoch 1
    rest = train(job("resumed", 2), progress=False)
    assert first.interrupted and first.step == 3 and rest.step == 7
    assert first.losses + rest.losses == whole.losses  # exact, step by step
    ta = checkpoint.load(str(tmp_path / "whole" / "checkpoints")).tensors
    tb = checkpoint.load(str(tmp_path / "resumed" / "checkpoints")).tensors
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.slow  # ~10-30 s: one expert process with two loader workers, stopped and checked
def test_sigterm_to_the_whole_process_group_still_stops_cleanly(tmp_path: Path) -> None:
    """Ctrl-C, or a scheduler that signals the job's process group: the loader workers are in a group of
    their own, so only the training process gets it; it finishes its step and writes the checkpoint."""
    ds = load_fashion_mnist(limit=64)
    write_shards(str(tmp_path / "part"), ds.images, ds.labels, ds.ids, num_classes=10, shard_size=16)
    out = tmp_path / "out"
    (tmp_path / "job.toml").write_text(to_toml(ExpertJobConfig.model_validate(dict(
        name="stream", output=str(out), data=dict(source="shards", path=str(tmp_path / "part")),
        train=dict(steps=100_000, batch_size=8, checkpoint_every=100_000, log_every=1, num_threads=1, loader_workers=2),
    )).model_dump(mode="json")))  # fmt: skip
    code, err = interrupt_training(tmp_path / "job.toml", out, group=True)  # the trainer and its workers
    assert code == EXIT_INTERRUPTED, err
    assert "rerun to resume" in err
    assert 2 <= checkpoint.load(str(out / "checkpoints")).step < 100_000


def test_a_run_that_leaves_a_failed_loader_behind_still_exits(tmp_path: Path) -> None:
    """A worker's error keeps its iterator alive in the traceback; the interpreter's exit terminates
    and joins leftover workers, which must therefore still die of SIGTERM (a worker ignoring it hung here)."""
    url = str(tmp_path / "p")
    write_shards(url, *partition(20), num_classes=4, shard_size=10)
    (tmp_path / "p" / "shard-00001.safetensors").write_bytes(b"garbage")
    script = f"""
import torch
from ddm.core.loader import step_loader
from ddm.core.schedule import BatchOrder, StepBatches
from ddm.expert.stream import open_shards
kept = []
try:
    list(step_loader(open_shards({url!r}), StepBatches(BatchOrder(20, 20, seed=0), 0, 1), workers=1, prefetch=1))
except Exception as e:
    kept.append(e)  # its traceback holds the iterator and its worker until the interpreter exits
print(type(kept[0]).__name__)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "ShardError", done.stderr[-2000:]


@pytest.mark.slow  # moto's server starts for it (~10 s on a free machine, minutes on a loaded one)
def test_s3_shards_stream_through_workers(s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deployment path: shards on S3 (moto), read by two forked workers, each shard fetched once."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    url = s3.url("partitions", "expert-0")
    index = write_shards(url, *partition(40), num_classes=4, shard_size=10)
    ds, whole = open_shards(url), read_shards(url)
    order = BatchOrder(40, 8, seed=2)
    got = list(step_loader(ds, StepBatches(order, 0, 5), workers=2, prefetch=2))
    for step, (images, labels) in zip(range(1, 6), got):
        index_s = BatchOrder(40, 8, seed=2).indices(step)
        assert torch.equal(images, whole.images[index_s]) and torch.equal(labels, whole.labels[index_s])
    cached = sorted(p.name for p in (tmp_path / "cache").glob("*.safetensors"))
    assert cached == sorted(f"{e['sha256']}.safetensors" for e in index["shards"])


def test_open_files_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ddm.expert.stream.MAX_OPEN", 3)
    url = str(tmp_path / "p")
    write_shards(url, *partition(30), num_classes=4, shard_size=5)  # 6 shards
    ds, whole = open_shards(url), read_shards(url)
    index = torch.arange(30).flip(0)
    assert torch.equal(ds.batch_uint8(index)[0], whole.images[index])
    assert len(ds.opened_shards()) == 3 and torch.equal(ds.labels, whole.labels)  # reopened as needed
