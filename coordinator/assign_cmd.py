"""``ddm assign RUN``: place new images in a finished run's clusters (which expert would own them).

The run's encoder embeds the new images on ``--device`` (default: the run config's ``device``)."""

from __future__ import annotations

import argparse
import json
import sys

from ddm.core.placement import add_override_argument
from ddm.expert.config import DataConfig
from ddm.expert.sources import SOURCES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="run root whose partition stage is done (local path or s3://...)")
    p.add_argument(
        "--source",
        choices=SOURCES.names(),
        default="image-folder",
        help="kind of the new data (ddm.expert.sources.SOURCES): " + SOURCES.describe(),
    )
    p.add_argument(
        "--path", required=True, help="the new data: " + DataConfig.model_fields["path"].description
    )
    for name in ("image_field", "label_field"):
        field = DataConfig.model_fields[name]
        p.add_argument("--" + name.replace("_", "-"), default=field.default, help=field.description)
    p.add_argument("--split", choices=["train", "test"], default="test", help="Fashion-MNIST split")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument(
        "--balanced",
        action="store_true",
        help="balance the new batch across clusters within the run's tolerance",
    )
    p.add_argument(
        "--out", help="write per-image assignments here as JSON (local or s3://); default: only print counts"
    )
    add_override_argument(p)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ddm.coordinator.cluster import Clustering
    from ddm.coordinator.config import RunConfig
    from ddm.coordinator.manifest import Manifest
    from ddm.core import storage
    from ddm.core.placement import Placement
    from ddm.expert.data import build_dataset
    from ddm.expert.features import announce_features, build_features

    manifest = Manifest.load(args.root)
    if not manifest.stage_done("partition"):
        print(
            f"ddm assign: {args.root}: the partition stage is not done yet; run `ddm run` first",
            file=sys.stderr,
        )
        return 2
    cfg = RunConfig.model_validate(manifest.data["config"])
    placement = Placement.resolve(args.device or cfg.device, field="--device" if args.device else "device")
    clustering = Clustering.load(storage.join(args.root, "clusters", "clustering"))
    data = build_dataset(DataConfig(source=args.source, path=args.path, split=args.split, limit=args.limit,
                                    image_size=cfg.data.image_size, channels=cfg.data.channels,
                                    image_field=args.image_field, label_field=args.label_field))  # fmt: skip
    extractor = build_features(cfg.partition.encoder, image_size=cfg.partition.embed_image_size,
                               batch_size=cfg.partition.embed_batch_size, progress=True, device=placement.device)  # fmt: skip
    announce_features(extractor, placement, "assign")
    feats = extractor(data.images)
    labels = clustering.assign(np.asarray(feats, dtype=np.float32), balanced=args.balanced)
    counts = np.bincount(labels, minlength=clustering.k).tolist()
    print(json.dumps({"images": len(data), "per_expert": {f"expert-{k}": c for k, c in enumerate(counts)}}))
    if args.out:
        storage.write_json(args.out, {"ids": data.ids.tolist(), "expert": labels.tolist(), "counts": counts})
    return 0
