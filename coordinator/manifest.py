"""The run manifest: ``{root}/manifest.json`` records the config, each stage's state and every job's
attempts, so ``ddm run`` resumes where it stopped and never launches a finished or running job twice.

Only the coordinator writes it, always atomically (``storage.write_json``), after every change.
"""

from __future__ import annotations

import time
from typing import Any

from ddm.expert import storage

MANIFEST = "manifest.json"
FORMAT = "ddm-manifest/1"

# Stage states
PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
# Job states (TorchX's names for the terminal ones)
SUBMITTED, SUCCEEDED, JOB_FAILED, CANCELLED = "SUBMITTED", "SUCCEEDED", "FAILED", "CANCELLED"


class ManifestError(ValueError):
    pass


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


class Manifest:
    def __init__(self, root: str, data: dict[str, Any]):
        self.root = root
        self.url = storage.join(root, MANIFEST)
        self.data = data

    @classmethod
    def open(cls, root: str, config: dict[str, Any], *, resumable_keys: tuple[str, ...] = ("eval",)) -> "Manifest":
        """Load the run's manifest, or create it. A rerun with a different config is refused (except for
        ``resumable_keys``, which only affect later stages) so two configs never mix in one run root."""
        url = storage.join(root, MANIFEST)
        if storage.exists(url):
            data = storage.read_json(url)
            if data.get("format") != FORMAT:
                raise ManifestError(f"{url}: not a ddm manifest (format {data.get('format')!r}, expected {FORMAT!r})")
            old = {k: v for k, v in data["config"].items() if k not in resumable_keys}
            new = {k: v for k, v in config.items() if k not in resumable_keys}
            changes = _diff(old, new)
            if changes:
                raise ManifestError(
                    f"{url}: this run root was started with a different config:\n  "
                    + "\n  ".join(changes[:20])
                    + "\nuse a new root (or restore the original config) so two configs never mix in one run"
                )
            data["config"] = config
            return cls(root, data)
        manifest = cls(root, {"format": FORMAT, "created": time.time(), "config": config, "stages": {}, "jobs": {}})
        manifest.save()
        return manifest

    @classmethod
    def load(cls, root: str) -> "Manifest":
        url = storage.join(root, MANIFEST)
        if not storage.exists(url):
            raise FileNotFoundError(f"{url}: no manifest; is {root!r} a ddm run root?")
        return cls(root, storage.read_json(url))

    def save(self) -> None:
        self.data["updated"] = time.time()
        storage.write_json(self.url, self.data)

    # stages ---------------------------------------------------------------------------------------
    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].setdefault(name, {"state": PENDING})

    def stage_done(self, name: str) -> bool:
        return self.stage(name)["state"] == DONE

    def set_stage(self, name: str, state: str, **info: Any) -> None:
        stage = self.stage(name)
        stage.update(info, state=state)
        stage[f"{state}_at"] = time.time()
        self.save()

    # jobs -----------------------------------------------------------------------------------------
    def job(self, name: str) -> dict[str, Any]:
        return self.data["jobs"].setdefault(name, {"state": "PENDING", "attempts": []})

    def update_job(self, name: str, **fields: Any) -> None:
        self.job(name).update(fields)
        self.save()
