"""The few torch.distributed facts the trainer needs. In one process (no process group) every
helper is the identity, so the same training loop runs alone or under ``torchrun``::

    with distributed.init_from_env() as device:   # torchrun --nproc_per_node 4 train.py
        model = build().to(device)
        Trainer(model, task, cfg, out_dir).fit()
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@contextlib.contextmanager
def init_from_env(device: str | None = None) -> Iterator[torch.device]:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), yield this process's device,
    and leave the group at exit.

    ``device`` is ``"cuda"``, ``"cpu"`` or None (CUDA when available). On CUDA each process takes
    GPU ``LOCAL_RANK`` and the group talks NCCL; on the CPU, gloo. In a plain process (no
    ``RANK``/``WORLD_SIZE`` in the environment), or when a group already exists, nothing is
    initialised or destroyed: it only yields the device (``cuda`` is the current GPU).
    """
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda', 'cpu' or None, got {device!r}")
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ and not _initialized()
    if kind == "cuda":
        if launched:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        here = torch.device("cuda", torch.cuda.current_device())
    else:
        here = torch.device("cpu")
    if not launched:
        yield here
        return
    dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    try:
        yield here
    finally:
        dist.destroy_process_group()


def exit_process(code: int = 0) -> None:
    """End a script with ``code``; a ``torchrun`` rank (``RANK`` set) ends at once, skipping the
    interpreter's teardown: there gloo's threads intermittently abort a process whose group is
    already destroyed ("terminate called without an active exception", seen with torch 2.13 and
    2.14), which fails a launch whose work is complete. Call it only from a ``__main__``."""
    if "RANK" not in os.environ:
        raise SystemExit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def launched_world_size() -> int:
    """How many processes ``torchrun`` started (``WORLD_SIZE``; 1 in a plain process): readable
    before the group is joined, e.g. to check a command's options on every rank first."""
    return int(os.environ.get("WORLD_SIZE", 1)) if "RANK" in os.environ else 1


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


def sum_gradients(model: nn.Module) -> None:
    """Replace every trainable parameter's gradient by its sum over the ranks, in one all-reduce:
    for a model split over the ranks, whose gradient on each rank is that of its own part. A
    parameter without a gradient on some rank counts zeros there; one without a gradient on any
    rank keeps none (so the optimizer leaves it alone, as in one process)."""
    if world_size() == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    has = torch.tensor([float(p.grad is not None) for p in params])
    flat = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params]
                     + [has.to(params[0])])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    *totals, anyone = flat.split([p.numel() for p in params] + [len(params)])
    for p, total, used in zip(params, totals, anyone.tolist()):
        p.grad = total.view_as(p) if used else None


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
