"""The router network (router/model.py): shapes, registry, initialisation that learns, size against the
DiT, and that it learns the posterior p(k | x_t, t) on a problem whose answer is known at both ends:
certain at t ~ 0 (the partitions are obvious in the data) and the prior share at t = 1 (pure noise)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ddm.expert import flow
from ddm.expert.model import DiT, dit_config
from ddm.router.model import ROUTER_ARCHS, RouterConfig, RouterNet, num_parameters, router_config

TINY = RouterConfig(
    image_size=8,
    in_channels=1,
    patch_size=4,
    hidden_size=32,
    depth=1,
    num_heads=2,
    num_classes=3,
    num_experts=2,
)


def test_forward_shapes_and_probabilities() -> None:
    torch.manual_seed(0)
    for cfg in (
        TINY,
        router_config("Router-T/4", image_size=28, in_channels=1, num_classes=10, num_experts=4),
    ):
        net = RouterNet(cfg)
        n = 5
        x = torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size)
        y = torch.tensor([0, 1, cfg.num_classes, 0, 1])  # includes the null label
        logits = net(x, torch.rand(n), y)
        assert logits.shape == (n, cfg.num_experts) and logits.dtype == torch.float32
        p = net.probabilities(x.double(), torch.rand(n).double(), y)  # any float dtype in, float32 out
        assert p.shape == (n, cfg.num_experts) and not p.requires_grad
        torch.testing.assert_close(p.sum(1), torch.ones(n))


def test_registry_and_config_validation() -> None:
    cfg = router_config("Router-S/2", image_size=32, in_channels=3, num_classes=1000, num_experts=8)
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (3, 128, 4, 2)
    xs = router_config("Router-XS/4", image_size=28, in_channels=1, num_classes=10, num_experts=4)
    assert (xs.depth, xs.hidden_size, xs.num_heads) == (3, 64, 4)
    assert (cfg.image_size, cfg.in_channels, cfg.num_classes, cfg.num_experts) == (32, 3, 1000, 8)
    assert "Router-T/4" in ROUTER_ARCHS and RouterConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown router architecture .DiT-T/4.; choose one of Router-XS/2"):
        router_config("DiT-T/4", image_size=28, in_channels=1, num_classes=10, num_experts=4)
    with pytest.raises(ValueError, match="patch_size"):
        RouterConfig(image_size=28, patch_size=8)
    with pytest.raises(ValueError, match="num_heads"):
        RouterConfig(hidden_size=96, num_heads=5)
    with pytest.raises(ValueError, match="num_experts"):
        RouterConfig(num_experts=0)


def test_default_router_is_a_fraction_of_an_expert() -> None:
    """The paper's router is ~18% of an expert; Router-T/4 against the demo's DiT-T/4."""
    router = RouterNet(
        router_config("Router-T/4", image_size=28, in_channels=1, num_classes=10, num_experts=4)
    )
    dit = DiT(dit_config("DiT-T/4", image_size=28, in_channels=1, num_classes=10))
    assert num_parameters(router) < 0.35 * num_parameters(dit)  # measured 390,340 vs 1,275,408 (31%)
    assert router.flops_per_image() < 0.35 * dit.flops_per_image()  # measured 29%


def test_initialisation_starts_uniform_but_every_path_learns_from_step_one() -> None:
    torch.manual_seed(1)
    net = RouterNet(TINY)
    x, t, y = torch.randn(64, 1, 8, 8), torch.rand(64), torch.randint(0, 4, (64,))
    k = torch.randint(0, 2, (64,))
    logits = net(x, t, y)
    assert logits.abs().max() < 0.5 and logits.std() > 0  # near-uniform probabilities, not constant
    loss = F.cross_entropy(logits, k)
    assert abs(loss.item() - math.log(2)) < 0.1
    loss.backward()
    # With a zero head every one of these would get a zero gradient at step 1.
    learning = {
        "head.linear": net.head.linear.weight,
        "head.adaLN": net.head.adaLN_modulation[-1].weight,
        "block adaLN (gates)": net.blocks[0].adaLN_modulation[-1].weight,
        "x_embedder": net.x_embedder.weight,
    }
    for name, p in learning.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def bright_or_dark(n: int, share: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Partition 0 (probability ``share``) is bright, partition 1 dark: x_0 = +-0.6 + 0.2 noise."""
    k = (torch.rand(n, generator=g) >= share).long()  # (n,)
    level = torch.where(k == 0, 0.6, -0.6).reshape(n, 1, 1, 1)
    return (level + 0.2 * torch.randn(n, 1, 8, 8, generator=g)).clamp(-1, 1), k


def test_router_learns_the_posterior_from_certain_to_the_prior() -> None:
    share = 0.7
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    net = RouterNet(TINY)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(300):
        x_0, k = bright_or_dark(64, share, g)
        t = torch.rand(64, generator=g)
        x_t = flow.interpolate(x_0, torch.randn(x_0.shape, generator=g), t)
        y = torch.full((64,), TINY.num_classes)  # unconditional: the class carries no information here
        loss = F.cross_entropy(net(x_t, t, y), k)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def evaluate(lo: float, hi: float, n: int = 2000) -> tuple[float, float]:
        x_0, k = bright_or_dark(n, share, g)
        t = lo + (hi - lo) * torch.rand(n, generator=g)
        x_t = flow.interpolate(x_0, torch.randn(x_0.shape, generator=g), t)
        p = net.probabilities(x_t, t, torch.full((n,), TINY.num_classes))
        return (p.argmax(1) == k).float().mean().item(), p[:, 0].mean().item()

    acc_small_t, _ = evaluate(0.0, 0.2)
    acc_noise, p_bright = evaluate(0.99, 1.0)
    assert acc_small_t > 0.97, acc_small_t  # the partition is obvious in nearly clean images
    assert abs(p_bright - share) < 0.12, p_bright  # pure noise: the router falls back to the prior
    assert abs(acc_noise - share) < 0.1, acc_noise  # ... and accuracy to the largest share
