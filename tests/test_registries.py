"""The extension points: a sampler, a time grid or a strategy registered in its one module appears
everywhere that names the choices (config validation, CLI choices and --help, the router's served lists
and request parsing) and runs, with no other file touched. Adding one for real: copy the matching test
here, with the new entry's own numbers.

Also: the CLI options made from config fields (ddm.core.cli) keep the fields' defaults, choices and
bounds, and a bad value is refused naming the option."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch

from ddm.coordinator.config import EvalConfig, EvalModel, eval_models, parse_eval_model
from ddm.core.cli import add_options, config_from_args
from ddm.core.config import ConfigError
from ddm.core.registry import Registry
from ddm.expert.analytic import GaussianDenoiser
from ddm.expert.config import SampleConfig
from ddm.expert.evaluate import generate
from ddm.expert.guidance import with_guidance
from ddm.expert.samplers import SAMPLERS, TIME_GRIDS, Step
from ddm.expert.sampling import CountingDenoiser, denoiser_calls, sample
from ddm.router.config import RoutingConfig, SampleDefaults
from ddm.router.distill_config import TeacherSettings
from ddm.router.ensemble import Ensemble
from ddm.router.strategies import GUIDANCE_MODES, STRATEGIES

GAUSS = GaussianDenoiser(torch.zeros(1, 2, 2, dtype=torch.float64), torch.eye(4, dtype=torch.float64))


def _choices(*argv: str, option: str) -> list[str]:
    """The choices ``ddm ARGV... --help`` offers for ``option``, from the real parser."""
    from ddm.coordinator.cli import build_parser

    parser = build_parser()
    for name in argv:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return list(next(a for a in parser._actions if option in a.option_strings).choices)


def _router_info() -> object:
    from ddm.router.sample_request import router_info

    return router_info(SampleDefaults(), SimpleNamespace(num_classes=1, in_channels=1, image_size=2))


def _request(**fields: object) -> object:
    from ddm.proto.ddm.v1 import ddm_pb2 as pb
    from ddm.router.sample_request import parse_request

    return parse_request(pb.SampleRequest(n=2, **fields), SampleDefaults(), num_classes=1, num_experts=2)


# ------------------------------------------------------------------------------------------ a sampler


@pytest.fixture
def midpoint() -> Iterator[str]:
    """The explicit midpoint method (RK2): two calls per step, the half step asked for instantaneously."""

    @SAMPLERS.register(
        "midpoint-test", help="explicit midpoint (RK2)", calls=lambda steps: 2 * steps, stochastic=False
    )
    def midpoint_sampler(model, x, ts, *, noise, churn):
        for i in range(len(ts) - 1):
            t, t_next = ts[i], ts[i + 1]
            v = model(x, t)
            t_mid = 0.5 * (t + t_next)
            x_next = x + (t_next - t) * model(x + (t_mid - t) * v, t_mid)
            yield Step(index=i, total=len(ts) - 1, t=t, t_next=t_next, x=x_next, x0_pred=x - t * v)
            x = x_next

    try:
        yield "midpoint-test"
    finally:
        SAMPLERS.remove("midpoint-test")


def test_a_registered_sampler_is_everywhere(midpoint: str) -> None:
    assert (
        SampleConfig(sampler=midpoint).sampler == midpoint
        and SampleDefaults(sampler=midpoint).sampler == midpoint
    )
    assert midpoint in _choices("sample", option="--sampler") and midpoint in _choices(
        "eval", option="--sampler"
    )
    assert midpoint in _router_info().samplers
    assert _request(sampler=midpoint).sampler == midpoint
    assert _request(sampler=midpoint).cohort_key() is not None  # deterministic: requests may share a cohort
    counter = CountingDenoiser(GAUSS)
    x = sample(counter, torch.randn(3, 1, 2, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.long), steps=5,
               sampler=midpoint)  # fmt: skip
    assert counter.calls.total_batches == denoiser_calls(midpoint, 5) == 10 and x.shape == (3, 1, 2, 2)


def test_an_unknown_sampler_names_the_field_and_the_choices() -> None:
    with pytest.raises(
        ValueError, match="sampler: unknown sampler 'dpm'; choose one of euler, heun, stochastic"
    ):
        sample(GAUSS, torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long), steps=2, sampler="dpm")
    with pytest.raises(ValueError, match="unknown sampler 'dpm'"):
        SampleConfig(sampler="dpm")


def test_every_sampler_declares_its_calls_and_whether_it_is_stochastic() -> None:
    for entry in SAMPLERS:
        counter = CountingDenoiser(GAUSS)
        sample(counter, torch.randn(2, 1, 2, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.long), steps=4,
               sampler=entry.name, generator=torch.Generator().manual_seed(0))  # fmt: skip
        assert counter.calls.total_batches == entry.calls(4), entry.name
        assert isinstance(entry.stochastic, bool) and entry.help


# ---------------------------------------------------------------------------------------- a time grid


def test_a_registered_time_grid_is_what_the_sampler_visits() -> None:
    @TIME_GRIDS.register("quadratic-test", help="t_i = 1 - (i / steps)^2")
    def quadratic(steps: int, time_shift: float) -> list[float]:
        return [1 - (i / steps) ** 2 for i in range(steps + 1)]

    @TIME_GRIDS.register("broken-test", help="not decreasing")
    def broken(steps: int, time_shift: float) -> list[float]:
        return [1.0, 1.0, 0.0]

    try:
        assert SampleConfig(time_grid="quadratic-test").time_grid == "quadratic-test"
        assert SampleDefaults(time_grid="quadratic-test").time_grid == "quadratic-test"
        for argv in (("sample",), ("eval",), ("serve", "router"), ("serve", "run")):
            assert "quadratic-test" in _choices(*argv, option="--time-grid"), argv
        assert list(_router_info().time_grids) == ["uniform", "quadratic-test", "broken-test"]
        asked = _request(time_grid="quadratic-test")
        assert asked.time_grid == "quadratic-test" and _request(time_grid="").time_grid == "uniform"
        assert asked.cohort_key() != _request().cohort_key()  # different grids never share a cohort
        seen: list[Step] = []
        sample(GAUSS, torch.randn(2, 1, 2, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.long), steps=4,
               time_grid="quadratic-test", callback=seen.append)  # fmt: skip
        assert [s.t for s in seen] + [seen[-1].t_next] == quadratic(4, 1.0)
        # ddm eval, the eval stage and the distill table sample through generate() with eval.sample
        cfg = SampleConfig(steps=4, guidance=1.0, time_grid="quadratic-test")
        y = torch.zeros(2, dtype=torch.long)
        got = generate(GAUSS, y, (1, 2, 2), cfg, generator=torch.Generator().manual_seed(0), batch_size=2)
        noise = torch.randn((2, 1, 2, 2), generator=torch.Generator().manual_seed(0))
        want = sample(with_guidance(GAUSS, 1.0), noise, y, steps=4, time_grid="quadratic-test")
        assert torch.equal(got, want)
        with pytest.raises(
            ValueError, match="time grid 'broken-test'.*strictly decreasing times from 1 to 0"
        ):
            sample(
                GAUSS,
                torch.zeros(1, 1, 2, 2),
                torch.zeros(1, dtype=torch.long),
                steps=2,
                time_grid="broken-test",
            )
        with pytest.raises(ValueError, match="time_grid: unknown time grid 'karras'; choose one of uniform"):
            sample(
                GAUSS, torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long), steps=2, time_grid="karras"
            )
    finally:
        TIME_GRIDS.remove("quadratic-test")
        TIME_GRIDS.remove("broken-test")


def test_ddm_sample_sends_its_time_grid_to_the_router(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ddm.coordinator.cli import main

    sent: dict[str, object] = {}

    class Router:  # stands in for RouterClient: records the request's fields
        def __init__(self, *args, **kwargs) -> None: ...
        def __enter__(self) -> Router:
            return self

        def __exit__(self, *exc: object) -> None: ...
        def info(self) -> SimpleNamespace:
            return SimpleNamespace(num_classes=3, class_names=[])

        def sample(self, n, y, **fields):
            sent.update(fields)
            done = SimpleNamespace(seconds=0.0, expert_calls={}, degraded_experts=[])
            return torch.zeros(n, 1, 2, 2, dtype=torch.uint8), done

    monkeypatch.setattr("ddm.router.client.RouterClient", Router)
    TIME_GRIDS.register("quadratic-test", help="t_i = 1 - (i / steps)^2")(lambda steps, shift: [])
    try:
        argv = ["sample", "--router", "127.0.0.1:1", "--n", "2", "--out", str(tmp_path / "x.png")]
        assert main([*argv, "--time-grid", "quadratic-test"]) == 0, capsys.readouterr().err
        assert sent["time_grid"] == "quadratic-test"
        assert main(argv) == 0 and sent["time_grid"] == "uniform"  # SampleConfig's default
    finally:
        TIME_GRIDS.remove("quadratic-test")


# ----------------------------------------------------------------------------------------- a strategy


@pytest.fixture
def bottom() -> Iterator[str]:
    """The least probable expert alone (useless, but its weights are known)."""

    @STRATEGIES.register("bottom-test", help="the least probable expert", served=True, routed=True)
    def bottom_rule(probs, *, top_k, threshold):
        return probs.new_zeros(probs.shape).scatter_(1, probs.argmin(dim=1, keepdim=True), 1.0)

    try:
        yield "bottom-test"
    finally:
        STRATEGIES.remove("bottom-test")


def test_a_registered_strategy_is_everywhere(bottom: str) -> None:
    assert (
        SampleDefaults(strategy=bottom).strategy == bottom
        and RoutingConfig(strategy=bottom).strategy == bottom
    )
    assert bottom in _choices("serve", "router", option="--strategy")
    assert bottom in _choices("serve", "run", option="--strategy")
    assert bottom in _choices("sample", option="--strategy")
    assert bottom in _router_info().strategies
    assert _request(strategy=bottom).strategy == bottom
    assert parse_eval_model(bottom) == EvalModel(bottom, bottom)  # ddm run's eval stage and ddm compare
    assert EvalConfig(models=[bottom, "top-3"]).models == [bottom, "top-3"] and bottom in eval_models()
    assert TeacherSettings(strategy=bottom).strategy == bottom  # a routed strategy can teach

    experts = [CountingDenoiser(GAUSS), CountingDenoiser(GAUSS)]
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    ens = Ensemble(experts, lambda x_t, t, y: probs, strategy=bottom)
    assert torch.equal(ens.weights(torch.zeros(3, 1, 2, 2), torch.ones(3), torch.zeros(3, dtype=torch.long)),
                       torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))  # fmt: skip
    ens.velocity(
        torch.zeros(3, 1, 2, 2, dtype=torch.float64), torch.ones(3), torch.zeros(3, dtype=torch.long)
    )
    assert [e.calls.total_rows for e in experts] == [1, 2]


def test_eval_models_come_from_the_registry() -> None:
    assert parse_eval_model("top-3") == EvalModel("top-3", "top-k", 3)
    assert parse_eval_model("threshold") == EvalModel("threshold", "threshold")
    assert parse_eval_model("mixture") == EvalModel("mixture", None)
    assert eval_models() == ("top-1", "top-2", "full", "threshold", "mixture")
    for bad in ("top-0", "top-k", "oracle", "best"):
        with pytest.raises(
            ValueError,
            match=f"unknown eval model '{bad}'; choose from top-K \\(K >= 1\\), full, threshold, mixture",
        ):
            EvalConfig(models=["top-1", bad])
    with pytest.raises(
        ValueError, match="unknown strategy 'oracle'; choose one of top-k, full, threshold \\["
    ):
        TeacherSettings(strategy="oracle")  # routes by labels: the partition teacher, not a strategy


def test_served_strategies_come_from_the_registry() -> None:
    assert STRATEGIES.names(served=True) == ("top-k", "full", "threshold")
    assert list(_router_info().strategies) == ["top-k", "full", "threshold"]
    assert _choices("serve", "router", option="--strategy") == ["top-k", "full", "threshold"]
    with pytest.raises(ValueError, match="unknown strategy 'oracle'"):
        SampleDefaults(strategy="oracle")  # evaluation only: not a served default
    with pytest.raises(
        ValueError, match="strategy: unknown strategy 'best'; choose one of top-k, full, threshold, oracle"
    ):
        Ensemble([GAUSS], None, strategy="best")


# ---------------------------------------------------------------------------------- options from fields


def test_options_carry_the_fields_defaults_choices_and_help() -> None:
    p = argparse.ArgumentParser()
    add_options(p, SampleConfig, ["steps", "sampler", "time_grid", "time_shift"])
    args = p.parse_args([])
    assert (args.steps, args.sampler, args.time_grid, args.time_shift) == (32, "euler", "uniform", None)
    assert (
        config_from_args(SampleConfig, args, ["steps", "sampler", "time_grid", "time_shift"])
        == SampleConfig()
    )
    text = p.format_help()
    assert "--time-shift" in text and SampleConfig.model_fields["steps"].description in text
    with pytest.raises(SystemExit):
        p.parse_args(["--sampler", "dpm"])  # argparse's choices, from the registry
    with pytest.raises(SystemExit):
        p.parse_args(["--time-grid", "karras"])


def test_a_bad_option_value_names_the_option() -> None:
    p = argparse.ArgumentParser()
    add_options(p, SampleConfig, ["steps", "guidance"])
    with pytest.raises(ConfigError, match="--steps: Input should be greater than or equal to 1"):
        config_from_args(SampleConfig, p.parse_args(["--steps", "0"]), ["steps", "guidance"])


def test_a_bad_sampling_option_fails_before_anything_loads(capsys: pytest.CaptureFixture[str]) -> None:
    from ddm.coordinator.cli import main

    assert main(["sample", "--checkpoint", "/nonexistent", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", "/nonexistent", "--guidance", "-1"]) == 2
    assert "--guidance" in capsys.readouterr().err


def test_unset_options_take_the_servers_default() -> None:
    p = argparse.ArgumentParser()
    add_options(
        p,
        RoutingConfig,
        ["strategy", "top_k"],
        unset=["strategy", "top_k"],
        unset_help="default: the router's",
    )
    args = p.parse_args([])
    assert args.strategy is None and args.top_k is None and "default: the router's" in p.format_help()


def test_a_registry_refuses_duplicates_and_missing_attributes() -> None:
    reg: Registry[int] = Registry("thing", required=("size",))
    reg.add("a", 1, help="one", size=1)
    with pytest.raises(ValueError, match="thing 'a' is registered twice"):
        reg.add("a", 2, help="two", size=2)
    with pytest.raises(ValueError, match="thing 'b' must declare size"):
        reg.add("b", 2, help="two")


# ----------------------------------------------------------------------------------- a guidance mode


def test_a_registered_guidance_mode_is_everywhere() -> None:
    """One decorated rule in GUIDANCE_MODES reaches the config, both CLIs, the router's request and
    info, the cohort key and the ensemble."""

    @GUIDANCE_MODES.register("conditional-test", help="ignore guidance: the conditional mixture", exact=False)
    def conditional(x_t, t, y, y_null, scale, *, route, mix):
        return mix(x_t, t, y, route(x_t, t, y))

    try:
        assert RoutingConfig(guidance_mode="conditional-test").guidance_mode == "conditional-test"
        assert "conditional-test" in _choices("sample", option="--guidance-mode")
        assert "conditional-test" in _choices("serve", "router", option="--guidance-mode")
        assert list(_router_info().guidance_modes) == ["ensemble", "expert", "conditional-test"]
        asked = _request(guidance_mode="conditional-test", route_every=2)
        assert (asked.guidance_mode, asked.route_every) == ("conditional-test", 2)
        assert asked.cohort_key() != _request(route_every=2).cohort_key()  # never merged with another mode
        assert _request(guidance_mode="").guidance_mode == "ensemble" and _request().route_every == 1
        experts = [GAUSS, GAUSS]
        router = lambda x, t, y: torch.full((x.shape[0], 2), 0.5, dtype=x.dtype)  # noqa: E731
        ens = Ensemble(experts, router, strategy="full", guidance_mode="conditional-test")
        x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
        t, y = torch.full((3,), 0.5, dtype=torch.float64), torch.zeros(3, dtype=torch.long)
        torch.testing.assert_close(ens.guided(4.0).velocity(x, t, y), GAUSS.velocity(x, t, y))
    finally:
        GUIDANCE_MODES.remove("conditional-test")
    with pytest.raises(
        ValueError, match="unknown guidance mode 'conditional-test'; choose one of ensemble, expert"
    ):
        RoutingConfig(guidance_mode="conditional-test")
