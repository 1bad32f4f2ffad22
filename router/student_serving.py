"""The distilled student behind the router's Sample API (``SampleRequest.model = "student"``).

The router process loads the student (one dense network, usually the size of one expert) and runs it
locally: guidance and the step size are the student's inputs, so a step is one forward pass and no
expert or router call. Requests keep the ensemble's contract: the same cohorts (the model is part of
the cohort key), the same initial noise for a seed, one Progress per step, then a Result whose
``expert_calls`` has one entry, ``"student"``, counting the student's passes. The student and its
sampler state run on the router's device; the seeded noise is drawn on the host and moved there.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import grpc
import torch

from ddm.core.checkpoint import CheckpointError
from ddm.core.placement import Placement
from ddm.expert.guidance import with_guidance
from ddm.expert.load import load_denoiser
from ddm.expert.sampling import iter_sample
from ddm.expert.student import StudentDenoiser
from ddm.proto.ddm.v1 import ddm_pb2 as pb
from ddm.router.cohort import Member, broadcast, member_results
from ddm.router.sample_request import initial_noise

log = logging.getLogger(__name__)
STUDENT = "student"


def load_student(
    url: str, *, num_classes: int, image_shape: tuple[int, int, int], device: str | torch.device = "cpu"
) -> StudentDenoiser:
    """The student from its checkpoint on ``device``, checked against what the router serves (classes,
    image shape)."""
    student = load_denoiser(url, device=device)
    if not isinstance(student, StudentDenoiser):
        raise CheckpointError(
            f"{url}: not a distilled student (no guidance input); train one with the distill stage"
        )
    if student.num_classes != num_classes or student.image_shape != tuple(image_shape):
        raise CheckpointError(
            f"{url}: the student has {student.num_classes} classes and images {student.image_shape}, the router "
            f"{num_classes} and {tuple(image_shape)}; serve the student distilled from these experts"
        )
    return student


class StudentRunner:
    """Runs cohorts of student requests. One forward at a time (a lock): the CPU is the limit and
    concurrent forwards of one module would only contend for it; cohorts already batch requests."""

    def __init__(self, student: StudentDenoiser, placement: Placement | None = None, codec: Any = None):
        self.student = student
        self.placement = placement or Placement.cpu()  # where the student's module is
        self.codec = codec  # a latent run's decoder (ddm.expert.autoencoder.LatentCodec), None for pixels
        self._lock = threading.Lock()

    def run(
        self,
        members: list[Member],
        image_shape: tuple[int, int, int],
        *,
        deadline: float | None,
        on_step: Any = None,
    ) -> None:
        """Sample the cohort and send each member its progress and result (or the error).
        ``deadline``: time.monotonic() after which the cohort stops with DEADLINE_EXCEEDED."""
        p = members[0].params
        try:
            noises, gens = zip(*(initial_noise(m.n, image_shape, m.params.seed) for m in members))
            noise = self.placement.to(torch.cat(noises))  # (N, C, H, W)
            student = self.student.with_counter()
            denoiser = with_guidance(student, p.guidance)
            x = noise
            steps = iter_sample(
                _Locked(denoiser, self._lock), noise, self.placement.to(torch.cat([m.params.labels for m in members])),
                steps=p.steps, sampler=p.sampler, time_grid=p.time_grid, time_shift=p.time_shift, churn=p.churn,
                generator=gens[0],
            )  # fmt: skip
            for step in steps:
                if on_step is not None:
                    on_step()
                if all(m.gone for m in members):
                    return
                x = step.x
                progress = pb.Progress(step=step.index + 1, total=step.total, t=step.t_next)
                for m in members:
                    m.send("progress", progress)
                if deadline is not None and time.monotonic() > deadline:
                    error = (
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        "router: deadline passed while sampling the student",
                    )
                    return broadcast(members, "error", error)
        except Exception as e:  # a bug: tell the clients instead of leaving them waiting
            log.exception("student cohort failed")
            return broadcast(members, "error", (grpc.StatusCode.INTERNAL, f"router: {type(e).__name__}: {e}"))
        if self.codec is not None:
            x = self.codec.decode(x)  # (N, C, H, W) pixels, once per cohort as in the ensemble path
        for m, result in zip(members, member_results(members, x, [STUDENT], student.calls)):
            m.send("result", result)


class _Locked:
    """The student (a StepDenoiser) whose forwards hold ``lock`` (one student forward at a time)."""

    def __init__(self, inner: StudentDenoiser, lock: threading.Lock):
        self.inner, self.lock = inner, lock
        self.num_classes = inner.num_classes

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.lock:
            return self.inner.velocity(x_t, t, y)

    def step_velocity(
        self, x_t: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        with self.lock:
            return self.inner.step_velocity(x_t, t, t_next, y)
