"""bench/gpu.py on a machine without CUDA (one line, exit 0), its MFU arithmetic, the import check, the
ddm shim for bare machines and the training loop it times (on the CPU here; its CUDA path needs a GPU)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench/gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu = load_bench()


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the real check")
def test_quick_without_cuda_prints_one_line_and_exits_0():
    done = subprocess.run(
        [sys.executable, str(REPO / "bench/gpu.py"), "--quick"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == {"device": "cpu", "skipped": "no CUDA device"}


def test_mfu_is_achieved_over_peak():
    assert gpu.mfu(1e9, 100.0, 1e12) == pytest.approx(0.1)
    # DiT-XL/2 training: 3 x 2 x 118.617e9 FLOPs per image; 1,000 img/s against a 1 PFLOP/s matmul
    assert gpu.mfu(3 * 2 * 118.617e9, 1000.0, 1e15) == pytest.approx(0.7117, abs=1e-4)
    assert gpu.mfu(1e9, 0.0, 1e12) == 0.0
    with pytest.raises(ValueError, match="peak_flops"):
        gpu.mfu(1e9, 100.0, 0.0)


def test_missing_imports_name_the_wheels_to_carry():
    assert gpu.missing_imports({"json": "stdlib", "no_such_module_xyz": "xyz-wheel", "google.nope": "g"}) == [
        "xyz-wheel",
        "g",
    ]
    assert "pydantic" in gpu.PIPELINE_IMPORTS and "torchx" in gpu.PIPELINE_IMPORTS


def test_shim_makes_ddm_importable_without_installing_it(tmp_path):
    """python -S: no site-packages, so no installed ddm; the shim maps the repository's folders."""
    code = (
        "import importlib.util, sys, pathlib\n"
        f"spec = importlib.util.spec_from_file_location('g', {str(REPO / 'bench/gpu.py')!r})\n"
        "g = importlib.util.module_from_spec(spec); spec.loader.exec_module(g)\n"
        f"print(g.ensure_ddm_importable(pathlib.Path({str(tmp_path)!r})))\n"
        "import ddm.expert.model_cost as m, ddm.core.device\n"
        "print(m.__file__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    source, path = done.stdout.split()
    assert source == "shim" and path.endswith("ddm/expert/model_cost.py")


def test_training_loop_runs_and_reports_throughput():
    out = gpu.train_throughput(
        "DiT-T/8", batch_size=2, steps=1, warmup=1, device=torch.device("cpu"), compile_model=False,
        image={"image_size": 16, "in_channels": 4, "num_classes": 10}, precision="fp32",
    )  # fmt: skip
    assert out["images_per_s"] > 0 and out["train_flops_per_image"] > 0


def test_the_mfu_part_needs_only_torch():
    """The GPU machine lacks pydantic, faiss and torchx: part (b) must run with none of the pipeline's
    packages importable (a None entry in sys.modules makes an import fail)."""
    blocked = [m.split(".")[0] for m in gpu.PIPELINE_IMPORTS if m.split(".")[0] not in ("numpy",)]
    code = (
        "import sys, importlib.util, torch\n"
        f"for m in {blocked!r}: sys.modules[m] = None\n"
        f"spec = importlib.util.spec_from_file_location('g', {str(REPO / 'bench/gpu.py')!r})\n"
        "g = importlib.util.module_from_spec(spec); spec.loader.exec_module(g)\n"
        "out = g.train_throughput('DiT-T/8', batch_size=2, steps=1, warmup=0, device=torch.device('cpu'),\n"
        "    compile_model=False, image={'image_size': 16, 'in_channels': 4, 'num_classes': 10}, precision='fp32')\n"
        "print(g.mfu(out['train_flops_per_image'], out['images_per_s'], 1e12) > 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "True"
