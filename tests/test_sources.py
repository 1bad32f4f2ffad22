"""The data-source registry: every source decodes the same pictures to the same arrays, skips and counts
corrupt records, and names a wrong column or a missing field with its fix (expert/sources.py, archives.py)."""

import json

import pytest
import torch
from rgb_shapes import SHAPES, encode, parquet_bytes, shapes, tar_bytes, webdataset_members, write_folder
from s3_fixtures import moto_endpoint_fixture, s3_fixture  # noqa: F401 - registers the fixtures

from ddm.core import storage
from ddm.expert.config import DataConfig
from ddm.expert.data import DataError, ImageDataset, build_dataset
from ddm.expert.images import decode_image
from ddm.expert.sources import SOURCES, expand_braces

ITEMS = shapes(12, size=32, seed=3)


def cfg(source, path, **kw):
    return DataConfig(source=source, path=str(path), image_size=16, channels=3, **kw)


def expected(items, fmt=("PNG", "PNG")):
    """The uint8 arrays decode_image gives each picture (JPEG for odd positions when fmt says so)."""
    return torch.stack(
        [decode_image(encode(im, fmt[i % 2]), channels=3, size=16) for i, (im, _) in enumerate(items)]
    )


def test_expand_braces():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("s3://b/{a,b}/x-{8..10}.tar") == [
        "s3://b/a/x-8.tar", "s3://b/a/x-9.tar", "s3://b/a/x-10.tar",
        "s3://b/b/x-8.tar", "s3://b/b/x-9.tar", "s3://b/b/x-10.tar",
    ]  # fmt: skip
    assert expand_braces("plain.tar") == ["plain.tar"]
    for bad, message in (
        ("s-{3..1}.tar", "backwards"),
        ("s-{x}.tar", "neither"),
        ("s-{0..1.tar", "unbalanced"),
    ):
        with pytest.raises(ValueError, match=message):
            expand_braces(bad)


def test_registry_is_the_config_choice():
    assert set(SOURCES.names()) >= {
        "fashion-mnist",
        "image-folder",
        "unlabelled-folder",
        "webdataset",
        "parquet",
    }
    with pytest.raises(ValueError, match="unknown data source 'tfrecord'; choose one of fashion-mnist"):
        DataConfig(source="tfrecord")


def test_image_folder_and_webdataset_give_the_same_arrays(tmp_path):
    folder = write_folder(tmp_path / "folder", ITEMS)
    ds = build_dataset(cfg("image-folder", folder))
    # folder order: by class folder name, then file name
    order = sorted(range(len(ITEMS)), key=lambda i: (SHAPES[ITEMS[i][1]], i))
    assert torch.equal(ds.images, expected([ITEMS[i] for i in order]))
    assert ds.class_names == sorted(SHAPES) and ds.num_classes == 4

    members = webdataset_members(ITEMS[:6], 0), webdataset_members(ITEMS[6:], 6, label="json")
    for k, m in enumerate(members):
        (tmp_path / f"shards-{k:02d}.tar").write_bytes(tar_bytes(m))
    wds = build_dataset(cfg("webdataset", tmp_path / "shards-{00..01}.tar"))
    assert torch.equal(wds.images, expected(ITEMS, fmt=("PNG", "JPEG")))  # record order, across shards
    assert wds.labels.tolist() == [y for _, y in ITEMS] and wds.ids.tolist() == list(range(12))
    assert wds.num_classes == 4 and wds.class_names is None and wds.skipped == []
    assert wds.image_shape == (3, 16, 16)


def test_webdataset_skips_and_counts_corrupt_records_and_names_missing_fields(tmp_path):
    members = webdataset_members(ITEMS[:4])
    members[2] = ("sample000001.jpg", b"\xff\xd8 not really a jpeg")
    shard = tmp_path / "one.tar"
    shard.write_bytes(tar_bytes(members))
    ds = build_dataset(cfg("webdataset", shard))
    assert len(ds) == 3 and ds.ids.tolist() == [0, 2, 3]
    assert ds.skipped == [f"{shard}#sample000001.jpg"]

    no_label = [m for m in webdataset_members(ITEMS[:2]) if not m[0].endswith(".cls")]
    shard.write_bytes(tar_bytes(no_label))
    with pytest.raises(DataError, match=r"sample 'sample000000' has no label .*data.label_field = ''"):
        build_dataset(cfg("webdataset", shard))
    unlabelled = build_dataset(cfg("webdataset", shard, label_field=""))
    assert unlabelled.num_classes == 0 and unlabelled.labels.tolist() == [0, 0]

    shard.write_bytes(tar_bytes(webdataset_members(ITEMS[:2], label="json")))
    with pytest.raises(DataError, match=r"sample000000.json has no 'cls_id' key .*set data.label_field"):
        build_dataset(cfg("webdataset", shard, label_field="cls_id"))

    shard.write_bytes(tar_bytes(webdataset_members(ITEMS[:3]))[:3000])  # truncated mid-member
    with pytest.raises(DataError, match="corrupt or truncated, re-create it"):
        build_dataset(cfg("webdataset", shard))
    with pytest.raises(DataError, match="not found"):
        build_dataset(cfg("webdataset", tmp_path / "s-{0..1}.tar"))


def test_parquet_reads_a_hugging_face_export_and_names_wrong_columns(tmp_path):
    data = tmp_path / "export" / "data"
    data.mkdir(parents=True)
    (data / "train-00000-of-00002.parquet").write_bytes(parquet_bytes(ITEMS[:7]))
    (data / "train-00001-of-00002.parquet").write_bytes(parquet_bytes(ITEMS[7:]))
    ds = build_dataset(cfg("parquet", tmp_path / "export"))  # a folder: every .parquet under it, sorted
    assert torch.equal(ds.images, expected(ITEMS))
    assert ds.labels.tolist() == [y for _, y in ITEMS] and ds.class_names == list(SHAPES)
    assert ds.num_classes == 4

    plain = tmp_path / "plain.parquet"
    plain.write_bytes(parquet_bytes(ITEMS[:3], struct=False, names=False))
    assert torch.equal(build_dataset(cfg("parquet", plain)).images, expected(ITEMS[:3]))
    limited = build_dataset(cfg("parquet", tmp_path / "export", limit=5))
    assert len(limited) == 5 and limited.num_classes == 4

    with pytest.raises(
        DataError, match=r"no image column 'img' \(columns: \['image', 'label'\]\); set data.image_field"
    ):
        build_dataset(cfg("parquet", plain, image_field="img"))
    with pytest.raises(
        DataError, match=r"no label column 'labels' .*set data.label_field .*label_field = ''"
    ):
        build_dataset(cfg("parquet", plain, label_field="labels"))
    with pytest.raises(DataError, match=r"image column 'label' is int64, not binary"):
        build_dataset(cfg("parquet", plain, image_field="label"))
    assert build_dataset(cfg("parquet", plain, label_field="")).num_classes == 0
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 truncated")
    with pytest.raises(DataError, match="not a readable parquet file"):
        build_dataset(cfg("parquet", bad))


def test_parquet_corrupt_rows_are_skipped_and_counted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [encode(im) for im, _ in ITEMS[:4]]
    rows[1] = b"garbage"
    rows[2] = None
    table = pa.table({"image": pa.array(rows, type=pa.binary()), "label": [0, 1, 2, 3]})
    path = tmp_path / "x.parquet"
    pq.write_table(table, path)
    ds = build_dataset(cfg("parquet", path))
    assert ds.ids.tolist() == [0, 3] and ds.skipped == [f"{path}#row1", f"{path}#row2"]
    assert ds.num_classes == 4  # labels of skipped rows still name classes


def test_unlabelled_folder_is_unconditional(tmp_path):
    root = write_folder(tmp_path / "pics", ITEMS[:5], labelled=False)
    (root / "nested").mkdir()
    ITEMS[5][0].save(root / "nested" / "z.png")
    (root / "broken.png").write_bytes(b"not a png")
    ds = build_dataset(cfg("unlabelled-folder", root))
    assert isinstance(ds, ImageDataset) and ds.num_classes == 0 and ds.class_names is None
    assert len(ds) == 6 and ds.labels.tolist() == [0] * 6 and ds.skipped == [f"{root}/broken.png"]
    assert torch.equal(ds.images[:5], expected(ITEMS[:5]))
    with pytest.raises(DataError, match="no class sub-folders"):
        build_dataset(cfg("image-folder", tmp_path / "pics" / "nested"))


def test_webdataset_and_parquet_from_s3(s3):
    storage.write_bytes(s3.url("wds", "s-0.tar"), tar_bytes(webdataset_members(ITEMS[:6])))
    storage.write_bytes(s3.url("wds", "s-1.tar"), tar_bytes(webdataset_members(ITEMS[6:], 6)))
    storage.write_bytes(s3.url("hf", "data", "train-00000-of-00001.parquet"), parquet_bytes(ITEMS))
    wds = build_dataset(cfg("webdataset", s3.url("wds", "s-{0..1}.tar")))
    pq_ds = build_dataset(cfg("parquet", s3.url("hf")))
    assert torch.equal(wds.images, expected(ITEMS, fmt=("PNG", "JPEG")))
    assert torch.equal(pq_ds.images, expected(ITEMS)) and pq_ds.class_names == list(SHAPES)
    assert json.loads(json.dumps(pq_ds.labels.tolist())) == [y for _, y in ITEMS]
