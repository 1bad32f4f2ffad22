"""Data readers (expert/data.py): idx files, Debian's Fashion-MNIST, image folders, the dataset object."""

from __future__ import annotations

import gzip
import io
import logging
import struct
import uuid

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from ddm.core import storage
from ddm.expert.config import DataConfig
from ddm.expert.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    DataError,
    DatasetNotFoundError,
    ImageDataset,
    build_dataset,
    load_fashion_mnist,
    load_image_folder,
    parse_idx,
    read_idx,
    to_model_range,
    to_uint8,
)

INSTALL_HINT = "apt-get install dataset-fashion-mnist"


# ---------------------------------------------------------------------------------------------------
# idx files


def idx_bytes(array: np.ndarray, type_code: int) -> bytes:
    """A hand-built idx file: 0x0000, type byte, ndim byte, big-endian uint32 dims, big-endian data."""
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_parse_idx_hand_built_uint8():
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    out = parse_idx(idx_bytes(images, 0x08))
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    assert np.array_equal(out, images)


def test_parse_idx_is_big_endian():
    values = np.array([1, -2, 70000, 2**31 - 1], dtype=np.int32)
    raw = idx_bytes(values, 0x0C)
    assert raw[8:12] == b"\x00\x00\x00\x01"  # the first value, big-endian, right after a 1-dim header
    out = parse_idx(raw)
    assert out.dtype == np.int32 and out.tolist() == values.tolist()
    floats = np.array([[0.5, -1.25]], dtype=np.float32)
    assert parse_idx(idx_bytes(floats, 0x0D)).tolist() == floats.tolist()


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_plain_or_gzip(tmp_path, compress):
    labels = np.array([9, 0, 0, 3], dtype=np.uint8)
    raw = idx_bytes(labels, 0x08)
    path = tmp_path / ("labels.gz" if compress else "labels")
    path.write_bytes(gzip.compress(raw) if compress else raw)
    assert read_idx(str(path)).tolist() == [9, 0, 0, 3]


def test_corrupt_idx_errors_name_the_file(tmp_path):
    good = idx_bytes(np.zeros((5, 4, 4), dtype=np.uint8), 0x08)
    cases = {
        "truncated": (good[:-7], "truncated"),
        "short-header": (good[:10], "truncated idx header"),
        "tiny": (good[:2], "too short"),
        "bad-magic": (b"\x08\x03" + good[2:], "bad idx magic"),
        "bad-type": (good[:2] + b"\x07" + good[3:], "bad idx magic"),
        "trailing": (good + b"\x00\x00", "unexpected bytes"),
    }
    for name, (raw, message) in cases.items():
        path = tmp_path / f"{name}-idx3-ubyte"
        path.write_bytes(raw)
        with pytest.raises(DataError, match=message) as info:
            read_idx(str(path))
        assert str(path) in str(info.value), name
    truncated_gz = tmp_path / "cut-idx3-ubyte.gz"
    truncated_gz.write_bytes(gzip.compress(good)[:-20])
    with pytest.raises(DataError, match="gzip") as info:
        read_idx(str(truncated_gz))
    assert str(truncated_gz) in str(info.value)


def write_fake_fashion_mnist(
    directory, n: int = 6, *, compress: bool = True, split: str = "train"
) -> np.ndarray:
    prefix = "train" if split == "train" else "t10k"
    images = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
        raw = idx_bytes(arr, 0x08)
        name = f"{prefix}-{kind}-ubyte" + (".gz" if compress else "")
        (directory / name).write_bytes(gzip.compress(raw) if compress else raw)
    return images


@pytest.mark.parametrize("compress", [False, True])
def test_load_fashion_mnist_layout_from_hand_built_files(tmp_path, compress):
    images = write_fake_fashion_mnist(tmp_path, n=12, compress=compress)
    ds = load_fashion_mnist(str(tmp_path), split="train", limit=5)
    assert len(ds) == 5 and ds.images.shape == (5, 1, 28, 28)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images[:5]))  # limit takes the first N
    assert ds.labels.tolist() == [0, 1, 2, 3, 4] and ds.ids.tolist() == [0, 1, 2, 3, 4]
    assert ds.class_names == list(FASHION_MNIST_CLASSES)


def test_fashion_mnist_count_mismatch_names_both_files(tmp_path):
    write_fake_fashion_mnist(tmp_path, n=6)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros(5, np.uint8), 0x08))
    )
    with pytest.raises(DataError, match="6 images but .*train-labels-idx1-ubyte.gz has 5 labels"):
        load_fashion_mnist(str(tmp_path))


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=INSTALL_HINT) as info:
        load_fashion_mnist(str(tmp_path / "nowhere"))
    assert "data.path" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    # a directory without the files gets the same hint and names the missing file
    with pytest.raises(DatasetNotFoundError, match="t10k-images-idx3-ubyte") as info:
        load_fashion_mnist(str(tmp_path), split="test")
    assert INSTALL_HINT in str(info.value)


# ---------------------------------------------------------------------------------------------------
# the real Debian files (installed on this machine; a missing package fails with the install hint)


@pytest.fixture(scope="module")
def fmnist_train() -> ImageDataset:
    return load_fashion_mnist(FASHION_MNIST_DIR, split="train")


def test_real_fashion_mnist_train(fmnist_train):
    ds = fmnist_train
    assert len(ds) == 60000
    assert ds.images.shape == (60000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64 and ds.num_classes == 10
    assert int(ds.labels[0]) == 9 and ds.class_names[9] == "Ankle boot"
    assert torch.bincount(ds.labels, minlength=10).tolist() == [6000] * 10  # Fashion-MNIST is balanced
    assert int(ds.images.min()) == 0 and int(ds.images.max()) == 255
    assert torch.equal(ds.ids, torch.arange(60000))


def test_real_fashion_mnist_test_split():
    ds = load_fashion_mnist(FASHION_MNIST_DIR, split="test")
    assert ds.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.labels, minlength=10).tolist() == [1000] * 10
    assert int(ds.labels[0]) == 9  # the first test image is also an ankle boot


def test_build_dataset_fashion_mnist(fmnist_train):
    ds = build_dataset(DataConfig(source="fashion-mnist", split="train", limit=100))
    assert len(ds) == 100 and torch.equal(ds.images, fmnist_train.images[:100])
    with pytest.raises(DataError, match="data.channels = 1 and data.image_size = 28"):
        build_dataset(DataConfig(source="fashion-mnist", channels=3, image_size=28))


# ---------------------------------------------------------------------------------------------------
# the dataset object


def small_dataset(n: int = 10) -> ImageDataset:
    images = torch.arange(n * 3 * 4 * 4, dtype=torch.int64).remainder(256).to(torch.uint8).view(n, 3, 4, 4)
    return ImageDataset(
        images=images, labels=torch.arange(n) % 3, ids=torch.arange(100, 100 + n), num_classes=3
    )


def test_dataset_item_batch_and_subset():
    ds = small_dataset()
    x, y = ds[4]
    assert x.shape == (3, 4, 4) and x.dtype == torch.float32 and int(y) == 1
    assert torch.equal(to_uint8(x), ds.images[4])
    xb, yb = ds.batch(torch.tensor([0, 4, 9]))
    assert xb.shape == (3, 3, 4, 4) and yb.tolist() == [0, 1, 0]
    assert torch.equal(xb, to_model_range(ds.images[[0, 4, 9]]))
    assert float(xb.min()) >= -1 and float(xb.max()) <= 1
    sub = ds.subset(torch.tensor([9, 2]))
    assert len(sub) == 2 and sub.ids.tolist() == [109, 102] and sub.labels.tolist() == [0, 2]
    assert sub.num_classes == 3 and torch.equal(sub.images[0], ds.images[9])
    assert ds.subset(slice(0, 3)).ids.tolist() == [100, 101, 102]
    assert ds.subset([1]).ids.tolist() == [101]
    mask = ds.labels == 2
    assert ds.subset(mask).ids.tolist() == [102, 105, 108]  # a mask selects, it is not read as 0/1 positions
    assert ds.batch(mask)[1].tolist() == [2, 2, 2]
    with pytest.raises(DataError, match="boolean index"):
        ds.subset(mask[:4])


def test_dataset_works_with_a_dataloader():
    loader = torch.utils.data.DataLoader(small_dataset(), batch_size=4, shuffle=False)
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 4, 4) and x.dtype == torch.float32 and y.tolist() == [0, 1, 2, 0]


def test_dataset_rejects_inconsistent_tensors():
    ds = small_dataset()
    with pytest.raises(DataError, match="uint8"):
        ImageDataset(images=ds.images.float(), labels=ds.labels, ids=ds.ids, num_classes=3)
    with pytest.raises(DataError, match="labels must be int64"):
        ImageDataset(images=ds.images, labels=ds.labels[:5], ids=ds.ids, num_classes=3)
    with pytest.raises(DataError, match=r"labels must lie in \[0, 2\)"):
        ImageDataset(images=ds.images, labels=ds.labels, ids=ds.ids, num_classes=2)


# ---------------------------------------------------------------------------------------------------
# image folders


def write_image(url: str, im: Image.Image, fmt: str = "PNG") -> None:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    storage.write_bytes(url, buf.getvalue())


def make_folder(root: str) -> None:
    """cat/: 2 good PNGs + 1 broken PNG; dog/: a wide JPEG and a red BMP; notes.txt is ignored."""
    write_image(f"{root}/cat/a.png", Image.new("L", (16, 16), 10))
    write_image(f"{root}/cat/b.png", Image.new("RGB", (32, 32), (255, 0, 0)))
    storage.write_bytes(f"{root}/cat/broken.png", b"\x89PNG\r\n\x1a\n this is not really a png")
    wide = Image.new("RGB", (60, 20), (0, 0, 0))
    wide.paste((255, 255, 255), (20, 0, 40, 20))  # only the centre square is white
    write_image(f"{root}/dog/wide.jpg", wide, "JPEG")
    write_image(f"{root}/dog/z.bmp", Image.new("RGB", (8, 8), (0, 0, 255)), "BMP")
    storage.write_bytes(f"{root}/dog/notes.txt", b"not an image, not counted")


def test_image_folder_grey(tmp_path, caplog):
    root = str(tmp_path / "folder")
    make_folder(root)
    with caplog.at_level(logging.WARNING, logger="ddm.expert.data"):
        ds = load_image_folder(root, image_size=8, channels=1)
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 2
    assert len(ds) == 4 and ds.images.shape == (4, 1, 8, 8)
    assert ds.labels.tolist() == [0, 0, 1, 1]
    assert ds.ids.tolist() == [0, 1, 3, 4]  # broken.png had source id 2; the others keep theirs
    assert ds.skipped == [f"{root}/cat/broken.png"]
    assert "skipped 1 unreadable" in caplog.text and "broken.png" in caplog.text
    assert torch.all(ds.images[0] == 10)
    assert torch.all(ds.images[1] == 76)  # red -> luma 76
    assert (
        int(ds.images[2].min()) >= 250
    )  # centre crop of the wide JPEG is all white (JPEG may ring a little)
    assert torch.all(ds.images[3] == 29)  # blue -> luma 255 * 114/1000


def test_image_folder_rgb_and_limit(tmp_path):
    root = str(tmp_path / "folder")
    make_folder(root)
    ds = load_image_folder(root, image_size=6, channels=3)
    assert ds.images.shape == (4, 3, 6, 6)
    assert ds.images[1, :, 0, 0].tolist() == [255, 0, 0]
    assert ds.images[3, :, 0, 0].tolist() == [0, 0, 255]
    assert torch.all(ds.images[0] == 10)
    first = load_image_folder(root, image_size=6, channels=3, limit=2)
    assert len(first) == 2 and first.ids.tolist() == [0, 1] and first.num_classes == 2


def test_image_folder_on_memory_filesystem_and_through_config():
    root = f"memory://folder-{uuid.uuid4().hex}"
    try:
        make_folder(root)
        ds = build_dataset(DataConfig(source="image-folder", path=root, image_size=12, channels=3))
        assert len(ds) == 4 and ds.images.shape == (4, 3, 12, 12)
        assert ds.skipped == [f"{root}/cat/broken.png"]
    finally:
        fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="not found"):
        load_image_folder(str(tmp_path / "missing"), image_size=8, channels=1)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        load_image_folder(str(empty), image_size=8, channels=1)
    (empty / "cat").mkdir()
    (empty / "cat" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="hold no images"):
        load_image_folder(str(empty), image_size=8, channels=1)
    (empty / "cat" / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(DataError, match="none of the 1 images could be decoded"):
        load_image_folder(str(empty), image_size=8, channels=1)
