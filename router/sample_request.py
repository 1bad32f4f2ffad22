"""A Sample request, validated: defaults for unset fields, limits, and one error per bad field.

Kept apart from the server so the rules read in one place and test without a network: every check
raises :class:`BadRequest` naming the protobuf field, which the server returns as INVALID_ARGUMENT.
``initial_noise`` is the one definition of a request's starting noise, so an in-process run with the
same seed reproduces a served one exactly.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ddm.expert.samplers import SAMPLERS, TIME_GRIDS
from ddm.proto.ddm.v1 import ddm_pb2 as pb
from ddm.router.config import SampleDefaults
from ddm.router.strategies import GUIDANCE_MODES, STRATEGIES

__all__ = ["BadRequest", "SampleDefaults", "SampleParams", "initial_noise", "parse_request", "router_info"]


class BadRequest(ValueError):
    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


@dataclass
class SampleParams:
    n: int
    labels: torch.Tensor  # (n,) long
    guidance: float
    steps: int
    sampler: str
    strategy: str
    top_k: int
    threshold: float
    seed: int
    time_shift: float
    churn: float
    time_grid: str = "uniform"  # an entry of TIME_GRIDS (SampleRequest.time_grid)
    allow_degraded: bool = False  # drop a failed expert and go on (SampleRequest.allow_degraded)
    model: str = "ensemble"  # "ensemble" or "student" (SampleRequest.model)
    guidance_mode: str = "ensemble"  # an entry of GUIDANCE_MODES (SampleRequest.guidance_mode)
    route_every: int = 1  # route every N-th ensemble evaluation (SampleRequest.route_every)

    def cohort_key(self) -> tuple | None:
        """Requests with equal keys can be sampled as one batch (``router.cohort``): same schedule,
        guidance and routing. None for a stochastic sampler, whose fresh noise per step comes from
        the request's own generator, so merging would change its numbers."""
        if SAMPLERS.entry(self.sampler).stochastic:
            return None
        return (
            self.steps,
            self.sampler,
            self.guidance,
            self.strategy,
            self.top_k,
            self.threshold,
            self.time_shift,
            self.time_grid,
            self.allow_degraded,
            self.model,
            self.guidance_mode,
            self.route_every,
        )


def parse_request(
    req: pb.SampleRequest,
    d: SampleDefaults,
    *,
    num_classes: int,
    num_experts: int,
    models: Sequence[str] = ("ensemble",),
    trained_time_shift: float = 1.0,
) -> SampleParams:
    """Validated parameters with defaults filled in; :class:`BadRequest` names the offending field.
    An unset time_shift is the server's ``d.time_shift`` if set, else ``trained_time_shift`` (what the
    served models were trained with, from their checkpoints)."""

    def opt(name: str, default: Any) -> Any:
        return getattr(req, name) if req.HasField(name) else default

    if not 1 <= req.n <= d.max_n:
        raise BadRequest("n", f"{req.n} images; ask for 1..{d.max_n}")
    labels = list(req.labels)
    if labels and len(labels) != req.n:
        raise BadRequest(
            "labels", f"{len(labels)} labels for n = {req.n}; send none (classes cycled) or exactly n"
        )
    bad = [v for v in labels if not 0 <= v <= num_classes]
    if bad:
        raise BadRequest(
            "labels",
            f"{bad[:5]} out of range; classes are 0..{num_classes - 1}, {num_classes} = unconditional"
            if num_classes
            else f"{bad[:5]} out of range; the model is unconditional: send no labels or only 0",
        )
    y = torch.tensor(labels, dtype=torch.long) if labels else torch.arange(req.n) % max(num_classes, 1)
    guidance = float(opt("guidance", d.guidance))
    if not (math.isfinite(guidance) and 0 <= guidance <= d.max_guidance):
        raise BadRequest("guidance", f"{guidance} out of range; use 0..{d.max_guidance} (1 = none)")
    steps = int(opt("steps", d.steps))
    if not 1 <= steps <= d.max_steps:
        raise BadRequest("steps", f"{steps} out of range; use 1..{d.max_steps}")
    sampler = opt("sampler", d.sampler)
    if sampler not in SAMPLERS:
        raise BadRequest(
            "sampler", f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS.names())}"
        )
    strategy = opt("strategy", d.strategy)
    served = STRATEGIES.names(served=True)
    if strategy not in served:
        hint = ""
        if strategy in STRATEGIES:
            hint = f" ({strategy!r} {STRATEGIES.entry(strategy).help})"
        raise BadRequest(
            "strategy", f"unknown strategy {strategy!r}{hint}; choose one of {', '.join(served)}"
        )
    top_k = int(opt("top_k", d.top_k))
    if not 1 <= top_k <= num_experts:
        raise BadRequest("top_k", f"{top_k} out of range; there are {num_experts} experts")
    threshold = float(opt("threshold", d.threshold))
    if not (math.isfinite(threshold) and 0 < threshold <= 1):
        raise BadRequest("threshold", f"{threshold} out of range; use a probability in (0, 1]")
    time_shift = float(opt("time_shift", trained_time_shift if d.time_shift is None else d.time_shift))
    if not (math.isfinite(time_shift) and 0 < time_shift <= 100):
        raise BadRequest("time_shift", f"{time_shift} out of range; use (0, 100] (1 = none)")
    time_grid = opt("time_grid", "") or d.time_grid  # empty: the server's default, like unset
    if time_grid not in TIME_GRIDS:
        raise BadRequest(
            "time_grid", f"unknown time grid {time_grid!r}; choose one of {', '.join(TIME_GRIDS.names())}"
        )
    guidance_mode = opt("guidance_mode", "") or d.guidance_mode  # empty: the server's default, like unset
    if guidance_mode not in GUIDANCE_MODES:
        raise BadRequest(
            "guidance_mode",
            f"unknown guidance mode {guidance_mode!r}; choose one of {', '.join(GUIDANCE_MODES.names())}",
        )
    route_every = int(opt("route_every", 0)) or d.route_every  # 0: the server's default, like unset
    if not 1 <= route_every <= d.max_steps:
        raise BadRequest("route_every", f"{route_every} out of range; use 1..{d.max_steps} (1 = every step)")
    churn = float(opt("churn", d.churn))
    if not (math.isfinite(churn) and 0 <= churn <= 1):
        raise BadRequest("churn", f"{churn} out of range; use [0, 1]")
    seed = int(opt("seed", secrets.randbits(63)))
    model = opt("model", "ensemble")
    if model not in models:
        hint = " (start the router with --student CKPT to serve one)" if model == "student" else ""
        raise BadRequest("model", f"{model!r} is not served here{hint}; choose one of {', '.join(models)}")
    return SampleParams(
        req.n,
        y,
        guidance,
        steps,
        sampler,
        strategy,
        top_k,
        threshold,
        seed,
        time_shift,
        churn,
        time_grid=time_grid,
        allow_degraded=bool(req.allow_degraded),
        model=model,
        guidance_mode=guidance_mode,
        route_every=route_every,
    )


def initial_noise(n: int, shape: Sequence[int], seed: int) -> tuple[torch.Tensor, torch.Generator]:
    """The noise a request with ``seed`` starts from, and the generator the stochastic sampler goes on
    with. One definition, so an in-process run with the same seed reproduces a served one exactly."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=gen), gen  # (n, C, H, W)


def router_info(d: SampleDefaults, router_config: Any, **fields: Any) -> pb.RouterInfo:
    """RouterInfo: what the router serves (strategies, guidance modes, samplers, time grids, image format),
    its defaults and limits."""
    cfg = router_config
    return pb.RouterInfo(
        num_classes=cfg.num_classes,
        image_shape=[cfg.in_channels, cfg.image_size, cfg.image_size],
        strategies=list(STRATEGIES.names(served=True)),
        samplers=list(SAMPLERS.names()),
        time_grids=list(TIME_GRIDS.names()),
        guidance_modes=list(GUIDANCE_MODES.names()),
        default_guidance_mode=d.guidance_mode,
        default_route_every=d.route_every,
        max_n=d.max_n,
        max_steps=d.max_steps,
        default_strategy=d.strategy,
        default_top_k=d.top_k,
        default_steps=d.steps,
        default_guidance=d.guidance,
        **fields,
    )
