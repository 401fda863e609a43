"""The few distributed primitives aurora_fx needs, for DDP and FSDP2 alike, on any backend and device.

* ``full(t)``: the whole tensor of a sharded ``DTensor`` (FSDP2 parameters, optimizer moments);
  a plain tensor as it is. A collective for DTensors: every rank calls it in the same order.
* ``assign(param, value)``: write a whole value (identical on every rank) into a parameter or a
  moment, sharded or not, without communication.
* ``agree(values)``: every rank gets rank 0's values (one broadcast), on the device the backend
  needs (NCCL: CUDA tensors), returned on the caller's device.
* ``world_size()``, ``is_main()``.
"""

from __future__ import annotations

import torch

__all__ = ["world_size", "is_main", "full", "assign", "agree", "is_sharded", "model_class"]


def _initialized() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the default group (1 without one)."""
    return torch.distributed.get_world_size() if _initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and without a process group)."""
    return not _initialized() or torch.distributed.get_rank() == 0


def is_sharded(t: torch.Tensor) -> bool:
    """True for a ``DTensor`` (e.g. an FSDP2 parameter)."""
    return hasattr(t, "full_tensor") and hasattr(t, "device_mesh")


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from the shards of a ``DTensor``), detached."""
    t = t.detach()
    return t.full_tensor() if is_sharded(t) else t


@torch.no_grad()
def assign(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target[...] = value`` for a whole ``value`` that every rank holds alike (no communication)."""
    if is_sharded(target):
        from torch.distributed.tensor import distribute_tensor

        local = distribute_tensor(value.to(target.device, target.dtype), target.device_mesh, target.placements,
                                  src_data_rank=None)
        target.to_local().copy_(local.to_local())
    else:
        target.copy_(value.to(target.device, target.dtype))


def _collective_device() -> torch.device:
    backend = str(torch.distributed.get_backend()).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(values: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``values`` on every rank (identical decisions everywhere, docs/methods.md §3.6)."""
    if world_size() == 1:
        return values
    shared = values.to(_collective_device())
    torch.distributed.broadcast(shared, src=0)
    return shared.to(values.device)


def model_class(model: torch.nn.Module) -> type:
    """The model's own class, under the ``FSDP<Class>`` that ``fully_shard`` makes of it."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return type(model)
    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
