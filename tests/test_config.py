"""Configs: every shipped config loads; bad fields are named with the file."""

import glob

import pytest

from ddm.coordinator.config import RunConfig, default_config_text, load_run_config
from ddm.coordinator.islands import load_islands
from ddm.core.config import ConfigError, load_config
from ddm.expert.config import ExpertJobConfig
from ddm.expert.data import build_dataset


def test_embedded_default_loads_and_matches_the_demo_promise():
    cfg = load_run_config(None)
    assert cfg.partition.k == 4 and cfg.mode == "experts" and cfg.data.source == "fashion-mnist"
    assert "name" in default_config_text()


@pytest.mark.parametrize("path", sorted(glob.glob("configs/*.toml")))
def test_every_shipped_config_loads(path):
    if "islands" in path:
        load_islands(path)
    else:
        assert isinstance(load_run_config(path), RunConfig)


@pytest.mark.parametrize("path", [p for p in sorted(glob.glob("configs/*.toml")) if "islands" not in p])
def test_every_shipped_config_builds_its_networks_on_meta(path):
    """The expert, router and student of each run config instantiate at the config's image shape
    (on the meta device: no memory, milliseconds even for DiT-XL/2), with the analytic counts."""
    import torch

    from ddm.expert.model import DiT, dit_config
    from ddm.expert.model_cost import dit_cost
    from ddm.router.model import RouterNet, router_config
    from ddm.router.model_cost import router_cost

    cfg = shaped(load_run_config(path))
    image = {"image_size": cfg.data.image_size, "in_channels": cfg.data.channels}
    expert = dit_config(cfg.experts.model.arch, **image, num_classes=cfg.experts.model.num_classes)
    router = router_config(
        cfg.router.model.arch, **image, num_classes=cfg.router.model.num_classes, num_experts=cfg.partition.k
    )
    student = dit_config(
        cfg.distill.model.arch, **image, num_classes=cfg.distill.model.num_classes,
        guidance_embed=True, step_embed=cfg.distill.shortcut.enabled,
    )  # fmt: skip
    networks = ((DiT, expert, dit_cost), (RouterNet, router, router_cost), (DiT, student, dit_cost))
    for module_cls, net_cfg, cost in networks:
        with torch.device("meta"):
            net = module_cls(net_cfg)
        assert sum(p.numel() for p in net.parameters()) == cost(net_cfg).parameters


def shaped(cfg: RunConfig) -> RunConfig:
    """The config with its data-derived fields filled as ``ddm run`` fills them: from the data where it is
    here (Fashion-MNIST); else what the config states, and for what it leaves to a folder that is not
    here (configs/folder.toml) the README's example folder: RGB 32x32, 4 classes."""
    from ddm.coordinator.data_shape import resolve_run_config

    class Stated:  # a dataset object as far as resolve_run_config reads one
        image_shape = (cfg.data.channels or 3, cfg.data.image_size or 32, cfg.data.image_size or 32)
        num_classes = cfg.experts.model.num_classes or 4
        class_names = None

    if cfg.data.source == "fashion-mnist":
        return resolve_run_config(cfg, build_dataset(cfg.data.model_copy(update={"limit": 10})))
    return resolve_run_config(cfg, Stated())


def test_paper_imagenet_config_uses_the_papers_sizes():
    cfg = shaped(load_run_config("configs/paper-imagenet.toml"))
    assert cfg.partition.k == 8
    assert cfg.experts.model.arch == "DiT-XL/2" and cfg.router.model.arch == "Router-B/2"
    classes = {cfg.experts.model.num_classes, cfg.router.model.num_classes, cfg.distill.model.num_classes}
    assert classes == {1000}
    for train in (cfg.experts.train, cfg.router.train, cfg.distill.train):
        assert train.device == "cuda" and train.precision == "bf16"


def test_unknown_and_invalid_fields_are_named(tmp_path):
    p = tmp_path / "job.toml"
    p.write_text('name = "e"\n[train]\nsteps = -1\nlearning_rate = 3\n[model]\narch = "DiT-Z/9"\n')
    with pytest.raises(ConfigError) as e:
        load_config(ExpertJobConfig, str(p))
    msg = str(e.value)
    assert "job.toml" in msg and "train.steps" in msg and "train.learning_rate: unknown field" in msg
    assert "model.arch" in msg and "DiT-T/4" in msg  # the fix: the list of valid choices


def test_overrides_apply_to_nested_fields():
    cfg = load_run_config(None, {"experts.train.steps": 7, "partition.k": 2})
    assert cfg.experts.train.steps == 7 and cfg.partition.k == 2


def test_k_must_not_exceed_fine_k():
    with pytest.raises(ConfigError, match="fine_k"):
        load_run_config(None, {"partition.k": 300, "partition.fine_k": 256})
