"""The run manifest: ``{root}/manifest.json`` records the config, each stage's state and every job's
attempts, so ``ddm run`` resumes where it stopped and never launches a finished or running job twice.

Only the coordinator writes it (and ``ddm cancel``), after every change, as a compare-and-swap
(``storage.write_if``): on S3 a conditional PUT (``If-Match`` on the ETag it read, ``If-None-Match: *``
to create), locally a compare-before-replace under a lock. A second coordinator on the same root, or a
writer working from a stale copy, therefore gets a ``ManifestConflict`` naming the file instead of
silently overwriting the other's record; only creating the manifest is retried (re-read, then checked
like any existing manifest), because that is the one race where nothing has been decided yet.

The one foreign write a live coordinator takes over is ``ddm cancel``'s: ``adopt_cancellations`` re-reads
the stored manifest and, if the only changes since this copy are jobs marked CANCELLED, takes those
records and keeps its own changes to the rest (anything else is still a ``ManifestConflict``).
"""

from __future__ import annotations

import copy
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
    def __init__(
        self,
        root: str,
        data: dict[str, Any],
        version: str | None = None,
        stored: dict[str, Any] | None = None,
    ):
        self.root = root
        self.url = storage.join(root, MANIFEST)
        self.data = data
        self.version = (
            version  # of the stored manifest this copy was read from / last wrote (None: not stored yet)
        )
        # What the store held at ``version`` (to tell another writer's changes from ours)
        if stored is None and version is not None:
            stored = copy.deepcopy(data)
        self._stored = stored
        # When the stored manifest was last written before this process read it: the last sign of life
        # of a coordinator that was killed, when its own clock says nothing more.
        self.last_written: float | None = data.get("updated")
        self.config_changes: list[str] = []  # what ``open`` let through (nothing had been made yet)

    @classmethod
    def open(
        cls, root: str, config: dict[str, Any], *,
        resumable_keys: tuple[str, ...] = ("eval", "storage", "distill", "device"),
    ) -> Manifest:  # fmt: skip
        """Load the run's manifest, or create it. A rerun with a different config is refused (except for
        ``resumable_keys``, which only affect later stages, how the root is reached or where the
        coordinator's own networks run) so two configs never mix in one run root."""
        url = storage.join(root, MANIFEST)
        try:
            stored = storage.read_versioned(url)
        except FileNotFoundError:
            manifest = cls(
                root, {"format": FORMAT, "created": time.time(), "config": config, "stages": {}, "jobs": {}}
            )
            try:
                manifest.save()
                return manifest
            except ManifestConflict:  # another coordinator created it a moment ago: check it like any other
                stored = storage.read_versioned(url)
        data = storage.parse_json(stored.data, url)
        if data.get("format") != FORMAT:
            raise ManifestError(
                f"{url}: not a ddm manifest (format {data.get('format')!r}, expected {FORMAT!r})"
            )
        old = {k: v for k, v in data["config"].items() if k not in resumable_keys}
        new = {k: v for k, v in config.items() if k not in resumable_keys}
        changes = _diff(old, new)
        produced = produced_output(data)
        if changes and produced:
            raise ManifestError(
                f"{url}: this run root was started with a different config, and {produced}:\n  "
                + "\n  ".join(changes[:20])
                + "\nuse a new root (or restore the original config) so two configs never mix in one run"
            )
        snapshot = copy.deepcopy(data)
        data["config"] = config
        if changes:  # nothing was made under the old config: the new one takes the root over
            data["stages"] = {
                n: st for n, st in data["stages"].items() if not st.get("skipped")
            }  # re-decided
            data.setdefault("config_changes", []).append({"at": time.time(), "changes": changes[:20]})
        manifest = cls(root, data, stored.version, snapshot)
        manifest.config_changes = changes
        if changes:
            manifest.save()
        return manifest

    @classmethod
    def load(cls, root: str) -> Manifest:
        url = storage.join(root, MANIFEST)
        try:
            stored = storage.read_versioned(url)
        except FileNotFoundError:
            raise FileNotFoundError(f"{url}: no manifest; is {root!r} a ddm run root?") from None
        return cls(root, storage.parse_json(stored.data, url), stored.version)

    def save(self) -> None:
        """Write the manifest if nobody else has written it since we read it; else ``ManifestConflict``."""
        self.data["updated"] = time.time()
        payload = storage.json_bytes(self.data)
        try:
            self.version = storage.write_if(self.url, payload, version=self.version)
            self._stored = storage.parse_json(payload, self.url)
        except storage.WriteConflict as e:
            raise ManifestConflict(
                f"{e}. Another `ddm run` (or `ddm cancel`) is writing this run root; this process stops "
                "rather than overwrite its record. Check `ddm status` and run one coordinator per root."
            ) from None

    def reload(self) -> None:
        """Replace this copy with the stored manifest (dropping changes not saved)."""
        fresh = Manifest.load(self.root)
        self.data, self.version, self._stored = fresh.data, fresh.version, fresh._stored

    def adopt_cancellations(self) -> list[str]:
        """Take over the jobs ``ddm cancel`` marked CANCELLED in the store since this copy was read or
        written; returns their names (empty if the store has not changed).

        Their records become the stored ones; this copy's own changes to everything else are kept and
        saved. Raises ``ManifestConflict`` if the store changed in any other way (another coordinator)."""
        stored = storage.read_versioned(self.url)
        if stored.version == self.version:
            return []
        theirs = storage.parse_json(stored.data, self.url)
        before = self._stored or {"jobs": {}}
        cancelled = [
            name
            for name, record in theirs.get("jobs", {}).items()
            if record != before["jobs"].get(name)
            and record.get("state") == CANCELLED
            and "cancelled_at" in record
        ]
        rest = ("updated", "jobs")
        same = {k: v for k, v in theirs.items() if k not in rest} == {
            k: v for k, v in before.items() if k not in rest
        }
        others = set(theirs.get("jobs", {})) | set(before["jobs"])
        if not same or any(theirs["jobs"].get(n) != before["jobs"].get(n) for n in others - set(cancelled)):
            raise ManifestConflict(
                f"{self.url}: another writer changed it since it was read, beyond cancelling jobs. Another "
                "`ddm run` is writing this run root; this process stops rather than overwrite its record. "
                "Check `ddm status` and run one coordinator per root."
            )
        for name in cancelled:
            self.data["jobs"][name] = copy.deepcopy(theirs["jobs"][name])
        self.version, self._stored = stored.version, theirs
        mine = {k: v for k, v in self.data.items() if k != "updated"}
        if mine != {k: v for k, v in theirs.items() if k != "updated"}:
            self.save()  # our changes the lost write carried
        return cancelled

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

    # Each attempt at a stage is {"started_at", "seconds", "end"}, end one of done / failed / interrupted /
    # killed (the coordinator died: seconds up to its last sign of life). The stage's ``seconds`` is their
    # sum, ``wall_seconds`` the span from the first start to the end, ``started_at`` the first start.
    def start_stage(self, name: str, *, last_alive: dict[str, Any] | None = None) -> float:
        """Record a new attempt at ``name``; an attempt left open by a killed coordinator is closed first,
        at ``last_alive`` (its ``coordinator.json``) when that is the same attempt, else at the manifest's
        last write before this process. Returns the new attempt's start time."""
        stage = self.stage(name)
        attempts = stage_attempts(stage)
        now = time.time()
        if attempts and "seconds" not in attempts[-1]:
            last = attempts[-1]
            alive = self.last_written
            if (
                last_alive
                and last_alive.get("stage") == name
                and last_alive.get("attempt_started_at") == last["started_at"]
            ):
                alive = last_alive.get("time")
            end = min(max(float(alive or last["started_at"]), last["started_at"]), now)
            last.update(seconds=round(end - last["started_at"], 1), end="killed")
        attempts.append({"started_at": now})
        stage["attempts"] = attempts
        stage.pop("error", None)  # the previous attempt's; a new failure records its own
        stage.update(state=RUNNING, running_at=now, started_at=attempts[0]["started_at"])
        self.save()
        return now

    def end_stage(self, name: str, state: str | None, **info: Any) -> dict[str, Any]:
        """Close the open attempt at ``name`` as ``state`` (DONE / FAILED; None: interrupted, the stage
        stays RUNNING and resumes on the next run) and record ``info``; returns the stage's record."""
        stage = self.stage(name)
        attempts = stage_attempts(stage)
        now = time.time()
        if not attempts or "seconds" in attempts[-1]:
            attempts.append({"started_at": now})
        attempts[-1].update(seconds=round(now - attempts[-1]["started_at"], 1), end=state or "interrupted")
        stage["attempts"] = attempts
        stage.update(
            info,
            seconds=round(sum(a["seconds"] for a in attempts), 1),
            wall_seconds=round(now - attempts[0]["started_at"], 1),
        )
        if state is not None:
            stage.update(state=state)
            stage[f"{state}_at"] = now
        self.save()
        return stage

    # jobs -----------------------------------------------------------------------------------------
    def job(self, name: str) -> dict[str, Any]:
        return self.data["jobs"].setdefault(name, {"state": "PENDING", "attempts": []})

    def update_job(self, name: str, **fields: Any) -> None:
        self.job(name).update(fields)
        self.save()


def produced_output(data: dict[str, Any]) -> str | None:
    """What locks a run root to its config: a stage that finished (not merely skipped) or a job that
    was ever submitted, named; None while nothing has been made (a first stage that failed on a wrong
    path leaves the root free to take the corrected config)."""
    done = [
        n for n, st in data.get("stages", {}).items() if st.get("state") == DONE and not st.get("skipped")
    ]
    if done:
        return f"stage {done[0]} finished under it"
    jobs = [n for n, job in data.get("jobs", {}).items() if job.get("attempts")]
    if jobs:
        return f"job {jobs[0]} was launched under it"
    return None


def stage_attempts(stage: dict[str, Any]) -> list[dict[str, Any]]:
    """A stage record's attempts; a record written before attempts were kept counts as one attempt
    (open if it was left running, closed at its ``failed_at`` or ``done_at`` otherwise)."""
    if "attempts" in stage:
        return stage["attempts"]
    if "running_at" not in stage:
        return []
    start = stage["running_at"]
    if stage.get("state") == RUNNING:
        return [{"started_at": start}]
    end = stage.get(f"{stage.get('state')}_at")
    seconds = stage.get("seconds", round(end - start, 1) if end else 0.0)
    return [{"started_at": start, "seconds": seconds, "end": stage.get("state")}]


def stage_times(stage: dict[str, Any], now: float | None = None) -> tuple[float | None, float | None]:
    """(own seconds, wall seconds) of a stage record, a running stage counted to ``now``; older
    manifests (one ``seconds`` per stage, no attempts) read as one attempt."""
    attempts = stage_attempts(stage)
    if not attempts:
        return stage.get("seconds"), None
    now = time.time() if now is None else now
    own = sum(a.get("seconds", now - a["started_at"]) for a in attempts)
    if stage.get("state") == RUNNING or "seconds" not in attempts[-1]:
        wall = now - attempts[0]["started_at"]
    else:
        wall = stage.get(
            "wall_seconds", attempts[-1]["started_at"] + attempts[-1]["seconds"] - attempts[0]["started_at"]
        )
    return round(own, 1), round(wall, 1)
