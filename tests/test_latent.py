"""Latent space: the autoencoder registry (a real diffusers AutoencoderKL written by save_pretrained), the
scale and shift from the data, the cached, resumable latents, float16 latent partitions streamed."""

from __future__ import annotations

import math

import pytest
import torch
from latent_fixtures import tiny_vae

from ddm.coordinator.config import LatentConfig, load_run_config
from ddm.coordinator.latents import encode_dataset
from ddm.core.config import ConfigError
from ddm.expert.autoencoder import (
    AUTOENCODERS,
    LatentCodec,
    autoencoder_names,
    latent_stats,
    load_autoencoder,
)
from ddm.expert.data import ImageDataset
from ddm.expert.images import to_model_input
from ddm.expert.shards import ShardError, ShardWriter, read_index, read_shards
from ddm.expert.stream import open_shards


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return tiny_vae(tmp_path_factory.mktemp("vae"))


def test_diffusers_kl_is_loaded_from_safetensors_and_maps_shapes(vae_dir):
    assert "diffusers-kl" in AUTOENCODERS and autoencoder_names() == ("none", *AUTOENCODERS.names())
    files = sorted(p.name for p in vae_dir.iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]  # nothing pickled
    ae = load_autoencoder("diffusers-kl", str(vae_dir))
    assert ae.latent_shape((3, 32, 32)) == (4, 16, 16)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (3, 4, 16, 16) and torch.equal(z, ae.encode(x))  # deterministic: the mode
    assert ae.decode(z).shape == (3, 3, 32, 32)
    with pytest.raises(ValueError, match="divisible by the autoencoder's downsampling 2"):
        ae.latent_shape((3, 31, 31))
    with pytest.raises(ValueError, match="set data.channels"):
        ae.latent_shape((1, 32, 32))


def test_a_bad_autoencoder_path_or_name_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="latent.path .*not a local directory"):
        load_autoencoder("diffusers-kl", str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a loadable diffusers AutoencoderKL"):
        load_autoencoder("diffusers-kl", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="latent.autoencoder: unknown autoencoder 'vq'"):
        load_autoencoder("vq", str(tmp_path))
    with pytest.raises(ConfigError, match="latent.path is empty"):
        load_run_config(None, {"latent.autoencoder": "diffusers-kl"})
    with pytest.raises(ConfigError, match="needs mode = 'experts'"):
        load_run_config(None, {"latent.autoencoder": "diffusers-kl", "latent.path": "/x", "mode": "monolith"})


def test_latent_stats_are_the_mean_and_inverse_std():
    values = torch.tensor([1.0, 3.0, 5.0, 7.0], dtype=torch.float64)  # mean 4, variance 5
    stats = latent_stats(4, float(values.sum()), float((values**2).sum()))
    assert stats.shift == 4.0 and math.isclose(stats.scale, 1 / math.sqrt(5), rel_tol=1e-12)
    with pytest.raises(ValueError, match="maps every image to the same point"):
        latent_stats(4, 8.0, 16.0)  # all values 2


class Counting:
    """An autoencoder wrapper that counts the images it encodes."""

    def __init__(self, inner):
        self.inner, self.encoded, self.name, self.device = inner, 0, inner.name, inner.device

    def encode(self, x):
        self.encoded += len(x)
        return self.inner.encode(x)

    def decode(self, z):
        return self.inner.decode(z)

    def latent_shape(self, shape):
        return self.inner.latent_shape(shape)


def test_latents_are_encoded_once_cached_and_resumed_by_chunk(vae_dir, tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=g)
    data = ImageDataset(
        images=images, labels=torch.zeros(10, dtype=torch.int64), ids=torch.arange(10), num_classes=1
    )
    cfg = LatentConfig(autoencoder="diffusers-kl", path=str(vae_dir), batch_size=3, chunk_size=4)
    ae = Counting(load_autoencoder("diffusers-kl", str(vae_dir)))
    root = str(tmp_path / "latents")
    first = encode_dataset(data, cfg, root, autoencoder=ae, say=lambda *_: None)
    assert ae.encoded == 10 and first.raw.shape == (10, 4, 16, 16) and first.raw.dtype == torch.float16
    assert sorted(p.name for p in (tmp_path / "latents").iterdir()) == [
        "chunk-00000.safetensors", "chunk-00001.safetensors", "chunk-00002.safetensors", "index.json",
    ]  # fmt: skip
    raw = ae.inner.encode(to_model_input(images)).double()
    assert math.isclose(first.stats.shift, float(raw.mean()), rel_tol=1e-5, abs_tol=1e-6)
    assert math.isclose(first.stats.scale, 1 / float(raw.std(unbiased=False)), rel_tol=1e-5)
    z = first.normalized(torch.arange(10)).double()
    assert abs(float(z.mean())) < 1e-2 and abs(float(z.std()) - 1) < 1e-2
    assert first.record["latent_shape"] == [4, 16, 16] and first.record["image_shape"] == [3, 32, 32]

    again = encode_dataset(data, cfg, root, autoencoder=ae, say=lambda *_: None)
    assert ae.encoded == 10 and torch.equal(again.raw, first.raw)  # all from the cache

    (tmp_path / "latents" / "index.json").unlink()  # a run stopped after two of three chunks
    (tmp_path / "latents" / "chunk-00002.safetensors").unlink()
    resumed = encode_dataset(data, cfg, root, autoencoder=ae, say=lambda *_: None)
    assert ae.encoded == 12 and torch.equal(resumed.raw, first.raw)  # only the last chunk's 2 images
    assert resumed.stats == first.stats

    hand = cfg.model_copy(update={"scale": 0.5, "shift": 0.25})
    fixed = encode_dataset(data, hand, str(tmp_path / "other"), autoencoder=ae, say=lambda *_: None)
    assert (fixed.stats.scale, fixed.stats.shift) == (0.5, 0.25)  # a hand-set value overrides

    codec = LatentCodec(ae.inner, first.stats)
    decoded = codec.decode(first.normalized(torch.arange(2)))
    assert decoded.shape == (2, 3, 32, 32) and float(decoded.abs().max()) <= 1


def test_a_float16_latent_partition_streams_exactly(tmp_path):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(7, 4, 8, 8, generator=g).to(torch.float16)
    labels, ids = torch.tensor([0, 1, 0, 1, 1, 0, 1]), torch.arange(7) + 100
    writer = ShardWriter(str(tmp_path / "p"), image_shape=(4, 8, 8), num_classes=2, shard_size=3,
                         meta={"latent": {"autoencoder": "diffusers-kl"}}, dtype="float16")  # fmt: skip
    writer.add(z, labels, ids)
    with pytest.raises(ValueError, match="images must be float16"):
        writer.add(z.float(), labels, ids)
    writer.close()
    assert read_index(str(tmp_path / "p"))["dtype"] == "float16"
    with pytest.raises(ShardError, match="a latent partition"):
        read_shards(str(tmp_path / "p"))  # latents are streamed, never loaded as images
    ds = open_shards(str(tmp_path / "p"))
    assert ds.image_shape == (4, 8, 8) and ds.meta["latent"]["autoencoder"] == "diffusers-kl"
    order = torch.tensor([6, 0, 3, 4, 1])
    stored, y = ds.batch_uint8(order)
    assert stored.dtype == torch.float16 and torch.equal(stored, z[order]) and torch.equal(y, labels[order])
    x, _ = ds.batch(order)
    assert x.dtype == torch.float32 and torch.equal(x, z[order].float())


def test_an_expert_trains_on_a_latent_partition_and_records_its_space_and_time_shift(tmp_path):
    from ddm.core import storage
    from ddm.expert import flow
    from ddm.expert.config import ExpertJobConfig
    from ddm.expert.load import recorded
    from ddm.expert.trainer import train

    g = torch.Generator().manual_seed(2)
    z = torch.randn(16, 4, 8, 8, generator=g).to(torch.float16)
    record = {"autoencoder": "diffusers-kl", "path": "/vae", "scale": 0.5, "shift": 0.1,
              "image_shape": [3, 16, 16], "latent_shape": [4, 8, 8]}  # fmt: skip
    writer = ShardWriter(str(tmp_path / "p"), image_shape=(4, 8, 8), num_classes=2, meta={"latent": record},
                         dtype="float16")  # fmt: skip
    writer.add(z, torch.arange(16) % 2, torch.arange(16))
    writer.close()

    def job(out, **train_settings):
        return ExpertJobConfig.model_validate(dict(
            name="latent", output=str(out), model=dict(arch="DiT-T/4", num_classes=2),
            data=dict(source="shards", path=str(tmp_path / "p"), image_size=16, channels=3),
            train=dict(steps=2, batch_size=8, warmup_steps=1, checkpoint_every=2, num_threads=1, loader_workers=0,
                       **train_settings),
        ))  # fmt: skip

    result = train(job(tmp_path / "derived"), progress=False)
    facts = recorded(str(tmp_path / "derived" / "checkpoints"))
    assert facts["latent"] == record  # the server decodes with this, without the training config
    assert facts["time_shift"] == pytest.approx(flow.derived_time_shift((4, 8, 8)))  # sqrt(256 / 784)
    meta = storage.read_json(result.checkpoint_url.removesuffix(".safetensors") + ".json")
    assert (meta["model"]["in_channels"], meta["model"]["image_size"]) == (4, 8)  # the DiT denoises latents

    train(job(tmp_path / "hand", time_shift=2.5), progress=False)
    assert recorded(str(tmp_path / "hand" / "checkpoints"))["time_shift"] == 2.5  # a hand-set value wins
