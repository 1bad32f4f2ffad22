"""A device setting resolved once for a process: where its networks run, and the setting that chose it.

``core.device`` holds the policy (``resolve``, ``configure``, ``announce``); a :class:`Placement` is
its result carried to whatever builds a network, so every network of a process lands on the same
device and is announced with the setting that put it there::

    placement = Placement.resolve(args.device, field="--device")  # DeviceError names --device
    model = load_denoiser(url, device=placement.device)
    placement.announce(f"expert {url}")  # ddm: expert ... on cpu (2 threads) (device = 'auto'; no CUDA device)

Inference runs in fp32 on every device (TF32 matmuls on CUDA, from ``configure``): bf16 autocast is a
training setting (``TrainConfig.precision``), not applied to sampling, evaluation or serving.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ddm.core import device as policy

if TYPE_CHECKING:  # torch stays unimported until a command actually runs a network
    import torch


@dataclass(frozen=True)
class Placement:
    """``device``: the resolved torch device; ``spec``: the setting it came from (``auto``, ``cpu``, ...)."""

    device: torch.device
    spec: str

    @classmethod
    def resolve(cls, spec: str = "auto", *, field: str = "device") -> Placement:
        """The device ``spec`` means on this machine, configured (TF32 on CUDA); DeviceError naming
        ``field`` when it cannot be honoured (CUDA asked for, none here)."""
        device = policy.resolve(spec, field=field)
        policy.configure(device)
        return cls(device, spec)

    @classmethod
    def cpu(cls) -> Placement:
        import torch

        return cls(torch.device("cpu"), "cpu")

    @classmethod
    def of(cls, value: str | Placement, *, field: str = "device") -> Placement:
        """``value`` itself if already resolved, else :meth:`resolve` of the setting (for library APIs
        that take either)."""
        return value if isinstance(value, Placement) else cls.resolve(value, field=field)

    def announce(self, what: str) -> str:
        """Log (stderr, once per network) that ``what`` runs here and why; returns the line."""
        return policy.announce(what, self.device, self.spec)

    def to(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on this device (pinned, non-blocking from host memory to a GPU)."""
        return policy.to_device(x, self.device)


def add_override_argument(parser: argparse.ArgumentParser, *, config_field: str = "device") -> None:
    """``--device`` for a command whose config already has a device setting: unset (None) keeps the
    config's value. Same choices and check as ``core.device.add_argument``."""
    policy.add_argument(
        parser, default=None,
        help=f"{policy.DEVICE_HELP} for the networks this process runs (default: the config's `{config_field}`)",
    )  # fmt: skip
