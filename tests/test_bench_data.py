"""``bench/data.py`` runs and emits its figures: a small version of ``--quick`` (fewer, smaller images;
no in-memory contrast), so it checks the script and the keys, not the targets, which need ``--quick``'s
sizes to mean anything (the streamed reader's laziness is pinned by tests/test_stream.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from latent_fixtures import tiny_vae

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~25 s on two free cores (two subprocesses, 4 steps each), minutes on a loaded machine
def test_bench_data_emits_its_figures(tmp_path: Path) -> None:
    vae = tiny_vae(tmp_path / "vae")  # the SD-VAE architecture is --quick's default; a tiny one here
    done = subprocess.run(
        [sys.executable, str(REPO / "bench/data.py"), "--quick", "--n", "300", "--size", "32", "--steps", "4",
         "--no-in-memory", "--vae", str(vae), "--latent-images", "8"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("rss_mb_small", "rss_mb_large", "rss_ratio", "loader_headroom"):
        assert isinstance(out[key], float) and out[key] > 0, (key, out)
    assert out["latent_encode_images_per_s"] > 0 and out["latent_shape"] == [4, 16, 16]
    assert out["n_large"] == 10 * out["n_small"] == 3000
    assert out["rss_ratio"] == round(out["rss_mb_large"] / out["rss_mb_small"], 3)
