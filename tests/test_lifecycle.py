"""Expert lifecycle: ``ddm add-expert`` and ``ddm retire-expert`` on a tiny real run (real TorchX local
scheduler, real faiss, real expert servers), the generations they record, and the pure parts (the
router head remap, generation files)."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddm.coordinator import lineage
from ddm.coordinator.config import RunConfig
from ddm.core import checkpoint
from ddm.expert.generation import read_generation
from ddm.router.grow import remap_head
from ddm.router.model import RouterConfig, RouterNet

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
DDM = [sys.executable, "-m", "ddm"]


def test_remap_head_copies_kept_rows_and_starts_new_ones_at_the_mean() -> None:
    torch.manual_seed(0)
    net = RouterNet(
        RouterConfig(image_size=8, patch_size=4, hidden_size=16, depth=1, num_heads=2, num_experts=3)
    )
    net.head.linear.bias.data = torch.tensor([0.5, -1.0, 2.0])
    state = net.state_dict()
    grown = remap_head(state, [2, 0, -1])  # new 0 <- old 2, new 1 <- old 0, new 2 is new
    w = state["head.linear.weight"]
    assert torch.equal(grown["head.linear.weight"][0], w[2]) and torch.equal(
        grown["head.linear.weight"][1], w[0]
    )
    assert torch.allclose(grown["head.linear.weight"][2], w.mean(0))
    assert grown["head.linear.bias"].tolist() == pytest.approx([2.0, 0.5, 0.5])  # mean of the old biases
    # the trunk is shared as it is, and the new router's logits for the kept experts are the old ones
    new = RouterNet(
        RouterConfig(image_size=8, patch_size=4, hidden_size=16, depth=1, num_heads=2, num_experts=3)
    )
    new.load_state_dict(grown)
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, 10])
    old_logits, new_logits = net(x, t, y), new(x, t, y)  # (4, 3) each
    assert torch.allclose(new_logits[:, 0], old_logits[:, 2], atol=1e-6)
    assert torch.allclose(new_logits[:, 1], old_logits[:, 0], atol=1e-6)
    assert torch.allclose(
        new_logits[:, 2], old_logits.mean(1), atol=1e-5
    )  # mean row + mean bias = mean logit
    with pytest.raises(ValueError, match="outputs 0..2"):
        remap_head(state, [0, 3])


def test_generation_file_is_read_beside_the_checkpoints(tmp_path: Path) -> None:
    out = tmp_path / "experts" / "expert-1"
    (out / "checkpoints").mkdir(parents=True)
    assert read_generation(str(out / "checkpoints")) == (0, "")  # none recorded: unknown
    (out / "generation.json").write_text(
        json.dumps({"name": "expert-1", "generation": 2, "lifecycle": "added"})
    )
    assert read_generation(str(out / "checkpoints")) == (2, "added")
    assert read_generation(str(out / "checkpoints" / "step-00000010.safetensors")) == (2, "added")
    (out / "generation.json").write_text(json.dumps({"generation": "two"}))
    with pytest.raises(ValueError, match="generation.json"):
        read_generation(str(out / "checkpoints"))


def test_lineage_orders_serving_experts_and_keeps_history(tmp_path: Path) -> None:
    cfg = RunConfig.model_validate({"root": str(tmp_path), "partition": {"k": 3}})
    data: dict = {}
    assert lineage.serving_experts(cfg, data) == ["expert-0", "expert-1", "expert-2"]
    for k in (2, 0, 1):
        lineage.record_generation(data, str(tmp_path), f"expert-{k}", lineage.TRAINED, partition_index=k,
                                  provenance={"count": 1}, checkpoint=None)  # fmt: skip
    lineage.record_generation(data, str(tmp_path), "expert-1", lineage.RETIRED, partition_index=1,
                              provenance=None, checkpoint=None, active=False)  # fmt: skip
    assert lineage.active_experts(data) == ["expert-0", "expert-2"]
    assert lineage.serving_experts(cfg, data) == ["expert-0", "expert-1", "expert-2"]  # no router yet
    lineage.record_router(data, "r/gen-2", ["expert-0", "expert-2"])
    assert lineage.serving_experts(cfg, data) == ["expert-0", "expert-2"]  # the router's experts
    assert lineage.next_partition_index(cfg, data) == 3  # a retired index stays taken
    rec = data["lineage"]["experts"]["expert-1"]
    assert (rec["generation"], rec["lifecycle"], rec["data"]) == (2, "retired", {"count": 1})
    assert [h["lifecycle"] for h in rec["history"]] == ["trained"]
    assert read_generation(str(tmp_path / "experts" / "expert-1" / "checkpoints")) == (2, "retired")
    with pytest.raises(ValueError, match="lifecycle"):
        lineage.record_generation(data, str(tmp_path), "expert-0", "reborn", partition_index=0,
                                  provenance=None, checkpoint=None)  # fmt: skip


def write_config(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "run"
    text = TINY.read_text().replace('root = "runs/tiny"', f'root = "{root}"')
    text = text.replace("steps = 30\n", "steps = 8\n").replace("steps = 20\n", "steps = 6\n")
    text = text.replace("[eval]\n", "[eval]\nenabled = false\n")
    text = text.replace("[distill.shortcut]", "[distill]\nenabled = false\n\n[distill.shortcut]")
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(text)
    return cfg, root


def checkpoint_hashes(root: Path, names: list[str]) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for n in names
        for p in sorted((root / "experts" / n / "checkpoints").iterdir())
    }


def ddm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*DDM, *args], capture_output=True, text=True, timeout=1500)


@pytest.mark.slow
# six TorchX jobs and three expert servers: ~7 min at load 2, over 20 at load 25
@pytest.mark.timeout(2400)
def test_add_then_retire_an_expert_touches_no_other_expert(tmp_path: Path) -> None:
    from ddm.coordinator.stack import LocalStack
    from ddm.router.client import RouterClient

    cfg, root = write_config(tmp_path)
    run = ddm("run", str(cfg), "--quiet")
    assert run.returncode == 0, run.stdout + run.stderr
    before = checkpoint_hashes(root, ["expert-0", "expert-1"])
    assert before

    # add: new data (the test split) becomes partition 2, its expert and a 3-output router train
    add = ddm("add-expert", str(root), "--data", "fashion-mnist", "--split", "test", "--limit", "120",
              "--router-steps", "4", "--json")  # fmt: skip
    assert add.returncode == 0, add.stdout + add.stderr
    event = json.loads(add.stdout.strip().splitlines()[-1])
    assert event["expert"] == "expert-2" and event["compute"]["spent_seconds"] > 0
    assert checkpoint_hashes(root, ["expert-0", "expert-1"]) == before  # byte-identical
    after_add = {k: v for k, v in checkpoint_hashes(root, ["expert-1", "expert-2"]).items()}
    m = json.loads((root / "manifest.json").read_text())
    gens = {n: (r["generation"], r["lifecycle"]) for n, r in m["lineage"]["experts"].items()}
    assert gens == {"expert-0": (1, "trained"), "expert-1": (1, "trained"), "expert-2": (1, "added")}
    shards = m["lineage"]["experts"]["expert-2"]["data"]["shards"]
    index = json.loads((root / "partitions" / "expert-2" / "index.json").read_text())
    assert [s["sha256"] for s in shards] == [s["sha256"] for s in index["shards"]]
    assert m["lineage"]["experts"]["expert-2"]["data"]["source"]["split"] == "test"
    router = checkpoint.load(checkpoint.latest(str(root / "router" / "gen-2" / "checkpoints")))
    assert router.meta["model"]["num_experts"] == 3
    assert [p.rsplit("/", 1)[1] for p in router.meta["partitions"]] == ["expert-0", "expert-1", "expert-2"]
    status = ddm("status", str(root))
    assert status.returncode == 0 and "added" in status.stdout and "router generation 2" in status.stdout

    # retire expert-0 with its data: shards deleted first, so the router retrains without reading them
    retire = ddm("retire-expert", str(root), "expert-0", "--purge", "--router-steps", "4")
    assert retire.returncode == 0, retire.stdout + retire.stderr
    assert not (root / "partitions" / "expert-0" / "index.json").exists()
    assert list((root / "experts" / "expert-0" / "checkpoints").iterdir()) == []
    assert checkpoint_hashes(root, ["expert-1", "expert-2"]) == after_add
    router = checkpoint.load(checkpoint.latest(str(root / "router" / "gen-3" / "checkpoints")))
    assert [p.rsplit("/", 1)[1] for p in router.meta["partitions"]] == ["expert-1", "expert-2"]
    m = json.loads((root / "manifest.json").read_text())
    assert m["lineage"]["experts"]["expert-0"]["lifecycle"] == "retired"
    assert not m["lineage"]["experts"]["expert-0"]["active"]

    # serving picks the change up: two experts, each saying which generation answers
    with LocalStack(str(root), port=0, supervise=False) as stack:
        with RouterClient(stack.address, timeout=60) as client:
            experts = client.list_experts()
            assert [(e.name, e.info.generation, e.info.lifecycle) for e in experts] == [
                ("expert-1", 1, "trained"),
                ("expert-2", 1, "added"),
            ]
            images, _ = client.sample(2, steps=2, seed=0)
            assert images.shape == (2, 1, 28, 28)


def test_an_expert_server_says_which_generation_it_serves_and_results_carry_it(tmp_path: Path) -> None:
    from grpc_fixtures import expert_checkpoint

    from ddm.expert.server import ExpertServer
    from ddm.proto.ddm.v1 import ddm_pb2 as pb
    from ddm.router.client import ExpertClient, RouterClient
    from ddm.router.cohort import member_results

    ckpts = expert_checkpoint(tmp_path, 1)
    (tmp_path / "experts" / "expert-1" / "generation.json").write_text(
        json.dumps({"name": "expert-1", "generation": 3, "lifecycle": "replaced"})
    )
    server = ExpertServer(ckpts, address="127.0.0.1:0").start(timeout=30)
    try:
        with ExpertClient(server.target) as client:
            info = client.info()
    finally:
        server.stop(0)
    assert (info.name, info.generation, info.lifecycle) == ("expert-1", 3, "replaced")

    class Counts:  # the ensemble's CallCounts: one entry per expert
        batches, rows = [4], [8]

    class Params:
        labels, seed = torch.tensor([0, 1]), 5

    class Member:
        n, params, include_float = 2, Params(), False

    (result,) = member_results([Member()], torch.zeros(2, 1, 8, 8), ["expert-1"], Counts(), [info])
    assert [(g.name, g.generation, g.lifecycle) for g in result.expert_generations] == [
        ("expert-1", 3, "replaced")
    ]
    _, sample_info = RouterClient._result(pb.Result.FromString(result.SerializeToString()), 1)
    assert sample_info.expert_generations == {"expert-1": (3, "replaced")}


def test_a_stale_student_is_not_served_by_default(tmp_path: Path) -> None:
    import argparse

    from ddm.coordinator.manifest import Manifest
    from ddm.coordinator.serve_cmd import _student

    cfg = RunConfig.model_validate({"root": str(tmp_path), "partition": {"k": 2}})
    manifest = Manifest.open(str(tmp_path), cfg.model_dump(mode="json"))
    student = checkpoint.save(
        str(tmp_path / "distill" / "checkpoints"), 3, {"model.w": torch.zeros(1)}, {"kind": "student"}
    )
    args = argparse.Namespace(root=str(tmp_path), student=None)
    assert _student(args) == checkpoint.latest(str(tmp_path / "distill" / "checkpoints"))
    lineage.mark_student_stale(manifest.data, "distilled with expert-1, now retired", student)
    manifest.save()
    assert _student(args) is None
    assert (
        _student(argparse.Namespace(root=str(tmp_path), student="explicit.safetensors"))
        == "explicit.safetensors"
    )
    assert any("STALE" in line for line in lineage.status_lines({**manifest.data, "lineage": {
        **manifest.data["lineage"], "experts": {"expert-0": {"generation": 1, "lifecycle": "trained", "partition_index": 0}}}}))  # fmt: skip


def test_compute_counts_each_jobs_attempts_against_a_full_retrain() -> None:
    from ddm.coordinator.lifecycle import compute

    def job(*spans):
        return {"attempts": [{"submitted_at": a, "ended_at": b} for a, b in spans]}

    data = {"jobs": {"expert-0": job((0, 100)), "expert-1": job((0, 40), (50, 110)), "router": job((110, 130)),
                     "expert-2": job((200, 290)), "router-gen-2": job((290, 300))}}  # fmt: skip
    c = compute(data, ["expert-2", "router-gen-2"], ["expert-0", "expert-1", "expert-2"])
    assert c["jobs"] == {"expert-2": 90, "router-gen-2": 10} and c["spent_seconds"] == 100
    assert c["full_retrain_seconds"] == 100 + 100 + 90 + 20 and c["ratio"] == round(100 / 310, 3)
