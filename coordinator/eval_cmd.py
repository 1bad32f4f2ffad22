"""``ddm eval``: FD, KID, precision/recall and class accuracy of a checkpoint's guided samples.

The model, the feature extractor and the classifier run on ``--device`` (default ``auto``), each
announced on stderr."""

from __future__ import annotations

import argparse
import json
import os

from ddm.core.cli import add_options
from ddm.core.device import add_argument as add_device_argument
from ddm.expert.config import SampleConfig

# SampleConfig fields offered as options
SAMPLING = ("steps", "sampler", "guidance", "time_grid", "time_shift", "churn")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint file or directory (local or s3://)")
    p.add_argument(
        "--num-samples", type=int, default=1000, help="generated images, class-balanced (default 1000)"
    )
    add_options(p, SampleConfig, SAMPLING)
    p.add_argument(
        "--features",
        default="efficientnet-lite0",
        help="feature space: efficientnet-lite0, pixels or torchscript:/path.pt",
    )
    p.add_argument(
        "--data",
        default="/usr/share/datasets/fashion-mnist",
        help="reference data: the Fashion-MNIST directory",
    )
    p.add_argument(
        "--split", choices=["train", "test"], default="test", help="reference split (default: test)"
    )
    p.add_argument("--real-samples", type=int, default=10000, help="reference images used (default 10000)")
    p.add_argument(
        "--no-classifier", action="store_true", help="skip class accuracy (no in-repo classifier is trained)"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-size", type=int, default=250, help="images per sampling batch")
    p.add_argument(
        "--out", default="eval", help="output directory for metrics.json and samples.png (local or s3://)"
    )
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    add_device_argument(p)


def run(args: argparse.Namespace) -> int:
    from ddm.coordinator.eval_stage import machine_cache
    from ddm.core.cli import config_from_args
    from ddm.core.placement import Placement
    from ddm.expert.classifier import get_classifier
    from ddm.expert.config import DataConfig
    from ddm.expert.data import build_dataset
    from ddm.expert.evaluate import evaluate
    from ddm.expert.features import announce_features, build_features
    from ddm.expert.load import load_denoiser, recorded

    sample_cfg = config_from_args(SampleConfig, args, SAMPLING)  # bad values fail before any loading
    placement = Placement.resolve(args.device, field="--device")
    denoiser = load_denoiser(args.checkpoint, ema=not args.no_ema, device=placement.device)
    if sample_cfg.time_shift is None:  # unset: the shift the model was trained with
        sample_cfg = sample_cfg.model_copy(update={"time_shift": recorded(args.checkpoint)["time_shift"]})
    placement.announce(f"eval: model ({args.checkpoint})")
    data_cfg = DataConfig(source="fashion-mnist", path=args.data, split=args.split, limit=args.real_samples)
    real = build_dataset(data_cfg)
    classifier = None
    if not args.no_classifier:
        classifier = get_classifier(DataConfig(source="fashion-mnist", path=args.data), machine_cache(), progress=True,
                                    device=placement.device)  # fmt: skip
        placement.announce("eval: classifier")
    features = build_features(args.features, progress=True, device=placement.device)
    announce_features(features, placement, "eval")
    result = evaluate(
        denoiser, real=real, num_samples=args.num_samples, sample_cfg=sample_cfg, features=features, classifier=classifier,
        seed=args.seed, batch_size=args.batch_size, out_dir=args.out, cache_dir=os.path.join(machine_cache(), "reference"),
        device=placement.device,
    )  # fmt: skip
    print(
        json.dumps(result.to_dict() if hasattr(result, "to_dict") else result.__dict__, indent=2, default=str)
    )
    return 0
