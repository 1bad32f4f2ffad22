"""Command-line options made from config fields: one definition per setting.

A config model's field already carries its type, default, description, bounds and (for a ``Literal`` or a
registry-backed field, ``ddm.core.registry.Registry.field``) its choices. :func:`add_options` turns
named fields into argparse options (``time_shift`` -> ``--time-shift``) with exactly those, so the TOML
key, the CLI flag and ``--help`` cannot drift apart; :func:`config_from_args` validates the parsed values
with the same model, and a bad value is a ``ConfigError`` naming the flag.

    add_options(parser, SampleConfig, ["guidance", "steps", "sampler", "time_shift"])
    ...
    cfg = config_from_args(SampleConfig, args, ["guidance", "steps", "sampler", "time_shift"])

Imports no torch: ``ddm --help`` builds every command's options from the config models.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any, Literal, TypeVar, Union

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from ddm.core.config import ConfigError
from ddm.core.registry import Choices

M = TypeVar("M", bound=BaseModel)


def flag(name: str) -> str:
    """The option of a field: ``time_shift`` -> ``--time-shift``."""
    return "--" + name.replace("_", "-")


def field_choices(info: Any) -> tuple[Any, ...] | None:
    for meta in info.metadata:
        if isinstance(meta, Choices):
            return meta.names()
    ann = _strip_optional(info.annotation)
    if typing.get_origin(ann) is Literal:
        return typing.get_args(ann)
    return None


def _strip_optional(ann: Any) -> Any:
    if typing.get_origin(ann) in (Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def _type(info: Any, choices: tuple[Any, ...] | None) -> Any:
    if choices:
        return type(choices[0])
    ann = _strip_optional(info.annotation)  # pydantic keeps Annotated metadata apart: a plain type here
    if ann in (int, float, str):
        return ann
    raise TypeError(f"no command-line option for a field of type {ann!r}")


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    model: type[BaseModel],
    fields: Sequence[str],
    *,
    unset: Iterable[str] = (),
    unset_help: str = "default: the server's",
    help: dict[str, str] | None = None,
) -> None:
    """Add ``--field-name`` options for ``fields`` of ``model``: type, default, choices and help from the
    field. Fields in ``unset`` default to None (the option is left out when not given) and say
    ``unset_help`` instead of their default; ``help`` replaces a field's description where given."""
    unset = set(unset)
    for name in fields:
        info = model.model_fields[name]
        choices = field_choices(info)
        text = (help or {}).get(name) or info.description or name
        if name in unset:
            default, text = None, f"{text} ({unset_help})"
        else:
            default = info.default if info.default is not PydanticUndefined else info.default_factory()
            text = f"{text} (default {default})"
        parser.add_argument(
            flag(name), dest=name, type=_type(info, choices), default=default, choices=choices,
            help=text.replace("%", "%%"),
        )  # fmt: skip


def config_from_args(model: type[M], args: argparse.Namespace, fields: Sequence[str], **extra: Any) -> M:
    """``model`` from the parsed options of ``fields`` (those left None take the model's default) and
    ``extra``; a ConfigError naming the option when a value is out of bounds."""
    data = {name: getattr(args, name) for name in fields if getattr(args, name) is not None}
    try:
        return model.model_validate({**data, **extra})
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = err["loc"][0] if err["loc"] else None
            where = flag(str(loc)) if loc in data else (str(loc) if loc is not None else "options")
            lines.append(f"{where}: {err['msg']}")
        raise ConfigError("; ".join(lines)) from None
