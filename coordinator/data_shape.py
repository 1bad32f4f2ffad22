"""A run's image shape and class count come from its data: what the config leaves out is filled in from
the dataset object (its ``image_shape``, ``num_classes`` and ``class_names``, whatever the source), and
what the config states is checked against it, before anything is launched or written.

The fields: ``data.channels`` and ``data.image_size`` (an image folder is converted and resized to stated
values, so these only fill in; a fixed-shape source such as Fashion-MNIST or shards is checked by
``ddm.expert.data.build_dataset``), and the class count, defined once as ``experts.model.num_classes``:
the router's and the student's (``router.model.num_classes``, ``distill.model.num_classes``) are the
experts' unless stated, and a stated one must agree. The resolved config is what the manifest records,
so every later reader (eval, compare, sample, serve) sees the concrete values.
"""

from __future__ import annotations

from typing import Any

from ddm.coordinator.config import RunConfig
from ddm.expert.data import DataError

NUM_CLASSES_FIELDS = ("experts.model.num_classes", "router.model.num_classes", "distill.model.num_classes")


def is_resolved(cfg: RunConfig) -> bool:
    """Whether every data-derived field is set (the config a manifest records)."""
    return None not in (cfg.data.channels, cfg.data.image_size, *(_get(cfg, f) for f in NUM_CLASSES_FIELDS))


def resolve_run_config(cfg: RunConfig, data: Any) -> RunConfig:
    """``cfg`` with the data's shape and class count where it leaves them out; a ``DataError`` naming the
    field, the data's value and the fix where it states one that contradicts the data."""
    from ddm.expert.model import dit_config

    c, h, w = data.image_shape
    if h != w:
        raise DataError(
            f"{cfg.data.path}: images are {h}x{w}; the models need square images (set data.image_size)"
        )
    n = int(data.num_classes)
    names = data.class_names
    shown = f" ({', '.join(map(str, names[:12]))}{', ...' if len(names) > 12 else ''})" if names else ""
    for name, value, want in (
        ("data.channels", cfg.data.channels, c),
        ("data.image_size", cfg.data.image_size, h),
    ):
        if value is not None and value != want:  # build_dataset honours or checks them; this is a guard
            raise DataError(f"{name} = {value}, but the data from {cfg.data.path} has {want}; set {name} = {want} "
                            "or leave it out to take it from the data")  # fmt: skip
    for field in NUM_CLASSES_FIELDS:
        value = _get(cfg, field)
        if value is not None and value != n:
            raise DataError(
                f"{field} = {value}, but the data from {cfg.data.path} has {n} classes{shown}; "
                f"leave {field} out to take it from the data (or set it to {n})"
            )
    try:  # the experts' DiT must fit the shape (patch size vs image size), said before anything runs
        dit_config(cfg.experts.model.arch, image_size=h, in_channels=c, num_classes=n)
    except ValueError as e:
        raise DataError(
            f"experts.model.arch = {cfg.experts.model.arch!r} at data.image_size = {h}: {e}"
        ) from None
    tree = cfg.model_dump()
    tree["data"].update(channels=c, image_size=h)
    for field in NUM_CLASSES_FIELDS:
        section, model, _ = field.split(".")
        tree[section][model]["num_classes"] = n
    return RunConfig.model_validate(tree)


def _get(cfg: RunConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node
