"""Launch, watch, retry and cancel jobs on islands through TorchX, with every step in the manifest.

Rules (ARCHITECTURE.md, "Jobs"):
- A job whose output says it is complete is never launched again.
- A job the manifest records as submitted is never launched twice: we ask its scheduler first, and
  when the scheduler no longer knows it (the local scheduler forgets its children when the coordinator
  restarts) we trust the job's own heartbeat on the run root for ``lease_seconds``.
- Retries are ours, bounded by ``max_attempts`` per coordinator run (a rerun gives a failed job a fresh
  budget: the operator fixed its island); the scheduler's own retries stay off.
- At most ``max_concurrent`` jobs of this run run at once on each island.
- A job ``ddm cancel`` cancels while this coordinator runs is never retried: ``cancel_jobs`` records the
  cancellation (a compare-and-swap on the manifest) *before* it stops the job, so by the time the job
  ends the record is there. The coordinator takes it over at its next poll, or when its own write of
  the manifest conflicts with it, stops any attempt of that job it knows (one it launched while the
  cancel ran included), and reports the job CANCELLED.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from torchx import specs
from torchx.runner import Runner

from ddm.coordinator.islands import IslandsConfig
from ddm.coordinator.kube import is_not_found, scheduler_key
from ddm.coordinator.manifest import CANCELLED, JOB_FAILED, SUBMITTED, SUCCEEDED, Manifest, ManifestConflict
from ddm.core import heartbeat

log = logging.getLogger("ddm.launcher")

TERMINAL_FAILED = {specs.AppState.FAILED, specs.AppState.CANCELLED}
# Accepted by the scheduler but not running yet (a Volcano job waiting in its queue for a gang of pods).
NOT_STARTED = {
    specs.AppState.SUBMITTED,
    specs.AppState.PENDING,
    specs.AppState.UNSUBMITTED,
    specs.AppState.UNKNOWN,
}


@dataclass
class JobSpec:
    name: str
    island: str
    app: specs.AppDef
    output: str  # where the job writes heartbeat.json
    is_complete: Callable[[], bool]


@dataclass
class JobOutcome:
    name: str
    state: str
    attempts: int
    error: str | None = None


@dataclass
class Launcher:
    manifest: Manifest
    islands: IslandsConfig
    runner: Runner
    max_attempts: int = 3
    poll_seconds: float = 2.0
    lease_seconds: float = 120.0
    log_dir: str | None = None
    on_progress: Callable[[dict[str, str]], None] | None = None
    _adopted: set[str] = field(default_factory=set)
    _cancelled: set[str] = field(default_factory=set)  # cancelled by `ddm cancel` during this run

    # one job -----------------------------------------------------------------------------------------
    def _submit(self, job: JobSpec) -> None:
        island = self.islands.island[job.island]
        cfg = island.run_cfg()
        if island.scheduler.startswith("local") and self.log_dir:
            cfg.setdefault("log_dir", self.log_dir)
        record = self.manifest.job(job.name)
        attempt = len(record["attempts"]) + 1
        # Write-ahead: the attempt is on the record before its process exists, so a coordinator killed
        # inside runner.run leaves a SUBMITTED attempt (no handle) that the next one waits for
        # (``_observe``), instead of no record and a second copy of the job.
        entry = {"handle": None, "island": job.island, "submitted_at": time.time(), "state": SUBMITTED}
        record["attempts"].append(entry)
        self.manifest.update_job(job.name, state=SUBMITTED, island=job.island, handle=None, attempt=attempt)
        try:
            handle = self.runner.run(job.app, scheduler=scheduler_key(job.island, island), cfg=cfg)
        except Exception as e:  # recorded, then raised as before: the attempt did not start
            entry.update(state=JOB_FAILED, error=f"could not submit: {e}", ended_at=time.time())
            self.manifest.update_job(job.name, state=JOB_FAILED, error=entry["error"])
            raise
        entry["handle"] = handle
        self.manifest.update_job(job.name, handle=handle)
        log.info(
            "submitted %s (attempt %d/%d) on %s: %s", job.name, attempt, self.max_attempts, job.island, handle
        )

    def _observe(self, job: JobSpec) -> str:
        """Current state of a submitted job: PENDING (accepted, not started), RUNNING, SUCCEEDED, FAILED
        or LOST (gone, no heartbeat)."""
        record = self.manifest.job(job.name)
        handle = record.get("handle")
        status = None
        if handle:
            try:
                status = self.runner.status(handle)
            except (ValueError, KeyError, RuntimeError) as e:  # unknown session/scheduler
                log.debug("status of %s failed: %s", handle, e)
            except Exception as e:  # a cluster API error: only "not found" means the job is gone
                if not is_not_found(e):
                    # Unreachable API server, 5xx, expired credentials: we cannot tell, so we neither
                    # resubmit (that could run the job twice) nor give up; ask again next poll.
                    log.warning(
                        "cannot get the status of %s (%s); asking again",
                        handle,
                        str(e).splitlines()[0] if str(e) else type(e).__name__,
                    )
                    return "UNKNOWN"
                log.debug("%s is gone from its cluster", handle)
        if status is not None:
            if status.state == specs.AppState.SUCCEEDED:
                return SUCCEEDED
            if status.state in TERMINAL_FAILED:
                record["error"] = self._error_text(handle, status)
                return JOB_FAILED
            return "PENDING" if status.state in NOT_STARTED else "RUNNING"
        # The scheduler does not know the job (e.g. the coordinator restarted): trust the heartbeat.
        if job.is_complete():
            return SUCCEEDED
        beat = heartbeat.read(job.output)
        if heartbeat.is_alive(beat, self.lease_seconds):
            if job.name not in self._adopted:
                log.info(
                    "adopted %s: still running from an earlier coordinator (heartbeat is fresh)", job.name
                )
                self._adopted.add(job.name)
            return "RUNNING"
        # Submitted by an earlier coordinator and not beating yet: a trainer's first heartbeat comes after
        # its interpreter, data and model are up, seconds after its launch. Until lease_seconds after the
        # submission, it is starting, not lost (relaunching it would run the job twice at once).
        submitted = float((record["attempts"][-1].get("submitted_at") if record["attempts"] else None) or 0.0)
        if time.time() - submitted < self.lease_seconds and float((beat or {}).get("time", 0)) < submitted:
            if job.name not in self._adopted:
                log.info(
                    "adopted %s: submitted %.0f s ago, not beating yet (starting)",
                    job.name,
                    time.time() - submitted,
                )
                self._adopted.add(job.name)
            return "PENDING"
        return "LOST"

    def _error_text(self, handle: str, status: specs.AppStatus) -> str:
        lines: list[str] = []
        try:
            app = self.runner.describe(handle)
            role = app.roles[0].name if app and app.roles else None
            if role:
                lines = list(self.runner.log_lines(handle, role, k=0, streams=None))[-20:]
        except Exception as e:  # logs are best effort: the scheduler may have dropped them
            lines = [f"(logs unavailable: {e})"]
        tail = "".join(line if line.endswith("\n") else line + "\n" for line in lines)
        return f"{status.state.name}: {status.msg or ''}\n{tail}".strip()

    # cancellation by `ddm cancel` ---------------------------------------------------------------------
    def _take_cancellations(self, pending: dict[str, JobSpec]) -> list[str]:
        """Adopt the cancellations `ddm cancel` recorded since our copy of the manifest and stop every
        attempt of those we are running; returns every job whose cancellation was taken over now."""
        known = {n: [a["handle"] for a in self.manifest.job(n)["attempts"] if a.get("handle")]
                 for n in pending}  # fmt: skip
        names = self.manifest.adopt_cancellations()
        for name in (n for n in names if n in pending):
            record = self.manifest.job(name)
            recorded = {a.get("handle") for a in record["attempts"]}
            unrecorded = [h for h in known[name] if h not in recorded]
            for handle in dict.fromkeys([*known[name], *(h for h in recorded if h)]):
                self._stop(handle)
            for handle in unrecorded:  # launched while the cancel ran: stopped at once, but on the record
                record["attempts"].append(
                    {"handle": handle, "island": pending[name].island, "state": CANCELLED,
                     "ended_at": time.time(), "error": "launched while `ddm cancel` ran; stopped at once"}
                )  # fmt: skip
            if unrecorded:
                self.manifest.save()
            self._cancelled.add(name)
            log.warning("%s was cancelled (`ddm cancel`); it is not retried", name)
        return names

    def _stop(self, handle: str) -> None:
        try:
            status = self.runner.status(handle)
            if status is not None and not status.is_terminal():
                self.runner.cancel(handle)
        except Exception as e:  # another scheduler's job, or an unreachable one: `ddm cancel` signalled it
            log.debug("cannot cancel %s here: %s", handle, e)

    # all jobs --------------------------------------------------------------------------------------
    def run(self, jobs: list[JobSpec]) -> dict[str, JobOutcome]:
        """Drive every job to a terminal state; returns the outcome of each."""
        pending = {j.name: j for j in jobs}
        outcomes: dict[str, JobOutcome] = {}
        # A job that failed in an earlier run gets a fresh budget of attempts: running again is how the
        # operator says its island is back (RunFailed asks for exactly that).
        earlier = {
            n: len(self.manifest.job(n)["attempts"])
            for n in pending
            if self.manifest.job(n)["state"] == JOB_FAILED
        }
        while pending:
            try:
                self._poll(jobs, pending, outcomes, earlier)
            except ManifestConflict:
                # `ddm cancel` wrote between our read and our write: take its record over, then look again
                if not self._take_cancellations(pending):
                    raise
                continue
            if pending:
                time.sleep(self.poll_seconds)
        return outcomes

    def _poll(
        self,
        jobs: list[JobSpec],
        pending: dict[str, JobSpec],
        outcomes: dict[str, JobOutcome],
        earlier: dict[str, int],
    ) -> None:
        """One pass over the pending jobs: record what happened, finish, retry or launch."""
        self._take_cancellations(pending)
        running_per_island: dict[str, int] = {}
        to_launch: list[JobSpec] = []
        for name, job in list(pending.items()):
            record = self.manifest.job(name)
            attempts = len(record["attempts"])
            if record["state"] == SUCCEEDED or job.is_complete():
                outcomes[name] = self._finish(job, SUCCEEDED, attempts)
                del pending[name]
                continue
            if name in self._cancelled:
                outcomes[name] = JobOutcome(name, CANCELLED, attempts, "cancelled by `ddm cancel`")
                del pending[name]
                continue
            if record["state"] in (SUBMITTED, "RUNNING"):
                state = self._observe(job)
                if state in ("RUNNING", "PENDING", "UNKNOWN"):
                    if state == "RUNNING" and record["state"] != "RUNNING":
                        self.manifest.update_job(name, state="RUNNING")
                    running_per_island[job.island] = running_per_island.get(job.island, 0) + 1
                    continue
                if state == SUCCEEDED and job.is_complete():
                    outcomes[name] = self._finish(job, SUCCEEDED, attempts)
                    del pending[name]
                    continue
                # FAILED, LOST, or "succeeded" without a complete output: the attempt failed.
                why = record.get("error") or (
                    "the job ended without completing its output"
                    if state == SUCCEEDED
                    else "lost: no longer known to its scheduler and no fresh heartbeat"
                )
                record["attempts"][-1].update(state=JOB_FAILED, error=why, ended_at=time.time())
                self.manifest.update_job(name, state=JOB_FAILED, error=why)
                log.warning("%s attempt %d failed: %s", name, attempts, why.splitlines()[0] if why else "")
            if record["state"] == JOB_FAILED and attempts - earlier.get(name, 0) >= self.max_attempts:
                outcomes[name] = self._finish(job, JOB_FAILED, attempts, record.get("error"))
                del pending[name]
                continue
            to_launch.append(job)
        if to_launch and self._take_cancellations(pending):
            return  # look again before launching anything: a job to launch may be one just cancelled
        for job in to_launch:
            limit = self.islands.island[job.island].max_concurrent
            if running_per_island.get(job.island, 0) < limit:
                self._submit(job)
                running_per_island[job.island] = running_per_island.get(job.island, 0) + 1
        if self.on_progress:
            self.on_progress({name: self.manifest.job(name)["state"] for name in (j.name for j in jobs)})

    def _finish(self, job: JobSpec, state: str, attempts: int, error: str | None = None) -> JobOutcome:
        record = self.manifest.job(job.name)
        if record["state"] != state:
            if record["attempts"]:
                record["attempts"][-1].setdefault("ended_at", time.time())
                record["attempts"][-1]["state"] = state
            self.manifest.update_job(job.name, state=state, finished_at=time.time())
        return JobOutcome(job.name, state, attempts, error)


def cancel_jobs(manifest: Manifest, runner: Runner, outputs: dict[str, str], *, tries: int = 20) -> list[str]:
    """Cancel every job of the run the manifest records as submitted or running; returns their names.

    The cancellation is recorded first, by a compare-and-swap of the manifest (re-read and redone when
    a live coordinator wrote in between, at most ``tries`` times), and only then are the jobs stopped:
    a coordinator that sees one of them end finds it cancelled and does not retry it. Nothing is written
    when a job's scheduler cannot be reached. ``outputs`` maps job name -> output URL (for jobs whose
    scheduler forgot them: we signal the process named by the heartbeat, which then checkpoints and exits).
    """
    for _ in range(tries):
        live = {n: r for n, r in manifest.data["jobs"].items() if r["state"] in (SUBMITTED, "RUNNING")}
        statuses = {n: _scheduler_status(runner, n, r.get("handle")) for n, r in live.items()}
        now = time.time()
        for record in live.values():
            if record["attempts"]:
                record["attempts"][-1].update(state=CANCELLED, ended_at=now)
            record.update(state=CANCELLED, cancelled_at=now)
        try:
            if live:
                manifest.save()
            break
        except ManifestConflict:
            manifest.reload()  # the coordinator recorded something meanwhile: decide again on its record
    else:
        raise ManifestConflict(
            f"{manifest.url}: changed under `ddm cancel` {tries} times in a row; run it again"
        )
    for name, record in live.items():
        status = statuses[name]
        if status is not None and not status.is_terminal():
            runner.cancel(record["handle"])
        elif name in outputs:
            _kill_local_orphan(outputs[name])
    return list(live)


def _scheduler_status(runner: Runner, name: str, handle: str | None) -> specs.AppStatus | None:
    """The job's status from its scheduler; None if the scheduler does not know it (any more)."""
    try:
        return runner.status(handle) if handle else None
    except (ValueError, KeyError, RuntimeError):
        return None
    except Exception as e:  # a cluster API error: "not found" means already gone, else say why
        if not is_not_found(e):
            raise RuntimeError(f"cannot reach the scheduler of {name} ({handle}) to cancel it: {e}") from e
        return None


def _kill_local_orphan(output: str) -> None:
    """A local job from an earlier coordinator: its scheduler is gone, so signal it by its heartbeat pid."""
    beat = heartbeat.read(output)
    if beat and beat.get("host") == socket.gethostname() and beat.get("state") == "running":
        try:
            os.kill(int(beat["pid"]), signal.SIGTERM)
        except ProcessLookupError:
            pass
