"""Parallelism applied to a model from outside (the model code does not change for it).

* ``ddp``: ``DistributedDataParallel`` replicates the model on every device and all-reduces gradients.
* ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) shards parameters, gradients and optimizer
  state over the ranks, for models larger than one device: each transformer block (the model's
  ``blocks``) is one unit, gathered just in time for its forward and backward, then the root.

Checkpoints are the same files either way: full tensors, gathered (``full_state``) so that servers and
a resume on any world size or parallelism load them unchanged (``load_full_state`` re-shards them).
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from ddm.core.distributed import Distributed


def data_parallel(model: nn.Module, d: Distributed) -> nn.Module:
    """DDP from outside the model; the model itself on one process.

    ddm's networks have only constant buffers (fixed position embeddings), identical everywhere, so
    DDP need not broadcast buffers before every forward. (torch >= 2.13 renamed that switch.)
    """
    if d.world_size == 1:
        return model
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_buffer_sync = (
        {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    )
    device_ids = [d.device.index] if d.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, **no_buffer_sync)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The FSDP units: each block of ``model.blocks`` (DiT and router alike), then the root."""
    blocks = getattr(model, "blocks", None)
    units = list(blocks) if isinstance(blocks, nn.ModuleList) else []
    return [*units, model]


def _fully_shard(model: nn.Module, d: Distributed, **options: object) -> nn.Module:
    """``fully_shard`` each unit of ``model`` over all ranks, in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(d.device.type, (d.world_size,))
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, **options)
    return model


def shard(model: nn.Module, d: Distributed, *, precision: str) -> nn.Module:
    """FSDP2 over all ranks, in place; bf16 keeps fp32 master weights and reduces gradients in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if precision == "bf16"
        else MixedPrecisionPolicy()
    )
    return _fully_shard(model, d, mp_policy=policy)


def sharded_copy(model: nn.Module, d: Distributed) -> nn.Module:
    """A second module sharded like ``model`` (the EMA's copy), made from the unsharded ``model``."""
    return _fully_shard(copy.deepcopy(model), d)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU; for a sharded (DTensor) one, gathered from every rank (collective)."""
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().cpu()


def full_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full CPU tensors of a state dict; collective when any entry is sharded (call on every rank)."""
    return {k: full_tensor(v) for k, v in state.items()}


def like(full: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``full`` placed like ``reference``: sharded the same way if it is a DTensor, else on its device."""
    if isinstance(reference, DTensor):
        return distribute_tensor(full.to(reference.device), reference.device_mesh, reference.placements)
    return full.to(reference.device)


def load_full_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full tensors into ``module``, re-sharding them where the module is sharded."""
    current = module.state_dict()
    missing = sorted(set(current) - set(state))
    unexpected = sorted(set(state) - set(current))
    if missing or unexpected:
        raise RuntimeError(
            f"state does not fit the module: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    module.load_state_dict({k: like(state[k], current[k]) for k in current})


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as named full tensors, ``optim.{index}.{key}`` (no pickling).

    Collective under FSDP (sharded moments are gathered); the same names on any world size."""
    out: dict[str, torch.Tensor] = {}
    for idx, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            out[f"optim.{idx}.{key}"] = full_tensor(value) if torch.is_tensor(value) else torch.tensor(value)
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of ``optimizer_tensors``: moments re-sharded like their parameters; hyper-parameters
    come from the optimizer as constructed."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sd = optimizer.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    # Sorted: re-sharding is collective, so every rank must go through the tensors in one order (the
    # dict safetensors loads is in hash order, which differs between processes).
    for name in sorted(tensors):
        if not name.startswith("optim."):
            continue
        _, idx, key = name.split(".", 2)
        param = params[int(idx)]
        value = tensors[name].clone()
        if isinstance(param, DTensor) and value.shape == param.shape:
            value = like(value, param)
        state.setdefault(int(idx), {})[key] = value
    sd["state"] = state
    optimizer.load_state_dict(sd)
