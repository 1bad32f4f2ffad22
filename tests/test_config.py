"""Configs: every shipped config loads; bad fields are named with the file."""

import glob

import pytest

from ddm.coordinator.config import RunConfig, default_config_text, load_run_config
from ddm.coordinator.islands import load_islands
from ddm.core.config import ConfigError, load_config
from ddm.expert.config import ExpertJobConfig


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
