"""A run's image shape and class count come from its data (issue 13: an RGB 32x32 4-class folder trained
as 1x28x28 with 10 classes); a config that contradicts the data is an error naming the field and the fix."""

import json
import logging
from types import SimpleNamespace

import pytest
from folders import make_rgb_folder
from PIL import Image

from ddm.coordinator.cli import main
from ddm.coordinator.config import load_run_config
from ddm.coordinator.data_shape import resolve_run_config
from ddm.expert.data import DataError, build_dataset, load_image_folder


@pytest.fixture
def ddm(capsys):
    """``ddm ARGS`` in this process (an uncaught exception fails the test): returncode, stdout, stderr."""

    def run(*args):
        rc = main(list(args))
        out = capsys.readouterr()
        return SimpleNamespace(returncode=rc, stdout=out.out, stderr=out.err)

    return run


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shape") / "images")
    make_rgb_folder(root, per_class=3)
    return root


def folder_config(tmp_path, folder, extra=""):
    p = tmp_path / "folder.toml"
    p.write_text(f'[data]\nsource = "image-folder"\npath = "{folder}"\n{extra}')
    return str(p)


def test_shape_and_classes_left_out_come_from_the_folder(tmp_path, folder, ddm):
    r = ddm("run", folder_config(tmp_path, folder), "--print-config")
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert (cfg["data"]["channels"], cfg["data"]["image_size"]) == (3, 32)
    # defined once, by the data: the experts', the router's and the student's class count alike
    assert [cfg[s]["model"]["num_classes"] for s in ("experts", "router", "distill")] == [4, 4, 4]


def test_a_stated_class_count_that_contradicts_the_data_is_named_with_the_fix(tmp_path, folder, ddm):
    r = ddm("run", folder_config(tmp_path, folder, "[experts.model]\nnum_classes = 10\n"), "--print-config")
    assert r.returncode == 2
    assert (
        "experts.model.num_classes = 10" in r.stderr
        and "has 4 classes (circle, dots, square, stripes)" in r.stderr
    )
    assert "leave experts.model.num_classes out" in r.stderr
    r = ddm("run", folder_config(tmp_path, folder), "--set", "router.model.num_classes=3", "--print-config")
    assert r.returncode == 2 and "router.model.num_classes = 3" in r.stderr and "4 classes" in r.stderr


def test_a_fixed_shape_source_names_the_stated_field_and_the_datas_value(ddm):
    with pytest.raises(DataError, match=r"data.channels = 3 \(the data's is 1\).*set data.channels = 1"):
        build_dataset(load_run_config(None, {"data.channels": 3, "data.limit": 10}).data)
    r = ddm("run", "--set", "data.image_size=32", "--set", "data.limit=10", "--print-config")
    assert r.returncode == 2 and "data.image_size = 32 (the data's is 28)" in r.stderr


def test_an_image_size_the_experts_patch_does_not_divide_is_said_before_the_run(tmp_path):
    root = str(tmp_path / "odd")
    for name in ("a", "b"):
        (tmp_path / "odd" / name).mkdir(parents=True)
        Image.new("RGB", (30, 30), (9, 9, 9)).save(f"{root}/{name}/0.png")
    cfg = load_run_config(folder_config(tmp_path, root))
    with pytest.raises(DataError, match=r"experts.model.arch = 'DiT-T/4' at data.image_size = 30"):
        resolve_run_config(cfg, build_dataset(cfg.data))


def test_folders_of_other_sizes_take_the_first_images_side_or_the_stated_one(tmp_path, caplog):
    root = str(tmp_path / "mixed")
    (tmp_path / "mixed" / "a").mkdir(parents=True)
    (tmp_path / "mixed" / "b").mkdir(parents=True)
    Image.new("RGB", (40, 40), (200, 10, 10)).save(f"{root}/a/0.png")  # the first image: 40x40 RGB
    Image.new("L", (64, 48), 30).save(f"{root}/a/1.png")  # wide and grey: center-cropped to 48, resized
    Image.new("RGB", (24, 24), (10, 10, 200)).save(f"{root}/b/0.png")  # smaller: upscaled
    with caplog.at_level(logging.WARNING, logger="ddm.expert.data"):
        ds = load_image_folder(root)
    assert ds.images.shape == (3, 3, 40, 40) and ds.class_names == ["a", "b"]
    assert "2 image(s) differ from the first one's shape" in caplog.text
    assert (
        int(ds.images[1].float().std()) == 0 and int(ds.images[1, 0, 0, 0]) == 30
    )  # grey -> RGB (30, 30, 30)
    stated = load_image_folder(root, image_size=16, channels=1)  # stated values are honoured for every image
    assert stated.images.shape == (3, 1, 16, 16)
