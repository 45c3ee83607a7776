"""Adapter application ``y += ((x V) * c) U^T`` in place: torch (CPU, and autograd), Triton
(CUDA inference, when Triton is importable), and the exact sparse variant."""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (its kernels then serve CUDA tensors outside autograd)."""
    return importlib.util.find_spec("triton") is not None


def add_adapter_(y: Tensor, x: Tensor, v: Tensor, u: Tensor, codes: Tensor, sparse_threshold: float = 0.0) -> Tensor:
    """``y += ((x V) * c) U^T`` in place and return ``y``.

    Shapes: ``y`` [N, out], ``x`` [N, in], ``v`` [in, r], ``u`` [out, r], ``codes`` [N, r].

    Dense (``sparse_threshold == 0``): no host synchronisation; on CPU, or whenever autograd
    records, one [N, r] intermediate and an in-place ``addmm_``; on CUDA outside autograd, the
    Triton shrink and expand kernels when Triton is importable.

    Sparse (``sparse_threshold > 0``): tokens whose code entries all have ``|c| < threshold`` skip
    the adapter; the result equals the dense one with those codes set to zero. Finding the kept
    tokens (``nonzero``) synchronises the host with the device, so it is off by default.
    """
    if sparse_threshold > 0:
        rows = (codes.abs() >= sparse_threshold).any(-1).nonzero().squeeze(1)
        return y.index_add_(0, rows, ((x[rows] @ v) * codes[rows]) @ u.T)
    recording = torch.is_grad_enabled() and any(t.requires_grad for t in (x, v, u, codes))
    if y.is_cuda and not recording and triton_available():
        from . import triton as kernels

        return kernels.expand_(y, kernels.shrink(x, v, codes), u)
    inner = x @ v  # (N, r)
    # In place when nothing is recorded: the one [N, r] buffer besides y.
    inner = inner * codes if recording else inner.mul_(codes)
    return y.addmm_(inner, u.T)
