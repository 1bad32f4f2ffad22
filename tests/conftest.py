"""Suite-wide settings and shared fixtures.

One intra-op thread: tests use tiny tensors, where thread hand-offs cost more than they win on a loaded
2-core machine, and subprocess tests set their own threads.
"""

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def served_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run root with two small trained-format experts and a router over them (real checkpoints
    written by the real code), one per test module: what the gRPC and degraded-serving tests serve."""
    from grpc_fixtures import expert_checkpoint, router_checkpoint

    root = tmp_path_factory.mktemp("run")
    for k in range(2):
        expert_checkpoint(root, k)
    router_checkpoint(root, 2)
    return root


@pytest.fixture(scope="module")
def run_root(served_root: Path) -> Path:
    """The shared served root under the name most serving tests use (a module may define its own)."""
    return served_root
