"""Job heartbeats: a running job says it is alive, and how far it got, on the run root.

``{output}/heartbeat.json`` = {"host", "pid", "step", "steps", "time", "state"} with state one of
running / stopped / done. The coordinator uses it to adopt a job it launched before it was itself
restarted (the local scheduler forgets its children), and to show progress. Rank 0 writes it, at most
every ``interval`` seconds, so it costs nothing on the training loop.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from ddm.core import storage

FILE = "heartbeat.json"


class Heartbeat:
    def __init__(self, output: str, steps: int, *, interval: float = 10.0):
        self.url = storage.join(output, FILE)
        self.steps = steps
        self.interval = interval
        self._last = 0.0

    def beat(self, step: int, *, state: str = "running", force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        storage.write_json(
            self.url,
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "step": step,
                "steps": self.steps,
                "time": now,
                "state": state,
            },
        )


def read(output: str) -> dict[str, Any] | None:
    url = storage.join(output, FILE)
    try:
        return storage.read_json(url) if storage.exists(url) else None
    except ValueError:
        return None  # a torn local write cannot happen (atomic), but a foreign file may be garbage


def is_alive(beat: dict[str, Any] | None, lease_seconds: float) -> bool:
    """True if the heartbeat says a job is running now: fresh, and (same host) its process exists."""
    if not beat or beat.get("state") != "running":
        return False
    if time.time() - float(beat.get("time", 0)) > lease_seconds:
        return False
    if beat.get("host") == socket.gethostname():
        try:
            os.kill(int(beat["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not _is_zombie(int(beat["pid"]))
    return True


def _is_zombie(pid: int) -> bool:
    """An exited child nobody reaped yet (its parent, the old coordinator, is gone) still has a pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False
