"""Replacing an expert of a live router without downtime (router/replace.py, Router.ReplaceExpert,
``ddm serve replace``): under the closed-loop clients of bench/load.py nothing fails or is lost, the
switch happens between sampler steps, and what answers afterwards is the new checkpoint."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_fixtures import EXPERT_CFG, _randomise, expert_checkpoint, router_checkpoint
from test_grpc_cli import DDM, Proc
from test_serve_stack import make_run, servers_of

from ddm.core import checkpoint
from ddm.expert.load import load_denoiser
from ddm.expert.model import DiT
from ddm.expert.sampling import sample
from ddm.expert.server import ExpertServer
from ddm.router.client import RouterClient
from ddm.router.ensemble import Ensemble
from ddm.router.model import load_router
from ddm.router.replace import ExpertSet
from ddm.router.server import RouterServer, initial_noise

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import load as bench_load  # noqa: E402  (bench/load.py: its closed-loop clients)

TOKEN = "replace-secret"
LABELS = torch.tensor([0, 2, 1, 3])


def keep_loading(address: str, load: argparse.Namespace, tally, stop: threading.Event, lost: list[int]):
    """bench/load.py's closed-loop clients in rounds of 2 s until ``stop``: load before, during and after
    a replacement however long it takes; ``lost`` gets each round's unanswered calls."""

    def loop() -> None:
        while not stop.is_set():
            lost.append(bench_load.run_load(address, load, 2.0, tally))

    worker = threading.Thread(target=loop, daemon=True)
    worker.start()
    return worker


def new_checkpoint(directory: Path, name: str = "expert-1", step: int = 42) -> str:
    """A different set of weights for ``name`` at ``step`` (what a retrained expert would be)."""
    model = DiT(EXPERT_CFG)
    _randomise(model, seed=900 + step)
    state = model.state_dict()
    tensors = {
        **{f"model.{k}": v for k, v in state.items()},
        **{f"ema.{k}": v.clone() for k, v in state.items()},
    }
    meta = {"kind": "expert", "name": name, "arch": "DiT-tiny", "model": EXPERT_CFG.to_dict()}
    return checkpoint.save(str(directory), step, tensors, meta)


def in_process(dirs: list[str], router_dir: str, n: int, seed: int, steps: int) -> torch.Tensor:
    ensemble = Ensemble([load_denoiser(d) for d in dirs], load_router(router_dir), strategy="top-k", top_k=1)
    noise, gen = initial_noise(n, (1, 8, 8), seed)
    return sample(ensemble.guided(2.0), noise, LABELS[:n], steps=steps, sampler="euler", generator=gen)


def test_a_lease_holds_its_experts_until_the_step_ends() -> None:
    a, b, c = object(), object(), object()
    experts = ExpertSet([a, b])
    lease = experts.lease()
    assert experts.swap(1, c) is b and lease.stale and lease.experts == [a, b]  # the step in flight keeps b
    assert not experts.wait_unused(b, 0.05)  # b has not drained
    threading.Timer(0.1, lambda: setattr(holder, "lease", holder.lease.renew())).start()
    holder = argparse.Namespace(lease=lease)
    assert experts.wait_unused(b, 5)  # renewed between steps: b is free, the new lease has c
    assert holder.lease.experts == [a, c] and not holder.lease.stale
    holder.lease.release()
    assert experts.wait_unused(c, 0)


@pytest.mark.slow  # ~40 s here: three expert servers and a router in process, 8 s of load
def test_replace_under_load_loses_nothing_and_serves_the_new_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "run"
    dirs = [expert_checkpoint(root, k) for k in range(2)]
    router_dir = router_checkpoint(root, 2)
    new_dir = tmp_path / "retrained"
    new_url = new_checkpoint(new_dir)
    experts = [ExpertServer(d, token=TOKEN).start(timeout=30) for d in dirs]
    replacement = ExpertServer(str(new_dir), token=TOKEN).start(timeout=30)
    router = RouterServer(router_dir, [e.target for e in experts], token=TOKEN, expert_token=TOKEN,
                          max_concurrent=4, max_queue=64).start(timeout=30)  # fmt: skip
    seen: list = []
    router.on_replaced.append(seen.append)
    load = argparse.Namespace(n=2, steps=6, timeout=30.0, clients=6, soak=False, token=TOKEN)
    tally = bench_load.Tally()
    lost: list[int] = []
    try:
        with RouterClient(router.target, token=TOKEN) as client:
            with RouterClient(router.target) as anonymous, pytest.raises(grpc.RpcError) as denied:
                anonymous.replace_expert("expert-1", address=replacement.target)
            assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED  # admin calls need the token
            for bad, why in [
                (dict(expert="expert-7", address=replacement.target), "no expert 'expert-7'"),
                (dict(expert="expert-0", address=replacement.target), "serves 'expert-1', not 'expert-0'"),
                (dict(expert="expert-1", checkpoint=new_url), "this router starts no expert servers"),
            ]:
                with pytest.raises(grpc.RpcError) as err:
                    client.replace_expert(**bad)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in err.value.details()
            assert [s.info.step for s in client.list_experts()] == [7, 7]  # nothing changed

            stop = threading.Event()
            worker = keep_loading(router.target, load, tally, stop, lost)
            time.sleep(3.0)  # the clients are mid-sample
            before = tally.ok
            reply = client.replace_expert("expert-1", address=replacement.target, drain_timeout=30)
            experts[1].stop(0)  # the old server goes away at once: nothing may still need it
            at_switch = tally.ok
            time.sleep(3.0)  # and the load goes on
            stop.set()
            worker.join(timeout=120)
            assert reply.drained and reply.previous.step == 7 and reply.current.step == 42
            assert reply.current.checkpoint == new_url and reply.previous_address == experts[1].target
            assert seen and seen[0].current.checkpoint == new_url  # the hook a manifest can record from
            assert [(s.info.step, s.info.checkpoint) for s in client.list_experts()][1] == (42, new_url)
            assert client.info().ready and not client.info().down_experts
            # after the switch the answers come from the new checkpoint: same seed, the new expert's images
            _, info = client.sample(
                2, LABELS[:2], guidance=2.0, steps=6, strategy="top-k", top_k=1, seed=3, include_float=True
            )
            want = in_process([dirs[0], str(new_dir)], router_dir, 2, 3, 6)
            torch.testing.assert_close(info.samples, want, atol=1e-5, rtol=1e-5)
            old = in_process(dirs, router_dir, 2, 3, 6)
            assert (old - want).abs().max() > 1e-3  # the two checkpoints differ, so the check can fail
    finally:
        router.stop(0)
        for e in [*experts, replacement]:
            e.stop(0)
    print(f"replace under load: {tally.ok} ok ({before} before the switch), {tally.shed} shed, {tally.errors} errors, "
          f"lost {lost}; switch {reply.switch_seconds:.3f} s, drain {reply.drain_seconds:.3f} s")  # fmt: skip
    assert tally.errors == 0 and set(lost) == {0}, (tally.error_kinds, lost)
    assert before > 0 and tally.ok > at_switch  # served before and after the switch
    assert tally.started == tally.ok + tally.shed


@pytest.mark.slow  # ~40-60 s: `ddm serve run` (three expert processes over its life) under load
def test_ddm_serve_replace_swaps_a_supervised_expert_under_load(tmp_path: Path) -> None:
    root = tmp_path / "run"
    make_run(root)
    new_url = new_checkpoint(tmp_path / "retrained")
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    stack = Proc([*DDM, "serve", "run", str(root), "--host", "127.0.0.1", "--port", "0", "--token-file", str(token),
                  "--steps", "4"])  # fmt: skip
    load = argparse.Namespace(n=2, steps=4, timeout=60.0, clients=3, soak=False, token=TOKEN)
    tally = bench_load.Tally()
    lost: list[int] = []
    try:
        port = stack.wait_for(r"serving router over 2 experts on 127\.0\.0\.1:(\d+)", timeout=120).group(1)
        address = f"127.0.0.1:{port}"
        old_pids = set(servers_of(root))
        stop = threading.Event()
        worker = keep_loading(address, load, tally, stop, lost)
        time.sleep(2.0)
        done = subprocess.run(
            [*DDM, "serve", "replace", "expert-1", "--checkpoint", new_url, "--router", address,
             "--token-file", str(token)],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        reply = json.loads(done.stdout.strip().splitlines()[-1])
        assert (
            reply["current"]["step"] == "42" and reply["current"]["checkpoint"] == new_url
        )  # int64: a string
        assert reply["previous"]["step"] == "7" and reply["drained"] is True
        at_switch = tally.ok
        time.sleep(3.0)
        stop.set()
        worker.join(timeout=120)
        assert tally.ok > at_switch  # answered after the switch too
        with RouterClient(address, token=TOKEN) as client:
            assert [s.info.checkpoint for s in client.list_experts()][1] == new_url
        now = set(
            servers_of(root)
        )  # expert-0 stays; the old expert-1 is gone (the new one serves another dir)
        assert len(old_pids & now) == 1
        code, err = stack.terminate()
        assert code == 0, err
        assert "restarting it" not in err  # the supervisor let the retired server go
    finally:
        if stack.p.poll() is None:
            stack.p.kill()
    print(f"ddm serve replace under load: {tally.ok} ok, {tally.shed} shed, {tally.errors} errors, lost {lost}; "
          f"switch {reply['switch_seconds']:.3f} s, drain {reply['drain_seconds']:.3f} s")  # fmt: skip
    assert tally.errors == 0 and set(lost) == {0} and tally.ok > 0, (tally.error_kinds, lost)
