"""Tensors on the wire: torch <-> ``ddm.v1.Tensor`` (raw little-endian bytes + dtype + shape, as KServe v2).

Nothing is pickled: a tensor is its dtype name, its shape and ``prod(shape) * itemsize`` bytes in C
order. Decoding validates everything a remote caller controls (dtype whitelist, shape, byte count,
finite values) and raises :class:`TensorError` naming the message field, which servers turn into
INVALID_ARGUMENT, so a bad request never reaches a model.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch

from ddm.proto.ddm.v1 import ddm_pb2 as pb

# KServe v2 datatype names -> torch dtypes. Only what ddm sends; anything else is refused.
DTYPES: dict[str, torch.dtype] = {
    "FP32": torch.float32,
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
    "INT64": torch.int64,
    "INT32": torch.int32,
    "UINT8": torch.uint8,
}
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOATS: tuple[str, ...] = ("FP32", "FP16", "BF16")
INTEGERS: tuple[str, ...] = ("INT64", "INT32")
MAX_DIMS = 8


class TensorError(ValueError):
    """A tensor field that cannot be accepted; ``field`` names it (e.g. ``"x_t"``)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


def _le_bytes(flat: torch.Tensor) -> bytes:
    """The bytes of a 1-D contiguous tensor in little-endian order."""
    raw = flat.view(torch.uint8)  # (numel * itemsize,)
    if sys.byteorder == "big" and flat.element_size() > 1:
        raw = raw.reshape(-1, flat.element_size()).flip(1).reshape(-1)
    return raw.numpy().tobytes()


def to_proto(tensor: torch.Tensor, out: pb.Tensor | None = None) -> pb.Tensor:
    """Encode a tensor of a supported dtype from any device (into ``out`` if given, e.g. a message
    field). This is where tensors leave a GPU: the bytes are copied to the host here and nowhere else."""
    if tensor.dtype not in NAMES:
        raise ValueError(f"cannot send dtype {tensor.dtype}; supported: {', '.join(str(d) for d in NAMES)}")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)  # (numel,)
    msg = pb.Tensor() if out is None else out
    msg.dtype = NAMES[tensor.dtype]
    msg.shape[:] = list(tensor.shape)
    msg.data = _le_bytes(flat)
    return msg


def from_proto(
    msg: pb.Tensor,
    field: str,
    *,
    dtypes: Sequence[str],
    shape: Sequence[int | None] | None = None,
    finite: bool = True,
) -> torch.Tensor:
    """Decode and validate a tensor field; raise :class:`TensorError` naming ``field`` if it is unfit.

    ``dtypes``: accepted KServe names. ``shape``: expected shape with ``None`` for free dimensions (the
    rank must match). ``finite``: refuse NaN and infinities in float tensors. The result owns its memory.
    """
    if not msg.dtype and not msg.shape and not msg.data:
        raise TensorError(field, "missing (an empty Tensor message)")
    if msg.dtype not in DTYPES:
        raise TensorError(field, f"unsupported dtype {msg.dtype!r}; supported: {', '.join(DTYPES)}")
    if msg.dtype not in dtypes:
        raise TensorError(field, f"dtype {msg.dtype} not accepted here; send one of {', '.join(dtypes)}")
    dims = list(msg.shape)
    if len(dims) > MAX_DIMS or any(d < 0 for d in dims):
        raise TensorError(field, f"invalid shape {dims}")
    if shape is not None:
        want = list(shape)
        if len(dims) != len(want) or any(w is not None and d != w for d, w in zip(dims, want)):
            pretty = (
                "("
                + ", ".join("N" if w is None else str(w) for w in want)
                + ("," if len(want) == 1 else "")
                + ")"
            )
            raise TensorError(field, f"shape {tuple(dims)} does not match the expected {pretty}")
    dtype = DTYPES[msg.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = math.prod(dims)
    if len(msg.data) != numel * itemsize:
        raise TensorError(
            field,
            f"{len(msg.data)} data bytes for shape {tuple(dims)} of {msg.dtype} "
            f"(expected {numel} x {itemsize} = {numel * itemsize})",
        )
    raw = (
        torch.frombuffer(bytearray(msg.data), dtype=torch.uint8)
        if numel
        else torch.empty(0, dtype=torch.uint8)
    )
    if sys.byteorder == "big" and itemsize > 1:
        raw = raw.reshape(-1, itemsize).flip(1).reshape(-1).contiguous()
    tensor = raw.view(dtype).reshape(dims)
    if finite and tensor.is_floating_point() and numel and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise TensorError(field, f"{bad} non-finite value(s) (NaN or inf)")
    return tensor
