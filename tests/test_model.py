"""The DiT: shapes, adaLN-Zero start, conditioning, registry."""

import pytest
import torch

from ddm.expert.model import DIT_ARCHS, DiT, DiTConfig, dit_config


def tiny(**kw):
    return DiT(
        DiTConfig(
            image_size=8,
            in_channels=1,
            patch_size=2,
            hidden_size=32,
            depth=2,
            num_heads=2,
            num_classes=3,
            **kw,
        )
    )


def test_forward_shape_and_zero_init():
    net = tiny()
    x = torch.randn(5, 1, 8, 8)
    v = net(x, torch.rand(5), torch.tensor([0, 1, 2, 3, 0]))  # 3 is the null class
    assert v.shape == x.shape
    assert torch.count_nonzero(v) == 0  # adaLN-Zero: the untrained network predicts exactly zero


def test_conditioning_changes_the_output_after_training_moves_the_weights():
    torch.manual_seed(0)
    net = tiny()
    for p in net.parameters():  # leave the zero init: any nonzero weights make the net depend on t and y
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 1, 8, 8)
    base = net(x, torch.tensor([0.5, 0.5]), torch.tensor([0, 0]))
    assert not torch.allclose(base, net(x, torch.tensor([0.5, 0.5]), torch.tensor([1, 1])))
    assert not torch.allclose(base, net(x, torch.tensor([0.1, 0.1]), torch.tensor([0, 0])))
    # one sample's output does not depend on another sample in the batch
    alone = net(x[:1], torch.tensor([0.5]), torch.tensor([0]))
    assert torch.allclose(alone, base[:1], atol=1e-5)


def test_registry_covers_cpu_and_paper_sizes():
    assert "DiT-T/4" in DIT_ARCHS and "DiT-B/2" in DIT_ARCHS and "DiT-XL/2" in DIT_ARCHS
    xl = dit_config("DiT-XL/2", image_size=32, in_channels=4, num_classes=1000)
    assert (xl.depth, xl.hidden_size, xl.num_heads, xl.patch_size) == (28, 1152, 16, 2)
    with pytest.raises(ValueError, match="unknown architecture 'DiT-Q/4'"):
        dit_config("DiT-Q/4", image_size=28, in_channels=1, num_classes=10)


def test_bad_sizes_are_explained():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        DiTConfig(image_size=28, patch_size=8)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        DiTConfig(hidden_size=130, num_heads=4)


def test_flops_estimate_matches_counted_matmuls():
    """flops_per_image counts forward matmul FLOPs; check it against torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    net = DiT(dit_config("DiT-T/4", image_size=28, in_channels=1, num_classes=10))
    with FlopCounterMode(display=False) as counter:
        net(torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([1, 2]))
    counted = counter.get_total_flops() / 2
    ops = {str(op) for op in counter.get_flop_counts()["Global"]}
    if not any("scaled_dot_product" in op for op in ops):  # the CPU kernel is not counted: add QK^T and AV
        cfg = net.config
        counted += cfg.depth * 2 * 2 * cfg.num_tokens**2 * cfg.hidden_size
    assert abs(net.flops_per_image() - counted) / counted < 0.02


def test_config_round_trips_through_dict():
    cfg = dit_config("DiT-M/2", image_size=28, in_channels=1, num_classes=10)
    assert DiTConfig.from_dict(cfg.to_dict()) == cfg
