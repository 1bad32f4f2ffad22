"""`ddm models`: the architecture table at the paper's ImageNet shape, JSON output, bad input named."""

import json
import subprocess
import sys

from ddm.coordinator.cli import main


def test_table_shows_xl2_as_published(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    xl2 = next(line for line in out.splitlines() if line.startswith("DiT-XL/2 "))
    assert "675M" in xl2 and "118.6" in xl2 and " 256 " in xl2  # 32x32x4 latents, patch 2: 256 tokens
    for arch in ("DiT-B/2", "DiT-3B/2", "Router-B/2", "Router-T/4"):
        assert any(line.startswith(arch + " ") for line in out.splitlines())


def test_json_for_one_arch(capsys):
    assert main(["models", "--arch", "DiT-XL/2", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["arch"] == "DiT-XL/2" and row["kind"] == "expert" and row["tokens"] == 256
    assert round(row["parameters"] / 1e6) == 675 and round(row["gflops"], 1) == 118.6
    assert abs(row["flops"] / 2e9 - row["gflops"]) < 1e-3  # flops: two per multiply-add


def test_other_shapes_and_router_outputs(capsys):
    shape = ["--image-size", "28", "--channels", "1", "--num-classes", "10", "--num-experts", "4"]
    assert main(["models", *shape, "--arch", "Router-T/4", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["tokens"] == 49 and row["kind"] == "router"


def test_wrong_arch_names_the_choices(capsys):
    assert main(["models", "--arch", "DiT-Q/3"]) == 2
    err = capsys.readouterr().err
    assert "DiT-Q/3" in err and "DiT-XL/2" in err and "Router-B/2" in err


def test_a_patch_that_does_not_divide_the_image(capsys):
    assert main(["models", "--image-size", "28", "--arch", "DiT-B/8"]) == 2
    assert "not divisible by patch_size" in capsys.readouterr().err
    assert main(["models", "--image-size", "28"]) == 0  # the full table marks those rows instead
    assert "DiT-B/8" in capsys.readouterr().out


def test_help_does_not_import_torch():
    """The module imports torch only in run(). (Other commands' add_arguments import the run config,
    which reaches torch through the DiT registry, so this checks models_cmd on its own parser.)"""
    code = (
        "import argparse, sys; from ddm.coordinator import models_cmd\n"
        "p = argparse.ArgumentParser(prog='ddm models'); models_cmd.add_arguments(p)\n"
        "try: p.parse_args(['--help'])\nexcept SystemExit: pass\n"
        "assert 'torch' not in sys.modules, 'torch imported for --help'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--num-classes" in r.stdout
