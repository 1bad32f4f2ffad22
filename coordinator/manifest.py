"""The run manifest: ``{root}/manifest.json`` records the config, each stage's state and every job's
attempts, so ``ddm run`` resumes where it stopped and never launches a finished or running job twice.

Only the coordinator writes it (and ``ddm cancel``), after every change, as a compare-and-swap
(``storage.write_if``): on S3 a conditional PUT (``If-Match`` on the ETag it read, ``If-None-Match: *``
to create), locally a compare-before-replace under a lock. A second coordinator on the same root, or a
writer working from a stale copy, therefore gets a ``ManifestConflict`` naming the file instead of
silently overwriting the other's record; only creating the manifest is retried (re-read, then checked
like any existing manifest), because that is the one race where nothing has been decided yet.
"""

from __future__ import annotations

import time
from typing import Any

from ddm.core import storage

MANIFEST = "manifest.json"
FORMAT = "ddm-manifest/1"

# Stage states
PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
# Job states (TorchX's names for the terminal ones)
SUBMITTED, SUCCEEDED, JOB_FAILED, CANCELLED = "SUBMITTED", "SUCCEEDED", "FAILED", "CANCELLED"


class ManifestError(ValueError):
    pass


class ManifestConflict(ManifestError):
    """Another writer changed the manifest since this process read it; nothing was overwritten."""


# Settings that say where and how a job runs, not what it computes: a job may resume on a GPU, under
# torch.compile or sharded, and its checkpoints stay the same files.
PLACEMENT_KEYS = frozenset({"device", "compile", "parallelism", "num_threads"})


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """What changed from the recorded config ``a`` to ``b``. Placement settings are not changes, nor
    are settings ``a`` lacks altogether (added by a newer ddm since the run started)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if key in PLACEMENT_KEYS or key not in a:
                continue
            out += _diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


class Manifest:
    def __init__(self, root: str, data: dict[str, Any], version: str | None = None):
        self.root = root
        self.url = storage.join(root, MANIFEST)
        self.data = data
        self.version = version  # of the stored manifest this copy was read from / last wrote (None: not stored yet)

    @classmethod
    def open(
        cls, root: str, config: dict[str, Any], *,
        resumable_keys: tuple[str, ...] = ("eval", "storage", "distill", "device"),
    ) -> "Manifest":  # fmt: skip
        """Load the run's manifest, or create it. A rerun with a different config is refused (except for
        ``resumable_keys``, which only affect later stages, how the root is reached or where the
        coordinator's own networks run) so two configs never mix in one run root."""
        url = storage.join(root, MANIFEST)
        try:
            stored = storage.read_versioned(url)
        except FileNotFoundError:
            manifest = cls(root, {"format": FORMAT, "created": time.time(), "config": config, "stages": {}, "jobs": {}})
            try:
                manifest.save()
                return manifest
            except ManifestConflict:  # another coordinator created it a moment ago: check it like any other
                stored = storage.read_versioned(url)
        data = storage.parse_json(stored.data, url)
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
        return cls(root, data, stored.version)

    @classmethod
    def load(cls, root: str) -> "Manifest":
        url = storage.join(root, MANIFEST)
        try:
            stored = storage.read_versioned(url)
        except FileNotFoundError:
            raise FileNotFoundError(f"{url}: no manifest; is {root!r} a ddm run root?") from None
        return cls(root, storage.parse_json(stored.data, url), stored.version)

    def save(self) -> None:
        """Write the manifest if nobody else has written it since we read it; else ``ManifestConflict``."""
        self.data["updated"] = time.time()
        try:
            self.version = storage.write_if(self.url, storage.json_bytes(self.data), version=self.version)
        except storage.WriteConflict as e:
            raise ManifestConflict(
                f"{e}. Another `ddm run` (or `ddm cancel`) is writing this run root; this process stops "
                "rather than overwrite its record. Check `ddm status` and run one coordinator per root."
            ) from None

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
