"""Rectified-flow math as pure functions.

Convention (Liu et al. 2023, "Flow Straight and Fast"; Esser et al. 2024, "Scaling Rectified Flow
Transformers", eqs. 1-3): t in [0, 1], t = 0 is data, t = 1 is noise,

    x_t = (1 - t) * x_0 + t * eps          (interpolate)
    u   = d x_t / d t = eps - x_0          (velocity_target)

and a sampler integrates dx/dt = v(x_t, t) from t = 1 to t = 0.
"""

from __future__ import annotations

import math

import torch


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, ...) so it broadcasts against ``like``."""
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def interpolate(x_0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x_0 + t eps."""
    tb = _bcast(t, x_0)
    return (1 - tb) * x_0 + tb * eps


def velocity_target(x_0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """u = eps - x_0, the conditional velocity of the straight path."""
    return eps - x_0


def flow_loss(v_pred: torch.Tensor, x_0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Mean squared error between predicted and target velocity (conditional flow matching loss)."""
    return torch.mean((v_pred.float() - velocity_target(x_0, eps).float()) ** 2)


def predict_x0(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x_0 implied by a velocity: x_0 = x_t - t v."""
    return x_t - _bcast(t, x_t) * v


def predict_eps(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """eps implied by a velocity: eps = x_t + (1 - t) v."""
    return x_t + (1 - _bcast(t, x_t)) * v


def sample_t_uniform(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.rand(n, generator=generator)


def sample_t_logit_normal(
    n: int, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """t = sigmoid(N(mean, std^2)): Esser et al. 2024, eq. 19 ("rf/lognorm(m, s)")."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution-dependent timestep shift, Esser et al. 2024, eq. 23:

        t' = shift * t / (1 + (shift - 1) * t)

    with shift = sqrt(m / n) for m pixels at the target resolution and n at the base resolution.
    shift > 1 spends more of the schedule at high noise, which larger images need.
    """
    if shift <= 0:
        raise ValueError(f"time shift must be positive, got {shift}")
    return shift * t / (shift * t + (1 - t))  # = eq. 23; this form is exact at t = 0 and t = 1


BASE_VALUES = 28 * 28  # values one example holds at the base resolution: shift 1 at 28 x 28 grayscale


def derived_time_shift(shape: tuple[int, ...] | list[int], base_values: int = BASE_VALUES) -> float:
    """The SD3 rule (Esser et al. 2024, sec. 5.3.2, eq. 23's alpha): shift = sqrt(m / n), with m the number
    of values the model denoises per example (C * H * W of the pixels, or of the latents in latent space)
    and n the same at the base resolution (``BASE_VALUES``: ddm's default 28 x 28 grayscale experts,
    whose shift is therefore exactly 1). E.g. 3 x 32 x 32 pixels: sqrt(3072 / 784) = 1.98; SD-VAE latents
    of a 256-pixel image, 4 x 32 x 32: sqrt(4096 / 784) = 2.29."""
    m = math.prod(int(d) for d in shape)
    if m < 1 or base_values < 1:
        raise ValueError(f"time shift: shape {tuple(shape)} and base {base_values} must be positive")
    return math.sqrt(m / base_values)


def resolve_time_shift(setting: float | None, shape: tuple[int, ...] | list[int]) -> float:
    """A hand-set ``time_shift`` wins; unset (None), the shift derived from ``shape`` (:func:`derived_time_shift`)."""
    return float(setting) if setting is not None else derived_time_shift(shape)


def resolution_shift(
    image_size: int, base_size: int = 32, channels: int = 1, base_channels: int = 1
) -> float:
    """shift = sqrt(m / n) for the number of values m at this resolution vs n at the base one."""
    return math.sqrt((image_size * image_size * channels) / (base_size * base_size * base_channels))


def time_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    """Decreasing times 1 = t_0 > t_1 > ... > t_steps = 0, uniform then shifted. Shape (steps + 1,)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).float()
