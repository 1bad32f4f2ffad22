"""Replacing an expert of a live router without downtime (``Router.ReplaceExpert``, docs/reliability.md).

The router's experts live in an :class:`ExpertSet`. A sampling cohort *leases* the current list for
one sampler step at a time (:meth:`ExpertSet.lease`; :meth:`Lease.renew` between steps), so every call
of a step (both guidance passes, a Heun step's two evaluations) goes to the same servers. A
replacement (:meth:`ExpertSet.swap`) puts the new :class:`~ddm.router.remote.RemoteExpert` in the
list: steps that start afterwards use it, a step in flight finishes on the old one, and
:meth:`ExpertSet.wait_unused` returns once no lease holds the old one (it has drained). The caller then
closes the old connection; whoever runs the old server stops it.

:class:`Replacement` is what a replacement reports (and what ``ReplaceExpertResponse`` carries): the
expert, its previous and current ``ExpertInfo`` (step and checkpoint URL) and the timings. Hooks that
record it elsewhere (a run manifest's generations) subscribe with ``RouterServer.on_replaced``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ddm.proto.ddm.v1 import ddm_pb2 as pb

log = logging.getLogger(__name__)


class ReplaceError(ValueError):
    """A replacement that cannot be done as asked (unknown expert, a server that does not fit)."""


class ReplaceBusy(RuntimeError):
    """Another replacement is running."""


@dataclass
class Replacement:
    """The outcome of one replacement: the new checkpoint URL and step are ``current.checkpoint`` and
    ``current.step``."""

    name: str
    index: int
    previous: pb.ExpertInfo
    current: pb.ExpertInfo
    previous_address: str
    address: str
    switch_seconds: float
    drain_seconds: float
    drained: bool

    def to_proto(self) -> pb.ReplaceExpertResponse:
        return pb.ReplaceExpertResponse(
            previous=self.previous,
            current=self.current,
            previous_address=self.previous_address,
            switch_seconds=self.switch_seconds,
            drain_seconds=self.drain_seconds,
            drained=self.drained,
        )


class Launched(Protocol):
    """A new expert server started for a replacement by whoever runs the servers (``ddm serve run``)."""

    address: str

    def commit(self) -> None:
        """The router switched to it: stop the old server, supervise this one."""

    def abort(self) -> None:
        """The switch did not happen: stop this server, keep the old one."""


class Launcher(Protocol):
    def launch(self, name: str, checkpoint: str, timeout: float) -> Launched:
        """Start an expert server for ``checkpoint`` as expert ``name``; ready when it returns."""


class Lease:
    """One cohort's hold on the experts for the current sampler step."""

    def __init__(self, owner: ExpertSet, version: int, experts: list[Any]):
        self.owner, self.version, self.experts = owner, version, experts
        self.released = False

    @property
    def stale(self) -> bool:
        return self.version != self.owner.version

    def renew(self) -> Lease:
        """Between steps: this lease if nothing changed, else a fresh one (this one released)."""
        if not self.stale:
            return self
        fresh = self.owner.lease()
        self.release()
        return fresh

    def release(self) -> None:
        self.owner._release(self)


class ExpertSet:
    """The router's experts in expert order, switchable between sampler steps (module docstring)."""

    def __init__(self, experts: Sequence[Any] = ()):
        self._cond = threading.Condition()
        self._experts = list(experts)
        self._users: Counter[int] = Counter()  # id(expert) -> leases holding it
        self.version = 0

    def __iter__(self):
        return iter(self.snapshot())

    def __len__(self) -> int:
        return len(self._experts)

    def __getitem__(self, k: int) -> Any:
        return self._experts[k]

    def snapshot(self) -> list[Any]:
        with self._cond:
            return list(self._experts)

    def index(self, name: str) -> int:
        names = [e.name for e in self._experts]
        if name not in names:
            raise ReplaceError(f"expert: no expert {name!r} here; the router serves {', '.join(names)}")
        return names.index(name)

    def lease(self) -> Lease:
        with self._cond:
            experts = list(self._experts)
            for e in experts:
                self._users[id(e)] += 1
            return Lease(self, self.version, experts)

    def _release(self, lease: Lease) -> None:
        with self._cond:
            if lease.released:
                return
            lease.released = True
            for e in lease.experts:
                self._users[id(e)] -= 1
                if self._users[id(e)] <= 0:
                    del self._users[id(e)]
            self._cond.notify_all()

    def swap(self, k: int, new: Any) -> Any:
        """Put ``new`` in slot ``k``; steps starting from now use it. Returns the old expert."""
        with self._cond:
            old, self._experts[k] = self._experts[k], new
            self.version += 1
            self._cond.notify_all()
            return old

    def wait_unused(self, expert: Any, timeout: float) -> bool:
        """True once no lease holds ``expert`` (within ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._users.get(id(expert), 0) > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True


def check_replacement(old: Any, new: Any, k: int) -> None:
    """ReplaceError unless ``new`` can stand in for ``old`` as expert ``k``: the same name, classes and
    image shape, and expert index k (or unknown). Its arch and objective may differ."""
    info = new.info
    problems = []
    if new.name != old.name:
        problems.append(f"it serves {new.name!r}, not {old.name!r} (ddm serve expert --name sets it)")
    if new.num_classes != old.num_classes or new.image_shape != old.image_shape:
        problems.append(
            f"num_classes {new.num_classes}, images {new.image_shape}; the ensemble has "
            f"{old.num_classes}, {old.image_shape}"
        )
    if info.expert_index not in (-1, k):
        problems.append(f"its expert index is {info.expert_index}, not {k}")
    if problems:
        raise ReplaceError(f"the server at {new.address} cannot replace {old.name}: " + "; ".join(problems))


def replace_expert(
    server: Any, name: str, address: str, ckpt: str, connect_timeout: float, drain_timeout: float
) -> Replacement:
    """The steps of ``RouterServer.replace_expert`` (which checks the request and holds its lock)."""
    start = time.monotonic()
    k = server.experts.index(name)
    old = server.experts[k]
    launched = server.launcher.launch(name, ckpt, connect_timeout) if ckpt else None
    new = None
    try:
        new = server._remote_expert(launched.address if launched else address)
        new.connect(connect_timeout)
        check_replacement(old, new, k)
    except BaseException:
        if new is not None:
            new.close()
        if launched is not None:
            launched.abort()
        raise
    new.liveness.on_change = lambda down, why: server._expert_changed(new, down, why)
    server.experts.swap(k, new)
    old.liveness.on_change = None  # what happens to the old server from now on is not the expert's health
    switched = time.monotonic()
    threading.Thread(target=server._watch, args=(new,), name=f"watch-{new.name}", daemon=True).start()
    if old.liveness.down:  # the expert was down: its replacement is up, so it is back (health SERVING)
        server._expert_changed(new, False, "")
    log.warning(
        "expert %s replaced: step %d (%s) at %s -> step %d (%s) at %s; draining the old one",
        name, old.info.step, old.info.checkpoint, old.address, new.info.step, new.info.checkpoint, new.address,
    )  # fmt: skip
    drained = server.experts.wait_unused(old, drain_timeout)
    drain_s = time.monotonic() - switched
    if drained:
        old.close()
    else:
        log.warning(
            "expert %s: old server still in use after %.1f s; its connection stays open", name, drain_s
        )
    if launched is not None:
        launched.commit()
    server.addresses[k] = new.address
    result = Replacement(
        name=name, index=k, previous=old.info, current=new.info, previous_address=old.address,
        address=new.address, switch_seconds=switched - start, drain_seconds=drain_s, drained=drained,
    )  # fmt: skip
    for hook in server.on_replaced:
        hook(result)
    return result
