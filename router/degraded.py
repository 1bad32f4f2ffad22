"""Degraded sampling: one cohort drops an expert that went down and carries on with the others.

A decentralised ensemble should survive losing an island. With ``SampleRequest.allow_degraded`` the
router treats an expert whose call failed with a "down" code (``remote.DOWN_CODES``: the server is
gone, crashed or broken; not slow, not overloaded) as absent for the rest of the request:

* the router's probabilities are zeroed for absent experts and renormalised over the live ones before
  the strategy selects, so ``full`` and ``top-k`` renormalise their weights over the live experts (a
  top-1 row whose expert is gone goes to its most probable live expert) and ``threshold`` keeps the
  live experts whose renormalised p reaches it: the ensemble formula over the remaining experts;
* the sampler step whose call failed is recomputed without the expert (its other calls are repeated:
  one wasted step per lost expert, never a mix of two weightings within a step);
* an expert the router already knows is down (``RemoteExpert.liveness``) is absent from the start,
  so requests do not pay for a doomed call each step; it rejoins once its health check passes.

Without ``allow_degraded`` (the default) the first failure ends the call; when no expert is left the
call fails with UNAVAILABLE naming the lost experts. The absent experts are reported in every
Progress and in the Result (``degraded_experts``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import grpc
import torch

from ddm.expert.denoiser import Denoiser
from ddm.router.ensemble import RouterFn
from ddm.router.remote import DOWN_CODES, ExpertFailure, RemoteExpert


class Degradation:
    """Which experts one cohort has dropped, and the rule for dropping one (``allowed``)."""

    def __init__(self, experts: Sequence[RemoteExpert], *, allowed: bool):
        self.experts = list(experts)
        self.allowed = allowed
        self._lock = threading.Lock()
        self.absent: dict[int, str] = {}  # expert index -> why
        if allowed:
            for k, e in enumerate(self.experts):
                if e.liveness.is_down():
                    self.absent[k] = f"expert {e.name} at {e.address}: down ({e.liveness.why})"
            self._check_some_left()

    @property
    def names(self) -> list[str]:
        """The absent experts' names, in expert order."""
        return [self.experts[k].name for k in sorted(self.absent)]

    def drop(self, failure: ExpertFailure) -> bool:
        """Drop the failed expert if allowed and it is down (True: recompute the step); else False."""
        if not self.allowed or failure.code not in DOWN_CODES:
            return False
        k = next((i for i, e in enumerate(self.experts) if e.address == failure.address), None)
        if k is None:
            return False
        with self._lock:
            if k in self.absent:
                return False  # dropped already, and still failing: a bug, do not loop
            self.absent[k] = str(failure)
        self._check_some_left()
        return True

    def _check_some_left(self) -> None:
        if len(self.absent) == len(self.experts):
            lost = "; ".join(self.absent[k] for k in sorted(self.absent))
            raise ExpertFailure(
                ", ".join(self.names),
                ", ".join(e.address for e in self.experts),
                grpc.StatusCode.UNAVAILABLE,
                f"no expert left to sample with ({lost})",
            )

    def router(self, probabilities: RouterFn) -> RouterFn:
        """``probabilities`` over the live experts: absent experts' columns zeroed and each row rescaled
        to sum to 1 (uniform over the live experts where a row's live probabilities underflowed to
        zero). So every strategy selects from p(k | x_t, t, y, k live): ``full`` and ``top-k`` would
        renormalise anyway, and ``threshold`` compares that renormalised p with its threshold (before,
        the raw p: losing one of three experts made threshold 0.4 pick the argmax alone)."""

        def live_probabilities(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            probs = probabilities(x_t, t, y)  # (N, K)
            if not self.absent:
                return probs
            live = torch.ones(probs.shape[1], dtype=torch.bool, device=probs.device)
            live[sorted(self.absent)] = False
            probs = torch.where(live, probs, torch.zeros_like(probs))
            total = probs.sum(1, keepdim=True)  # (N, 1)
            empty = total.squeeze(1) <= 0  # (N,)
            if bool(empty.any()):
                probs[empty] = live.to(probs.dtype)
                total[empty] = float(live.sum())
            return probs / total

        return live_probabilities

    def denoiser(self, inner: Denoiser) -> Denoiser:
        """``inner`` (the cohort's guided ensemble) recomputing a step without an expert that failed."""
        return _Degrading(inner, self)


class _Degrading:
    def __init__(self, inner: Denoiser, degradation: Degradation):
        self.inner, self.degradation = inner, degradation
        self.num_classes = inner.num_classes

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        while True:
            try:
                return self.inner.velocity(x_t, t, y)
            except ExpertFailure as e:
                if not self.degradation.drop(e):
                    raise
