"""The expert server on 127.0.0.1: Predict is the local model's velocity, concurrent calls share forward
passes, bad input is INVALID_ARGUMENT naming the field, deadlines and back-pressure have their codes,
health/reflection/auth/TLS/metrics work. Real servers on ephemeral ports, tiny random checkpoints."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from grpc_fixtures import expert_checkpoint, self_signed
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from ddm.coordinator.stack import free_ports
from ddm.expert.load import load_denoiser
from ddm.expert.server import ExpertServer
from ddm.proto import rpc
from ddm.proto.ddm.v1 import ddm_pb2 as pb
from ddm.proto.tensors import to_proto
from ddm.router.client import ExpertClient
from ddm.router.remote import ExpertFailure, RemoteExpert


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    return expert_checkpoint(tmp_path_factory.mktemp("run"), 2)


@pytest.fixture(scope="module")
def local(ckpt: str):
    return load_denoiser(ckpt)


def _serve(ckpt: str, **kwargs) -> ExpertServer:
    return ExpertServer(ckpt, **kwargs).start(timeout=30)


@pytest.fixture
def server(ckpt: str) -> Iterator[ExpertServer]:
    s = _serve(ckpt)
    yield s
    s.stop(0)


def _inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 1, 8, 8, generator=g),
        torch.rand(n, generator=g),
        torch.randint(0, 4, (n,), generator=g),
    )


def test_predict_equals_the_local_velocity(server: ExpertServer, local) -> None:
    x, t, y = _inputs(6)
    y[0] = 3  # the null label (num_classes) is a valid label
    with ExpertClient(server.target) as client:
        v = client.predict(x, t, y)
        info = client.info()
    want = local.velocity(x, t, y)
    assert v.shape == x.shape and v.abs().mean() > 0.1  # random weights: a real function of the inputs
    torch.testing.assert_close(v, want, atol=1e-6, rtol=1e-6)
    assert (info.name, info.expert_index, info.num_classes, list(info.image_shape)) == (
        "expert-2",
        2,
        3,
        [1, 8, 8],
    )
    assert (
        info.step == 7
        and info.arch == "DiT-tiny"
        and info.max_batch == 64
        and info.checkpoint.endswith(".safetensors")
    )


def test_concurrent_requests_share_batches_and_get_their_own_rows(ckpt: str, local) -> None:
    s = _serve(ckpt, max_delay=0.05, max_batch=64)
    try:
        requests = [_inputs(1 + i % 3, seed=i) for i in range(16)]
        with ExpertClient(s.target) as client, ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda r: client.predict(*r, timeout=10), requests))
        for (x, t, y), v in zip(requests, replies):
            torch.testing.assert_close(v, local.velocity(x, t, y), atol=1e-5, rtol=1e-5)
        stats = s.batcher.stats
        assert stats.requests == 16 and stats.rows == sum(r[0].shape[0] for r in requests)
        assert stats.batches < 16 and stats.largest_batch > 3  # some forward served several requests
    finally:
        s.stop(0)


def _raw_predict(target: str, request: pb.PredictRequest) -> grpc.RpcError | pb.PredictResponse:
    with ExpertClient(target) as client:
        try:
            return client.stub.Predict(request, timeout=5)
        except grpc.RpcError as e:
            return e


def _request(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> pb.PredictRequest:
    return pb.PredictRequest(x_t=to_proto(x), t=to_proto(t), y=to_proto(y))


X, T, Y = _inputs(2)


@pytest.mark.parametrize(
    "request_, field",
    [
        (_request(torch.randn(2, 1, 4, 4), T, Y), "x_t: shape (2, 1, 4, 4) does not match"),
        (_request(torch.randn(2, 8, 8), T, Y), "x_t: shape"),
        (
            pb.PredictRequest(
                x_t=pb.Tensor(dtype="FP64", shape=[2, 1, 8, 8], data=X.double().numpy().tobytes()),
                t=to_proto(T),
                y=to_proto(Y),
            ),
            "x_t: unsupported dtype 'FP64'",
        ),
        (_request(X.long(), T, Y), "x_t: dtype INT64 not accepted"),
        (_request(X.clone().index_fill_(0, torch.tensor([1]), float("nan")), T, Y), "x_t: 64 non-finite"),
        (
            _request(torch.randn(65, 1, 8, 8), torch.rand(65), torch.zeros(65, dtype=torch.long)),
            "x_t: 65 rows",
        ),
        (_request(X, torch.tensor([0.5, 1.5]), Y), "t: times must lie in [0, 1]"),
        (_request(X, torch.rand(3), Y), "t: shape (3,) does not match the expected (2,)"),
        (_request(X, T, torch.tensor([0, 4])), "y: labels must lie in [0, 3]"),
        (_request(X, T, torch.tensor([-1, 0])), "y: labels must lie"),
        (_request(X, T, Y.float()), "y: dtype FP32 not accepted"),
        (pb.PredictRequest(x_t=to_proto(X), t=to_proto(T)), "y: missing"),
        (
            pb.PredictRequest(
                x_t=pb.Tensor(dtype="FP32", shape=[2, 1, 8, 8], data=b"\0" * 12), t=to_proto(T), y=to_proto(Y)
            ),
            "x_t: 12 data bytes",
        ),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(
    server: ExpertServer, request_: pb.PredictRequest, field: str
) -> None:
    err = _raw_predict(server.target, request_)
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(field), err.details()
    ok = _raw_predict(server.target, _request(X, T, Y))  # and the server keeps serving
    assert isinstance(ok, pb.PredictResponse) and server.batcher.stats.batches == 1


def test_a_request_past_its_deadline_is_dropped_before_compute(ckpt: str) -> None:
    s = _serve(ckpt, max_delay=0.6)  # the worker gathers for 0.6 s: longer than the 0.15 s deadline
    try:
        with ExpertClient(s.target) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.predict(X, T, Y, timeout=0.15)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            deadline = time.monotonic() + 5
            while s.batcher.stats.expired == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert s.batcher.stats.expired == 1 and s.batcher.stats.batches == 0  # never computed
            assert client.predict(X, T, Y, timeout=5).shape == X.shape
    finally:
        s.stop(0)


def test_too_many_pending_requests_are_resource_exhausted(ckpt: str) -> None:
    s = _serve(ckpt, max_delay=1.0, max_queue=2)  # two requests wait in the gathering batch
    try:
        with ExpertClient(s.target) as client, ThreadPoolExecutor(5) as pool:

            def call(_: int) -> str:
                try:
                    client.predict(X, T, Y, timeout=10)
                    return "OK"
                except grpc.RpcError as e:
                    assert "overloaded" in e.details()
                    return e.code().name

            codes = sorted(pool.map(call, range(5)))
        assert codes == ["OK", "OK", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"]
        assert s.batcher.stats.rejected == 3
    finally:
        s.stop(0)


class _SlowLoading(ExpertServer):
    release = threading.Event()

    def _load_model(self):
        self.release.wait(10)
        return super()._load_model()


def test_unavailable_and_not_serving_while_loading_then_serving(ckpt: str) -> None:
    s = _SlowLoading(ckpt).start(wait=False)
    try:
        channel = rpc.make_channel(s.target)
        assert rpc.check_health(channel) == (False, "NOT_SERVING")
        err = _raw_predict(s.target, _request(X, T, Y))
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "still loading" in err.details()
        s.release.set()
        s.wait_ready(10)
        assert rpc.check_health(channel) == (True, "")
        assert rpc.check_health(channel, "ddm.v1.Expert") == (True, "")
        channel.close()
    finally:
        s.stop(0)


def test_a_bad_checkpoint_fails_start_with_its_name(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        ExpertServer(str(tmp_path)).start(timeout=10).stop(0)


def test_reflection_lists_the_services(server: ExpertServer) -> None:
    channel = rpc.make_channel(server.target)
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"ddm.v1.Expert", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    channel.close()


def test_token_auth(ckpt: str, local) -> None:
    s = _serve(ckpt, token="s3cret-token")
    try:
        for token in (None, "wrong"):
            with ExpertClient(s.target, token=token) as client:
                with pytest.raises(grpc.RpcError) as info:
                    client.predict(X, T, Y)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "s3cret" not in info.value.details()
                assert client.health() == (True, "")  # probes need no token
        with ExpertClient(s.target, token="s3cret-token") as client:
            torch.testing.assert_close(client.predict(X, T, Y), local.velocity(X, T, Y), atol=1e-6, rtol=1e-6)
    finally:
        s.stop(0)


def test_tls_and_mutual_tls(ckpt: str, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "server")
    client_cert, client_key = self_signed(tmp_path, "client")
    s = _serve(ckpt, tls=rpc.ServerTLS(cert, key))
    try:
        with ExpertClient(s.target, tls=rpc.ClientTLS(ca=cert)) as client:
            assert client.predict(X, T, Y).shape == X.shape
        with ExpertClient(s.target, timeout=2) as plain, pytest.raises(grpc.RpcError) as info:
            plain.predict(X, T, Y)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        s.stop(0)
    s = _serve(ckpt, tls=rpc.ServerTLS(cert, key, client_ca=client_cert))
    try:
        mutual = rpc.ClientTLS(ca=cert, cert=client_cert, key=client_key)
        with ExpertClient(s.target, tls=mutual) as client:
            assert client.predict(X, T, Y).shape == X.shape
        with ExpertClient(s.target, tls=rpc.ClientTLS(ca=cert), timeout=2) as anonymous:
            with pytest.raises(grpc.RpcError) as info:
                anonymous.predict(X, T, Y)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        s.stop(0)


def test_prometheus_metrics(ckpt: str) -> None:
    port = free_ports(1)[0]
    s = _serve(ckpt, metrics_port=port)
    try:
        with ExpertClient(s.target) as client:
            client.predict(*_inputs(3))
            client.predict(*_inputs(2))
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'ddm_expert_rows_total{expert="expert-2"} 5.0' in text
        assert 'ddm_expert_requests_total{code="OK",expert="expert-2"} 2.0' in text
        assert 'ddm_expert_batch_rows_count{expert="expert-2"} 2.0' in text
    finally:
        s.stop(0)


def test_remote_expert_splits_requests_larger_than_max_batch(ckpt: str, local) -> None:
    s = _serve(ckpt, max_batch=4)
    try:
        remote = RemoteExpert(s.target)
        x, t, y = _inputs(10)
        torch.testing.assert_close(remote.velocity(x, t, y), local.velocity(x, t, y), atol=1e-5, rtol=1e-5)
        assert remote.num_classes == 3 and remote.image_shape == (1, 8, 8) and remote.name == "expert-2"
        assert s.batcher.stats.rows == 10 and s.batcher.stats.largest_batch <= 4
        remote.close()
    finally:
        s.stop(0)
    with pytest.raises(
        ExpertFailure, match=f"expert {s.target} at {s.target}: (UNAVAILABLE|DEADLINE_EXCEEDED)"
    ):
        RemoteExpert(s.target, connect_timeout=0.5)
