"""The three experts and the gate of the lattice MoE step, on the whole lattice at once.

Every module here maps ``[B, X, Y, Z, *]`` tensors (any leading shape for the pointwise
ones) and keeps the spec's parameter names and ``nn.Linear`` orientations
(``weight: [out, in]``). Neighbour aggregation comes from :mod:`.geometry`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import LatticeGeometry, pad_lattice, shifted


class LocalExpert(nn.Module):
    r"""Local expert, an MLP on the cell and the mean of its local tier.

    .. math:: o_L = L_2\,\mathrm{gelu}(L_1 [x_i ; \bar x^{L}_i] + l_1) + l_2

    Shapes: ``x, mean_local: [..., S] -> [..., S]``.
    """

    def __init__(self, state_size: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2 * state_size, hidden)
        self.fc2 = nn.Linear(hidden, state_size)

    def forward(self, x: torch.Tensor, mean_local: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(torch.cat([x, mean_local], dim=-1))))


class FunctionalExpert(nn.Module):
    r"""Functional expert: attention message passing over the functional tier.

    .. math::
        m_{ij} = M_2\,\mathrm{gelu}(M_1 [x_j ; x_i] + b_1) + b_2, \quad
        e_{ij} = a \cdot [m_{ij} ; x_i], \quad
        w_{ij} = \mathrm{softmax}_{j} e_{ij}

        \mathrm{agg}_i = \textstyle\sum_j w_{ij} m_{ij}, \quad
        o_F = U_2\,\mathrm{gelu}(U_1 [x_i ; \mathrm{agg}_i] + u_1) + u_2

    and ``o_F = 0`` for a cell with no functional neighbour.

    Fast path: with ``h_ij = gelu(P_j + Q_i)``, ``P = M_1^{a} x``, ``Q = M_1^{b} x + b_1``, the
    score is ``e_ij = v . h_ij + const_i`` with ``v = M_2^T a_m`` (the constant cancels in the
    softmax), and ``agg_i = M_2 (sum_j w_ij h_ij) + b_2``. :class:`FunctionalAggregate` streams
    an online softmax over the offsets, so no ``[N, K, H]`` tensor exists, in the forward or
    in the backward (which recomputes each chunk instead of saving it).

    Shapes: ``x: [B, X, Y, Z, S] -> [B, X, Y, Z, S]``.
    """

    def __init__(self, state_size: int, hidden: int) -> None:
        super().__init__()
        self.msg1 = nn.Linear(2 * state_size, hidden)
        self.msg2 = nn.Linear(hidden, state_size)
        self.attn = nn.Linear(2 * state_size, 1, bias=False)
        self.upd1 = nn.Linear(2 * state_size, hidden)
        self.upd2 = nn.Linear(hidden, state_size)

    def forward(self, x: torch.Tensor, geometry: LatticeGeometry,
                valid_pad: torch.Tensor | None, has_functional: torch.Tensor,
                chunk_elems: int) -> torch.Tensor:
        S = x.shape[-1]
        w1 = self.msg1.weight                                   # (H, 2S)
        p_pad = pad_lattice(x @ w1[:, :S].t(), geometry.pads[1], geometry.boundary)  # (B, X', Y', Z', H)
        q = F.linear(x, w1[:, S:], self.msg1.bias)              # (B, X, Y, Z, H)
        v = self.msg2.weight.t() @ self.attn.weight[0, :S]      # (H,)
        hagg = FunctionalAggregate.apply(p_pad, q, v, valid_pad, geometry, chunk_elems)
        agg = self.msg2(hagg)                                   # (B, X, Y, Z, S)
        out = self.upd2(F.gelu(self.upd1(torch.cat([x, agg], dim=-1))))
        return out * has_functional.unsqueeze(-1)


class DistantExpert(nn.Module):
    r"""Distant expert: a neural ODE driven by the mean of the distant tier.

    .. math::
        \frac{dz}{dt} = D_2 \tanh(D_1 [z ; \bar x^{D}_i] + d_1) + d_2 - \mathrm{softplus}(\lambda) z,
        \quad z(0) = x_i, \quad o_D = z(1) - x_i

    integrated by ``ode_steps`` fixed RK4 steps. Masking of cells with an empty distant tier
    is the caller's.

    Shapes: ``x, mean_distant: [..., S] -> [..., S]``.
    """

    def __init__(self, state_size: int, hidden: int, ode_steps: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2 * state_size, hidden)
        self.fc2 = nn.Linear(hidden, state_size)
        self.lam = nn.Parameter(torch.zeros(()))
        self.ode_steps = ode_steps

    def forward(self, x: torch.Tensor, mean_distant: torch.Tensor) -> torch.Tensor:
        S = x.shape[-1]
        w1 = self.fc1.weight
        drive = F.linear(mean_distant, w1[:, S:], self.fc1.bias)   # constant in t
        decay = F.softplus(self.lam)

        def field(z: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.tanh(z @ w1[:, :S].t() + drive)) - decay * z

        dt = 1.0 / self.ode_steps
        z = x
        for _ in range(self.ode_steps):
            k1 = field(z)
            k2 = field(z + 0.5 * dt * k1)
            k3 = field(z + 0.5 * dt * k2)
            k4 = field(z + dt * k3)
            z = z + (dt / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
        return z - x

    def extra_repr(self) -> str:
        return f"ode_steps={self.ode_steps}"


class Gate(nn.Module):
    r"""Gate over the three experts.

    .. math:: g_i = \mathrm{softmax}(G_2\,\mathrm{gelu}(G_1 [\mathrm{LN}(x_i) ; \bar x^{A}_i] + g_1) + g_2)

    An expert whose tier is empty for the cell gets logit ``-inf``; a cell with no neighbour
    at all gets ``g = 0``.

    Shapes: ``x, mean_all: [..., S]``, ``has_tier: [..., 3]`` (bool) ``-> [..., 3]``.
    """

    def __init__(self, state_size: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2 * state_size, hidden)
        self.fc2 = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor, mean_all: torch.Tensor, has_tier: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(x, x.shape[-1:], eps=1e-5)
        logits = self.fc2(F.gelu(self.fc1(torch.cat([normed, mean_all], dim=-1))))
        any_tier = has_tier.any(dim=-1, keepdim=True)
        logits = logits.masked_fill(~has_tier, float("-inf")).masked_fill(~any_tier, 0.0)
        return torch.softmax(logits, dim=-1) * any_tier


def _gelu_grad(u: torch.Tensor) -> torch.Tensor:
    """d gelu(u) / du for the exact (erf) gelu."""
    return 0.5 * (1.0 + torch.erf(u * (1.0 / math.sqrt(2.0)))) + u * torch.exp(-0.5 * u * u) * (
        1.0 / math.sqrt(2.0 * math.pi)
    )


def _chunks(geometry: LatticeGeometry, batch: int, hidden: int, chunk_elems: int):
    """Yield ``(x0, x1, offsets)``: x-slabs of the lattice and groups of functional offsets
    sized so one chunk's ``[g, B, x1 - x0, Y, Z, H]`` tensors hold about ``chunk_elems``."""
    X, Y, Z = geometry.dims
    offsets = geometry.offsets[1]
    if not offsets:
        return
    per_plane = batch * Y * Z * hidden
    ratio = max(1, chunk_elems // per_plane)
    group = min(len(offsets), ratio)
    slab = min(X, max(1, ratio // group))
    for x0 in range(0, X, slab):
        for k in range(0, len(offsets), group):
            yield x0, min(X, x0 + slab), offsets[k: k + group]


def _chunk_inputs(p_pad, q, v, valid_pad, geometry, x0, x1, group):
    """Recompute one chunk: pre-activations ``u`` ``[g, B, sx, Y, Z, H]``, ``h = gelu(u)`` and
    masked scores ``s`` ``[g, B, sx, Y, Z]``."""
    pad, dims = geometry.pads[1], geometry.dims
    u = torch.stack([shifted(p_pad, pad, o, dims)[:, x0:x1] for o in group]) + q[:, x0:x1]
    h = F.gelu(u)
    s = h @ v
    if valid_pad is not None:
        valid = torch.stack([shifted(valid_pad, pad, o, dims)[:, x0:x1, ..., 0] for o in group])
        s = s.masked_fill(~valid, float("-inf"))
    return u, h, s


class FunctionalAggregate(torch.autograd.Function):
    """``hagg_i = sum_j softmax_j(v . h_ij) h_ij`` with ``h_ij = gelu(P_{i+o_j} + Q_i)``, streamed.

    Inputs: ``p_pad [B, X', Y', Z', H]`` (P padded for the functional tier), ``q [B, X, Y, Z, H]``,
    ``v [H]``, ``valid_pad [1, X', Y', Z', 1]`` bool (open boundary) or None. Output
    ``[B, X, Y, Z, H]``, zero where the functional tier is empty. The forward keeps a running
    max, denominator and weighted sum per cell (online softmax); the backward recomputes each
    chunk from ``P, Q, v`` and the saved max and denominator, so memory stays
    ``O(N * H + chunk)`` in both directions.
    """

    @staticmethod
    def forward(ctx, p_pad, q, v, valid_pad, geometry, chunk_elems):
        B, H = q.shape[0], q.shape[-1]
        run_max = q.new_full(q.shape[:-1], torch.finfo(q.dtype).min)
        den = q.new_zeros(q.shape[:-1])
        acc = torch.zeros_like(q)
        for x0, x1, group in _chunks(geometry, B, H, chunk_elems):
            _, h, s = _chunk_inputs(p_pad, q, v, valid_pad, geometry, x0, x1, group)
            m_old = run_max[:, x0:x1]
            m_new = torch.maximum(m_old, s.amax(dim=0))
            alpha = torch.exp(m_old - m_new)
            p = torch.exp(s - m_new)                                   # (g, B, sx, Y, Z)
            den[:, x0:x1] = den[:, x0:x1] * alpha + p.sum(dim=0)
            acc[:, x0:x1] = acc[:, x0:x1] * alpha.unsqueeze(-1) + torch.einsum("g...,g...h->...h", p, h)
            run_max[:, x0:x1] = m_new
        nonempty = den > 0
        hagg = torch.where(nonempty.unsqueeze(-1), acc / torch.where(nonempty, den, 1.0).unsqueeze(-1), 0.0)
        ctx.save_for_backward(p_pad, q, v, valid_pad, run_max, den, hagg)
        ctx.geometry, ctx.chunk_elems = geometry, chunk_elems
        return hagg

    @staticmethod
    def backward(ctx, grad_hagg):
        p_pad, q, v, valid_pad, run_max, den, hagg = ctx.saved_tensors
        geometry = ctx.geometry
        B, H = q.shape[0], q.shape[-1]
        nonempty = den > 0
        grad = grad_hagg * nonempty.unsqueeze(-1)
        den_safe = torch.where(nonempty, den, 1.0)
        centre = (grad * hagg).sum(dim=-1)                              # G . hagg, (B, X, Y, Z)
        d_p_pad = torch.zeros_like(p_pad)
        d_q = torch.zeros_like(q)
        d_v = torch.zeros_like(v)
        pad, dims = geometry.pads[1], geometry.dims
        for x0, x1, group in _chunks(geometry, B, H, ctx.chunk_elems):
            u, h, s = _chunk_inputs(p_pad, q, v, valid_pad, geometry, x0, x1, group)
            g_slab = grad[:, x0:x1]
            w = torch.exp(s - run_max[:, x0:x1]) / den_safe[:, x0:x1]  # (g, B, sx, Y, Z)
            d_s = w * ((h * g_slab).sum(dim=-1) - centre[:, x0:x1])
            d_u = (w.unsqueeze(-1) * g_slab + d_s.unsqueeze(-1) * v) * _gelu_grad(u)
            d_q[:, x0:x1].add_(d_u.sum(dim=0))
            for k, o in enumerate(group):
                shifted(d_p_pad, pad, o, dims)[:, x0:x1].add_(d_u[k])
            d_v += d_s.reshape(-1) @ h.reshape(-1, H)
        return d_p_pad, d_q, d_v, None, None, None
