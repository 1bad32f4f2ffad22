"""Feature extractors: the pretrained EfficientNet-Lite0 really is loaded and separates real from noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ddm.expert.data import load_fashion_mnist
from ddm.expert.features import (
    DEFAULT_IMAGE_SIZE,
    EfficientNetFeatures,
    FeatureExtractor,
    PixelFeatures,
    TorchScriptFeatures,
    _efficientnet_state_dict,
    build_features,
    efficientnet_weights_path,
    embed,
    load_efficientnet,
    load_pretrained_efficientnet,
    preprocess,
)
from ddm.expert.metrics import frechet_distance, kid


@pytest.fixture(scope="module")
def fmnist_test():
    return load_fashion_mnist(split="test", limit=600)


def test_efficientnet_features_shape_dtype_and_determinism(fmnist_test):
    fx = EfficientNetFeatures()
    images = fmnist_test.images[:6]
    a = fx(images)
    b = fx(images.numpy())  # numpy input works too
    assert a.shape == (6, 1280) and a.dtype == np.float64
    np.testing.assert_array_equal(a, b)
    assert np.isfinite(a).all() and (a >= 0).all()  # ReLU6 before pooling: features lie in [0, 6]
    assert (a <= 6.0).all() and a.std(axis=0).max() > 0  # images differ, so do their features
    assert isinstance(fx, FeatureExtractor) and fx.name == f"efficientnet-lite0@{DEFAULT_IMAGE_SIZE}"


def test_grey_images_equal_their_rgb_copies(fmnist_test):
    grey = fmnist_test.images[:3]
    rgb = grey.expand(-1, 3, -1, -1).contiguous()
    fx = EfficientNetFeatures()
    np.testing.assert_allclose(fx(grey), fx(rgb), rtol=0, atol=1e-6)


def test_pretrained_weights_are_loaded():
    state = torch.load(efficientnet_weights_path(), map_location="cpu", weights_only=True)
    model = load_pretrained_efficientnet(DEFAULT_IMAGE_SIZE)
    loaded = model.state_dict()
    assert set(loaded) == set(state) and len(state) == 296  # strict load: every key, none extra
    for name, tensor in state.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)
    assert load_efficientnet(DEFAULT_IMAGE_SIZE) is load_efficientnet(
        DEFAULT_IMAGE_SIZE
    )  # one per process and size
    assert not model.training and not load_efficientnet(DEFAULT_IMAGE_SIZE).training


def test_pretrained_features_differ_from_random_init(fmnist_test):
    from efficientnet_lite_pytorch import EfficientNet

    images = fmnist_test.images[:4]
    pretrained = EfficientNetFeatures()(images)
    torch.manual_seed(0)
    fresh = EfficientNet.from_name("efficientnet-lite0", image_size=DEFAULT_IMAGE_SIZE).eval()
    with torch.no_grad():
        random_feats = fresh.extract_features(preprocess(images, DEFAULT_IMAGE_SIZE)).mean(dim=(2, 3))
    assert np.abs(pretrained - random_feats.double().numpy()).max() > 0.1
    # the loaded weights carry ImageNet statistics: BatchNorm running stats are not the 0/1 of a fresh init
    bn = load_pretrained_efficientnet(DEFAULT_IMAGE_SIZE)._bn0
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


def test_weight_file_is_a_plain_state_dict():
    state = _efficientnet_state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert {v.dtype for k, v in state.items() if not k.endswith("num_batches_tracked")} == {torch.float32}
    assert sum(v.numel() for v in state.values()) == 4_694_073  # Lite0: 4.65M params + BN buffers


def test_real_vs_real_fd_is_small_compared_with_noise(fmnist_test):
    """Two disjoint halves of Fashion-MNIST test are close; Gaussian-noise images are far."""
    fx = EfficientNetFeatures()
    half_a = fx(fmnist_test.images[:250])
    half_b = fx(fmnist_test.images[250:500])
    gen = torch.Generator().manual_seed(0)
    noise = (torch.randn(250, 1, 28, 28, generator=gen) * 64 + 128).clamp(0, 255).to(torch.uint8)
    noise_feats = fx(noise)
    fd_real = frechet_distance(half_a, half_b)
    fd_noise = frechet_distance(half_a, noise_feats)
    # 250 samples in 1280-d give FD a large positive bias (the same for both), hence the modest ratio
    assert fd_real * 3 < fd_noise, (fd_real, fd_noise)
    # KID is unbiased: ~0 for two halves of one set, clearly positive against noise
    kid_real, kid_real_std = kid(half_a, half_b, subsets=20, subset_size=200)
    kid_noise, _ = kid(half_a, noise_feats, subsets=20, subset_size=200)
    assert abs(kid_real) < 3 * kid_real_std + 0.01 * kid_noise, (kid_real, kid_real_std, kid_noise)
    assert kid_noise > 20 * abs(kid_real), (kid_real, kid_noise)


def test_embed_is_the_same_extractor(fmnist_test):
    images = fmnist_test.images[:5]
    np.testing.assert_array_equal(embed(images, batch_size=2), EfficientNetFeatures(batch_size=5)(images))


def test_batching_does_not_change_features_much(fmnist_test):
    images = fmnist_test.images[:7]
    np.testing.assert_allclose(
        EfficientNetFeatures(batch_size=3)(images), EfficientNetFeatures(batch_size=7)(images), atol=1e-4
    )


def test_other_resolutions_build_matching_padding(fmnist_test):
    feats = EfficientNetFeatures(64)(fmnist_test.images[:2])
    assert feats.shape == (2, 1280)
    with pytest.raises(ValueError, match="image_size"):
        EfficientNetFeatures(8)


def test_pixel_features():
    images = torch.tensor([[[[0, 255], [51, 102]]]], dtype=torch.uint8)  # (1, 1, 2, 2)
    feats = PixelFeatures()(images)
    np.testing.assert_allclose(feats, [[0.0, 1.0, 0.2, 0.4]])
    assert isinstance(PixelFeatures(), FeatureExtractor)


def test_inputs_are_validated():
    fx = PixelFeatures()
    with pytest.raises(ValueError, match="uint8"):
        fx(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="uint8"):
        fx(torch.zeros(1, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="channels"):
        fx(torch.zeros(2, 2, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="unknown feature extractor"):
        build_features("inception")


class TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))  # (B, 5, h, w): a feature map, pooled by the extractor


@pytest.mark.filterwarnings(
    "ignore:`torch.jit:DeprecationWarning"
)  # still the portable format for user encoders
def test_torchscript_encoder_from_a_local_file(tmp_path):
    torch.manual_seed(0)
    encoder = TinyEncoder().eval()
    path = tmp_path / "encoder.pt"
    torch.jit.save(torch.jit.script(encoder), str(path))
    fx = TorchScriptFeatures(
        str(path), image_size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), batch_size=2
    )
    images = torch.randint(
        0, 256, (3, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    feats = fx(images)
    with torch.no_grad():
        x = (
            torch.nn.functional.interpolate(
                images.float().div(255).expand(-1, 3, -1, -1),
                size=(16, 16),
                mode="bilinear",
                align_corners=False,
            )
            * 2
            - 1
        )
        expected = encoder(x).mean(dim=(2, 3))
    assert feats.shape == (3, 5)
    np.testing.assert_allclose(feats, expected.double().numpy(), atol=1e-5)
    assert fx.name.startswith("torchscript:encoder.pt:") and fx.name.endswith("@16")
    assert build_features(f"torchscript:{path}", image_size=16).name == fx.name


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        TorchScriptFeatures(str(tmp_path / "missing.pt"), image_size=32)
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a torchscript archive")
    with pytest.raises(ValueError, match="not a TorchScript module"):
        TorchScriptFeatures(str(bogus), image_size=32)
    with pytest.raises(ValueError, match="image_size"):
        build_features(f"torchscript:{bogus}")


def test_inference_optimisations_keep_the_function():
    """BN folding, symmetric-padding moves and channels_last must not change the features."""
    images = load_fashion_mnist(split="test", limit=16).images
    plain = load_pretrained_efficientnet(64)
    with torch.no_grad():
        expected = plain.extract_features(preprocess(images, 64)).mean(dim=(2, 3)).double().numpy()
    got = EfficientNetFeatures(64)(images)
    assert np.abs(got - expected).max() < 1e-3 * np.abs(expected).max()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in EfficientNetFeatures(64).model.modules())
