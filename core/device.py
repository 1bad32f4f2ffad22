"""The one device policy: where every network of every process runs, and how it is announced.

A device setting is ``"auto" | "cpu" | "cuda" | "cuda:N"`` (a config's ``device`` field, or ``--device``
on every command that runs a network). ``auto`` means CUDA when torch sees a GPU, else the CPU; under
torchrun ``auto`` and ``cuda`` mean the process's own GPU, ``cuda:{LOCAL_RANK}``. Asking for CUDA on a
machine without it is an error, never a silent fall-back: a job meant for a GPU that lands on a CPU
node must say so rather than run 50x slower.

Every process logs, once per network, the device it chose and why (``announce``), so a GPU is never
silently ignored. On CUDA the policy also turns on TF32 matmuls (``configure``); ``precision = "auto"``
is bf16 autocast there and fp32 on the CPU. Host tensors go to the device pinned with non-blocking
copies (``to_device``); tensors come back to the CPU only at the gRPC wire.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from contextlib import AbstractContextManager, ExitStack, nullcontext
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:  # torch stays unimported until a command actually runs a network
    import torch

DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"
DEVICE_HELP = "where networks run: 'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'"
PRECISIONS = ("auto", "fp32", "bf16")
PRECISION_HELP = "'auto' (bf16 autocast on CUDA, fp32 on CPU), 'fp32', or 'bf16' (autocast on either)"


class DeviceError(ValueError):
    """A device setting that cannot be honoured on this machine; the message says what to set."""


def check_spec(spec: str, field: str = "device") -> str:
    """``spec`` if it is a valid device setting, else a ValueError naming ``field`` and the choices."""
    if not isinstance(spec, str) or not re.match(DEVICE_PATTERN, spec):
        raise DeviceError(f"{field} = {spec!r} is not a device; use {DEVICE_HELP}")
    return spec


def resolve(spec: str = "auto", *, field: str = "device") -> torch.device:
    """The torch device for a setting on this machine (see the module docstring)."""
    import torch

    check_spec(spec, field)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if spec == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if spec == "auto":
        return (
            torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
            if available
            else torch.device("cpu")
        )
    if not available:
        raise DeviceError(
            f"{field} = {spec!r} but torch sees no CUDA device here (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda or 'no'}); set {field} = 'cpu' or 'auto', or run on a GPU node"
        )
    index = local_rank if spec == "cuda" else int(spec.split(":")[1])
    if index >= torch.cuda.device_count():
        raise DeviceError(
            f"{field} = {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
            f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); choose one of them"
        )
    return torch.device(f"cuda:{index}")


def configure(device: torch.device) -> None:
    """Per-process settings for ``device``: TF32 matmuls and convolutions on CUDA (no-op on the CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def precision_for(precision: str, device: torch.device) -> str:
    """``"fp32"`` or ``"bf16"``: ``auto`` is bf16 on CUDA and fp32 on the CPU."""
    if precision not in PRECISIONS:
        raise DeviceError(f"precision = {precision!r}; use {PRECISION_HELP}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def describe(device: torch.device) -> str:
    """``cpu (2 threads)`` or ``cuda:0 (NVIDIA H200, 139.8 GiB)``."""
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    return f"{device} ({torch.get_num_threads()} threads)"


def announce(what: str, device: torch.device, spec: str, *, stream: TextIO | None = None) -> str:
    """Log which device runs ``what`` and why, once per network per process; returns the line.

    Under torchrun only local rank 0 prints (every rank chooses by the same rule)."""
    why = ""
    if spec == "auto":
        why = "; CUDA present" if device.type == "cuda" else "; no CUDA device"
    line = f"ddm: {what} on {describe(device)} (device = {spec!r}{why})"
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(line, file=stream or sys.stderr, flush=True)
    return line


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``; from host memory to a GPU through pinned memory with a non-blocking copy."""
    if x.device == device:
        return x
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def add_argument(
    parser: argparse.ArgumentParser, *, default: str | None = "auto", help: str | None = None
) -> None:
    """``--device`` with the policy's help and choices check (every command that runs a network).
    ``default=None``: unset keeps what the command's config says (``help`` then names that setting)."""

    def device_type(value: str) -> str:
        try:
            return check_spec(value, "--device")
        except DeviceError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parser.add_argument(
        "--device", type=device_type, default=default, help=help or f"{DEVICE_HELP} (default: {default})"
    )


def autocast(precision: str, device: torch.device) -> AbstractContextManager[object]:
    """The forward pass's numeric context for a resolved precision: nothing for fp32; bf16 autocast.

    On CPU, bf16 also selects the math attention kernel: with torch 2.13 on a 2-core x86 machine the
    CPU flash-attention *backward* in bf16 took ~10x longer than in fp32 (660 vs 66 ms per DiT-T/4 step
    at batch 128) and erased the matmul gain; with the math kernel a bf16 step is ~30% faster than fp32.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if precision != "bf16":
        return nullcontext()
    stack = ExitStack()
    stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
    if device.type == "cpu":
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    return stack
