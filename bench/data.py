"""Data-path benchmark: an expert's memory must not grow with its partition, and the loader must keep up.

    python bench/data.py [--quick] [--n N] [--size S] [--workers W] [--steps K] [--batch-size B]

Writes two partitions of random RGB images of one size (``ShardWriter``, chunk by chunk), N and 10·N
images, then runs, each in its own subprocess so that peak RSS is its own:

  * an expert job (``ddm.expert.trainer.train``, DiT-T/4, one thread) training K steps on each partition
    through the streamed reader and ``train.loader_workers`` DataLoader workers: ``rss_mb_small``,
    ``rss_mb_large`` = peak RSS of the training process (``ru_maxrss``), ``rss_ratio`` = large / small
    (target <= 1.2), and the workers' peak (``worker_rss_mb_*``, max over the worker processes);
  * in the same process after training, the data path alone (the same sampler and loader, no model):
    ``loader_images_per_s``; ``loader_headroom`` = that / the images per second the trainer consumed
    (steps 2..K-1, so neither the first step nor the final checkpoint counts) (target >= 2);
  * for contrast, the same two jobs with the partition read whole into memory (``read_shards``, what the
    trainers did before streaming): ``rss_mb_*_in_memory``, ``rss_ratio_in_memory`` - the figure the
    streamed reader exists to keep near 1.

``latent_encode_images_per_s``: images per second the latent cache (``ddm.coordinator.latents.
encode_dataset``: uint8 -> model range -> ``AutoencoderKL.encode`` -> float16 chunks with their sums, written
to disk) encodes at this size, with ``--vae DIR`` (a diffusers AutoencoderKL directory) or, by default, a
randomly initialised AutoencoderKL of the SD-VAE architecture (4 levels of 128-512 channels, 4 latent
channels; throughput depends on the architecture, not the weights), ``--latent-images`` images, one
process, ``--threads`` threads. ``--latent-only`` measures that alone. Prints readable lines, then one JSON
object as the LAST line. ``--quick`` (N = 2,000 at 64x64, 6 steps of 16) takes about a minute on two free cores, several on a
loaded one. ``worker_rss_mb_*`` counts the pages a forked worker shares with the training process too.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def write_partition(url: str, n: int, size: int, *, seed: int, shard_size: int, chunk: int = 1000) -> None:
    from ddm.expert.shards import ShardWriter

    g = torch.Generator().manual_seed(seed)
    writer = ShardWriter(url, image_shape=(3, size, size), num_classes=10, shard_size=shard_size)
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        images = torch.randint(0, 256, (m, 3, size, size), generator=g, dtype=torch.uint8)  # (m, 3, S, S)
        labels = torch.randint(0, 10, (m,), generator=g)  # (m,)
        writer.add(images, labels, torch.arange(lo, lo + m))
    writer.close()


# ---------------------------------------------------------------------------------------------------
# one measurement (the child process)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    from ddm.core.loader import step_loader
    from ddm.core.schedule import BatchOrder, StepBatches
    from ddm.expert import trainer as expert_trainer
    from ddm.expert.config import ExpertJobConfig
    from ddm.expert.data import build_dataset, build_training_dataset

    torch.set_num_threads(spec["threads"])
    if spec["in_memory"]:  # the pre-streaming reader, for contrast
        expert_trainer.build_training_dataset = build_dataset  # type: ignore[assignment]
    job = ExpertJobConfig.model_validate(dict(
        name="bench", output=spec["output"],
        data=dict(source="shards", path=spec["path"], channels=3, image_size=spec["size"]),
        model=dict(arch="DiT-T/4"),
        train=dict(steps=spec["steps"], batch_size=spec["batch_size"], warmup_steps=1, checkpoint_every=1000,
                   log_every=1000, num_threads=spec["threads"], precision="fp32", loader_workers=spec["workers"]),
    ))  # fmt: skip
    stamps: dict[int, float] = {}
    result = expert_trainer.train(
        job, progress=False, on_step=lambda s: stamps.__setitem__(s, time.perf_counter())
    )
    k = spec["steps"]
    train_ips = (k - 2) * spec["batch_size"] / (stamps[k - 1] - stamps[1])

    data = build_training_dataset(job.data) if not spec["in_memory"] else build_dataset(job.data)
    order = BatchOrder(len(data), spec["batch_size"], seed=1)
    m = spec["loader_batches"]
    loader = step_loader(data, StepBatches(order, 0, m + 1), workers=spec["workers"], prefetch=2)
    it = iter(loader)
    next(it)  # worker start-up is paid once per run, not per batch
    t0 = time.perf_counter()
    n = sum(batch[0].shape[0] for batch in it)
    loader_ips = n / (time.perf_counter() - t0)
    del it
    return {
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "train_images_per_s": train_ips,
        "loader_images_per_s": loader_ips,
        "final_loss": result.final_loss,
    }


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench child failed ({spec}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------


def latent_encode(vae: str | None, n: int, size: int, threads: int) -> dict[str, Any]:
    """Images/s of the latent cache's encoding path (``encode_dataset``) for n random RGB images."""
    import torch

    from ddm.coordinator.config import LatentConfig
    from ddm.coordinator.latents import encode_dataset
    from ddm.expert.data import ImageDataset

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="ddm-bench-latent-") as tmp:
        if vae is None:
            from diffusers import AutoencoderKL

            torch.manual_seed(0)
            AutoencoderKL(  # the SD-VAE architecture (stabilityai/sd-vae-ft-mse's config.json)
                in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=size,
            ).save_pretrained(Path(tmp) / "vae")  # fmt: skip
        path = vae or str(Path(tmp) / "vae")
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        data = ImageDataset(
            images=images, labels=torch.zeros(n, dtype=torch.int64), ids=torch.arange(n), num_classes=1
        )
        cfg = LatentConfig(autoencoder="diffusers-kl", path=path, batch_size=16, chunk_size=max(1, n // 2))
        from ddm.expert.autoencoder import load_autoencoder

        ae = load_autoencoder("diffusers-kl", path)  # loading is not encoding: outside the clock
        t0 = time.perf_counter()
        latents = encode_dataset(data, cfg, str(Path(tmp) / "latents"), autoencoder=ae, say=lambda *_: None)
        seconds = time.perf_counter() - t0
    return {
        "latent_encode_images_per_s": round(n / seconds, 2),
        "latent_encode": f"diffusers-kl {'from ' + vae if vae else 'SD-VAE architecture, random weights'}, "
        f"{n} images, {threads} thread(s)",
        "latent_shape": list(latents.raw.shape[1:]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="N = 2,000 at 64x64, 6 steps (about a minute on two free cores)"
    )
    parser.add_argument(
        "--n", type=int, default=None, help="images in the small partition (the large has 10x)"
    )
    parser.add_argument("--size", type=int, default=64, help="image side (RGB)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per job (>= 4)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="train.loader_workers")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    parser.add_argument("--no-in-memory", action="store_true", help="skip the in-memory contrast runs")
    parser.add_argument(
        "--vae", help="a diffusers AutoencoderKL directory (default: SD-VAE architecture, random)"
    )
    parser.add_argument(
        "--latent-images", type=int, default=None, help="images to encode (quick 32, else 256)"
    )
    parser.add_argument("--latent-only", action="store_true", help="measure latent encoding only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    n = args.n or (2000 if args.quick else 10000)
    steps = args.steps or (6 if args.quick else 30)
    if steps < 4:
        parser.error("--steps must be >= 4 (the trainer's rate is timed over steps 2..K-1)")
    t_start = time.perf_counter()
    latent = latent_encode(
        args.vae, args.latent_images or (32 if args.quick else 256), args.size, args.threads
    )
    print(f"latent encoding: {latent['latent_encode_images_per_s']} images/s of 3x{args.size}x{args.size} "
          f"-> {latent['latent_shape']} ({latent['latent_encode']})", flush=True)  # fmt: skip
    if args.latent_only:
        print(json.dumps({**latent, "seconds": round(time.perf_counter() - t_start, 1)}))
        return 0
    row_bytes = 3 * args.size * args.size
    shard_size = max(1, (64 * 2**20) // row_bytes)  # ~64 MB shards
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ddm-bench-data-") as tmp:
        sizes = {"small": n, "large": 10 * n}
        for name, count in sizes.items():
            t0 = time.perf_counter()
            write_partition(str(Path(tmp) / name), count, args.size, seed=len(name), shard_size=shard_size)
            print(f"wrote {name} partition: {count} images of 3x{args.size}x{args.size} "
                  f"({count * row_bytes / 2**20:.0f} MB) in {time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
        modes = [False] if args.no_in_memory else [False, True]
        for in_memory in modes:
            for name in sizes:
                spec = dict(
                    path=str(Path(tmp) / name), output=str(Path(tmp) / f"out-{name}-{in_memory}"), size=args.size,
                    steps=steps, batch_size=args.batch_size, workers=args.workers, threads=args.threads,
                    in_memory=in_memory, loader_batches=max(20, steps),
                )  # fmt: skip
                got = run_child(spec)
                key = name + ("_in_memory" if in_memory else "")
                figures[key] = got
                print(f"{key:>16}: peak RSS {got['rss_mb']:.0f} MB (workers {got['worker_rss_mb']:.0f} MB), "
                      f"trainer {got['train_images_per_s']:.0f} img/s, loader {got['loader_images_per_s']:.0f} img/s",
                      flush=True)  # fmt: skip

    small, large = figures["small"], figures["large"]
    out: dict[str, Any] = {
        "rss_mb_small": round(small["rss_mb"], 1),
        "rss_mb_large": round(large["rss_mb"], 1),
        "rss_ratio": round(large["rss_mb"] / small["rss_mb"], 3),
        "loader_headroom": round(large["loader_images_per_s"] / large["train_images_per_s"], 2),
        **latent,
        "worker_rss_mb_small": round(small["worker_rss_mb"], 1),
        "worker_rss_mb_large": round(large["worker_rss_mb"], 1),
        "loader_images_per_s": round(large["loader_images_per_s"], 1),
        "train_images_per_s": round(large["train_images_per_s"], 1),
        "n_small": n,
        "n_large": 10 * n,
        "image_shape": [3, args.size, args.size],
        "partition_mb_large": round(10 * n * row_bytes / 2**20, 1),
        "loader_workers": args.workers,
        "steps": steps,
        "batch_size": args.batch_size,
    }
    if "small_in_memory" in figures:
        a, b = figures["small_in_memory"]["rss_mb"], figures["large_in_memory"]["rss_mb"]
        out.update(
            rss_mb_small_in_memory=round(a, 1),
            rss_mb_large_in_memory=round(b, 1),
            rss_ratio_in_memory=round(b / a, 3),
        )
    out["targets"] = {"rss_ratio": "<= 1.2", "loader_headroom": ">= 2"}
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    print(
        f"rss_ratio {out['rss_ratio']} (target <= 1.2), loader_headroom {out['loader_headroom']} (target >= 2)"
    )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
