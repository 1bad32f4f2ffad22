"""``ddm sample --labels`` takes class names (the checkpoint's, the run's or the router's) as well as
numbers, and a bad value is a clean error listing the valid names (exit 2, no traceback), in this
process and through the router's gRPC path (RouterInfo.class_names)."""

from pathlib import Path

import pytest
from grpc_fixtures import expert_checkpoint, router_checkpoint

from ddm.coordinator.cli import main
from ddm.coordinator.sample_cmd import parse_labels

NAMES = ["boot", "coat", "shirt"]  # grpc_fixtures' models have 3 classes


def test_names_numbers_and_a_bad_value_listing_the_classes():
    assert parse_labels("coat,0,SHIRT", 5, 3, NAMES).tolist() == [1, 0, 2, 1, 0]
    assert parse_labels("2", 2, 3).tolist() == [2, 2]  # no names known: numbers as before
    with pytest.raises(ValueError, match=r"--labels 'cot': not a class of this model; the classes are 0 boot, 1 coat, 2 shirt"):  # fmt: skip
        parse_labels("coat,cot", 4, 3, NAMES)
    with pytest.raises(ValueError, match=r"--labels '3': .* the classes are 0\.\.2"):
        parse_labels("3", 4, 3)


def test_sample_a_checkpoint_by_class_name_and_a_bad_name_exits_2(tmp_path: Path, capsys):
    ckpt = expert_checkpoint(tmp_path, 0, class_names=NAMES)
    out = tmp_path / "s.png"
    assert main(["sample", "--checkpoint", ckpt, "--n", "2", "--steps", "1", "--labels", "shirt,boot", "--out", str(out)]) == 0  # fmt: skip
    assert out.exists()
    assert main(["sample", "--checkpoint", ckpt, "--n", "2", "--steps", "1", "--labels", "hat", "--out", str(out)]) == 2  # fmt: skip
    assert "ddm sample: --labels 'hat': not a class of this model; the classes are 0 boot, 1 coat, 2 shirt" in capsys.readouterr().err  # fmt: skip


def test_the_router_serves_its_class_names_and_sample_router_takes_them(tmp_path: Path, capsys):
    from ddm.expert.server import ExpertServer
    from ddm.router.client import RouterClient
    from ddm.router.server import RouterServer

    experts = [ExpertServer(expert_checkpoint(tmp_path, k)).start(timeout=30) for k in range(2)]
    router = RouterServer(router_checkpoint(tmp_path, 2, class_names=NAMES), [e.target for e in experts])
    router.start(timeout=30)
    try:
        with RouterClient(router.target) as client:
            assert list(client.info().class_names) == NAMES
        out = tmp_path / "r.png"
        common = ["sample", "--router", router.target, "--n", "2", "--steps", "1", "--out", str(out)]
        assert main([*common, "--labels", "coat,2"]) == 0 and out.exists()
        assert main([*common, "--labels", "jumper"]) == 2
        assert "the classes are 0 boot, 1 coat, 2 shirt" in capsys.readouterr().err
    finally:
        router.stop()
        for e in experts:
            e.stop()
