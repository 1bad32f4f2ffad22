"""Registries: the extension points (samplers, time grids, ensemble strategies, island schedulers).

A registry maps a name to an implementation plus the facts the rest of the system needs about it
(its help text and a few typed attributes, e.g. a sampler's denoiser calls per run). Each registry is
filled in exactly one module, next to the implementations, by decorating them::

    SAMPLERS = Registry("sampler")

    @SAMPLERS.register("euler", help="first-order Euler", calls=lambda steps: steps)
    def euler(model, x, ts, *, noise, churn): ...

Everything that names the choices reads the registry: config fields (``SAMPLERS.field()``, a ``str``
validated against the registry whose choices ``ddm.core.cli`` turns into argparse ``choices``), the
router's served lists, error messages. So adding an implementation is one decorated function in one
file, plus its test.

The modules that fill the registries feeding CLI choices import no torch at module level (their code
uses tensor methods, and imports torch inside functions where it must), so that ``ddm --help`` can read
the choices without loading torch; tests/test_cli.py checks it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Generic, TypeVar

from pydantic import AfterValidator

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered implementation: its name, the object, its help text and its attributes."""

    name: str
    value: T
    help: str
    attrs: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["attrs"][key]
        except KeyError:
            raise AttributeError(f"{self.name!r} has no attribute {key!r}") from None


@dataclass(frozen=True)
class Choices:
    """Field metadata naming the registry (and filter) a ``str`` setting must come from; ``ddm.core.cli``
    reads it to build argparse ``choices``, evaluated when the parser is built."""

    registry: Registry[Any]
    where: tuple[tuple[str, Any], ...] = ()

    def names(self) -> tuple[str, ...]:
        return self.registry.names(**dict(self.where))


class Registry(Generic[T]):
    """Named implementations of one kind, in registration order (the first one is listed first)."""

    def __init__(self, kind: str, *, required: tuple[str, ...] = ()):
        self.kind = kind
        self.required = required  # attributes every entry must declare
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, *, help: str, **attrs: Any) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name``; returns it unchanged."""

        def add(value: T) -> T:
            self.add(name, value, help=help, **attrs)
            return value

        return add

    def add(self, name: str, value: T, *, help: str, **attrs: Any) -> Entry[T]:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        missing = [a for a in self.required if a not in attrs]
        if missing:
            raise ValueError(f"{self.kind} {name!r} must declare {', '.join(missing)}")
        entry = Entry(name, value, help, dict(attrs))
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> None:
        """Unregister ``name`` (tests that register a throwaway entry clean up with it)."""
        del self._entries[name]

    def names(self, **where: Any) -> tuple[str, ...]:
        """The registered names, optionally only those whose attributes equal ``where``."""
        return tuple(
            e.name for e in self._entries.values() if all(e.attrs.get(k) == v for k, v in where.items())
        )

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, name: str, *, field: str | None = None, **where: Any) -> Entry[T]:
        """The entry for ``name``; a ValueError naming ``field`` and the choices when there is none."""
        choices = self.names(**where)
        if name not in choices:
            prefix = f"{field}: " if field else ""
            raise ValueError(f"{prefix}unknown {self.kind} {name!r}; choose one of {', '.join(choices)}")
        return self._entries[name]

    def get(self, name: str, *, field: str | None = None, **where: Any) -> T:
        """The implementation registered as ``name`` (see :meth:`entry`)."""
        return self.entry(name, field=field, **where).value

    def check(self, name: str, **where: Any) -> str:
        """``name`` if registered (and matching ``where``), else the ValueError of :meth:`entry`."""
        self.entry(name, **where)
        return name

    def field(self, **where: Any) -> Any:
        """The type of a config field holding one of these names: a ``str`` validated against the
        registry, whose choices the CLI and the docs read (``Choices``)."""
        return Annotated[
            str, AfterValidator(lambda v: self.check(v, **where)), Choices(self, tuple(where.items()))
        ]

    def describe(self, **where: Any) -> str:
        """'name: help; name: help' for ``--help`` texts and docs."""
        return "; ".join(
            f"{e.name}: {e.help}" for e in self if all(e.attrs.get(k) == v for k, v in where.items())
        )
