"""Training objectives: what an expert's network predicts, and its exact conversion to a velocity.

An objective is one registry entry (``OBJECTIVES``, filled here and nowhere else). Every objective trains
on the same path (``ddm.expert.flow``): t in [0, 1], t = 0 is data, t = 1 is noise,

    x_t = (1 - t) x_0 + t eps,    u = eps - x_0,

and differs only in the network's target:

* ``velocity``: v = eps - x_0 (rectified flow; Liu et al. 2023, Esser et al. 2024 eq. 3);
* ``eps``: the noise eps (DDPM's eps-prediction, Ho et al. 2020; "eps/linear" in Esser et al. 2024 Table 1);
* ``x0``: the clean data x_0 (Karras et al. 2022 "D(x)"; Salimans & Ho 2022 "x-prediction").

Whatever an expert predicts, the rest of the system sees a velocity: the denoiser boundary
(``ddm.expert.denoiser.ModuleDenoiser``) converts with :meth:`Objective.to_velocity`, exactly, from the
path's two identities x_t = (1 - t) x_0 + t eps and v = eps - x_0:

    eps-prediction:  v = (eps - x_t) / (1 - t)      (singular at t = 1)
    x0-prediction:   v = (x_t - x_0) / t            (singular at t = 0)

Applied to the exact predictors E[eps | x_t] and E[x_0 | x_t] these give the exact marginal velocity
E[eps - x_0 | x_t] (the conversions are affine in the prediction), so the router, the ensemble and
every sampler mix experts of any objective unchanged.

The singular ends. At t = 1, x_1 = eps: an eps-predictor's exact answer is x_t itself, and (eps - x_t)
/ (1 - t) is 0/0; the data mean it would need is simply not in an eps-prediction (Lin et al. 2024,
"Common Diffusion Noise Schedules and Sample Steps are Flawed", sec. 3.2: eps-prediction is ill-posed
at zero terminal SNR). Likewise an x0-predictor at t = 0. Near either end the division amplifies the
network's error by 1 / (1 - t) or 1 / t. So an objective with a singular end declares ``edge``: the
network is evaluated and converted at t clamped to [edge, 1 - edge] on that side, which is exact at the
clamped time (the velocity at 1 - edge stands in for the one at 1) and bounded everywhere. Samplers
start at t = 1 (``ddm.expert.samplers``), so every eps-expert call of a first step is clamped; the
x0 clamp only acts on grids finer than 1 / edge steps. ``velocity`` has no singular end and no clamp:
its numerics are those of the code before objectives existed.

This module imports no torch (tensor methods only), so ``--help`` reads the choices without loading it.
To add an objective: one :class:`Objective` registered here, plus its closed-form test in
tests/test_objectives.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ddm.core.registry import Registry

if TYPE_CHECKING:
    from torch import Tensor

OBJECTIVES: Registry[Objective] = Registry("objective")
DEFAULT = "velocity"  # what a checkpoint without an "objective" entry was trained with
EDGE = 0.02  # the clamp at a singular end: 1 / EDGE = 50x the error amplification, at most

Net = Callable[["Tensor", "Tensor", "Tensor"], "Tensor"]  # (x_t, t, y) -> prediction, same shape as x_t


def _bcast(t: Tensor, like: Tensor) -> Tensor:
    """(N,) -> (N, 1, 1, ...) so it broadcasts against ``like`` (flow._bcast, without importing torch)."""
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


@dataclass(frozen=True)
class Objective:
    """What the network predicts: ``target(x_0, eps)`` and the exact ``to_velocity``; ``singular`` names
    the end of [0, 1] where the conversion divides by zero (None: no such end)."""

    name: str
    target: Callable[[Tensor, Tensor], Tensor]  # (x_0, eps) -> the regression target
    convert: Callable[[Tensor, Tensor, Tensor], Tensor]  # (prediction, x_t, t (N,)) -> v, exact
    singular: float | None = None  # 0.0 or 1.0

    def net_time(self, t: Tensor) -> Tensor:
        """The time the network is evaluated and converted at: t, clamped ``EDGE`` away from the
        singular end (see the module docstring)."""
        if self.singular == 1.0:
            return t.clamp(max=1.0 - EDGE)
        if self.singular == 0.0:
            return t.clamp(min=EDGE)
        return t

    def to_velocity(self, prediction: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """v (N, C, H, W) from the network's prediction at (x_t, t); t must be :meth:`net_time`'s."""
        return self.convert(prediction, x_t, t)

    def velocity(self, net: Net, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """The velocity of ``net`` (which predicts this objective's target) at (x_t, t, y), in float32."""
        t_net = self.net_time(t)  # (N,)
        return self.to_velocity(net(x_t, t_net, y).float(), x_t.float(), t_net)

    def training_loss(self, net: Net, x_0: Tensor, eps: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """The one objective call (DiT's ``training_losses``): mean squared error of the network's
        prediction at x_t = (1 - t) x_0 + t eps against this objective's target, in float32."""
        tb = _bcast(t, x_0)
        x_t = (1 - tb) * x_0 + tb * eps  # (b, C, H, W): flow.interpolate
        prediction = net(x_t, t, y)  # (b, C, H, W)
        return ((prediction.float() - self.target(x_0, eps).float()) ** 2).mean()


def register(objective: Objective, *, help: str) -> Objective:
    OBJECTIVES.add(objective.name, objective, help=help, singular=objective.singular)
    return objective


VELOCITY = register(
    Objective("velocity", target=lambda x_0, eps: eps - x_0, convert=lambda v, x_t, t: v),
    help="the velocity eps - x_0 (rectified flow)",
)
EPS = register(
    Objective(
        "eps",
        target=lambda x_0, eps: eps,
        convert=lambda eps, x_t, t: (eps - x_t) / (1 - _bcast(t, x_t)),
        singular=1.0,
    ),
    help=f"the noise eps; v = (eps - x_t) / (1 - t), evaluated at t <= {1 - EDGE:g}",
)
X0 = register(
    Objective(
        "x0",
        target=lambda x_0, eps: x_0,
        convert=lambda x_0, x_t, t: (x_t - x_0) / _bcast(t, x_t),
        singular=0.0,
    ),
    help=f"the clean image x_0; v = (x_t - x_0) / t, evaluated at t >= {EDGE:g}",
)


def objective_of(meta: dict, url: str = "checkpoint") -> Objective:
    """The objective a checkpoint's metadata records (``model.objective``; older checkpoints: velocity)."""
    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    name = meta.get("objective", model.get("objective", DEFAULT))
    if name not in OBJECTIVES:
        raise ValueError(
            f"{url}: metadata names objective {name!r}, unknown to this version; known: {', '.join(OBJECTIVES.names())}"
        )
    return OBJECTIVES.get(name)
