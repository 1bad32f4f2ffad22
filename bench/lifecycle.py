"""Expert lifecycle benchmark: add an expert for classes the run never saw, then retire it.

    python bench/lifecycle.py --quick          # CI-sized: a few dozen steps per job
    python bench/lifecycle.py                  # larger budgets (minutes per job on 2 CPU cores)

1. A run is trained on Fashion-MNIST classes 0-7 only (K = 2 experts, router).
2. ``ddm add-expert`` adds classes 8-9 (train split) as expert-2 and fine-tunes the router to 3 outputs.
3. ``ddm retire-expert expert-2 --purge`` removes it again (router retrained from scratch on the rest).

Measured after each step: class accuracy (the in-repo classifier of all Fashion-MNIST) of guided top-1
ensemble samples conditioned on classes 8-9 and on 0-7; compute of each command's jobs (wall seconds of
the TorchX jobs, from the manifest) against the run's own jobs; and the unlearning check: mean
nearest-neighbour L2 distance (pixels in [0, 1]) of the class 8-9 samples to the images expert-2 was
trained on, against the distance to class 8-9 images no model ever saw (the test split). Prints one
line per figure; the last printed line is one JSON object with all of them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NEW_CLASSES = (8, 9)


def write_shards_of(out: Path, images, labels, ids) -> None:
    from ddm.expert.shards import write_shards

    write_shards(
        str(out), images, labels, ids, num_classes=10, shard_size=10_000, meta={"bench": "lifecycle"}
    )


def ddm(*args: str) -> str:
    p = subprocess.run([sys.executable, "-m", "ddm", *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"ddm {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}")
    return p.stdout


def nearest_distance(samples, reference) -> float:
    """Mean over samples of the L2 distance (pixels in [0, 1], per image) to the nearest reference image."""
    import torch

    a = samples.flatten(1).float() / 255  # (N, D)
    b = reference.flatten(1).float() / 255  # (M, D)
    return float(torch.cdist(a, b).min(1).values.mean())


def measure(root: Path, classifier, n_per_class: int, steps: int, guidance: float, seed: int) -> dict:
    """Samples of the run's serving ensemble (top-1) for every class; class accuracy on 8-9 and 0-7."""
    import torch

    from ddm.coordinator.config import RunConfig
    from ddm.coordinator.eval_stage import load_experts, routed_ensemble
    from ddm.coordinator.lineage import router_dir, serving_experts
    from ddm.coordinator.manifest import Manifest
    from ddm.core import checkpoint, storage
    from ddm.expert.classifier import class_accuracy
    from ddm.expert.config import SampleConfig
    from ddm.expert.evaluate import generate
    from ddm.expert.images import to_uint8

    data = Manifest.load(str(root)).data
    cfg = RunConfig.model_validate(data["config"])
    names = serving_experts(cfg, data)
    experts = load_experts({n: str(root / "experts" / n) for n in names}, purpose="bench")
    router = checkpoint.latest(storage.join(router_dir(str(root), data), "checkpoints"))
    ens = routed_ensemble(experts, router, "top-1", 0.1)
    y = torch.arange(10).repeat_interleave(n_per_class)  # (10 n,)
    x = generate(ens, y, (1, 28, 28), SampleConfig(steps=steps, guidance=guidance),
                 generator=torch.Generator().manual_seed(seed), batch_size=100)  # fmt: skip
    images = to_uint8(x)  # (10 n, 1, 28, 28)
    new = torch.isin(y, torch.tensor(NEW_CLASSES))  # (10 n,)
    return {"experts": names, "acc_new": class_accuracy(classifier, images[new], y[new]),
            "acc_old": class_accuracy(classifier, images[~new], y[~new]), "images": images, "labels": y}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small budgets (CI)")
    p.add_argument("--out", help="work folder (default: a temporary one)")
    args = p.parse_args(argv)

    import torch

    from ddm.coordinator.config import RunConfig
    from ddm.coordinator.eval_stage import classifier_cache
    from ddm.expert.classifier import ClassifierTrainConfig, get_classifier
    from ddm.expert.config import DataConfig
    from ddm.expert.data import build_dataset

    torch.set_num_threads(2)
    q = args.quick
    base_n, new_n = (800, 250) if q else (4000, 1000)
    expert_steps, router_steps = (60, 30) if q else (600, 200)
    n_per_class, steps = (20, 8) if q else (50, 16)
    work = Path(args.out or tempfile.mkdtemp(prefix="bench-lifecycle-"))
    work.mkdir(parents=True, exist_ok=True)

    train = build_dataset(DataConfig(split="train"))
    test = build_dataset(DataConfig(split="test"))
    new_mask = torch.isin(train.labels, torch.tensor(NEW_CLASSES))
    base_idx = (~new_mask).nonzero().squeeze(1)[:base_n]
    new_idx = new_mask.nonzero().squeeze(1)[:new_n]
    unseen_idx = torch.isin(test.labels, torch.tensor(NEW_CLASSES)).nonzero().squeeze(1)[:new_n]
    write_shards_of(work / "base", train.images[base_idx], train.labels[base_idx], train.ids[base_idx])
    write_shards_of(work / "new", train.images[new_idx], train.labels[new_idx], train.ids[new_idx])
    retired_images, unseen_images = train.images[new_idx], test.images[unseen_idx]

    root = work / "run"
    cfg_text = f"""
name = "bench-lifecycle"
root = "{root}"
[data]
source = "shards"
path = "{work / "base"}"
[partition]
k = 2
fine_k = 16
sample_size = {base_n}
encoder = "pixels"
tolerance = 0.1
[experts]
poll_seconds = 0.5
[experts.train]
steps = {expert_steps}
batch_size = 32
warmup_steps = 5
checkpoint_every = {expert_steps}
num_threads = 1
[router.model]
arch = "Router-XS/4"
[router.train]
steps = {router_steps}
batch_size = 32
checkpoint_every = {router_steps}
[router.eval]
samples_per_bin = 20
[eval]
enabled = false
[distill]
enabled = false
"""
    (work / "run.toml").write_text(cfg_text)
    # quick: a classifier of one epoch on 20k images (its own cache entry), cheap to train on a shared machine
    recipe = ClassifierTrainConfig(epochs=1, limit=20_000) if q else ClassifierTrainConfig()
    classifier = get_classifier(
        DataConfig(split="train"), classifier_cache(RunConfig(root=str(root))), recipe
    )
    fig_classifier = classifier.meta.get("test_accuracy")
    fig: dict = {"quick": q, "classifier_test_accuracy": fig_classifier, "base_images": base_n, "new_images": new_n, "expert_steps": expert_steps,
                 "router_steps": router_steps}  # fmt: skip
    t0 = time.time()
    ddm("run", str(work / "run.toml"), "--quiet")
    fig["run_seconds"] = round(time.time() - t0, 1)
    m0 = measure(root, classifier, n_per_class, steps, 3.0, 0)
    fig.update(base_acc_new=m0["acc_new"], base_acc_old=m0["acc_old"])

    t0 = time.time()
    add = json.loads(
        ddm("add-expert", str(root), "--data", "shards", "--path", str(work / "new"), "--json").splitlines()[
            -1
        ]
    )
    fig["add_seconds"] = round(time.time() - t0, 1)
    fig["add_compute"] = add["compute"]
    m1 = measure(root, classifier, n_per_class, steps, 3.0, 0)
    new1 = m1["images"][torch.isin(m1["labels"], torch.tensor(NEW_CLASSES))]
    fig.update(added_acc_new=m1["acc_new"], added_acc_old=m1["acc_old"],
               added_dist_to_trained=nearest_distance(new1, retired_images),
               added_dist_to_unseen=nearest_distance(new1, unseen_images))  # fmt: skip

    t0 = time.time()
    retire = json.loads(ddm("retire-expert", str(root), "expert-2", "--purge", "--json").splitlines()[-1])
    fig["retire_seconds"] = round(time.time() - t0, 1)
    fig["retire_compute"] = retire["compute"]
    m2 = measure(root, classifier, n_per_class, steps, 3.0, 0)
    new2 = m2["images"][torch.isin(m2["labels"], torch.tensor(NEW_CLASSES))]
    fig.update(retired_acc_new=m2["acc_new"], retired_acc_old=m2["acc_old"],
               retired_dist_to_retired=nearest_distance(new2, retired_images),
               retired_dist_to_unseen=nearest_distance(new2, unseen_images))  # fmt: skip
    for k, v in fig.items():
        print(f"{k}: {v}")
    print(json.dumps(fig))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
