"""`ddm run` in latent space end to end: a generated RGB folder of shapes, a small random diffusers
AutoencoderKL (save_pretrained), real TorchX expert and router jobs on latents, FD in pixel space, then
`ddm serve run` and a Sample through gRPC that returns decoded pixel images."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from latent_fixtures import shapes_folder, tiny_vae
from test_grpc_cli import DDM, Proc

from ddm.router.client import RouterClient

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]  # over 10 min at load 25 on 2 cores

CONFIG = """
name = "latent"
root = "{root}"
[data]
source = "image-folder"
path = "{data}"
image_size = 16
channels = 3
[latent]
autoencoder = "diffusers-kl"
path = "{vae}"
batch_size = 32
[partition]
k = 2
fine_k = 8
sample_size = 80
niter = 5
encoder = "pixels"
tolerance = 0.2
[experts]
poll_seconds = 0.5
[experts.model]
num_classes = 2
[experts.train]
steps = 6
batch_size = 8
warmup_steps = 2
checkpoint_every = 6
num_threads = 1
loader_workers = 0
[router.model]
arch = "Router-XS/4"
num_classes = 2
[router.train]
steps = 4
batch_size = 8
checkpoint_every = 4
num_threads = 1
loader_workers = 0
[router.eval]
samples_per_bin = 2
[eval]
features = "pixels"
classifier = false
num_samples = 10
real_samples = 40
models = ["top-1"]
[eval.sample]
steps = 2
[distill]
enabled = false
"""


def test_ddm_run_in_latent_space_serves_decoded_pixels(tmp_path):
    data, vae, root = (
        shapes_folder(tmp_path / "shapes", size=16),
        tiny_vae(tmp_path / "vae"),
        tmp_path / "run",
    )
    cfg = tmp_path / "latent.toml"
    cfg.write_text(CONFIG.format(root=root, data=data, vae=vae))
    run = subprocess.run(
        [sys.executable, "-m", "ddm", "run", str(cfg)], capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    index = json.loads((root / "latents" / "index.json").read_text())
    assert index["latent_shape"] == [4, 8, 8] and index["image_shape"] == [3, 16, 16] and index["count"] == 80
    part = json.loads((root / "partitions" / "expert-0" / "index.json").read_text())
    assert part["dtype"] == "float16" and part["image_shape"] == [4, 8, 8]
    assert part["meta"]["latent"]["scale"] == index["scale"]  # the scale travels with the partition
    metrics = json.loads((root / "eval" / "top-1" / "metrics.json").read_text())
    assert metrics["fd"] > 0  # scored in pixel space: the real set is 3 x 16 x 16 pixels

    stack = Proc([*DDM, "serve", "run", str(root), "--host", "127.0.0.1", "--port", "0", "--steps", "2"])
    try:
        port = stack.wait_for(r"serving router over 2 experts on 127\.0\.0\.1:(\d+)", timeout=180).group(1)
        with RouterClient(f"127.0.0.1:{port}", timeout=120) as client:
            info = client.info()
            assert list(info.image_shape) == [4, 8, 8] and list(info.output_shape) == [3, 16, 16]
            assert info.autoencoder == "diffusers-kl"
            images, _ = client.sample(3, labels=[0, 1, 0])
        assert tuple(images.shape) == (3, 3, 16, 16) and str(images.dtype) == "torch.uint8"
        assert int(images.max()) > int(images.min())  # decoded pictures, not a constant
        stack.p.send_signal(signal.SIGTERM)  # three processes to stop: slow on a loaded machine
        assert stack.wait(180) == 0, stack.stderr
    finally:
        if stack.p.poll() is None:
            stack.p.kill()
