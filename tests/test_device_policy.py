"""The device policy everywhere: every command and server that runs a network takes ``--device`` (or the
run config's ``device``), runs there, and says where on stderr; CUDA asked for on a machine without it
is a clean usage error (exit 2, the message names the setting, no traceback); a malformed setting is
refused by argparse naming the choices. Real commands in-process, real servers on 127.0.0.1.

On this (CPU) machine ``auto`` must choose the CPU and say why; on a CUDA machine the same tests
expect cuda:0 and skip the "no CUDA here" ones.
"""

from __future__ import annotations

import argparse
import inspect
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from grpc_fixtures import EXPERT_CFG, _randomise, expert_checkpoint, router_checkpoint

from ddm.coordinator import cli, serve_cmd
from ddm.coordinator.config import RunConfig
from ddm.coordinator.manifest import DONE, Manifest
from ddm.core import checkpoint
from ddm.core.placement import Placement
from ddm.expert.model import DiT, DiTConfig
from ddm.router.model import RouterConfig, RouterNet

CUDA = torch.cuda.is_available()
needs_no_cuda = pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
FMNIST = "/usr/share/datasets/fashion-mnist"
SPECS = ["cpu", "auto"]

# Commands that run no network, and why; every other command must take --device.
NO_NETWORK = {
    "status": "reads the manifest and heartbeats",
    "cancel": "asks the run's schedulers to stop its jobs",
    "logs": "reads a job's log",
    "k8s": "writes kustomize files",
    "models": "counts parameters and FLOPs from the architecture registry (analytic, no module built)",
    "report": "reads the JSON, CSV and PNG files the stages wrote (no checkpoint, no torch)",
    "retire-expert": "records the retirement; the router it retrains is a job with its own train.device",
}
# Subcommands of a command whose other subcommands run networks (their module is shared, so only the
# parser is checked): the reason each builds none here.
NO_NETWORK_SUBCOMMANDS = {
    "serve replace": "asks a running router to switch an expert; a new expert server for --checkpoint is "
    "started on the router's host, by its stack, with that stack's --device",
}
# What building a network looks like in a command module's source (a no-network command has none).
NETWORK_BUILDERS = re.compile(
    r"load_denoiser|load_model|load_router|build_features|get_classifier|ExpertServer|RouterServer|"
    r"LocalStack|run_eval|eval_context|run_compare|Pipeline\("
)


# ---------------------------------------------------------------------------------------------------
# helpers


def announced(stderr: str, what: str, spec: str) -> str:
    """The announce line of ``what`` in ``stderr``, checked to name the device ``spec`` chose and why."""
    on = ("cuda:0" if CUDA else "cpu") if spec == "auto" else spec
    why = ("; CUDA present" if CUDA else "; no CUDA device") if spec == "auto" else ""
    lines = [line for line in stderr.splitlines() if line.startswith("ddm: ") and what in line]
    assert lines, f"nothing announced for {what!r}; stderr:\n{stderr}"
    good = [line for line in lines if f" on {on} (" in line and line.endswith(f"(device = {spec!r}{why})")]
    assert good, f"{what!r} announced, but not on {on} for device = {spec!r}: {lines}"
    return good[0]


def refused_cleanly(rc: int, stderr: str, command: str, setting: str = "--device") -> None:
    assert rc == 2, stderr
    assert f"{setting} = 'cuda' but torch sees no CUDA device here" in stderr, stderr
    assert "Traceback" not in stderr


def save(directory: Path, module: torch.nn.Module, meta: dict, seed: int) -> str:
    _randomise(module, seed=seed)
    state = module.state_dict()
    tensors = {
        **{f"model.{n}": v for n, v in state.items()},
        **{f"ema.{n}": v.clone() for n, v in state.items()},
    }
    checkpoint.save(str(directory), 3, tensors, {**meta, "model": module.config.to_dict()})
    return str(directory)


FM_IMAGE = dict(image_size=28, in_channels=1, num_classes=10)  # Fashion-MNIST: what eval compares with
FM_EXPERT = DiTConfig(patch_size=7, hidden_size=32, depth=1, num_heads=2, **FM_IMAGE)
FM_ROUTER = RouterConfig(num_experts=2, patch_size=7, hidden_size=32, depth=1, num_heads=2, **FM_IMAGE)


def fm_run(root: Path, *, features: str = "pixels", encoder: str = "efficientnet-lite0") -> RunConfig:
    """A finished 2-expert run on Fashion-MNIST-shaped checkpoints: manifest, experts, router."""
    cfg = RunConfig.model_validate({
        "name": "dev", "root": str(root), "data": {"path": FMNIST, "limit": 64},
        "partition": {"k": 2, "fine_k": 4, "sample_size": 40, "encoder": encoder, "embed_image_size": 32},
        "experts": {"train": {"num_threads": 1}},
        "eval": {"num_samples": 10, "real_samples": 10, "features": features, "classifier": False,
                 "models": ["top-1"], "sample": {"steps": 2, "guidance": 2.0}},
    })  # fmt: skip
    # resolved as `ddm run` records it (Fashion-MNIST's shape and classes), without reading the data
    from ddm.coordinator.data_shape import resolve_run_config

    cfg = resolve_run_config(cfg, SimpleNamespace(image_shape=(1, 28, 28), num_classes=10, class_names=None))
    Manifest.open(str(root), cfg.model_dump(mode="json"))
    for k in range(2):
        meta = {"kind": "expert", "name": f"expert-{k}"}
        save(root / "experts" / f"expert-{k}" / "checkpoints", DiT(FM_EXPERT), meta, 10 + k)
    save(root / "router" / "checkpoints", RouterNet(FM_ROUTER), {"kind": "router", "name": "router"}, 2)
    return cfg


def student(directory: Path, cfg: DiTConfig) -> str:
    cfg = DiTConfig(**{**cfg.to_dict(), "guidance_embed": True, "step_embed": True})
    return save(directory, DiT(cfg), {"kind": "student", "name": "student"}, 7)


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reference features and classifiers are cached per machine (``$DDM_CACHE``): keep ours apart."""
    monkeypatch.setenv("DDM_CACHE", str(tmp_path / "machine-cache"))


@pytest.fixture
def restore_signals() -> Iterator[None]:
    """``ddm serve`` installs SIGTERM/SIGINT handlers; give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


# ---------------------------------------------------------------------------------------------------
# the inventory: every command that builds a network has --device


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _leaf_commands() -> dict[str, argparse.ArgumentParser]:
    """Every runnable command: ``sample``, ``serve expert``, ``serve router``, ``serve run``, ..."""
    out = {}
    for name, p in _subparsers(cli.build_parser()).items():
        kinds = _subparsers(p)
        out.update({f"{name} {kind}": q for kind, q in kinds.items()} if kinds else {name: p})
    return out


def _has_device(p: argparse.ArgumentParser) -> bool:
    return any("--device" in a.option_strings for a in p._actions)


def test_every_command_that_runs_a_network_takes_device() -> None:
    leaves = _leaf_commands()
    exempt = NO_NETWORK
    commands = {name.split()[0] for name in leaves}
    assert set(exempt) <= commands, f"stale exemptions: {set(exempt) - commands}"
    assert set(NO_NETWORK_SUBCOMMANDS) <= set(leaves), f"stale: {set(NO_NETWORK_SUBCOMMANDS) - set(leaves)}"
    missing = [
        name
        for name, p in leaves.items()
        if name.split()[0] not in exempt and name not in NO_NETWORK_SUBCOMMANDS and not _has_device(p)
    ]
    assert not missing, (
        f"{missing} take no --device; add core.device.add_argument (or core.placement.add_override_argument) "
        "or, if they run no network, list them in NO_NETWORK with the reason"
    )
    for name in ("run", "assign", "sample", "eval", "compare", "serve expert", "serve router", "serve run"):
        assert _has_device(leaves[name]), name


@pytest.mark.parametrize("command", sorted(NO_NETWORK))
def test_commands_listed_as_network_free_build_no_network(command: str) -> None:
    import importlib

    source = inspect.getsource(importlib.import_module(cli.COMMANDS[command][0]))
    found = NETWORK_BUILDERS.findall(source)
    assert not found, (
        f"ddm {command} builds a network ({found}); give it --device and drop it from NO_NETWORK"
    )


NETWORK_COMMANDS = sorted(
    n for n in _leaf_commands() if n.split()[0] not in NO_NETWORK and n not in NO_NETWORK_SUBCOMMANDS
)


@pytest.mark.parametrize("command", NETWORK_COMMANDS)
def test_a_malformed_device_is_refused_by_argparse_naming_the_choices(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args([*command.split(), "--device", "gpu0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --device: --device = 'gpu0' is not a device" in err
    assert "'auto'" in err and "'cpu'" in err and "'cuda:N'" in err


# ---------------------------------------------------------------------------------------------------
# ddm sample (local), ddm eval


@pytest.mark.parametrize("spec", SPECS)
def test_sample_runs_where_it_is_told_and_says_so(spec: str, tmp_path: Path, capsys) -> None:
    ckpt = expert_checkpoint(tmp_path, 0)
    out = tmp_path / "grid.png"
    rc = cli.main(["sample", "--checkpoint", ckpt, "--n", "3", "--steps", "2", "--sampler", "stochastic",
                   "--out", str(out), "--device", spec])  # fmt: skip
    cap = capsys.readouterr()
    assert rc == 0 and out.exists(), cap.err
    announced(cap.err, "sample: model", spec)


def test_sample_of_a_student_checkpoint_announces_the_student(tmp_path: Path, capsys) -> None:
    ckpt = student(tmp_path / "student", EXPERT_CFG)
    assert cli.main(["sample", "--checkpoint", ckpt, "--n", "2", "--steps", "2", "--out", str(tmp_path / "s.png"),
                     "--device", "cpu"]) == 0  # fmt: skip
    announced(capsys.readouterr().err, "sample: student", "cpu")


@needs_no_cuda
def test_sample_refuses_cuda_here(tmp_path: Path, capsys) -> None:
    rc = cli.main(["sample", "--checkpoint", expert_checkpoint(tmp_path, 0), "--out", str(tmp_path / "g.png"),
                   "--device", "cuda"])  # fmt: skip
    refused_cleanly(rc, capsys.readouterr().err, "sample")
    assert not (tmp_path / "g.png").exists()


def test_sample_through_a_router_refuses_a_device_it_would_not_use(capsys) -> None:
    assert cli.main(["sample", "--router", "127.0.0.1:1", "--device", "cpu"]) == 2
    assert "--device applies to --checkpoint only" in capsys.readouterr().err


def test_the_same_seed_gives_the_same_noise_on_any_device() -> None:
    """The stochastic sampler draws fresh noise from the (CPU) generator and moves it to x's device."""
    from ddm.expert.sampling import _fresh_noise

    b = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    for device in ["cpu", "cuda" if CUDA else "meta"]:  # meta: a second device on a CPU-only machine
        x = torch.zeros(2, 1, 4, 4, device=device)
        a = _fresh_noise(x, torch.Generator().manual_seed(3))
        assert a.device == x.device
        assert device == "meta" or torch.equal(a.cpu(), b)


def test_a_decoded_reply_lands_on_the_callers_device() -> None:
    """The wire is where tensors cross: an expert's reply is decoded onto the device of the x_t it
    answers (the router's), whatever that device is."""
    from ddm.proto.ddm.v1 import ddm_pb2 as pb
    from ddm.proto.tensors import to_proto
    from ddm.router.client import ExpertClient

    v = torch.randn(2, 1, 8, 8)
    reply = pb.PredictResponse(v=to_proto(v))
    assert torch.equal(ExpertClient.velocity_of(reply, torch.empty(2, 1, 8, 8)), v)
    elsewhere = torch.empty(2, 1, 8, 8, device="cuda" if CUDA else "meta")
    assert ExpertClient.velocity_of(reply, elsewhere).device == elsewhere.device


# FD over 1280 EfficientNet features costs seconds (an eigh of 1280 x 1280), so one case of each pair
# embeds with the network and the other in pixel space (no network: nothing to announce).
SPEC_FEATURES = [("cpu", "pixels"), ("auto", "efficientnet-lite0")]


@pytest.mark.parametrize(("spec", "features"), SPEC_FEATURES)
def test_eval_runs_model_and_features_where_it_is_told(
    spec: str, features: str, tmp_path: Path, capsys
) -> None:
    ckpt = save(tmp_path / "ckpt", DiT(FM_EXPERT), {"kind": "expert", "name": "expert-0"}, 1)
    rc = cli.main(["eval", "--checkpoint", ckpt, "--num-samples", "10", "--steps", "2", "--real-samples", "10",
                   "--data", FMNIST, "--no-classifier", "--features", features, "--out", str(tmp_path / "eval"),
                   "--device", spec])  # fmt: skip
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    announced(cap.err, "eval: model", spec)
    if features == "pixels":
        assert "feature extractor" not in cap.err
    else:
        announced(cap.err, "eval: feature extractor efficientnet-lite0@96", spec)
    assert (tmp_path / "eval" / "metrics.json").exists()


@needs_no_cuda
def test_eval_refuses_cuda_here(tmp_path: Path, capsys) -> None:
    rc = cli.main(["eval", "--checkpoint", str(tmp_path / "none"), "--device", "cuda"])
    refused_cleanly(rc, capsys.readouterr().err, "eval")


def test_the_classifier_trains_and_predicts_on_its_device(tmp_path: Path) -> None:
    from ddm.expert.classifier import ClassifierTrainConfig, get_classifier
    from ddm.expert.config import DataConfig

    device = Placement.resolve("auto").device
    recipe = ClassifierTrainConfig(epochs=1, limit=256, batch_size=128)
    clf = get_classifier(DataConfig(path=FMNIST), str(tmp_path), recipe, device=device)
    assert next(clf.model.parameters()).device.type == device.type
    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    assert clf.predict(images).device.type == "cpu"  # predictions come back to the host
    again = get_classifier(DataConfig(path=FMNIST), str(tmp_path), recipe, device=device)  # from the cache
    assert again.loaded_from_cache and torch.equal(again.predict(images), clf.predict(images))


# ---------------------------------------------------------------------------------------------------
# servers: ddm serve expert / router (in-process, as the command builds them), ddm serve run


def _serve_args(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["serve", *argv, "--host", "127.0.0.1", "--port", "0"])


@pytest.mark.parametrize("spec", SPECS)
def test_serve_expert_and_router_run_where_told_and_say_so(spec: str, tmp_path: Path, capsys) -> None:
    from ddm.router.client import ExpertClient, RouterClient

    experts = [expert_checkpoint(tmp_path, k) for k in range(2)]
    router_checkpoint(tmp_path, 2)
    student_dir = student(tmp_path / "distill" / "checkpoints", EXPERT_CFG)
    servers = []
    try:
        for ckpt in experts:
            args = _serve_args("expert", "--checkpoint", ckpt, "--device", spec)
            servers.append(serve_cmd._build_expert(args, "127.0.0.1:0", None).start(timeout=60))
        err = capsys.readouterr().err
        announced(err, "expert server: expert-0", spec)
        announced(err, "expert server: expert-1", spec)
        with ExpertClient(f"127.0.0.1:{servers[0].port}") as client:
            x_t = torch.randn(3, 1, 8, 8)
            v = client.predict(x_t, torch.full((3,), 0.5), torch.tensor([0, 1, 3]))
            assert v.shape == x_t.shape and v.device.type == "cpu" and torch.isfinite(v).all()
        addresses = [a for s in servers for a in ("--expert", f"127.0.0.1:{s.port}")]
        args = _serve_args("router", "--run", str(tmp_path), *addresses, "--student", student_dir, "--device", spec,
                           "--steps", "2")  # fmt: skip
        servers.append(serve_cmd._build_router(args, "127.0.0.1:0", None).start(timeout=60))
        err = capsys.readouterr().err
        announced(err, "router server: router net", spec)
        announced(err, "router server: student", spec)
        with RouterClient(f"127.0.0.1:{servers[-1].port}") as client:
            images, info = client.sample(3, [0, 1, 3], steps=2, strategy="full", sampler="stochastic", seed=1)
            assert images.shape == (3, 1, 8, 8) and sum(info.expert_calls.values()) > 0
            images, info = client.sample(2, steps=2, model="student")
            assert images.shape == (2, 1, 8, 8) and info.expert_calls == {"student": 2}
    finally:
        for s in reversed(servers):
            s.stop(0)


def test_degraded_routing_keeps_its_mask_on_the_routers_device() -> None:
    """Dropping a lost expert's column works for probabilities on any device (a CPU mask would not
    broadcast against CUDA probabilities)."""
    from ddm.router.degraded import Degradation
    from ddm.router.remote import RemoteExpert

    device = Placement.resolve("auto").device
    experts = [RemoteExpert(f"127.0.0.1:{port}", connect_timeout=None) for port in (1, 2)]  # never called
    try:
        degradation = Degradation(experts, allowed=True)
        degradation.absent[1] = "lost"
        route = degradation.router(lambda x, t, y: torch.tensor([[0.2, 0.8], [0.0, 1.0]], device=device))
        probs = route(None, None, None)
        assert probs.device.type == device.type  # renormalised over the live expert, rows summing to 1
        assert torch.equal(probs.cpu(), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    finally:
        for e in experts:
            e.close()


@needs_no_cuda
@pytest.mark.parametrize("kind", ["expert", "router", "run"])
def test_serve_refuses_cuda_here_before_opening_a_port(
    kind: str, tmp_path: Path, capsys, restore_signals
) -> None:
    source = {"expert": ["--checkpoint", str(tmp_path)], "router": ["--run", str(tmp_path), "--expert", "127.0.0.1:1"],
              "run": [str(tmp_path)]}[kind]  # fmt: skip
    rc = cli.main(["serve", kind, *source, "--host", "127.0.0.1", "--port", "0", "--device", "cuda"])
    refused_cleanly(rc, capsys.readouterr().err, f"serve {kind}")


@pytest.mark.slow  # two expert server processes importing torch: ~10 s on 2 busy cores
def test_serve_run_passes_the_device_on_to_its_expert_processes(tmp_path: Path, capsys) -> None:
    from test_serve_stack import make_run

    from ddm.coordinator.stack import LocalStack

    make_run(tmp_path)
    stack = LocalStack(str(tmp_path), port=0, device=Placement.resolve("auto", field="--device")).start()
    try:
        for e in stack.experts:
            assert e.proc.args[-2:] == ["--device", "auto"]
            announced("\n".join(e.stderr_tail), f"expert server: {e.name}", "auto")
        announced(capsys.readouterr().err, "router server: router net", "auto")
    finally:
        stack.stop(1)


# ---------------------------------------------------------------------------------------------------
# the coordinator: run config `device`, ddm run, the in-process stages, ddm assign, ddm compare


def test_run_config_device_follows_the_policy(capsys) -> None:
    assert RunConfig().device == "auto"
    assert cli.main(["run", "--device", "cpu", "--print-config"]) == 0
    assert '"device": "cpu"' in capsys.readouterr().out
    assert cli.main(["run", "--set", "device=gpu0", "--print-config"]) == 2
    assert "device" in capsys.readouterr().err


@pytest.mark.parametrize("spec", SPECS)
def test_run_embeds_on_its_device_and_resumes_on_another(spec: str, tmp_path: Path, capsys) -> None:
    small = ["--set", "data.limit=32", "--set", "partition.k=2", "--set", "partition.fine_k=4", "--set",
             "partition.sample_size=32", "--set", "partition.embed_image_size=32", "--quiet"]  # fmt: skip
    assert cli.main(["run", "--root", str(tmp_path), *small, "--stages", "curate", "--device", spec]) == 0
    announced(capsys.readouterr().err, "curation embeddings: feature extractor efficientnet-lite0@32", spec)
    other = "auto" if spec == "cpu" else "cpu"
    assert (
        cli.main(["run", "--root", str(tmp_path), *small, "--stages", "curate,partition", "--device", other])
        == 0
    )
    assert Manifest.load(str(tmp_path)).data["config"]["device"] == other


@needs_no_cuda
def test_run_refuses_cuda_here_before_writing_anything(tmp_path: Path, capsys) -> None:
    rc = cli.main(["run", "--root", str(tmp_path / "r"), "--device", "cuda", "--quiet"])
    refused_cleanly(rc, capsys.readouterr().err, "run", setting="device")
    assert not (tmp_path / "r").exists()


def test_a_run_resumes_with_another_device(tmp_path: Path) -> None:
    """Where the coordinator's networks run is no part of what the run computed: resumable."""
    cfg = RunConfig(root=str(tmp_path))
    Manifest.open(str(tmp_path), cfg.model_dump(mode="json"))
    Manifest.open(str(tmp_path), cfg.model_copy(update={"device": "cpu"}).model_dump(mode="json"))
    old = cfg.model_dump(mode="json")
    old.pop("device")  # a manifest written before the setting existed
    (tmp_path / "manifest.json").unlink()
    Manifest.open(str(tmp_path), old)
    Manifest.open(str(tmp_path), cfg.model_dump(mode="json"))


@pytest.mark.parametrize("spec", SPECS)
def test_curation_embeddings_run_on_the_pipelines_device(spec: str, tmp_path: Path, capsys) -> None:
    from ddm.coordinator.curate import embed_dataset
    from ddm.coordinator.pipeline import Pipeline
    from ddm.expert.data import build_dataset

    cfg = fm_run(tmp_path).model_copy(update={"device": spec})
    pipe = Pipeline(cfg, None, None)  # type: ignore[arg-type]
    data = build_dataset(cfg.data.model_copy(update={"limit": 6}))
    feats = embed_dataset(
        data, cfg.partition, str(tmp_path / "emb.safetensors"), progress=False, placement=pipe.where()
    )
    assert feats.shape == (6, 1280) and pipe.where() is pipe.where()  # resolved once
    announced(capsys.readouterr().err, "curation embeddings: feature extractor efficientnet-lite0@32", spec)


@pytest.mark.parametrize(("spec", "features"), SPEC_FEATURES)
def test_eval_stage_and_distill_table_run_on_the_runs_device(
    spec: str, features: str, tmp_path: Path, capsys
) -> None:
    from ddm.coordinator.distill_stage import distill_table
    from ddm.coordinator.eval_stage import eval_context, load_experts, run_eval

    cfg = fm_run(tmp_path, features=features).model_copy(update={"device": spec})
    dirs = {f"expert-{k}": str(tmp_path / "experts" / f"expert-{k}") for k in range(2)}
    router = checkpoint.latest(str(tmp_path / "router" / "checkpoints"))
    results = run_eval(cfg, dirs, router, progress=False)  # placement: cfg.device, resolved here
    assert set(results) == {"top-1"} and np.isfinite(results["top-1"]["fd"])
    err = capsys.readouterr().err
    for what in ("eval: 2 model(s)", "eval: router net"):
        announced(err, what, spec)
    if features != "pixels":
        announced(err, "eval: feature extractor efficientnet-lite0@96", spec)

    placement = Placement.resolve(spec)
    context = eval_context(cfg, progress=False, placement=placement)
    table = distill_table(
        experts=load_experts(dirs, placement, purpose="distill table"), router_url=router,
        student_url=student(tmp_path / "distill" / "checkpoints", FM_EXPERT), context=context,
        ensemble_steps=[2], student_steps=[1], guidance=2.0, out_dir=str(tmp_path / "distill" / "eval"),
        say=lambda _: None, placement=placement,
    )  # fmt: skip
    assert [r["model"] for r in table["rows"]] == ["ensemble", "student"]
    err = capsys.readouterr().err
    for what in ("distill table: 2 model(s)", "distill table: router net", "distill table: student"):
        announced(err, what, spec)


def _partitioned(root: Path, cfg: RunConfig) -> None:
    """Mark the partition stage done with a clustering of random EfficientNet-sized features."""
    from ddm.coordinator.cluster import ClusterConfig, fit_clustering

    feats = np.random.default_rng(0).normal(size=(40, 1280)).astype(np.float32)
    clustering, _ = fit_clustering(feats, ClusterConfig(k=2, fine_k=4, sample_size=40, niter=2))
    clustering.save(str(root / "clusters" / "clustering"))
    manifest = Manifest.load(str(root))
    manifest.set_stage("partition", DONE)
    manifest.save()


@pytest.mark.parametrize("spec", SPECS)
def test_assign_embeds_on_its_device(spec: str, tmp_path: Path, capsys) -> None:
    _partitioned(tmp_path, fm_run(tmp_path))
    rc = cli.main(["assign", str(tmp_path), "--source", "fashion-mnist", "--path", FMNIST, "--limit", "6",
                   "--device", spec])  # fmt: skip
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert '"images": 6' in cap.out
    announced(cap.err, "assign: feature extractor efficientnet-lite0@32", spec)


def test_assign_without_device_uses_the_run_configs(tmp_path: Path, capsys) -> None:
    _partitioned(tmp_path, fm_run(tmp_path))
    assert (
        cli.main(["assign", str(tmp_path), "--source", "fashion-mnist", "--path", FMNIST, "--limit", "2"])
        == 0
    )
    announced(capsys.readouterr().err, "assign: feature extractor", "auto")  # the run's device = "auto"


@needs_no_cuda
def test_assign_refuses_cuda_here(tmp_path: Path, capsys) -> None:
    _partitioned(tmp_path, fm_run(tmp_path))
    rc = cli.main(
        ["assign", str(tmp_path), "--path", FMNIST, "--source", "fashion-mnist", "--device", "cuda"]
    )
    refused_cleanly(rc, capsys.readouterr().err, "assign")


def _monolith_trained(root: Path, cfg: RunConfig) -> None:
    """The matched monolith as if `ddm compare` had trained it already (its stages done, a checkpoint)."""
    from ddm.coordinator.compare import matched_monolith
    from ddm.coordinator.pipeline import expert_output

    mono = matched_monolith(cfg, str(root / "compare" / "monolith"))
    manifest = Manifest.open(mono.root, mono.model_dump(mode="json"))
    for stage in ("curate", "partition", "experts"):
        manifest.set_stage(stage, DONE)
    manifest.save()
    save(
        Path(expert_output(mono, "monolith")) / "checkpoints",
        DiT(FM_EXPERT),
        {"kind": "expert", "name": "monolith"},
        5,
    )


@pytest.mark.parametrize("spec", SPECS)
def test_compare_scores_on_its_device(spec: str, tmp_path: Path, capsys) -> None:
    cfg = fm_run(tmp_path)
    _monolith_trained(tmp_path, cfg)
    rc = cli.main(["compare", str(tmp_path), "--models", "top-1", "--quiet", "--device", spec])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "| monolith |" in cap.out and "| top-1 |" in cap.out
    for what in ("compare (monolith): monolith", "compare (experts): 2 model(s)", "eval: router net"):
        announced(cap.err, what, spec)


@needs_no_cuda
def test_compare_refuses_cuda_here(tmp_path: Path, capsys) -> None:
    fm_run(tmp_path)
    rc = cli.main(["compare", str(tmp_path), "--device", "cuda", "--quiet"])
    refused_cleanly(rc, capsys.readouterr().err, "compare")
    assert not (tmp_path / "compare").exists()
