"""Checkpoints and storage: atomic, self-describing, never unpickled."""

import json
import os
import pickle

import pytest
import torch

from ddm.core import checkpoint, parallel, storage
from ddm.core.checkpoint import CheckpointError


def tensors(step):
    return {
        "model.w": torch.full((3, 2), float(step)),
        "ema.w": torch.ones(3, 2),
        "optim.0.step": torch.tensor(step),
    }


@pytest.mark.parametrize("root", ["local", "memory"])
def test_round_trip_latest_and_pruning(tmp_path, root):
    d = str(tmp_path / "ck") if root == "local" else f"memory://ck-{os.getpid()}"
    for step in (10, 20, 30, 40):
        checkpoint.save(d, step, tensors(step), {"kind": "expert", "model": {"depth": 2}}, keep=2)
    assert checkpoint.list_steps(d) == [30, 40]
    ck = checkpoint.load(d)  # a directory resolves to the latest
    assert ck.step == 40 and ck.meta["kind"] == "expert" and ck.meta["model"] == {"depth": 2}
    assert torch.equal(ck.prefixed("model")["w"], torch.full((3, 2), 40.0))
    assert json.loads(storage.read_bytes(ck.url.removesuffix(".safetensors") + ".json"))["step"] == 40


def test_optimizer_state_round_trips_without_pickle():
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    flat = parallel.optimizer_tensors(opt)
    net2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(net2.parameters(), lr=0.1)
    parallel.load_optimizer_tensors(opt2, flat)
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)


def test_truncated_checkpoint_names_the_file(tmp_path):
    url = checkpoint.save(str(tmp_path), 1, tensors(1), {"kind": "expert"})
    raw = open(url, "rb").read()
    open(url, "wb").write(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"step-00000001\.safetensors"):
        checkpoint.load(url)


def test_a_pickle_where_a_checkpoint_should_be_is_refused(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    url = str(tmp_path / "step-00000005.safetensors")
    with open(url, "wb") as f:
        pickle.dump(Boom(), f)
    with pytest.raises(CheckpointError, match="step-00000005"):
        checkpoint.load(url)
    assert not (tmp_path / "pwned").exists()


def test_failed_write_leaves_previous_checkpoint_and_pointer_intact(tmp_path, monkeypatch):
    d = str(tmp_path)
    checkpoint.save(d, 10, tensors(10), {"kind": "expert"})
    real_replace = os.replace

    def crash_on_weights(src, dst):  # the process dies between writing the temp file and renaming it
        if dst.endswith("step-00000020.safetensors"):
            raise OSError("simulated crash during checkpoint write")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_weights)
    with pytest.raises(OSError, match="simulated crash"):
        checkpoint.save(d, 20, tensors(20), {"kind": "expert"})
    monkeypatch.setattr(os, "replace", real_replace)
    assert checkpoint.load(d).step == 10
    assert not [f for f in os.listdir(d) if ".tmp-" in f]  # no half-written file left behind


def test_atomic_write_replaces_whole_file(tmp_path):
    url = str(tmp_path / "a" / "b.json")
    storage.write_json(url, {"x": 1})
    storage.write_json(url, {"x": 2})
    assert storage.read_json(url) == {"x": 2}
    assert os.listdir(tmp_path / "a") == ["b.json"]


def test_corrupt_json_names_the_file(tmp_path):
    p = tmp_path / "manifest.json"
    p.write_text('{"stages": {')
    with pytest.raises(ValueError, match="manifest.json: not valid JSON"):
        storage.read_json(str(p))


def test_join_keeps_schemes():
    assert storage.join("s3://b/run/", "experts", "/e0") == "s3://b/run/experts/e0"
    assert storage.join("runs/x", "a") == "runs/x/a"
