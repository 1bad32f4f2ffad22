"""Islands files and TorchX components: parsing, validation and the AppDefs they produce."""

import sys

import pytest

from ddm.coordinator import components
from ddm.coordinator.islands import IslandsConfig, load_islands, parse_j
from ddm.core.config import ConfigError


def write(tmp_path, text):
    p = tmp_path / "islands.toml"
    p.write_text(text)
    return str(p)


def test_default_is_one_local_island():
    cfg = load_islands(None)
    assert cfg.island_for(0) == "local" and cfg.island["local"].scheduler == "local_cwd"


def test_experts_are_placed_on_their_island(tmp_path):
    cfg = load_islands(
        write(
            tmp_path,
            """
default = "a"
[island.a]
scheduler = "local_cwd"
[island.b]
scheduler = "kubernetes"
experts = [1, 3]
image = "img:1"
namespace = "ddm"
queue = "q"
j = "2x8"
gpu = 8
""",
        )
    )
    assert [cfg.island_for(k) for k in range(4)] == ["a", "b", "a", "b"]
    assert cfg.island["b"].run_cfg() == {"namespace": "ddm", "queue": "q"}
    assert cfg.island["b"].model_copy(update={"service_account": "sa"}).run_cfg()["service_account"] == "sa"
    with pytest.raises(ValueError, match="experts 0..1"):
        cfg.check_experts(2)


@pytest.mark.parametrize(
    "text, field",
    [
        ('[island.a]\nscheduler = "slurmm"', "island.a.scheduler"),
        ('[island.local]\nj = "2y3"', "island.local.j"),
        ("[island.local]\ncpus = 3", "island.local.cpus"),
        ('default = "gpu"\n[island.local]\n', "default island 'gpu'"),
        ('[island.k]\nscheduler = "kubernetes"\nimage = "x"', "namespace, queue"),
        ('default = "a"\n[island.a]\nexperts = [0]\n[island.b]\nexperts = [0]', "expert 0 is listed in both"),
        ('[island.local]\nqueue = "q"', 'queue: only for scheduler = "kubernetes"'),
        (
            '[island.k]\nscheduler = "kubernetes"\nimage = "x"\nnamespace = "Bad_NS"\nqueue = "q"',
            "namespace = 'Bad_NS' is not a kubernetes name",
        ),
        (
            '[island.k]\nscheduler = "kubernetes"\nimage = "x"\nnamespace = "n"\nqueue = "q"\nenv_from_secrets = ["s3 creds"]',
            "env_from_secrets[0]",
        ),
        ('default = "a b"\n[island."a b"]\n', "island name 'a b'"),
    ],
)
def test_bad_islands_file_names_the_field(tmp_path, text, field):
    with pytest.raises(ConfigError) as e:
        load_islands(write(tmp_path, text))
    assert field in str(e.value) and "islands.toml" in str(e.value)


def test_unparseable_islands_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_islands(write(tmp_path, "[island.a\n"))


@pytest.mark.parametrize("j, expected", [("1x1", (1, 1)), ("4", (1, 4)), ("2x8", (2, 8)), ("1:3x2", (3, 2))])
def test_parse_j(j, expected):
    assert parse_j(j) == expected


@pytest.mark.parametrize("j", ["", "x2", "2x", "1.5x2", "axb"])
def test_parse_j_rejects(j):
    with pytest.raises(ValueError, match="NODESxPROCS"):
        parse_j(j)


def test_single_process_component_runs_the_module_directly():
    app = components.trainer("/r/job.toml", name="demo-expert-0", image="/work", python=sys.executable, cpu=2)
    role = app.roles[0]
    assert role.entrypoint == sys.executable
    assert role.args == ["-m", "ddm.train", "--config", "/r/job.toml"]
    assert role.env["OMP_NUM_THREADS"] == "2" and role.resource.cpu == 2


def test_multi_process_component_uses_torchrun():
    app = components.trainer("s3://b/r/job.toml", name="e", image="img", j="2x4", gpu=4)
    role = app.roles[0]
    assert role.entrypoint == "bash" and role.num_replicas == 2
    script = role.args[1]
    assert "-m torch.distributed.run" in script and "--nnodes 2" in script and "--nproc-per-node 4" in script
    assert "--rdzv-backend c10d" in script and script.endswith("-m ddm.train --config s3://b/r/job.toml")
    assert "OMP_NUM_THREADS" not in role.env  # GPU jobs keep torch's own thread choice


def test_islands_config_object_rejects_unknown_default():
    with pytest.raises(ValueError):
        IslandsConfig(default="nope")


def test_a_registered_scheduler_is_an_island_kind() -> None:
    """An island scheduler is one ISLAND_SCHEDULERS entry: its required and own fields, run options and
    per-island binding follow from it (copy this test when adding one)."""
    from ddm.coordinator.islands import ISLAND_SCHEDULERS, Island, SchedulerKind

    ISLAND_SCHEDULERS.add(
        "test-batch", SchedulerKind(needs=("image",), run_cfg=lambda isl: {"image": isl.image}, per_island=lambda isl, client: None),
        help="a batch system for this test",
    )  # fmt: skip
    try:
        island = Island(scheduler="test-batch", image="img:1", cfg={"extra": 1})
        assert (
            island.run_cfg() == {"image": "img:1", "extra": 1}
            and island.scheduler_key("east") == "test-batch@east"
        )
        with pytest.raises(ValueError, match="a test-batch island needs image"):
            Island(scheduler="test-batch")
        with pytest.raises(ValueError, match='queue: only for scheduler = "kubernetes"'):
            Island(scheduler="test-batch", image="img:1", queue="q")
        assert Island().scheduler_key("local") == "local_cwd"
    finally:
        ISLAND_SCHEDULERS.remove("test-batch")
    with pytest.raises(ValueError, match="unknown scheduler 'test-batch'; choose one of local_cwd"):
        Island(scheduler="test-batch")
