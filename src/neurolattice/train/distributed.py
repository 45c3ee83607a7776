"""The few torch.distributed facts the trainer needs. In one process (no process group) every
helper is the identity, so the same training loop runs alone or under ``torchrun``."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if _initialized() else 1


def is_main() -> bool:
    """True on the process that writes files (checkpoints, metrics) and shows progress."""
    return rank() == 0


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of ``value`` over all ranks (a new tensor; ``value`` itself in one process)."""
    if world_size() == 1:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_gather_object(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` in one process)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def wrap(model: nn.Module) -> nn.Module:
    """``model`` in DistributedDataParallel when there is more than one rank, else ``model``."""
    if world_size() == 1:
        return model
    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(model: nn.Module) -> AbstractContextManager:
    """DDP's ``no_sync()`` (skip the gradient all-reduce of this backward), or nothing."""
    return model.no_sync() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()
