"""The wire format: committed stubs match the .proto, tensors round-trip bit-exactly, and every bad
tensor is refused with an error naming its field (what servers send back as INVALID_ARGUMENT)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from ddm.proto import rpc
from ddm.proto.ddm.v1 import ddm_pb2 as pb
from ddm.proto.tensors import DTYPES, FLOATS, TensorError, from_proto, to_proto

PROTO = Path(__file__).resolve().parents[1] / "proto"


def _generator():
    spec = importlib.util.spec_from_file_location("proto_generate", PROTO / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_what_the_generator_makes(tmp_path: Path) -> None:
    for path in _generator().generate(tmp_path):
        committed = PROTO / "ddm" / "v1" / path.name
        assert committed.read_text() == path.read_text(), (
            f"{committed} drifted: run `python proto/generate.py`"
        )


def test_stubs_import_inside_the_ddm_namespace() -> None:
    text = (PROTO / "ddm" / "v1" / "ddm_pb2_grpc.py").read_text()
    assert "from ddm.proto.ddm.v1 import ddm_pb2" in text and "\nfrom ddm.v1 import" not in text
    assert pb.DESCRIPTOR.package == "ddm.v1" and pb.DESCRIPTOR.name == "ddm/v1/ddm.proto"
    assert set(pb.DESCRIPTOR.services_by_name) == {"Expert", "Router"}


@pytest.mark.parametrize("name", list(DTYPES))
def test_every_dtype_round_trips_bit_exactly(name: str) -> None:
    dtype = DTYPES[name]
    g = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        x = (torch.randn(2, 3, 5, generator=g) * 100).to(dtype)
    else:
        x = torch.randint(0, 250, (2, 3, 5), generator=g).to(dtype)
    x = x.transpose(1, 2)  # non-contiguous input must still be sent in C order
    msg = pb.Tensor.FromString(to_proto(x).SerializeToString())
    assert msg.dtype == name and list(msg.shape) == [2, 5, 3]
    assert len(msg.data) == x.numel() * x.element_size()
    back = from_proto(msg, "x", dtypes=[name])
    assert back.dtype == dtype and torch.equal(back, x)


def test_bytes_are_little_endian() -> None:
    msg = to_proto(torch.tensor([1], dtype=torch.int32))
    assert msg.data == b"\x01\x00\x00\x00"
    assert (
        from_proto(pb.Tensor(dtype="FP32", shape=[1], data=b"\x00\x00\x80\x3f"), "t", dtypes=FLOATS).item()
        == 1.0
    )


def test_empty_and_zero_row_tensors() -> None:
    x = torch.empty(0, 1, 4, 4)
    assert from_proto(to_proto(x), "x_t", dtypes=FLOATS, shape=(None, 1, 4, 4)).shape == (0, 1, 4, 4)
    with pytest.raises(TensorError, match="^x_t: missing"):
        from_proto(pb.Tensor(), "x_t", dtypes=FLOATS)


@pytest.mark.parametrize(
    "msg, kwargs, pattern",
    [
        (pb.Tensor(dtype="FP64", shape=[1], data=bytes(8)), {}, r"^x_t: unsupported dtype 'FP64'"),
        (pb.Tensor(dtype="INT64", shape=[1], data=bytes(8)), {}, r"^x_t: dtype INT64 not accepted here"),
        (
            pb.Tensor(dtype="FP32", shape=[2, 2], data=bytes(12)),
            {},
            r"^x_t: 12 data bytes for shape \(2, 2\)",
        ),
        (pb.Tensor(dtype="FP32", shape=[2, -1], data=b""), {}, r"^x_t: invalid shape"),
        (
            pb.Tensor(dtype="FP32", shape=[1, 1, 3, 3], data=bytes(36)),
            {"shape": (None, 1, 4, 4)},
            r"^x_t: shape \(1, 1, 3, 3\) does not match the expected \(N, 1, 4, 4\)",
        ),
        (
            pb.Tensor(dtype="FP32", shape=[1, 4, 4], data=bytes(64)),
            {"shape": (None, 1, 4, 4)},
            r"^x_t: shape",
        ),
    ],
)
def test_bad_tensors_name_the_field(msg: pb.Tensor, kwargs: dict, pattern: str) -> None:
    with pytest.raises(TensorError, match=pattern) as info:
        from_proto(msg, "x_t", dtypes=FLOATS, **kwargs)
    assert info.value.field == "x_t"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_refused(bad: float) -> None:
    x = torch.zeros(3)
    x[1] = bad
    with pytest.raises(TensorError, match=r"^t: 1 non-finite value"):
        from_proto(to_proto(x), "t", dtypes=FLOATS)
    assert torch.isnan(from_proto(to_proto(x), "t", dtypes=FLOATS, finite=False)).sum() == int(
        math.isnan(bad)
    )


def test_message_limit_is_rows_times_row_bytes_with_headroom() -> None:
    assert rpc.message_limit(1, 100) == 4 * rpc.MiB  # small models keep gRPC's usual floor
    big = rpc.message_limit(256, 3 * 256 * 256 * 4)
    assert 256 * 3 * 256 * 256 * 4 * 1.2 < big < 256 * 3 * 256 * 256 * 4 * 1.3
    assert rpc.message_limit(10**6, 10**6) == 2**31 - 1  # gRPC options are int32
    with pytest.raises(ValueError, match="max_rows"):
        rpc.message_limit(0, 10)


def test_token_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(rpc.TOKEN_ENV, raising=False)
    assert rpc.read_token(None) is None
    monkeypatch.setenv(rpc.TOKEN_ENV, "from-env")
    assert rpc.read_token(None) == "from-env"
    f = tmp_path / "token"
    f.write_text("s3cret\n")
    assert rpc.read_token(f) == "s3cret"
    f.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        rpc.read_token(f)
    assert "s3cret" not in repr(rpc.TokenAuthInterceptor("s3cret"))
