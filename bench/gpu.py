"""GPU check: the tiny pipeline on CUDA through the real CLI, and training MFU of paper-sized experts.

    python bench/gpu.py [--quick] [--skip-pipeline] [--workdir DIR] [--budget-s 420]

Without a CUDA device it prints one line, ``{"device": "cpu", "skipped": "no CUDA device"}``, and exits 0
(``make bench`` runs every bench file with ``--quick`` on CPU machines too). With CUDA, in one call of a
few minutes:

(b) first, training throughput and MFU (needs only torch and ddm's model files): DiT-B/2 at batch 256,
    and DiT-XL/2 at batch 64 unless --quick, on random 32x32x4 latents (ImageNet 256 px through the SD
    VAE, 1000 classes), AdamW step with bf16 autocast, images/s from a timed loop after warm-up between
    ``torch.cuda.synchronize()`` calls. MFU = 3 x forward FLOPs per image (``ddm.expert.model_cost``, 2
    FLOPs per multiply-add) x images/s / the bf16 ``torch.mm`` FLOP/s measured in the same run (8192^2
    products) -- the practical peak of this GPU, not the datasheet's. ``compile_speedup`` = images/s
    with ``torch.compile`` / without, same model and batch. A batch that does not fit is halved once.
(a) then the tiny pipeline (configs/tiny.toml) through the real CLI in subprocesses: ``ddm run`` (curate,
    partition, 2 experts, router, eval, distil) with every training stage on ``device = "cuda"``, then
    ``ddm serve run`` and ``ddm sample --router`` over gRPC on loopback, as .ci/run does; the outputs must
    exist. The in-process stages (curation, eval, distill table) take the run config's ``device`` and the
    servers ``--device``, all set to cuda; the
    data is Fashion-MNIST when /usr/share/datasets/fashion-mnist exists, else a generated image folder.
    Its imports are checked first: when one is missing, ``pipeline_ok`` is false with the reason and part
    (b) still runs. A failing step's stderr tail is printed above the JSON line.

Prints readable lines, then one JSON object as the LAST line: device, images_per_s, mfu_bf16,
compile_speedup, pipeline_ok, model, batch_size, mm_tflops_bf16, and per-model figures under ``models``.

ddm on a bare machine: when ``ddm`` is not installed, the script maps the repository's folders to the
``ddm`` package in a temporary directory on PYTHONPATH (as pyproject's package-dir does), for itself
and every process it starts; no pip install is needed.

Carrying wheels to a machine without them (no network there). Here, into the git-ignored wheels/:

    pip download --python-version 3.12 --platform manylinux2014_x86_64 --only-binary=:all: \\
        -c requirements/constraints.txt -d wheels \\
        pydantic pydantic-core annotated-types typing-inspection typing-extensions \\
        torchx faiss-cpu fsspec pyyaml grpcio-health-checking grpcio-reflection pillow

(pip resolves the rest, e.g. torchx's docstring-parser, pyre-extensions, tabulate, filelock; grpcio
and protobuf come along and should match the machine's). There, before the check:

    pip install --no-index --find-links wheels pydantic torchx faiss-cpu fsspec pyyaml \\
        grpcio-health-checking grpcio-reflection pillow && python bench/gpu.py
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LATENT = {"image_size": 32, "in_channels": 4, "num_classes": 1000}  # the paper's ImageNet experts

# module the pipeline imports -> the wheel that provides it (what to carry when it is missing)
PIPELINE_IMPORTS = {
    "pydantic": "pydantic (+ pydantic-core, annotated-types, typing-inspection)",
    "torchx": "torchx",
    "faiss": "faiss-cpu",
    "fsspec": "fsspec",
    "yaml": "pyyaml",
    "grpc": "grpcio",
    "grpc_health": "grpcio-health-checking",
    "grpc_reflection": "grpcio-reflection",
    "google.protobuf": "protobuf",
    "safetensors": "safetensors",
    "PIL": "pillow",
    "numpy": "numpy",
    "scipy": "scipy",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "prometheus_client": "prometheus-client",
}


def mfu(flops_per_image: float, images_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s (FLOPs per image x images/s) over the peak FLOP/s.

    ``flops_per_image`` is per training image, i.e. 3 x the forward FLOPs (forward + backward ~ 2x)."""
    if flops_per_image <= 0 or images_per_s < 0 or peak_flops <= 0:
        raise ValueError(
            f"mfu needs flops_per_image > 0, images_per_s >= 0 and peak_flops > 0 "
            f"(got {flops_per_image}, {images_per_s}, {peak_flops})"
        )
    return flops_per_image * images_per_s / peak_flops


def missing_imports(modules: dict[str, str] = PIPELINE_IMPORTS) -> list[str]:
    """The wheels to carry for the modules that this Python cannot import."""
    missing = []
    for module, wheel in modules.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a missing parent package (google for google.protobuf)
            found = False
        if not found:
            missing.append(wheel)
    return missing


# ----------------------------------------------------------------------------------------------------
# ddm importable without installing it


def ensure_ddm_importable(tmp: Path) -> str:
    """'installed', or 'shim': the repository's folders mapped to the ddm package under ``tmp``, put on
    sys.path and PYTHONPATH (every subprocess, TorchX jobs included, inherits the environment)."""
    if importlib.util.find_spec("ddm") is not None and _has_subpackage("ddm.expert"):
        return "installed"
    sys.modules.pop("ddm", None)  # the bare ddm/ folder, found on sys.path without its subpackages
    shim = tmp / "ddm-path"
    pkg = shim / "ddm"
    pkg.mkdir(parents=True, exist_ok=True)
    for name in ("__init__.py", "__main__.py", "configs"):
        (pkg / name).symlink_to(REPO / "ddm" / name)
    for name in ("core", "expert", "router", "coordinator", "proto"):
        (pkg / name).symlink_to(REPO / name)
    sys.path.insert(0, str(shim))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH")) if p)
    return "shim"


def _has_subpackage(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


# ----------------------------------------------------------------------------------------------------
# (b) throughput and MFU


def mm_flops(dtype_name: str = "bfloat16", n: int = 8192, reps: int = 20, rounds: int = 3) -> float:
    """Best sustained torch.mm FLOP/s of n x n products on the current CUDA device."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    rates = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        torch.cuda.synchronize()
        rates.append(reps * 2 * n**3 / (time.perf_counter() - start))
    del a, b
    torch.cuda.empty_cache()
    return max(rates)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_throughput(
    arch: str, *, batch_size: int, steps: int, warmup: int, device: Any, compile_model: bool,
    image: dict[str, int] = LATENT, precision: str = "bf16",
) -> dict[str, float]:  # fmt: skip
    """images/s of forward + flow loss + backward + AdamW on one fixed random batch; the first
    ``warmup`` steps (the compile, with torch.compile) are timed separately and left out."""
    import torch

    from ddm.core import device as policy
    from ddm.expert import flow
    from ddm.expert.model import DiT, dit_config

    torch.manual_seed(0)
    net = DiT(dit_config(arch, **image)).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_fn = torch.compile(net) if compile_model else net
    n, c, s = batch_size, image["in_channels"], image["image_size"]
    x_0, eps = torch.randn(n, c, s, s, device=device), torch.randn(n, c, s, s, device=device)
    t = torch.rand(n, device=device)
    y = torch.randint(0, image["num_classes"] + 1, (n,), device=device)

    def step() -> None:
        x_t = flow.interpolate(x_0, eps, t)
        with policy.autocast(precision, device):
            v_pred = step_fn(x_t, t, y)
        loss = flow.flow_loss(v_pred, x_0, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    _sync(device)
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    elapsed = time.perf_counter() - start
    flops = 3 * net.flops_per_image()
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    net = opt = step_fn = None  # free the GPU memory before empty_cache (the closure holds them too)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return {
        "images_per_s": n * steps / elapsed,
        "ms_per_step": elapsed / steps * 1e3,
        "warmup_s": warmup_s,
        "train_flops_per_image": flops,
        "peak_mem_gib": peak_mem,
    }


def measure_model(arch: str, batch_size: int, *, steps: int, device: Any, peak: float, compile_model: bool,
                  say: Any) -> dict[str, Any]:  # fmt: skip
    """Eager (and compiled) throughput and MFU of one model; an out-of-memory batch is halved once."""
    import torch

    for attempt in range(2):
        try:
            eager = train_throughput(arch, batch_size=batch_size, steps=steps, warmup=3, device=device,
                                     compile_model=False)  # fmt: skip
            break
        except torch.cuda.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
            if attempt:
                raise
            say(f"{arch}: batch {batch_size} does not fit; trying {batch_size // 2}")
            batch_size //= 2
    out: dict[str, Any] = {
        "batch_size": batch_size,
        "images_per_s": eager["images_per_s"],
        "ms_per_step": eager["ms_per_step"],
        "mfu_bf16": mfu(eager["train_flops_per_image"], eager["images_per_s"], peak),
        "train_gflops_per_image": eager["train_flops_per_image"] / 1e9,
        "peak_mem_gib": eager["peak_mem_gib"],
    }
    say(f"{arch} batch {batch_size}: eager {eager['images_per_s']:.0f} img/s "
        f"({eager['ms_per_step']:.1f} ms/step), MFU {out['mfu_bf16']:.1%} of measured bf16 mm, "
        f"peak memory {eager['peak_mem_gib']:.1f} GiB")  # fmt: skip
    if compile_model:
        try:
            compiled = train_throughput(arch, batch_size=batch_size, steps=steps, warmup=3, device=device,
                                        compile_model=True)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - e.g. no C compiler for Triton: keep the eager figures
            gc.collect()
            torch.cuda.empty_cache()
            out["compile_error"] = f"{type(e).__name__}: {str(e)[:500]}"
            say(f"{arch} compiled: failed, {out['compile_error']}")
            return out
        out.update(
            images_per_s_compiled=compiled["images_per_s"],
            mfu_bf16_compiled=mfu(compiled["train_flops_per_image"], compiled["images_per_s"], peak),
            compile_speedup=compiled["images_per_s"] / eager["images_per_s"],
            compile_warmup_s=compiled["warmup_s"],
        )
        say(f"{arch} compiled: {compiled['images_per_s']:.0f} img/s, {out['compile_speedup']:.2f}x eager "
            f"(first 3 steps incl. compile {compiled['warmup_s']:.0f} s)")  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------
# (a) the tiny pipeline through the CLI


class StepFailed(RuntimeError):
    def __init__(self, step: str, detail: str):
        super().__init__(f"{step}: {detail}")
        self.step, self.detail = step, detail


def ddm_cli(*args: str, timeout: float, step: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m ddm ARGS`` from ``cwd``; StepFailed with the stderr tail unless it exits 0 in time."""
    cmd = [sys.executable, "-m", "ddm", *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False)
    except subprocess.TimeoutExpired as e:
        tail = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        raise StepFailed(step, f"timed out after {timeout:.0f} s\n{tail[-3000:]}") from None
    if done.returncode != 0:
        raise StepFailed(step, f"exit {done.returncode}\n{done.stderr[-3000:]}")
    return done


def synthetic_image_folder(root: Path, classes: int = 10, per_class: int = 60, size: int = 28) -> Path:
    """A class-conditional image folder (one sub-folder per class) of 28x28 grayscale PNGs: class k is a
    bright bar at angle k*18 degrees on noise, so clusters, router and samples have structure to find."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] - (size - 1) / 2
    for k in range(classes):
        (root / f"class-{k}").mkdir(parents=True, exist_ok=True)
        angle = np.pi * k / classes
        dist = np.abs(xx * np.sin(angle) - yy * np.cos(angle))
        for i in range(per_class):
            img = 200 * np.exp(-((dist / (1.5 + rng.random())) ** 2)) + rng.normal(30, 15, (size, size))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / f"class-{k}" / f"{i}.png")
    return root


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # tiny.toml's data (Debian's package)


def run_pipeline(work: Path, *, device: str = "cuda", fashion_mnist: Path | None = FASHION_MNIST,
                 say: Any = print) -> dict[str, Any]:  # fmt: skip
    """ddm run (tiny) -> ddm serve run -> ddm sample --router; raises StepFailed with the failing step.

    Every process runs from ``work``, not the repository: ``python -m`` puts its working directory first
    on sys.path, where the repository's bare ddm/ folder would hide the installed (or shimmed) package."""
    root = work / "tiny"
    overrides = [f"{stage}.train.device={device}" for stage in ("experts", "router", "distill")]
    overrides.append(f"device={device}")  # the in-process stages: curation embeddings, eval, distill table
    if fashion_mnist is not None and fashion_mnist.is_dir():
        data = "fashion-mnist"
    else:
        data = "generated image folder"
        folder = synthetic_image_folder(work / "images")
        overrides += ["data.source=image-folder", f"data.path={folder}"]
    sets = [a for o in overrides for a in ("--set", o)]
    start = time.perf_counter()
    tiny = str(REPO / "configs/tiny.toml")
    ddm_cli("run", tiny, "--root", str(root), "--quiet", *sets, timeout=600, step="ddm run", cwd=work)
    run_s = time.perf_counter() - start
    say(f"pipeline: ddm run (tiny, {data}, every stage on {device}) took {run_s:.0f} s")
    expected = [root / "eval/top-1/samples.png", root / "distill/eval/student-4/samples.png"]
    absent = [str(p.relative_to(root)) for p in expected if not p.is_file() or p.stat().st_size == 0]
    if absent:
        raise StepFailed("ddm run outputs", f"missing under {root}: {', '.join(absent)}")

    from ddm.coordinator.stack import free_ports

    port = free_ports(1)[0]
    log_path = work / "serve.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "ddm", "serve", "run", str(root), "--host", "127.0.0.1", "--port", str(port),
             "--device", device],
            stdout=log, stderr=subprocess.STDOUT, cwd=work, text=True,
        )  # fmt: skip
    try:
        deadline = time.time() + 180
        while "serving router" not in log_path.read_text():
            if server.poll() is not None or time.time() > deadline:
                why = "no router after 180 s" if server.returncode is None else f"exit {server.returncode}"
                raise StepFailed("ddm serve run", f"{why}\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        served = work / "served.png"
        ddm_cli("sample", "--router", f"127.0.0.1:{port}", "--n", "8", "--steps", "8", "--out", str(served),
                timeout=180, step="ddm sample --router", cwd=work)  # fmt: skip
        if not served.is_file() or served.stat().st_size == 0:
            raise StepFailed("ddm sample --router", f"{served} was not written")
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    return {"pipeline_s": time.perf_counter() - start, "pipeline_data": data}


# ----------------------------------------------------------------------------------------------------


def say(line: str) -> None:
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="DiT-B/2 only, fewer timed steps (2-3 minutes)")
    parser.add_argument("--skip-pipeline", action="store_true", help="only the throughput/MFU part (b)")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed training steps per model (default 30, 10 with --quick)"
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="keep the pipeline's run root and logs here (default: a temporary one)",
    )
    parser.add_argument(
        "--budget-s", type=float, default=420,
        help="DiT-XL/2 is compiled only if less than half of this many seconds has been spent so far",
    )  # fmt: skip
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"device": "cpu", "skipped": "no CUDA device"}))
        return 0

    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        work = Path(args.workdir).resolve() if args.workdir else tmp / "work"
        work.mkdir(parents=True, exist_ok=True)
        ddm_source = ensure_ddm_importable(tmp)
        from ddm.core import device as policy

        device = policy.resolve("cuda")
        policy.configure(device)
        name = torch.cuda.get_device_name(device)
        say(
            f"torch {torch.__version__}, CUDA {torch.version.cuda}, {policy.describe(device)}, ddm {ddm_source}"
        )

        peak = mm_flops("bfloat16")
        say(f"torch.mm 8192^2 bf16: {peak / 1e12:.1f} TFLOP/s (the MFU denominator)")
        steps = args.steps or (10 if args.quick else 30)
        plan = [("DiT-B/2", 256)] + ([] if args.quick else [("DiT-XL/2", 64)])
        models: dict[str, Any] = {}
        for arch, batch in plan:
            compile_model = arch == "DiT-B/2" or time.perf_counter() - began < args.budget_s / 2
            try:
                models[arch] = measure_model(arch, batch, steps=steps, device=device, peak=peak,
                                             compile_model=compile_model, say=say)  # fmt: skip
            except Exception as e:  # noqa: BLE001 - report and go on to the next model and the pipeline
                say(f"{arch}: failed: {type(e).__name__}: {str(e)[:500]}")
                models[arch] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}

        out: dict[str, Any] = {"device": name, "torch": torch.__version__, "ddm": ddm_source}
        if args.skip_pipeline:
            out.update(pipeline_ok=None, pipeline_error="skipped (--skip-pipeline)")
        elif missing := missing_imports():
            reason = f"missing: {', '.join(missing)}; carry wheels (see bench/gpu.py's docstring)"
            say(f"pipeline: not run, {reason}")
            out.update(pipeline_ok=False, pipeline_error=reason)
        else:
            try:
                out.update(run_pipeline(work, device="cuda", say=say), pipeline_ok=True)
                say("pipeline: ok (ddm run, ddm serve run, ddm sample --router)")
            except StepFailed as e:
                say(f"pipeline: FAILED at {e.step}\n{e.detail}")
                out.update(pipeline_ok=False, pipeline_error=f"{e.step}: {e.detail.splitlines()[0]}")
        out["pipeline_note"] = (
            "every stage, the expert servers and the router on cuda (run config device, train.device, --device)"
        )

        head = models.get("DiT-B/2", {})
        out.update(
            model="DiT-B/2",
            batch_size=head.get("batch_size"),
            images_per_s=head.get("images_per_s"),
            mfu_bf16=head.get("mfu_bf16"),
            compile_speedup=head.get("compile_speedup"),
            images_per_s_compiled=head.get("images_per_s_compiled"),
            mm_tflops_bf16=peak / 1e12,
            image="32x32x4 latents, 1000 classes",
            steps=steps,
            models=models,
            seconds=time.perf_counter() - began,
        )
    print(json.dumps(_rounded(out)))
    sys.stdout.flush()
    return 0


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


if __name__ == "__main__":
    raise SystemExit(main())
