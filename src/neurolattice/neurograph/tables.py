"""Lookup tables of the NeuroGraph signal and their derivatives.

For a phase index ``p in Z_N`` and a magnitude index ``a in [0, M)`` (one component of a
node's ``D``-vector)::

    s(p, a) = cos(2 pi p / N) * g(a),          g(a) = exp(sin(theta_a)),  theta_a = 2 pi a / M - pi
    ds/dp   = -sin(2 pi p / N) * 2 pi / N * g(a)
    ds/da   = cos(2 pi p / N) * cos(theta_a) * exp(sin(theta_a)) * 2 pi / M

The tables hold these at every bin; :func:`signal` looks the values up at integer indices and,
under autograd, uses the derivative tables for the backward pass (the indices carry gradients
through a straight-through estimator, see :mod:`.propagate`).
"""

from __future__ import annotations

import math

import torch


class Tables:
    """``cos``, ``sin`` ``[N]`` of ``2 pi p / N``; ``g``, ``dg`` ``[M]`` (``dg`` = dg/da per bin),
    in ``dtype`` on ``device``."""

    def __init__(self, N: int, M: int, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu"):
        self.N, self.M = N, M
        phase = 2 * math.pi * torch.arange(N, dtype=torch.float64) / N
        theta = 2 * math.pi * torch.arange(M, dtype=torch.float64) / M - math.pi
        self.cos = phase.cos().to(dtype=dtype, device=device)
        self.sin = phase.sin().to(dtype=dtype, device=device)
        self.g = theta.sin().exp().to(dtype=dtype, device=device)
        self.dg = (theta.cos() * theta.sin().exp() * 2 * math.pi / M).to(dtype=dtype, device=device)
        self.dcos = (-phase.sin() * 2 * math.pi / N).to(dtype=dtype, device=device)

    def values(self, p: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``s(p, a)`` for int64 indices ``p`` in ``[0, N)`` and ``a`` in ``[0, M)`` of any equal shape."""
        return self.cos[p] * self.g[a]


def strength(sig: torch.Tensor) -> torch.Tensor:
    """Message strength ``sum_d s_d`` of signals ``[..., D]``, added in the fixed order
    ``d = 0, 1, ..., D-1`` so the fast path and the reference round alike."""
    total = sig[..., 0].clone()
    for d in range(1, sig.shape[-1]):
        total += sig[..., d]
    return total


class _Signal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p: torch.Tensor, a: torch.Tensor, tables: Tables) -> torch.Tensor:
        pi, ai = p.detach().round().long(), a.detach().round().long()
        ctx.save_for_backward(pi, ai)
        ctx.tables = tables
        return tables.values(pi, ai).to(p.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pi, ai = ctx.saved_tensors
        t = ctx.tables
        grad_p = grad * (t.dcos[pi] * t.g[ai]).to(grad.dtype)
        grad_a = grad * (t.cos[pi] * t.dg[ai]).to(grad.dtype)
        return grad_p, grad_a, None


def signal(p: torch.Tensor, a: torch.Tensor, tables: Tables) -> torch.Tensor:
    """``s(p, a)`` of float index carriers ``p``, ``a`` (integer-valued; ``p`` in ``[0, N)``,
    ``a`` in ``[0, M)``) with the derivatives of the module docstring as their gradients."""
    return _Signal.apply(p, a, tables)
