"""The ensemble of experts behind the one Denoiser interface (DDM, McAllister et al. 2025, sec. 3).

If the data is a mixture of disjoint partitions, the marginal velocity is exactly

    v(x_t, t, y) = sum_k p(k | x_t, t, y) v_k(x_t, t, y),

and the router approximates p(k | x_t, t, y). Strategies (the registry ``ddm.router.strategies.STRATEGIES``) decide which experts are evaluated:

* ``full``       every expert, weighted by the router's probabilities (the exact formula);
* ``top-k``      the ``top_k`` most probable experts, probabilities renormalised over them
                 (top-1 was best in the paper at 1/K of the compute);
* ``threshold``  experts with p >= ``threshold`` (always at least the argmax), renormalised;
* ``oracle``     each row uses the expert of its known partition (``with_partition``): the oracle
                 evaluation, and the teacher of distillation. Not routed: it has no selection rule.

Each selected expert is called once per ``velocity`` with only the rows routed to it, so top-1 costs one
expert row per sample per step; with an ``executor`` the selected experts run in parallel (the router
server passes a thread pool because its experts are remote). The router runs once per call, without
gradients.

Guidance (ARCHITECTURE.md; the paper leaves it open) has two modes, ``guidance_mode`` (the registry
``ddm.router.strategies.GUIDANCE_MODES``):

* ``ensemble`` (the default) is the monolith's guided flow, exact with a perfect router:

      v = v_u + s (v_c - v_u),  v_c = sum_k p(k | x_t, t, y) v_k(x_t, t, y),
                                v_u = sum_k p(k | x_t, t) v_k(x_t, t, null),

  the router run on [rows with y; rows with the null label] in one pass (it learns p(k | x_t, t) through
  its label dropout), the strategy applied to each half with its own weights, and one call per expert
  that either half selected, carrying that expert's conditional and unconditional rows;
* ``expert`` guides inside each expert the conditional routing selects and mixes with those weights,
  v = sum_k w_k(x_t, t, y) (v_k,u + s (v_k,c - v_k,u)): not the monolith's flow (the unconditional pass
  never routes without the label), kept as an option.

Both are equal at scale 1 (routed with y) and at scale 0 (unconditional: routed with the null label).
With top-1 both cost 2 expert rows per sample per step; ``ensemble`` routes 2 rows per sample.

Cheaper routing: ``route_every`` = r runs the router on the first evaluation of a sampling run and on
every r-th one after it, and reuses that selection and its weights in between (Euler: one evaluation
per step, so every r-th step is routed; Heun: two per step). It lives in the guided denoiser that
``Ensemble.guided`` returns fresh for each sampling run; ``Ensemble.velocity`` routes every call.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence

import torch

from ddm.expert.denoiser import CallCounts, Denoiser
from ddm.expert.guidance import check_scale, guided
from ddm.router.model import RouterNet
from ddm.router.strategies import GUIDANCE_MODES, STRATEGIES

__all__ = [
    "CallCounts", "Ensemble", "GUIDANCE_MODES", "GuidedEnsemble", "PartitionDenoiser", "STRATEGIES", "select_weights"
]  # fmt: skip
RouterFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t, y) -> probs (N, K)


def select_weights(
    probs: torch.Tensor, strategy: str, *, top_k: int = 1, threshold: float = 0.1
) -> torch.Tensor:
    """The mixing weights a routed strategy takes from router probabilities (N, K): the selected experts'
    probabilities renormalised to sum to 1 per row, zeros elsewhere (the strategy's registered rule)."""
    rule = STRATEGIES.get(strategy, field="strategy", routed=True)
    return rule(probs, top_k=top_k, threshold=threshold)


class Ensemble:
    """Router + experts as one Denoiser: ``velocity(x_t, t, y) -> v``, same shapes in and out.

    experts: Denoisers sharing ``num_classes`` (expert k was trained on partition k).
    router: a ``RouterNet`` or any callable (x_t, t, y) -> probabilities (N, K); may be None for
    ``strategy="oracle"``, which routes by given partition labels only.
    """

    def __init__(
        self,
        experts: Sequence[Denoiser],
        router: RouterNet | RouterFn | None,
        *,
        strategy: str = "top-k",
        top_k: int = 1,
        threshold: float = 0.1,
        guidance_mode: str = "ensemble",
        route_every: int = 1,
        executor: concurrent.futures.Executor | None = None,
    ):
        self.experts = list(experts)
        if not self.experts:
            raise ValueError("experts: need at least one expert")
        for i, e in enumerate(self.experts):
            if not isinstance(e, Denoiser):
                raise ValueError(
                    f"experts[{i}] ({type(e).__name__}) does not implement the Denoiser interface "
                    "(num_classes and velocity(x_t, t, y)); wrap an nn.Module in ModuleDenoiser"
                )
        classes = [e.num_classes for e in self.experts]
        if len(set(classes)) != 1:
            raise ValueError(
                "experts: all experts must have the same num_classes (they share the null label), "
                f"got {classes}"
            )
        STRATEGIES.entry(strategy, field="strategy")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
        GUIDANCE_MODES.entry(guidance_mode, field="guidance_mode")
        if isinstance(route_every, bool) or not isinstance(route_every, int) or route_every < 1:
            raise ValueError(
                f"route_every must be an integer >= 1 (1 = route every evaluation), got {route_every!r}"
            )
        if executor is not None and not isinstance(executor, concurrent.futures.Executor):
            raise ValueError(
                f"executor must be a concurrent.futures.Executor or None, got {type(executor).__name__}"
            )
        self.num_classes = classes[0]
        self.strategy, self.top_k, self.threshold = strategy, top_k, float(threshold)
        self.guidance_mode, self.route_every = guidance_mode, route_every
        self.executor = executor
        self.router = self._router_fn(router)
        self.calls = CallCounts(len(self.experts))

    def _router_fn(self, router: RouterNet | RouterFn | None) -> RouterFn | None:
        if router is None:
            if STRATEGIES.entry(self.strategy).routed:
                unrouted = ", ".join(repr(s) for s in STRATEGIES.names(routed=False))
                raise ValueError(
                    f"router: strategy {self.strategy!r} needs a router; only {unrouted} works without one"
                )
            return None
        if isinstance(router, RouterNet):
            if router.num_experts != self.num_experts:
                raise ValueError(
                    f"router: the router has {router.num_experts} outputs but there are "
                    f"{self.num_experts} experts; "
                    "use the router trained on these experts' partitions"
                )
            if router.num_classes != self.num_classes:
                raise ValueError(
                    f"router: the router has num_classes {router.num_classes}, "
                    f"the experts {self.num_classes}; "
                    "they must agree (the null label is num_classes)"
                )
            router.eval()
            return router.probabilities
        if not callable(router):
            raise ValueError(
                f"router must be a RouterNet or a callable (x_t, t, y) -> (N, K), got {type(router).__name__}"
            )
        return router

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def null_label(self) -> int:
        return self.num_classes

    # ------------------------------------------------------------------------------------- routing

    def probabilities(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The router's p(k | x_t, t, y), (N, K) on x_t's device, checked. One router call, no gradients."""
        if self.router is None:
            raise ValueError("this ensemble has no router (strategy 'oracle'); use with_partition(k)")
        with torch.no_grad():
            probs = self.router(x_t, t, y)
        self.calls.add_router(x_t.shape[0])
        n, k = x_t.shape[0], self.num_experts
        if not isinstance(probs, torch.Tensor) or tuple(probs.shape) != (n, k):
            shape = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
            raise ValueError(f"router output must have shape (N, K) = ({n}, {k}), got {shape}")
        if not torch.isfinite(probs).all() or (probs < 0).any() or (n and (probs.sum(1) <= 0).any()):
            raise ValueError(
                "router output must be finite, non-negative probabilities with a positive sum per row"
            )
        return probs.to(x_t.device)

    def weights(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(N, K) mixing weights: the strategy's selected experts, renormalised; zeros for the others."""
        if not STRATEGIES.entry(self.strategy).routed:
            raise ValueError(
                f"strategy {self.strategy!r} routes by known partition labels: "
                "call ensemble.with_partition(k) with k (N,)"
            )
        return select_weights(
            self.probabilities(x_t, t, y), self.strategy, top_k=self.top_k, threshold=self.threshold
        )

    # ------------------------------------------------------------------------------------- velocity

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.mix(x_t, t, y, self.weights(x_t, t, y))

    def guided(self, scale: float) -> GuidedEnsemble:
        """A Denoiser applying CFG through the ensemble in its ``guidance_mode``, routing every
        ``route_every``-th evaluation (module docstring); fresh for each sampling run."""
        return GuidedEnsemble(self, check_scale(scale))

    def with_partition(self, k: torch.Tensor) -> PartitionDenoiser:
        """The oracle: row i uses expert k[i] alone. k (N,) integer partition labels."""
        return PartitionDenoiser(self, k)

    def mix(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        weights: torch.Tensor,
        *,
        scale: float = 1.0,
    ) -> torch.Tensor:
        """sum_k weights[:, k] * v_k (guided by ``scale``), calling each expert with a nonzero weight once,
        on its rows only. Results combine in expert order, so serial and parallel runs agree exactly."""
        n = x_t.shape[0]
        if tuple(weights.shape) != (n, self.num_experts):
            raise ValueError(
                f"weights must have shape (N, K) = ({n}, {self.num_experts}), got {tuple(weights.shape)}"
            )
        if tuple(t.shape) != (n,) or tuple(y.shape) != (n,):
            raise ValueError(
                f"t and y must have shape (N,) = ({n},), got {tuple(t.shape)} and {tuple(y.shape)}"
            )
        weights = weights.to(x_t.device)
        selected = [
            (k, rows) for k in range(self.num_experts) if (rows := weights[:, k].nonzero().squeeze(1)).numel()
        ]

        def call(k: int, rows: torch.Tensor) -> torch.Tensor:
            return self._expert_velocity(k, x_t[rows], t[rows], y[rows], scale)

        if self.executor is not None and len(selected) > 1:
            futures = [self.executor.submit(call, k, rows) for k, rows in selected]
            concurrent.futures.wait(futures)  # all finish before any error surfaces
            results = [f.result() for f in futures]
        else:
            results = [call(k, rows) for k, rows in selected]
        out = torch.zeros_like(x_t)  # (N, C, H, W)
        for (k, rows), v_k in zip(selected, results):
            want = (rows.numel(), *x_t.shape[1:])
            if tuple(v_k.shape) != want:
                raise ValueError(f"experts[{k}].velocity returned shape {tuple(v_k.shape)} for input {want}")
            w_k = weights[rows, k].to(out.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))  # (n_k, 1, 1, 1)
            out.index_add_(0, rows, w_k * v_k.to(out.dtype))
        return out

    def _expert_velocity(
        self, k: int, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Expert k on its rows: conditional only (scale 1), unconditional only (scale 0), else one
        batched call of [rows; rows with the null label]."""
        expert = self.experts[k]
        if scale == 1.0:
            self.calls.add(k, x_t.shape[0])
            return expert.velocity(x_t, t, y)
        y_null = torch.full_like(y, self.null_label)  # (n,)
        if scale == 0.0:
            self.calls.add(k, x_t.shape[0])
            return expert.velocity(x_t, t, y_null)
        self.calls.add(k, 2 * x_t.shape[0])
        v = expert.velocity(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, y_null]))  # (2n, C, H, W)
        if v.shape[0] != 2 * x_t.shape[0]:
            raise ValueError(f"experts[{k}].velocity returned {v.shape[0]} rows for {2 * x_t.shape[0]}")
        v_c, v_u = v.chunk(2)  # (n, C, H, W) each
        return guided(v_c, v_u, scale)


class GuidedEnsemble:
    """The ensemble guided by ``scale`` in the ensemble's ``guidance_mode``; holds one sampling run's
    routing decision for ``route_every`` (a new run: a new ``Ensemble.guided``)."""

    def __init__(self, ensemble: Ensemble, scale: float):
        self.ensemble, self.scale = ensemble, scale
        self.num_classes = ensemble.num_classes
        self.mode = GUIDANCE_MODES.get(ensemble.guidance_mode, field="guidance_mode")
        self._decision: tuple[torch.Tensor, torch.Tensor] | None = None  # (labels (M,), weights (M, K))
        self._age = 0  # evaluations since the router last ran

    def route(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(M, K) weights: the router's, or the last decision's while it is younger than ``route_every``
        and was made for the same rows (same count and labels)."""
        last = self._decision
        if (
            last is not None
            and self._age < self.ensemble.route_every
            and last[0].shape == y.shape
            and torch.equal(last[0], y)
        ):
            self._age += 1
            return last[1]
        weights = self.ensemble.weights(x_t, t, y)  # (M, K)
        self._decision, self._age = (y.clone(), weights), 1
        return weights

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y_null = torch.full_like(y, self.ensemble.null_label)  # (N,)
        try:
            return self.mode(x_t, t, y, y_null, self.scale, route=self.route, mix=self.ensemble.mix)
        except Exception:
            self._decision = None  # a failed step (a lost expert) is recomputed with a fresh routing
            raise


class PartitionDenoiser:
    """The oracle: row i's velocity is expert k[i]'s (optionally guided). A Denoiser for batches of the
    same N rows as k, e.g. sampling with a fixed expert per sample, or distillation's teacher."""

    def __init__(self, ensemble: Ensemble, k: torch.Tensor, scale: float = 1.0):
        if not isinstance(k, torch.Tensor) or k.ndim != 1 or k.is_floating_point() or k.dtype == torch.bool:
            raise ValueError(f"k must be a 1-D integer tensor of partition labels (N,), got {k!r}")
        if k.numel() and (int(k.min()) < 0 or int(k.max()) >= ensemble.num_experts):
            raise ValueError(
                f"k (partition labels) must lie in [0, {ensemble.num_experts}), "
                f"got [{int(k.min())}, {int(k.max())}]"
            )
        self.ensemble, self.k, self.scale = ensemble, k.long(), scale
        self.num_classes = ensemble.num_classes

    def guided(self, scale: float) -> PartitionDenoiser:
        return PartitionDenoiser(self.ensemble, self.k, check_scale(scale))

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x_t.shape[0] != self.k.shape[0]:
            raise ValueError(f"x_t has {x_t.shape[0]} rows but k (partition labels) has {self.k.shape[0]}")
        weights = torch.nn.functional.one_hot(self.k.to(x_t.device), self.ensemble.num_experts).to(x_t.dtype)
        return self.ensemble.mix(x_t, t, y, weights, scale=self.scale)
