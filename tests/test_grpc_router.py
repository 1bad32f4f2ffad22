"""The router server end to end on 127.0.0.1: two expert servers + a router; Sample streams progress
then images identical to the in-process Ensemble with the same seed; bad requests are INVALID_ARGUMENT
naming the field; expert health, a lost expert, client cancellation and deadlines behave."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from ddm.expert import flow
from ddm.expert.images import to_uint8
from ddm.expert.load import load_denoiser
from ddm.expert.samplers import TIME_GRIDS
from ddm.expert.sampling import sample
from ddm.expert.server import ExpertServer
from ddm.proto import rpc
from ddm.router.client import ExpertClient, RouterClient
from ddm.router.ensemble import Ensemble
from ddm.router.model import load_router
from ddm.router.remote import ExpertFailure
from ddm.router.server import RouterServer, initial_noise


def _experts(root: Path, **kwargs) -> list[ExpertServer]:
    return [
        ExpertServer(str(root / f"experts/expert-{k}/checkpoints"), **kwargs).start(timeout=30)
        for k in range(2)
    ]


@pytest.fixture(scope="module")
def stack(run_root: Path) -> Iterator[tuple[RouterServer, list[ExpertServer]]]:
    experts = _experts(run_root)
    router = RouterServer(str(run_root / "router/checkpoints"), [e.target for e in experts]).start(timeout=30)
    yield router, experts
    router.stop(0)
    for e in experts:
        e.stop(0)


@pytest.fixture(scope="module")
def client(stack: tuple[RouterServer, list[ExpertServer]]) -> Iterator[RouterClient]:
    with RouterClient(stack[0].target) as c:
        yield c


def _in_process(
    root: Path, n: int, y: torch.Tensor, seed: int, *, guidance: float, steps: int, sampler: str,
    time_grid: str = "uniform", **strategy,
):  # fmt: skip
    experts = [load_denoiser(str(root / f"experts/expert-{k}/checkpoints")) for k in range(2)]
    ensemble = Ensemble(experts, load_router(str(root / "router/checkpoints")), **strategy)
    noise, gen = initial_noise(n, (1, 8, 8), seed)
    x = sample(ensemble.guided(guidance), noise, y, steps=steps, sampler=sampler, time_grid=time_grid,
               generator=gen)  # fmt: skip
    return x, ensemble.calls


@pytest.mark.parametrize(
    "strategy, sampler, guidance",
    [
        (dict(strategy="top-k", top_k=1), "euler", 3.0),
        (dict(strategy="full"), "heun", 1.0),
        (dict(strategy="threshold", threshold=0.3), "stochastic", 2.5),
        (dict(strategy="top-k", top_k=2), "euler", 0.0),
    ],
)
def test_sample_matches_the_in_process_ensemble(
    client: RouterClient, run_root: Path, strategy: dict, sampler: str, guidance: float
) -> None:
    progress: list[tuple[int, int, float]] = []
    y = torch.tensor([0, 1, 2, 3, 1, 0])  # 3 = unconditional
    images, info = client.sample(
        6,
        y,
        guidance=guidance,
        steps=4,
        sampler=sampler,
        seed=11,
        include_float=True,
        on_progress=lambda *p: progress.append(p),
        **strategy,
    )
    want, calls = _in_process(run_root, 6, y, 11, guidance=guidance, steps=4, sampler=sampler, **strategy)
    assert progress == [(i + 1, 4, pytest.approx(t)) for i, t in enumerate(flow.time_grid(4).tolist()[1:])]
    assert images.dtype == torch.uint8 and images.shape == (6, 1, 8, 8)
    torch.testing.assert_close(info.samples, want, atol=1e-5, rtol=1e-5)
    assert (images.int() - to_uint8(want).int()).abs().max() <= 1  # float rounding may flip a level
    assert torch.equal(info.labels, y) and info.seed == 11 and info.degraded_experts == []
    assert info.expert_rows == {"expert-0": calls.rows[0], "expert-1": calls.rows[1]}
    assert info.expert_calls == {"expert-0": calls.batches[0], "expert-1": calls.batches[1]}
    assert min(calls.rows) > 0  # both experts took part


def test_a_requested_time_grid_matches_in_process_sampling_with_it(
    client: RouterClient, run_root: Path
) -> None:
    @TIME_GRIDS.register("quadratic-test", help="t_i = 1 - (i / steps)^2")
    def quadratic(steps: int, time_shift: float) -> list[float]:
        return [1 - (i / steps) ** 2 for i in range(steps + 1)]

    try:
        assert list(client.info().time_grids) == ["uniform", "quadratic-test"]
        progress: list[tuple[int, int, float]] = []
        y = torch.tensor([0, 1, 2, 1])
        images, info = client.sample(4, y, guidance=2.0, steps=3, sampler="heun", seed=5, include_float=True,
                                     time_grid="quadratic-test", on_progress=lambda *p: progress.append(p))  # fmt: skip
        want, _ = _in_process(run_root, 4, y, 5, guidance=2.0, steps=3, sampler="heun", time_grid="quadratic-test",
                              strategy="top-k", top_k=1)  # fmt: skip
        assert [t for _, _, t in progress] == pytest.approx(quadratic(3, 1.0)[1:])
        torch.testing.assert_close(info.samples, want, atol=1e-5, rtol=1e-5)
        uniform, _ = _in_process(
            run_root, 4, y, 5, guidance=2.0, steps=3, sampler="heun", strategy="top-k", top_k=1
        )
        assert not torch.allclose(want, uniform, atol=1e-3)  # the grid did change the numbers
        _, default = client.sample(4, y, guidance=2.0, steps=3, sampler="heun", seed=5, include_float=True,
                                   time_grid="")  # fmt: skip
        torch.testing.assert_close(
            default.samples, uniform, atol=1e-5, rtol=1e-5
        )  # empty: the server default
    finally:
        TIME_GRIDS.remove("quadratic-test")


@pytest.mark.parametrize("guidance_mode, route_every", [("expert", 1), ("ensemble", 3)])
def test_a_requested_guidance_mode_and_route_every_match_in_process_sampling(
    client: RouterClient, run_root: Path, guidance_mode: str, route_every: int
) -> None:
    info = client.info()
    assert list(info.guidance_modes) == ["ensemble", "expert"]
    assert (info.default_guidance_mode, info.default_route_every) == ("ensemble", 1)
    y = torch.tensor([0, 1, 2, 3, 1])
    _, got = client.sample(5, y, guidance=2.5, steps=4, seed=7, include_float=True, strategy="full",
                           guidance_mode=guidance_mode, route_every=route_every)  # fmt: skip
    want, calls = _in_process(run_root, 5, y, 7, guidance=2.5, steps=4, sampler="euler", strategy="full",
                              guidance_mode=guidance_mode, route_every=route_every)  # fmt: skip
    torch.testing.assert_close(got.samples, want, atol=1e-5, rtol=1e-5)
    assert got.expert_rows == {"expert-0": calls.rows[0], "expert-1": calls.rows[1]}
    assert calls.router == (2 if route_every == 3 else 4)  # 4 Euler steps, routed at steps 1 and 4
    other = "ensemble" if guidance_mode == "expert" else "expert"
    _, default = client.sample(5, y, guidance=2.5, steps=4, seed=7, include_float=True, strategy="full",
                               guidance_mode=other if route_every == 1 else "", route_every=0)  # fmt: skip
    assert not torch.allclose(default.samples, got.samples, atol=1e-4)  # the setting changed the numbers


def test_defaults_info_and_random_seed(
    client: RouterClient, stack: tuple[RouterServer, list[ExpertServer]]
) -> None:
    info = client.info()
    assert (info.num_classes, list(info.image_shape), info.num_experts) == (3, [1, 8, 8], 2)
    assert info.default_strategy == "top-k" and info.default_top_k == 1 and info.ready
    assert list(info.strategies) == ["top-k", "full", "threshold"]
    images, a = client.sample(4, steps=2)
    _, b = client.sample(4, steps=2)
    assert torch.equal(a.labels, torch.tensor([0, 1, 2, 0]))  # classes cycled
    assert a.seed != b.seed and images.shape == (4, 1, 8, 8)
    assert sum(a.expert_rows.values()) == 4 * 2 * 2  # top-1, CFG (2 rows per sample), 2 steps


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n=0), "n: 0 images; ask for 1..256"),
        (dict(n=257), "n: 257 images"),
        (dict(n=3, labels=[0, 1]), "labels: 2 labels for n = 3"),
        (dict(n=2, labels=[0, 4]), "labels: [4] out of range"),
        (dict(n=1, guidance=-1.0), "guidance: -1.0 out of range"),
        (dict(n=1, guidance=float("nan")), "guidance: nan out of range"),
        (dict(n=1, steps=0), "steps: 0 out of range"),
        (dict(n=1, steps=1001), "steps: 1001 out of range"),
        (dict(n=1, sampler="ddim"), "sampler: unknown sampler 'ddim'"),
        (dict(n=1, strategy="random"), "strategy: unknown strategy 'random'"),
        (dict(n=1, strategy="oracle"), "strategy: unknown strategy 'oracle' ('oracle' needs ground-truth"),
        (dict(n=1, top_k=3), "top_k: 3 out of range; there are 2 experts"),
        (dict(n=1, threshold=0.0), "threshold: 0.0 out of range"),
        (dict(n=1, time_shift=0.0), "time_shift: 0.0 out of range"),
        (dict(n=1, time_grid="karras"), "time_grid: unknown time grid 'karras'; choose one of uniform"),
        (dict(n=1, churn=1.5), "churn: 1.5 out of range"),
        (
            dict(n=1, guidance_mode="both"),
            "guidance_mode: unknown guidance mode 'both'; choose one of ensemble, expert",
        ),
        (dict(n=1, route_every=-2), "route_every: -2 out of range; use 1..1000"),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(
    client: RouterClient, kwargs: dict, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.sample(**kwargs)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(message), info.value.details()


def test_health_reflection_and_list_experts(
    client: RouterClient, stack: tuple[RouterServer, list[ExpertServer]]
) -> None:
    assert client.health() == (True, "")
    statuses = client.list_experts()
    assert [(s.name, s.address, s.healthy) for s in statuses] == [
        ("expert-0", stack[1][0].target, True),
        ("expert-1", stack[1][1].target, True),
    ]
    assert statuses[1].info.expert_index == 1 and statuses[1].info.num_classes == 3


@pytest.fixture
def own_stack(run_root: Path) -> Iterator[tuple[RouterServer, list[ExpertServer]]]:
    experts = _experts(run_root)
    router = RouterServer(
        str(run_root / "router/checkpoints"), [e.target for e in experts], expert_timeout=5
    ).start(timeout=30)
    yield router, experts
    router.stop(0)
    for e in experts:
        e.stop(0)


def test_a_lost_expert_is_unhealthy_and_fails_sampling_with_unavailable_naming_it(own_stack) -> None:
    router, experts = own_stack
    with RouterClient(router.target) as client:
        client.sample(2, steps=2, strategy="full")
        experts[1].stop(0)
        statuses = client.list_experts()
        assert [s.healthy for s in statuses] == [True, False] and "UNAVAILABLE" in statuses[1].error
        with pytest.raises(grpc.RpcError) as info:
            client.sample(2, steps=2, strategy="full")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"expert expert-1 at {experts[1].target}: UNAVAILABLE" in info.value.details()
    assert router.stats.failed == 1


def _settled(read: Callable[[], int], quiet: float = 0.4, timeout: float = 10.0) -> int:
    """The value of a counter once it has stopped changing for ``quiet`` seconds."""
    value, since, end = read(), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < end:
        time.sleep(0.05)
        if read() != value:
            value, since = read(), time.monotonic()
        elif time.monotonic() - since >= quiet:
            return value
    raise AssertionError(f"counter still changing after {timeout} s (at {value})")


def test_client_cancel_stops_the_routers_work(own_stack) -> None:  # noqa: ANN001
    router, experts = own_stack

    def stop_after_two(step: int, total: int, t: float) -> None:
        if step == 2:
            raise KeyboardInterrupt  # what Ctrl-C in the client does

    with RouterClient(router.target) as client, pytest.raises(KeyboardInterrupt):
        client.sample(4, steps=1000, strategy="full", on_progress=stop_after_two)
    steps = _settled(lambda: router.stats.steps)  # the router stopped sampling...
    requests = _settled(lambda: sum(e.batcher.stats.requests for e in experts))  # ...and calling experts
    assert router.stats.cancelled == 1 and router.stats.completed == 0
    assert steps < 1000 and requests <= 2 * steps


def test_deadline_exceeded_stops_sampling(own_stack) -> None:  # noqa: ANN001
    router, _ = own_stack
    with RouterClient(router.target) as client, pytest.raises(grpc.RpcError) as info:
        client.sample(4, steps=1000, strategy="full", timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _settled(lambda: router.stats.steps) < 1000 and router.stats.completed == 0


def test_tokens_between_client_router_and_experts(run_root: Path) -> None:
    experts = _experts(run_root, token="expert-secret")
    router = RouterServer(
        str(run_root / "router/checkpoints"),
        [e.target for e in experts],
        token="router-secret",
        expert_token="expert-secret",
    ).start(timeout=30)
    try:
        with RouterClient(router.target) as anonymous, pytest.raises(grpc.RpcError) as info:
            anonymous.sample(1, steps=1)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with RouterClient(router.target, token="router-secret") as client:
            assert client.sample(1, steps=1)[0].shape == (1, 1, 8, 8)
    finally:
        router.stop(0)
        for e in experts:
            e.stop(0)


def test_router_refuses_experts_that_do_not_fit(run_root: Path) -> None:
    experts = _experts(run_root)
    try:
        ckpt = str(run_root / "router/checkpoints")
        with pytest.raises(ValueError, match="1 expert addresses but the router was trained for 2"):
            RouterServer(ckpt, [experts[0].target]).start(timeout=30).stop(0)
        with pytest.raises(
            ValueError, match=r"--expert #0 .* serves expert-1 .* list the expert addresses in expert order"
        ):
            RouterServer(ckpt, [experts[1].target, experts[0].target]).start(timeout=30).stop(0)
        unready = RouterServer(ckpt, ["127.0.0.1:1", experts[1].target], connect_timeout=0.3).start(
            wait=False
        )
        channel = rpc.make_channel(unready.target)
        with pytest.raises(
            ExpertFailure, match="expert 127.0.0.1:1 at 127.0.0.1:1: (UNAVAILABLE|DEADLINE_EXCEEDED)"
        ):
            unready.wait_ready(10)
        assert rpc.check_health(channel) == (False, "NOT_SERVING")
        channel.close()
        unready.stop(0)
    finally:
        for e in experts:
            e.stop(0)


class _GatedLoad(ExpertServer):
    """A real expert server whose checkpoint load waits for ``loaded.set()``: its port is open and Info
    answers UNAVAILABLE "still loading" until then (what a slow checkpoint read looks like)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loaded = threading.Event()

    def _load_model(self):
        self.loaded.wait(60)
        return super()._load_model()


def test_router_waits_for_an_expert_that_is_still_loading(run_root: Path) -> None:
    """Started together, the router retries an expert answering "still loading" until it is ready
    (before the fix it gave up at once with UNAVAILABLE: ... is still loading)."""
    fast = ExpertServer(str(run_root / "experts/expert-0/checkpoints")).start(timeout=30)
    slow = _GatedLoad(str(run_root / "experts/expert-1/checkpoints")).start(wait=False)
    router = RouterServer(
        str(run_root / "router/checkpoints"), [fast.target, slow.target], connect_timeout=30
    ).start(wait=False)
    try:
        with ExpertClient(slow.target) as probe, pytest.raises(grpc.RpcError) as info:
            probe.info(timeout=5)  # the expert is up and says so
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "still loading" in info.value.details()
        time.sleep(1.5)  # several connect attempts, each answered "still loading"
        assert not router.wait_loaded(0), f"router gave up while the expert loaded: {router.load_error}"
        slow.loaded.set()
        router.wait_ready(30)
        assert [e.name for e in router.experts] == ["expert-0", "expert-1"]
        with RouterClient(router.target) as client:
            images, _ = client.sample(2, steps=2, strategy="full", seed=0)
        assert images.shape == (2, 1, 8, 8)
    finally:
        slow.loaded.set()
        router.stop(0)
        fast.stop(0)
        slow.stop(0)


def test_router_fails_naming_an_expert_that_never_becomes_ready(run_root: Path) -> None:
    fast = ExpertServer(str(run_root / "experts/expert-0/checkpoints")).start(timeout=30)
    slow = _GatedLoad(str(run_root / "experts/expert-1/checkpoints")).start(wait=False)
    try:
        began = time.monotonic()
        router = RouterServer(
            str(run_root / "router/checkpoints"), [fast.target, slow.target], connect_timeout=1.5
        ).start(wait=False)
        with pytest.raises(ExpertFailure) as info:
            router.wait_ready(30)
        waited = time.monotonic() - began
        message = str(info.value)
        assert message.startswith(
            f"expert {slow.target} at {slow.target}: DEADLINE_EXCEEDED: not ready after 1.5 s"
        ), message
        assert "it last said UNAVAILABLE: expert" in message and "is still loading" in message, message
        assert 1.4 <= waited < 10, waited
        router.stop(0)
    finally:
        slow.loaded.set()
        fast.stop(0)
        slow.stop(0)


def test_concurrent_requests_are_sampled_as_cohorts_and_share_expert_calls(run_root: Path) -> None:
    experts = _experts(run_root, max_delay=0.05)  # a Predict takes >= 50 ms: other calls queue behind it
    router = RouterServer(
        str(run_root / "router/checkpoints"), [e.target for e in experts], cohort_delay=0.5
    ).start(timeout=30)
    try:
        # three schedules (guidance 3, 2, 1.5): three cohorts of two requests each, sampled at the same time
        jobs = [(torch.tensor([i % 3, (i + 1) % 4]), (3.0, 2.0, 1.5)[i // 2]) for i in range(6)]
        with RouterClient(router.target) as client, ThreadPoolExecutor(6) as pool:
            results = list(
                pool.map(
                    lambda i: client.sample(
                        2,
                        jobs[i][0],
                        guidance=jobs[i][1],
                        steps=3,
                        seed=i,
                        strategy="full",
                        include_float=True,
                    ),
                    range(6),
                )
            )
        assert (router.cohorts.cohorts, router.cohorts.members) == (3, 6)
        for i, (images, info) in enumerate(results):
            labels, guidance = jobs[i]
            want, _ = _in_process(
                run_root, 2, labels, i, guidance=guidance, steps=3, sampler="euler", strategy="full"
            )
            torch.testing.assert_close(
                info.samples, want, atol=1e-4, rtol=1e-4
            )  # batching changes float sums only
            assert (
                images.shape == (2, 1, 8, 8)
                and info.progress_events == 3
                and torch.equal(info.labels, labels)
            )
            assert info.seed == i and info.batched_with == 1
            assert info.expert_rows == {
                "expert-0": 3 * 2 * 4,
                "expert-1": 3 * 2 * 4,
            }  # the cohort's 4 rows, CFG
        coalesced = [e.batcher.stats for e in router.experts]
        assert all(s.requests == 3 * 3 for s in coalesced)  # each cohort calls each expert once per step...
        assert all(
            s.batches < s.requests for s in coalesced
        )  # ...and cohorts share Predicts (queued behind one)
        assert sum(e.batcher.stats.requests for e in experts) == sum(s.batches for s in coalesced)
        assert router.router_batcher.stats.requests == 3 * 3
    finally:
        router.stop(0)
        for e in experts:
            e.stop(0)


def _until(check: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.05)


def test_a_lost_expert_turns_health_not_serving_and_its_restart_serving_again(
    run_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: health stayed SERVING and Info.ready true while every default request failed with
    UNAVAILABLE, the router logged nothing, and Health/List answered UNIMPLEMENTED."""
    experts = _experts(run_root)
    router = RouterServer(
        str(run_root / "router/checkpoints"),
        [e.target for e in experts],
        expert_timeout=5,
        health_interval=0.1,
    ).start(timeout=30)
    caplog.set_level("INFO", logger="ddm.router.server")
    everything_serving = {
        "": "SERVING", "ddm.v1.Expert/expert-0": "SERVING", "ddm.v1.Expert/expert-1": "SERVING",
        "ddm.v1.Router": "SERVING", "liveness": "SERVING",
    }  # fmt: skip
    try:
        with RouterClient(router.target) as client:
            _until(lambda: client.health_list() == everything_serving, what="all SERVING")
            info = client.info()
            assert info.ready and list(info.down_experts) == []
            port = experts[1].port
            experts[1].stop(0)
            _until(lambda: client.health() != (True, ""), timeout=5, what="router NOT_SERVING")
            assert client.health() == (False, "NOT_SERVING")
            assert client.health("ddm.v1.Expert/expert-1") == (False, "NOT_SERVING")
            assert client.health_list() == {
                **everything_serving, "": "NOT_SERVING", "ddm.v1.Router": "NOT_SERVING",
                "ddm.v1.Expert/expert-1": "NOT_SERVING",
            }  # fmt: skip
            info = client.info()
            assert not info.ready and list(info.down_experts) == ["expert-1"]
            assert any(
                f"expert expert-1 at 127.0.0.1:{port} is down" in r.getMessage() for r in caplog.records
            ), caplog.text
            with pytest.raises(grpc.RpcError) as failed:
                client.sample(2, steps=2, strategy="full")
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE and "expert-1" in failed.value.details()
            _, degraded = client.sample(2, steps=2, strategy="full", allow_degraded=True)
            assert degraded.degraded_experts == ["expert-1"]
            assert any("finished degraded, without expert-1" in r.getMessage() for r in caplog.records)
            assert any(
                "Sample failed for 1 request(s) (allow_degraded not set)" in r.getMessage()
                for r in caplog.records
            )

            experts[1] = ExpertServer(
                str(run_root / "experts/expert-1/checkpoints"), address=f"127.0.0.1:{port}"
            ).start(timeout=30)
            _until(lambda: client.health_list() == everything_serving, what="SERVING again")
            assert client.info().ready and list(client.info().down_experts) == []
            assert any(
                f"expert expert-1 at 127.0.0.1:{port} is back after" in r.getMessage() for r in caplog.records
            )
            _, info = client.sample(2, steps=2, strategy="full")
            assert info.degraded_experts == []
    finally:
        router.stop(0)
        for e in experts:
            e.stop(0)


def test_health_list_answers_every_service_on_an_expert(
    stack: tuple[RouterServer, list[ExpertServer]],
) -> None:
    with ExpertClient(stack[1][0].target) as client:
        assert client.health_list() == {"": "SERVING", "ddm.v1.Expert": "SERVING"}
