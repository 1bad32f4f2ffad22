"""``ddm run``'s pipeline: the run's context (config, islands, manifest, device, dataset, how jobs are
built and launched) and the loop over the stages of ``stages.ALL``, in order: curate -> partition ->
experts -> router -> eval -> distill. The run root's layout is in ``layout.py``.

Each stage reads and writes only under the run root and records itself in the manifest; a stage that
is done is skipped on a rerun, so the coordinator can be killed at any point and run again. Every
attempt at a stage is timed: the manifest keeps each attempt's seconds (a killed coordinator's up to
its last sign of life in ``coordinator.json``), their sum as the stage's ``seconds`` and the span from
the first start to the end as ``wall_seconds``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ddm.coordinator import stages as stage_objects
from ddm.coordinator.config import RunConfig
from ddm.coordinator.islands import IslandsConfig
from ddm.coordinator.layout import (  # noqa: F401  (where callers have always found them)
    expert_is_complete,
    expert_names,
    expert_output,
    job_output,
    local_log_dir,
    router_output,
    trained_to,
)
from ddm.coordinator.manifest import CANCELLED, DONE, FAILED, SUCCEEDED, Manifest
from ddm.coordinator.progress import Clock, eta, format_seconds
from ddm.core import storage
from ddm.core.config import to_toml
from ddm.core.placement import Placement

STAGES = stage_objects.NAMES


class RunFailed(RuntimeError):
    pass


@dataclass
class Pipeline:
    cfg: RunConfig
    islands: IslandsConfig
    manifest: Manifest
    progress: bool = True
    say: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))
    dry_run: bool = False  # build jobs without writing their configs (``ddm run --dry-run``)
    # Where the in-process stages' networks run (embeddings, eval, distillation table); None: resolved
    # from ``cfg.device`` the first time a stage needs it.
    placement: Placement | None = None
    clock_seconds: float = 10.0  # how often ``coordinator.json`` says this coordinator is alive
    _data: Any = None
    _rates: dict[str, tuple[float, int]] = field(default_factory=dict)
    _last_line: str | None = None
    _clock: Clock | None = None

    def __post_init__(self) -> None:
        from ddm.coordinator.data_shape import is_resolved, resolve_run_config

        if not is_resolved(self.cfg):  # `ddm run` resolves before the manifest; library callers here
            self.cfg = resolve_run_config(self.cfg, self.data())

    def where(self) -> Placement:
        """The coordinator's device, resolved once per pipeline (``cfg.device``)."""
        if self.placement is None:
            self.placement = Placement.resolve(self.cfg.device)
        return self.placement

    def data(self) -> Any:
        """The run's dataset (an ``ImageDataset``), read once for the stages that need it."""
        if self._data is None:
            from ddm.expert.data import build_dataset

            self._data = build_dataset(self.cfg.data)
        return self._data

    def run(self, stages: Sequence[str | stage_objects.Stage] = STAGES) -> dict[str, Any]:
        """Run ``stages`` (names or Stage objects) in order, skipping those done; returns the manifest."""
        todo = [stage_objects.BY_NAME[s] if isinstance(s, str) else s for s in stages]
        for i, stage in enumerate(todo):
            if stage.done(self.manifest):
                self.say(f"[{stage.name}] already done — skipped")
                continue
            reason = stage.skipped(self.cfg)
            if reason:
                self.manifest.set_stage(stage.name, DONE, skipped=reason)
                self.say(f"[{stage.name}] skipped: {reason}")
                continue
            earlier = {s.name for s in todo[:i]}
            missing = [
                n for n in stage.needs
                if n not in earlier and not self.manifest.stage_done(n) and not stage_objects.BY_NAME[n].skipped(self.cfg)
            ]  # fmt: skip
            if missing:
                raise RunFailed(f"stage {stage.name} needs {', '.join(missing)}, which has not run: run it first "
                                f"(--stages {','.join(missing)})")  # fmt: skip
            self._attempt(stage)
        return self.manifest.data

    def _attempt(self, stage: stage_objects.Stage) -> None:
        """One timed attempt at ``stage``, recorded in the manifest as done or failed."""
        name = stage.name
        self.say(f"[{name}] running")
        clock = self._clock = Clock(
            storage.join(self.cfg.root, "coordinator.json"), name, every=self.clock_seconds
        )
        started = self.manifest.start_stage(name, last_alive=clock.last_alive)
        clock.start(started)
        try:
            info = stage.run(self) or {}
        except Exception as e:
            clock.stop()
            self.manifest.end_stage(name, FAILED, error=f"{type(e).__name__}: {e}")
            raise
        except BaseException:  # Ctrl-C: the attempt's time counts; the stage resumes on the next run
            clock.stop()
            self.manifest.end_stage(name, None)
            raise
        clock.stop()
        record = self.manifest.end_stage(name, DONE, **info)
        line = f"[{name}] done in {format_seconds(time.time() - started)}"
        if len(record["attempts"]) > 1:
            line += (f" ({format_seconds(record['seconds'])} over {len(record['attempts'])} attempts, "
                     f"{format_seconds(record['wall_seconds'])} from the first start)")  # fmt: skip
        self.say(line)

    def job(
        self,
        name: str,
        job_cfg: Any,
        output: str,
        island_name: str,
        component: Callable,
        complete: Callable[[], bool],
        **resources: Any,
    ):
        """Write the job's config next to its output and describe it for the launcher; the job runs as the
        island's ``j`` processes (torchrun for more than one: every trainer is data-parallel)."""
        from ddm.coordinator.launcher import JobSpec

        island = self.islands.island[island_name]
        if island.scheduler == "kubernetes" and "://" not in self.cfg.root:
            raise ValueError(
                f"island {island_name!r} runs jobs on a cluster, which cannot see the local run root {self.cfg.root}; "
                "use shared object storage, e.g. --root s3://bucket/run"
            )
        config_url = storage.join(output, "job.toml")
        if not self.dry_run:
            storage.write_bytes(config_url, to_toml(job_cfg.model_dump(mode="json")).encode())
        local = island.scheduler.startswith("local")
        # The job reaches the run root as the coordinator does: the S3 endpoint and region go into its
        # environment (credentials do not: local jobs inherit them, cluster jobs get them from a Secret),
        # unless the island brings its own view of the store: its `env`, or ConfigMaps (on Kubernetes an
        # explicit variable would override the ConfigMap's, which knows the in-cluster address).
        storage_env = {} if island.env_from_configmaps else storage.job_env()
        app = component(
            _absolute(config_url) if local else config_url,
            name=f"{self.cfg.name}-{name}",
            image=_cwd() if island.scheduler == "local_cwd" else (island.image or ""),
            python=sys.executable if local else "python",
            cpu=island.cpu, gpu=island.gpu, memMB=island.memMB, env={**storage_env, **island.env}, j=island.j,
            **resources,
        )  # fmt: skip
        return JobSpec(name=name, island=island_name, app=app, output=output, is_complete=complete)

    def launch(self, jobs: list, max_attempts: int) -> None:
        """Run jobs to completion on their islands; raise RunFailed naming every job that failed."""
        from ddm.coordinator.kube import make_runner
        from ddm.coordinator.launcher import Launcher

        log_dir = local_log_dir(self.cfg.root)
        with make_runner(self.islands) as runner:
            launcher = Launcher(
                self.manifest, self.islands, runner,
                max_attempts=max_attempts, poll_seconds=self.cfg.experts.poll_seconds,
                lease_seconds=self.cfg.experts.lease_seconds, log_dir=log_dir, on_progress=self._job_progress,
            )  # fmt: skip
            outcomes = launcher.run(jobs)
        failed = {n: o for n, o in outcomes.items() if o.state != SUCCEEDED}
        if failed:
            lines = [
                f"  {n}: cancelled by `ddm cancel` after {o.attempts} attempt(s)" if o.state == CANCELLED
                else f"  {n}: failed after {o.attempts} attempt(s): {(o.error or '').strip()[:2000]}"
                for n, o in failed.items()
            ]  # fmt: skip
            raise RunFailed(
                "jobs failed or were cancelled (the others finished; fix the cause and run again to retry, "
                "or to resume a cancelled job):\n" + "\n".join(lines)
            )

    def _job_progress(self, states: dict[str, str]) -> None:
        """One line per change of the jobs' states or steps, with an ETA from the steps seen so far."""
        from ddm.core import heartbeat

        if self._clock is not None:
            self._clock.tick()
        now = time.time()
        parts, etas = [], []
        for name, state in states.items():
            beat = (
                heartbeat.read(job_output(self.cfg.root, name)) if state in ("SUBMITTED", "RUNNING") else None
            )
            if not beat:
                parts.append(f"{name}={state}")
                continue
            step, steps = int(beat["step"]), int(beat["steps"])
            first = self._rates.setdefault(name, (float(beat.get("time", now)), step))
            left = eta(step, steps, since=first, now=float(beat.get("time", now)))
            parts.append(f"{name}={state} {step}/{steps}")
            if left is not None:
                etas.append(f"{name} {format_seconds(left)}")
        line = "  ".join(parts)
        if line != self._last_line:
            self._last_line = line
            self.say(f"[jobs] {line}" + (f"  (ETA {', '.join(etas)})" if etas else ""))


def _cwd() -> str:
    import os

    return os.getcwd()


def _absolute(url: str) -> str:
    import os

    return url if "://" in url else os.path.abspath(url)
