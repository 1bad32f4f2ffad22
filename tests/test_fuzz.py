"""Every RPC field fuzzed (hypothesis) against real servers on 127.0.0.1, started once for the module.

Expert Predict: wrong dtypes, shapes (negative, huge, wrong rank, zero rows), byte counts, NaN/inf,
times outside [0, 1], labels outside [0, num_classes]. Router Sample: every field of SampleRequest
over its whole wire range (int32/uint64 extremes, NaN/inf, unknown names, label lists of any length).
Each call must end OK (the request was valid) or INVALID_ARGUMENT with a message that starts with the
offending field's name, and the server must keep serving: a valid call afterwards works. Oversized
messages get RESOURCE_EXHAUSTED from gRPC before any decoding."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_fixtures import expert_checkpoint, router_checkpoint
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ddm.expert.server import ExpertServer
from ddm.proto import rpc
from ddm.proto.ddm.v1 import ddm_pb2 as pb
from ddm.proto.ddm.v1 import ddm_pb2_grpc as pb_grpc
from ddm.router.sample_request import SampleDefaults
from ddm.router.server import RouterServer

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,
)
ITEMSIZE = {"FP32": 4, "FP16": 2, "BF16": 2, "INT64": 8, "INT32": 4, "UINT8": 1}
INT32 = st.integers(-(2**31), 2**31 - 1)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RouterServer, list[ExpertServer]]]:
    root: Path = tmp_path_factory.mktemp("run")
    experts = [ExpertServer(expert_checkpoint(root, k), max_batch=16).start(timeout=30) for k in range(2)]
    router_checkpoint(root, 2)
    defaults = SampleDefaults(steps=2, max_n=8, max_steps=4, max_seconds=30)  # valid requests stay cheap
    router = RouterServer(
        str(root / "router/checkpoints"), [e.target for e in experts], defaults=defaults, cohort_delay=0
    ).start(timeout=30)
    yield router, experts
    router.stop(0)
    for e in experts:
        e.stop(0)


@pytest.fixture(scope="module")
def channels(stack) -> Iterator[tuple[grpc.Channel, grpc.Channel]]:
    router, experts = stack
    opts = rpc.channel_options(64 * rpc.MiB)
    with (
        grpc.insecure_channel(experts[0].target, options=opts) as e,
        grpc.insecure_channel(router.target, options=opts) as r,
    ):
        yield e, r


# --------------------------------------------------------------------------------------------- tensors


@st.composite
def tensors(draw: st.DrawFn, good_shape: tuple[int, ...], good_dtype: str) -> pb.Tensor:
    """A Tensor message near a valid one (so the checks after the first are reached too)."""
    dtype = draw(
        st.sampled_from(
            [good_dtype] * 4 + ["FP32", "FP16", "BF16", "INT64", "INT32", "UINT8", "", "FP64", "fp32", "\x00"]
        )
    )
    shape = list(good_shape)
    kind = draw(st.sampled_from(["same", "same", "dim", "rank", "wild"]))
    if kind == "dim" and shape:
        shape[draw(st.integers(0, len(shape) - 1))] = draw(st.integers(-2, 70))
    elif kind == "rank":
        shape = shape[: draw(st.integers(0, len(shape)))] + draw(st.lists(st.integers(0, 3), max_size=10))
    elif kind == "wild":
        shape = draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=10))
    numel = math.prod(shape) if all(0 <= d < 1024 for d in shape) else 0
    size = numel * ITEMSIZE.get(dtype, 4)
    size = max(0, size + draw(st.sampled_from([0, 0, 0, -1, 1, -size, 7])))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if dtype in ("FP32", "FP16", "BF16") and draw(st.booleans()):
        # well-behaved numbers (maybe with a NaN or inf planted) rather than random bit patterns
        values = rng.uniform(0, 1, size // ITEMSIZE[dtype] + 1).astype(np.float32)
        if values.size and draw(st.booleans()):
            values[rng.integers(values.size)] = draw(
                st.sampled_from([math.nan, math.inf, -math.inf, 2.0, -1.0])
            )
        data = torch.from_numpy(values).to(
            {"FP32": torch.float32, "FP16": torch.float16, "BF16": torch.bfloat16}[dtype]
        )
        raw = data.view(torch.uint8).numpy().tobytes()[:size]
    elif dtype in ("INT64", "INT32") and draw(st.booleans()):
        values = rng.integers(-2, 6, size // ITEMSIZE[dtype] + 1).astype(
            np.int64 if dtype == "INT64" else np.int32
        )
        raw = values.tobytes()[:size]
    else:
        raw = rng.bytes(size)
    return pb.Tensor(dtype=dtype, shape=shape, data=raw)


def _valid(n: int) -> pb.PredictRequest:
    g = torch.Generator().manual_seed(n)
    from ddm.proto.tensors import to_proto

    return pb.PredictRequest(
        x_t=to_proto(torch.randn(n, 1, 8, 8, generator=g)),
        t=to_proto(torch.rand(n, generator=g)),
        y=to_proto(torch.randint(0, 4, (n,), generator=g)),
    )


@FUZZ
@given(
    n=st.integers(1, 16),
    fields=st.data(),
    missing=st.sampled_from([set()] * 8 + [{"x_t"}, {"t"}, {"y"}]),
)
def test_fuzzed_predict_is_ok_or_invalid_argument_naming_the_field(channels, n, fields, missing) -> None:
    stub = pb_grpc.ExpertStub(channels[0])
    req = _valid(n)
    which = fields.draw(st.sets(st.sampled_from(["x_t", "t", "y"]), max_size=2))  # empty: a valid request
    shapes = {"x_t": ((n, 1, 8, 8), "FP32"), "t": ((n,), "FP32"), "y": ((n,), "INT64")}
    for name in which:
        getattr(req, name).CopyFrom(fields.draw(tensors(*shapes[name])))
    for name in missing:
        req.ClearField(name)
    try:
        reply = stub.Predict(req, timeout=10)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
        assert e.details().split(":", 1)[0] in ("x_t", "t", "y"), e.details()
        event(f"INVALID_ARGUMENT {e.details().split(':', 1)[0]}: {e.details().split(':', 2)[1].strip()[:30]}")
        return
    event("OK")
    assert not missing and tuple(reply.v.shape) == tuple(req.x_t.shape)  # only a valid request gets OK


# --------------------------------------------------------------------------------------------- Sample

FLOATS = st.floats(allow_nan=True, allow_infinity=True)
# field -> (values a valid request may carry, values anywhere on the wire)
FIELDS = {
    "n": (st.integers(1, 8), st.one_of(st.integers(-2, 10), INT32)),
    "labels": (st.just([]), st.lists(st.one_of(st.integers(-1, 4), INT32), max_size=12)),
    "guidance": (st.floats(0, 10), st.one_of(st.floats(-2, 200), FLOATS)),
    "steps": (st.integers(1, 4), st.one_of(st.integers(-1, 6), INT32)),
    "sampler": (
        st.sampled_from(["euler", "heun", "stochastic"]),
        st.one_of(st.sampled_from(["ddim", "", "EULER"]), st.text(max_size=8)),
    ),
    "strategy": (
        st.sampled_from(["top-k", "full", "threshold"]),
        st.one_of(st.sampled_from(["oracle", "random", "expert-7"]), st.text(max_size=8)),
    ),
    "top_k": (st.integers(1, 2), st.one_of(st.integers(-1, 4), INT32)),
    "threshold": (st.floats(0.01, 1), st.one_of(st.floats(-0.5, 1.5), FLOATS)),
    "seed": (st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
    "time_shift": (st.floats(0.1, 10), st.one_of(st.floats(-1, 200), FLOATS)),
    "churn": (st.floats(0, 1), st.one_of(st.floats(-0.5, 1.5), FLOATS)),
    "time_grid": (
        st.sampled_from(["uniform", ""]),
        st.one_of(st.sampled_from(["karras", "UNIFORM"]), st.text(max_size=8)),
    ),
    "guidance_mode": (
        st.sampled_from(["ensemble", "expert", ""]),
        st.one_of(st.sampled_from(["both", "ENSEMBLE"]), st.text(max_size=8)),
    ),
    "route_every": (st.integers(0, 5), st.one_of(st.integers(-2, 1002), INT32)),
    "allow_degraded": (st.booleans(), st.booleans()),
    "include_float": (st.booleans(), st.booleans()),
}


@st.composite
def sample_requests(draw: st.DrawFn) -> dict:
    """A valid request (n always, other fields sometimes), then up to two fields anywhere on the wire."""
    fields = {"n": draw(FIELDS["n"][0])}
    for name in draw(st.sets(st.sampled_from(sorted(FIELDS)), max_size=6)):
        fields[name] = draw(FIELDS[name][0])
    for name in draw(st.sets(st.sampled_from(sorted(FIELDS)), max_size=2)):
        fields[name] = draw(FIELDS[name][1])
    return fields


@FUZZ
@given(fields=sample_requests())
def test_fuzzed_sample_is_ok_or_invalid_argument_naming_the_field(channels, fields: dict) -> None:
    stub = pb_grpc.RouterStub(channels[1])
    try:
        events = list(stub.Sample(pb.SampleRequest(**fields), timeout=30))
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
        assert e.details().split(":", 1)[0] in FIELDS, e.details()
        event(f"INVALID_ARGUMENT {e.details().split(':', 1)[0]}")
        return
    event("OK")
    result = events[-1].result
    n = fields.get("n", 0)
    assert 1 <= n <= 8 and tuple(result.images.shape) == (n, 1, 8, 8)
    assert result.HasField("samples") == fields.get("include_float", False)


# --------------------------------------------------------------------------------------------- size


def test_oversized_messages_are_resource_exhausted_and_the_servers_keep_serving(stack, channels) -> None:
    _, experts = stack
    expert_stub, router_stub = pb_grpc.ExpertStub(channels[0]), pb_grpc.RouterStub(channels[1])
    huge = experts[0].max_message + 1024  # rows x row bytes with headroom; this is more
    with pytest.raises(grpc.RpcError) as err:
        expert_stub.Predict(
            pb.PredictRequest(x_t=pb.Tensor(dtype="FP32", shape=[huge // 256, 1, 8, 8], data=b"\0" * huge)),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as err:  # 15 MB of labels (5-byte varints)
        list(router_stub.Sample(pb.SampleRequest(n=1, labels=[1_000_000_000] * 3_000_000), timeout=10))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert tuple(expert_stub.Predict(_valid(2), timeout=10).v.shape) == (2, 1, 8, 8)
    events = list(router_stub.Sample(pb.SampleRequest(n=2, steps=2), timeout=30))
    assert tuple(events[-1].result.images.shape) == (2, 1, 8, 8)


def test_router_defaults_outside_their_own_limits_are_refused() -> None:
    # found by the fuzzer's first fixture: max_steps=4 with the default 32 steps refused every request
    with pytest.raises(ValueError, match=r"steps: default 32 must lie in 1\.\.max_steps \(4\)"):
        SampleDefaults(max_steps=4)
    with pytest.raises(ValueError, match="guidance: default 3.0"):
        SampleDefaults(max_guidance=2)
    with pytest.raises(ValueError, match=r"route_every: default 8 must lie in 1\.\.max_steps \(4\)"):
        SampleDefaults(steps=4, max_steps=4, route_every=8)
