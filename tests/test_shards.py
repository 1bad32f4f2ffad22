"""Partition shards (expert/shards.py): round trips on local and memory:// fsspec, integrity errors."""

from __future__ import annotations

import hashlib
import json
import uuid

import fsspec
import pytest
import torch

from ddm.core import storage
from ddm.expert.config import DataConfig
from ddm.expert.data import DataError, build_dataset
from ddm.expert.shards import (
    FORMAT,
    IncompletePartitionError,
    ShardError,
    ShardWriter,
    read_index,
    read_shards,
    write_shards,
)


def partition(n: int = 23, c: int = 1, size: int = 6, num_classes: int = 4):
    g = torch.Generator().manual_seed(n)
    images = torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    ids = torch.randperm(1000, generator=g)[:n]
    return images, labels, ids


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "partitions" / "cluster-003")
    else:
        bucket = f"shards-{uuid.uuid4().hex}"
        yield f"memory://{bucket}/cluster-003"
        fsspec.filesystem("memory").rm(f"/{bucket}", recursive=True)


def test_round_trip(root):
    images, labels, ids = partition(23)
    index = write_shards(root, images, labels, ids, num_classes=4, shard_size=10, meta={"cluster": 3})
    assert index["format"] == FORMAT and index["count"] == 23
    assert index["image_shape"] == [1, 6, 6] and index["num_classes"] == 4
    assert [s["count"] for s in index["shards"]] == [10, 10, 3]
    assert [s["file"] for s in index["shards"]] == [f"shard-0000{i}.safetensors" for i in range(3)]
    assert read_index(root) == index
    assert storage.listdir(root) == ["index.json"] + [
        s["file"] for s in index["shards"]
    ]  # no temp files left
    for s in index["shards"]:  # the index's checksums are of the files as stored
        assert hashlib.sha256(storage.read_bytes(storage.join(root, s["file"]))).hexdigest() == s["sha256"]
    ds = read_shards(root)
    assert torch.equal(ds.images, images) and torch.equal(ds.labels, labels) and torch.equal(ds.ids, ids)
    assert ds.labels.dtype == torch.int64 and ds.ids.dtype == torch.int64
    assert ds.num_classes == 4 and ds.meta == {"cluster": 3}


def test_round_trip_rgb_and_class_names(root):
    images, labels, ids = partition(5, c=3, size=4, num_classes=2)
    write_shards(
        root, images, labels.to(torch.int32), ids, num_classes=2, meta={"class_names": ["cat", "dog"]}
    )
    ds = read_shards(root)
    assert ds.images.shape == (5, 3, 4, 4) and torch.equal(ds.images, images)
    assert ds.labels.dtype == torch.int64 and torch.equal(ds.labels, labels)
    assert ds.class_names == ["cat", "dog"]


def test_empty_partition_round_trips(root):
    write_shards(root, *partition(0, size=4), num_classes=2)
    ds = read_shards(root)
    assert len(ds) == 0 and ds.image_shape == (1, 4, 4)


def test_index_is_written_last(root, monkeypatch):
    written = []
    real_write_bytes = storage.write_bytes

    def recording_write_bytes(url, data):
        written.append(url.rsplit("/", 1)[-1])
        real_write_bytes(url, data)

    monkeypatch.setattr(storage, "write_bytes", recording_write_bytes)
    write_shards(root, *partition(12), num_classes=4, shard_size=5)
    assert written == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
        "shard-00002.safetensors",
        "index.json",
    ]


def test_flipped_byte_fails_the_checksum_and_names_the_shard(root):
    images, labels, ids = partition(20)
    write_shards(root, images, labels, ids, num_classes=4, shard_size=10)
    shard = storage.join(root, "shard-00001.safetensors")
    raw = bytearray(storage.read_bytes(shard))
    raw[-5] ^= 0x01  # one bit of image data in the second shard
    storage.write_bytes(shard, bytes(raw))
    with pytest.raises(ShardError, match="checksum mismatch") as info:
        read_shards(root)
    assert "shard-00001.safetensors" in str(info.value)
    # without verification the (wrong) bytes load: the checksum is what caught it
    ds = read_shards(root, verify=False)
    assert not torch.equal(ds.images, images)


def test_missing_index_is_an_incomplete_partition(root):
    write_shards(root, *partition(8), num_classes=4, shard_size=4)
    storage.remove(storage.join(root, "index.json"))  # as if the writer died before its last step
    with pytest.raises(IncompletePartitionError, match="incomplete partition") as info:
        read_shards(root)
    assert "index.json" in str(info.value) and "2 shard file(s) exist" in str(info.value)
    with pytest.raises(IncompletePartitionError, match="incomplete partition.*no partition was written"):
        read_index(storage.join(root, "never-written"))


def test_missing_or_malformed_shard_names_it(root):
    write_shards(root, *partition(8), num_classes=4, shard_size=4)
    storage.write_bytes(storage.join(root, "shard-00000.safetensors"), b"garbage")
    with pytest.raises(ShardError, match="shard-00000.safetensors: not a readable safetensors"):
        read_shards(root, verify=False)
    storage.remove(storage.join(root, "shard-00000.safetensors"))
    with pytest.raises(ShardError, match="shard-00000.safetensors: shard listed in index.json is missing"):
        read_shards(root)


def _edit_index(root: str, edit) -> None:
    url = storage.join(root, "index.json")
    index = json.loads(storage.read_bytes(url))
    edit(index)
    storage.write_bytes(url, json.dumps(index).encode())


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda ix: ix.update(format="ddm-shards/9"), "field 'format'"),
        (lambda ix: ix.pop("num_classes"), "field 'num_classes' is missing"),
        (lambda ix: ix.update(count=9), "field 'count' is 9 but the shards' counts add up to 8"),
        (lambda ix: ix.update(image_shape=[1, 6]), "field 'image_shape'"),
        (lambda ix: ix["shards"][1].update(sha256="xyz"), r"field 'shards\[1\].sha256'"),
        (lambda ix: ix["shards"][0].update(file="../../etc/passwd"), r"field 'shards\[0\].file'"),
        (lambda ix: ix["shards"][0].update(count=True), r"field 'shards\[0\].count'"),
    ],
    ids=["format", "num_classes", "count", "image_shape", "sha256", "file", "count-bool"],
)
def test_bad_index_fields_are_named(tmp_path, edit, message):
    root = str(tmp_path / "p")
    write_shards(root, *partition(8), num_classes=4, shard_size=4)
    _edit_index(root, edit)
    with pytest.raises(ShardError, match=message) as info:
        read_index(root)
    assert str(tmp_path / "p" / "index.json") in str(info.value)


def test_shapes_and_labels_are_checked_against_the_index(tmp_path):
    root = str(tmp_path / "p")
    write_shards(root, *partition(8, size=6), num_classes=4, shard_size=4)
    _edit_index(root, lambda ix: ix.update(image_shape=[1, 6, 5]))
    with pytest.raises(
        ShardError,
        match=r"shard-00000.safetensors: images have shape \[4, 1, 6, 6\], the index says \[4, 1, 6, 5\]",
    ):
        read_shards(root)
    write_shards(root, *partition(8, size=6), num_classes=4, shard_size=4)
    _edit_index(root, lambda ix: ix.update(num_classes=1))
    with pytest.raises(ShardError, match=r"shard-00000.safetensors: labels span .* outside \[0, 1\)"):
        read_shards(root)


def test_rewrite_removes_stale_shards(tmp_path):
    root = str(tmp_path / "p")
    write_shards(root, *partition(30), num_classes=4, shard_size=10)
    images, labels, ids = partition(7)
    write_shards(root, images, labels, ids, num_classes=4, shard_size=10)
    assert storage.listdir(root) == ["index.json", "shard-00000.safetensors"]
    assert torch.equal(read_shards(root).ids, ids)


def test_limit_reads_only_the_shards_it_needs(tmp_path):
    root = str(tmp_path / "p")
    images, labels, ids = partition(20)
    write_shards(root, images, labels, ids, num_classes=4, shard_size=5)
    storage.remove(storage.join(root, "shard-00003.safetensors"))  # never opened with limit <= 15
    ds = read_shards(root, limit=12)
    assert len(ds) == 12 and torch.equal(ds.ids, ids[:12])


def test_write_validates_its_inputs(tmp_path):
    images, labels, ids = partition(4)
    root = str(tmp_path / "p")
    with pytest.raises(ValueError, match="uint8"):
        write_shards(root, images.float(), labels, ids, num_classes=4)
    with pytest.raises(ValueError, match="ids must be integers"):
        write_shards(root, images, labels, ids[:3], num_classes=4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        write_shards(root, images, labels + 2, ids, num_classes=2)
    with pytest.raises(ValueError, match="JSON"):
        write_shards(root, images, labels, ids, num_classes=4, meta={"x": object()})
    assert not storage.exists(root)


def test_build_dataset_from_shards(tmp_path):
    root = str(tmp_path / "p")
    images, labels, ids = partition(9, c=1, size=28, num_classes=10)
    write_shards(root, images, labels, ids, num_classes=10, shard_size=4)
    ds = build_dataset(DataConfig(source="shards", path=root, limit=6))
    assert len(ds) == 6 and torch.equal(ds.images, images[:6])
    with pytest.raises(DataError, match="data.image_size = 28"):
        build_dataset(DataConfig(source="shards", path=root, image_size=32))


def test_shard_writer_streams_chunks_into_the_same_partition(tmp_path):
    images, labels, ids = partition(45, c=3, size=5)
    write_shards(str(tmp_path / "a"), images, labels, ids, num_classes=4, shard_size=10)
    writer = ShardWriter(str(tmp_path / "b"), image_shape=(3, 5, 5), num_classes=4, shard_size=10)
    for lo in range(0, 45, 13):  # chunks that do not line up with the shards
        writer.add(images[lo : lo + 13], labels[lo : lo + 13], ids[lo : lo + 13])
    assert not storage.exists(str(tmp_path / "b" / "index.json"))  # incomplete until closed
    assert writer.close() == storage.read_json(str(tmp_path / "a" / "index.json"))
    with pytest.raises(ValueError, match="uint8"):
        writer.add(images[:, :1], labels, ids)
