"""Analytic parameter counts and FLOPs (ddm.expert.model_cost, ddm.router.model_cost) against DiT's
published figures, the real modules built on the meta device, and torch's FLOP counter."""

import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ddm.expert.model import DIT_ARCHS, DiT, dit_config
from ddm.expert.model_cost import dit_cost, dit_reference_macs, dit_reference_parameters
from ddm.router.model import ROUTER_ARCHS, RouterNet, router_config
from ddm.router.model_cost import router_cost

IMAGENET_LATENT = {"image_size": 32, "in_channels": 4, "num_classes": 1000}  # 256 px through the SD VAE

# DiT (Peebles & Xie 2023) Table 4 at 256 px: parameters (millions, as the paper rounds them) and
# GFLOPs per forward pass counted as multiply-adds.
PUBLISHED = {
    "DiT-S/2": (33, 6.06),
    "DiT-B/2": (130, 23.01),
    "DiT-L/2": (458, 80.71),
    "DiT-XL/2": (675, 118.64),
}


def meta_params(module_cls, cfg) -> int:
    with torch.device("meta"):
        net = module_cls(cfg)
    assert all(p.is_meta for p in net.parameters())  # nothing was allocated
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("arch", list(PUBLISHED))
def test_dit_reproduces_the_papers_table(arch):
    cfg = dit_config(arch, **IMAGENET_LATENT)
    millions, gflops = PUBLISHED[arch]
    # The paper gives whole millions (B/2 is 130.51M by DiT's own count, printed as 130M).
    assert abs(dit_reference_parameters(cfg) / 1e6 - millions) < 0.6
    assert abs(dit_cost(cfg).parameters / 1e6 - millions) < 0.6
    # DiT counts one multiply-add as one FLOP; at two per multiply-add XL/2 would be 237 GFLOPs. The
    # residual (<= 0.02 GFLOPs, XL/2 118.62 vs 118.64) is below the paper's rounding plus one elementwise
    # op per LayerNorm element, which its counter may have included and a matmul count does not.
    assert abs(dit_reference_macs(cfg) / 1e9 - gflops) <= 0.025
    assert abs(dit_cost(cfg).gflops - gflops) <= 0.025


def test_xl2_exact_counts_and_how_they_relate_to_dits():
    cfg = dit_config("DiT-XL/2", **IMAGENET_LATENT)
    cost = dit_cost(cfg)
    assert cost.tokens == 256
    assert round(cost.gflops, 1) == 118.6 and cost.flops == 2 * cost.macs
    # facebookresearch/DiT reports 675,129,632: its frozen pos_embed Parameter (256 x 1152) and the learned
    # variance half of the output layer (1152 x 16 + 16) are the whole difference; the class table is
    # 1001 rows in both (1000 classes + the null class).
    assert dit_reference_parameters(cfg) == 675_129_632
    assert dit_reference_parameters(cfg) - cost.parameters == 256 * 1152 + (1152 * 16 + 16)
    assert cost.parameters == 674_816_272


@pytest.mark.parametrize("arch", DIT_ARCHS)
def test_dit_count_equals_the_meta_module(arch):
    cfg = dit_config(arch, **IMAGENET_LATENT)
    assert meta_params(DiT, cfg) == dit_cost(cfg).parameters


def test_student_embedders_are_counted():
    cfg = dit_config("DiT-B/4", **IMAGENET_LATENT, guidance_embed=True, step_embed=True)
    base = dit_cost(dit_config("DiT-B/4", **IMAGENET_LATENT))
    assert meta_params(DiT, cfg) == dit_cost(cfg).parameters
    d = 768
    assert dit_cost(cfg).parameters - base.parameters == 2 * (256 * d + d + d * d + d)
    assert dit_cost(cfg).macs - base.macs == 2 * (256 * d + d * d)


@pytest.mark.parametrize("arch", ROUTER_ARCHS)
def test_router_count_equals_the_meta_module(arch):
    cfg = router_config(arch, **IMAGENET_LATENT, num_experts=8)
    assert meta_params(RouterNet, cfg) == router_cost(cfg).parameters


def test_paper_sized_models_build_on_meta_in_milliseconds():
    for arch in ("DiT-XL/2", "DiT-3B/2"):
        cfg = dit_config(arch, **IMAGENET_LATENT)
        start = time.perf_counter()
        n = meta_params(DiT, cfg)
        assert time.perf_counter() - start < 5  # measured ~0.1-0.2 s; generous for a shared machine
        assert n == dit_cost(cfg).parameters
    assert 2.9e9 < dit_cost(dit_config("DiT-3B/2", **IMAGENET_LATENT)).parameters < 3.1e9


def test_router_b_is_about_a_fifth_of_an_xl_expert():
    """DDM: the router is a DiT-B beside DiT-XL/2 experts, ~18% of an expert's size."""
    router = router_cost(router_config("Router-B/2", **IMAGENET_LATENT, num_experts=8))
    expert = dit_cost(dit_config("DiT-XL/2", **IMAGENET_LATENT))
    assert 0.17 < router.parameters / expert.parameters < 0.21
    assert 0.17 < router.macs / expert.macs < 0.21


def counted_macs(net, *inputs) -> int:
    """torch's FLOP counter / 2, plus the attention matmuls when its CPU SDPA kernel is not counted."""
    with FlopCounterMode(display=False) as counter:
        net(*inputs)
    macs = counter.get_total_flops() // 2
    if not any("scaled_dot_product" in str(op) for op in counter.get_flop_counts()["Global"]):
        cfg = net.config
        macs += cfg.depth * 2 * cfg.num_tokens**2 * cfg.hidden_size
    return macs


def test_macs_equal_torchs_flop_counter_exactly():
    image = {"image_size": 28, "in_channels": 1, "num_classes": 10}
    cfg = dit_config("DiT-T/4", **image, guidance_embed=True, step_embed=True)
    x, t, y = torch.randn(1, 1, 28, 28), torch.rand(1), torch.tensor([3])
    assert counted_macs(DiT(cfg), x, t, y, torch.rand(1), torch.rand(1)) == dit_cost(cfg).macs
    rcfg = router_config("Router-T/4", **image, num_experts=4)
    assert counted_macs(RouterNet(rcfg), x, t, y) == router_cost(rcfg).macs
