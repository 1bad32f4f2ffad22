"""README's "Train on your own image folder", followed word for word: its commands, parsed from the
README's code block, run on a generated RGB 32x32 4-class folder of 200 images. Only the budget is made
tiny (the --set options below, appended to each `ddm run`); the folder, the config and every command
are the README's. Real faiss, real TorchX local jobs, the in-repo classifier trained on the folder."""

import json
import re
import shlex
from pathlib import Path

import pytest
from folders import make_rgb_folder

from ddm.coordinator.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # ~90 s quiet; a loaded machine is 10x slower

README = Path(__file__).resolve().parents[1] / "README.md"
TINY_BUDGET = {  # sizes only: what the section's config says otherwise stands
    "partition.k": "2", "partition.fine_k": "8", "partition.encoder": "pixels", "partition.tolerance": "0.2",
    "experts.poll_seconds": "0.3", "experts.train.steps": "8", "experts.train.batch_size": "16",
    "experts.train.warmup_steps": "2", "experts.train.checkpoint_every": "4",
    "router.model.arch": "Router-XS/4", "router.train.steps": "6", "router.train.batch_size": "16",
    "router.train.checkpoint_every": "3", "router.eval.samples_per_bin": "4",
    "eval.num_samples": "16", "eval.real_samples": "100", "eval.sample.steps": "4",
    "distill.train.steps": "4", "distill.train.batch_size": "8", "distill.train.checkpoint_every": "2",
    "distill.train.warmup_steps": "1", "distill.shortcut.min_step": "0.25", "distill.eval.ensemble_steps": "[4]",
    "distill.eval.num_samples": "10",
}  # fmt: skip


def readme_commands() -> list[list[str]]:
    """The `ddm ...` lines of the first sh block under the section's heading, split like a shell does."""
    text = README.read_text()
    section = text.split("## Train on your own image folder\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "README: the section has no sh code block"
    return [shlex.split(line) for line in block[1].splitlines() if line.startswith("ddm ")]


def test_the_readme_folder_section_word_for_word(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the README's relative paths (my-images, runs/..., samples.png) land here
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "folder.toml").write_text((README.parent / "configs" / "folder.toml").read_text())
    classes = make_rgb_folder(str(tmp_path / "my-images"), per_class=50)
    commands = readme_commands()
    assert [c[:2] for c in commands] == [["ddm", "run"], ["ddm", "run"], ["ddm", "status"], ["ddm", "sample"]]
    tiny = [a for k, v in TINY_BUDGET.items() for a in ("--set", f"{k}={v}")]
    outputs = []
    for command in commands:
        args = command[1:] + (tiny if command[1] == "run" else [])
        assert main(args) == 0, (command, capsys.readouterr().err[-3000:])
        outputs.append(capsys.readouterr())
    # 1. --print-config: what the data says, in every section that needs it
    cfg = json.loads(outputs[0].out)
    assert (cfg["data"]["channels"], cfg["data"]["image_size"]) == (3, 32)
    assert [cfg[s]["model"]["num_classes"] for s in ("experts", "router", "distill")] == [4, 4, 4]
    # 2. the run: every stage done, class accuracy scored by a classifier of the folder itself
    root = tmp_path / "runs" / "my-images"
    stages = json.loads((root / "manifest.json").read_text())["stages"]
    assert {s: stages[s]["state"] for s in stages} == dict.fromkeys(stages, "done") and len(stages) == 6
    metrics = json.loads((root / "eval" / "top-1" / "metrics.json").read_text())
    assert metrics["class_accuracy"] is not None and metrics["classifier_test_accuracy"] >= 0.9
    assert list((root / "eval" / "classifier").glob("classifier-image-folder-*/*.safetensors"))
    # 3. status and 4. a sample by class name
    assert "eval" in outputs[2].out + outputs[2].err
    assert (tmp_path / "samples.png").exists() and "wrote 8 samples" in outputs[3].out
    assert classes == ["circle", "dots", "square", "stripes"]
