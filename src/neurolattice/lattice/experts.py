"""The three experts and the gate of the lattice MoE step, on the whole lattice at once.

Every module here maps ``[B, X, Y, Z, *]`` tensors (any leading shape for the pointwise
ones) and keeps the parameter names of docs/lattice.md and ``nn.Linear`` orientations
(``weight: [out, in]``). Neighbour aggregation comes from :mod:`.geometry`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import shifted


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

    def project(self, xp: torch.Tensor, z_major: bool) -> torch.Tensor:
        """``P = M_1^a x`` of the padded states ``xp [B, X', Y', Z', S] -> [B, X', Y', Z', H]``,
        computed once per step for every block; ``z_major``: stored ``[.., H, Z']`` per z-row
        (a transposed view; what the ``cpp`` kernel reads), by the matmul itself."""
        w1a = self.msg1.weight[:, :xp.shape[-1]]                # (H, S)
        if z_major:
            return torch.matmul(w1a, xp.transpose(-1, -2)).transpose(-1, -2)
        return xp @ w1a.t()

    def forward(self, x: torch.Tensor, p_pad: torch.Tensor, offsets: tuple, reach: tuple[int, int, int],
                score_bias: torch.Tensor | None, has_functional: torch.Tensor,
                chunk_elems: int, kernels) -> torch.Tensor:
        """``x [B, X, Y, Z, S]``; ``p_pad`` :meth:`project` of the same states padded by ``reach``
        (the functional offsets' largest ``|d|`` per axis; zeros or wrapped), ``score_bias`` the
        matching padded mask, ``kernels`` a backend's :class:`~neurolattice.lattice.backends.Kernels`
        (its ``aggregate`` computes :class:`FunctionalAggregate`'s function)."""
        S = x.shape[-1]
        w1 = self.msg1.weight                                   # (H, 2S)
        if kernels.z_major:   # as p_pad: stored [.., H, Z] per z-row
            q = (torch.matmul(w1[:, S:], x.transpose(-1, -2)) + self.msg1.bias[:, None]).transpose(-1, -2)
        else:
            q = F.linear(x, w1[:, S:], self.msg1.bias)          # (B, X, Y, Z, H)
        v = self.msg2.weight.t() @ self.attn.weight[0, :S]      # (H,)
        hagg = kernels.aggregate(p_pad, q, v, score_bias, offsets, reach, chunk_elems)
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
        # tanh(a) = 2 sigmoid(2 a) - 1, the same function to rounding and ~3x faster than torch's
        # CPU tanh (which was 15% of a 30^3 step on its own). The factors 2 ride on the weights:
        # scaling by 2 is exact in binary, so sigmoid(2 a) and (sigmoid - 1/2) (2 D2) round
        # exactly as 2 sigmoid(2 a) - 1 and D2 do, in two fewer passes over [M, H].
        drive = F.linear(mean_distant, 2.0 * w1[:, S:], 2.0 * self.fc1.bias).reshape(-1, w1.shape[0])  # (M, H)
        w_z = 2.0 * w1[:, :S].t()                                            # (S, H)
        w_out, b_out = 2.0 * self.fc2.weight.t(), self.fc2.bias
        neg_decay = -F.softplus(self.lam)

        def field(z: torch.Tensor) -> torch.Tensor:                         # (M, S) -> (M, S)
            half_tanh = torch.sigmoid(torch.addmm(drive, z, w_z)).sub(0.5)  # tanh(D1 [z ; mean] + d1) / 2
            return torch.addmm(b_out, half_tanh, w_out).addcmul_(z, neg_decay)

        dt = 1.0 / self.ode_steps
        x_flat = x.reshape(-1, S)
        z = x_flat
        for _ in range(self.ode_steps):
            k1 = field(z)
            k2 = field(torch.add(z, k1, alpha=0.5 * dt))
            k3 = field(torch.add(z, k2, alpha=0.5 * dt))
            k4 = field(torch.add(z, k3, alpha=dt))
            z = torch.add(z, torch.add(k1, k2, alpha=2.0).add_(k3, alpha=2.0).add_(k4), alpha=dt / 6.0)
        return (z - x_flat).view_as(x)

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


def _slabs(dims: tuple[int, int, int], width: int, chunk_elems: int):
    """Yield ``(x0, x1)``: slabs of whole x-planes holding about ``chunk_elems`` elements of
    ``[B, x1 - x0, Y, Z, H]`` (``width = B * Y * Z * H`` per plane; at least one plane)."""
    slab = min(dims[0], max(1, chunk_elems // width))
    for x0 in range(0, dims[0], slab):
        yield x0, min(dims[0], x0 + slab)


class FunctionalAggregate(torch.autograd.Function):
    """``hagg_i = sum_j softmax_j(v . h_ij) h_ij`` with ``h_ij = gelu(P_{i+o_j} + Q_i)``, streamed.

    Inputs: ``p_pad [B, X', Y', Z', H]`` (P padded by ``pad``), ``q [B, X, Y, Z, H]``, ``v [H]``,
    ``score_bias [1, X', Y', Z', 1]`` (0 inside, ``-inf`` in the padding of an open lattice) or
    None (periodic), the functional ``offsets`` and ``pad``. Output ``[B, X, Y, Z, H]``, zero
    where the functional tier is empty.

    The forward walks the lattice in slabs of x-planes and, within a slab, the offsets one at
    a time, keeping a running max, denominator and weighted sum per cell (online softmax) in
    preallocated buffers. The backward recomputes each offset's ``h`` from ``P, Q, v`` and the
    saved max and denominator. Memory is ``O(N * H)`` plus one slab's buffers in both
    directions, whatever the number of offsets.
    """

    @staticmethod
    def forward(ctx, p_pad, q, v, score_bias, offsets, pad, chunk_elems):
        B, H, dims = q.shape[0], q.shape[-1], tuple(q.shape[1:4])
        run_max = q.new_full(q.shape[:-1], torch.finfo(q.dtype).min)
        den = q.new_zeros(q.shape[:-1])
        acc = torch.zeros_like(q)
        views = [shifted(p_pad, pad, o, dims) for o in offsets]
        biases = [None if score_bias is None else shifted(score_bias, pad, o, dims) for o in offsets]
        for x0, x1 in _slabs(dims, B * dims[1] * dims[2] * H, chunk_elems):
            q_s = q[:, x0:x1]
            m_s = run_max[:, x0:x1].reshape(B, -1)              # (B, M) views into the outputs
            den_s = den[:, x0:x1].reshape(B, -1)
            acc_s = acc[:, x0:x1].reshape(B, -1, H)
            h = torch.empty_like(q_s)                            # (B, sx, Y, Z, H)
            h_flat = h.view(B, -1, H)
            s = q_s.new_empty(h_flat.shape[:-1])                 # (B, M)
            for view, bias in zip(views, biases):
                torch.add(view[:, x0:x1], q_s, out=h)
                torch.ops.aten.gelu_(h)
                torch.matmul(h_flat, v, out=s)
                if bias is not None:
                    s.add_(bias[:, x0:x1].reshape(1, -1))
                m_new = torch.maximum(m_s, s)
                alpha = torch.exp(m_s - m_new)
                p = torch.exp(s.sub_(m_new))
                den_s.mul_(alpha).add_(p)
                acc_s.mul_(alpha.unsqueeze(-1)).addcmul_(p.unsqueeze(-1), h_flat)
                m_s.copy_(m_new)
        nonempty = den > 0
        hagg = acc.div_(torch.where(nonempty, den, 1.0).unsqueeze(-1))
        ctx.save_for_backward(p_pad, q, v, score_bias, run_max, den, hagg)
        ctx.offsets, ctx.pad, ctx.chunk_elems = offsets, pad, chunk_elems
        return hagg

    @staticmethod
    def backward(ctx, grad_hagg):
        r"""With ``G = dL/dhagg`` and ``w_j = softmax_j(s_j)``:
        ``dL/ds_j = w_j (G . h_j - G . hagg)``, ``dL/dh_j = w_j G + dL/ds_j v``,
        ``dL/du_j = dL/dh_j gelu'(u_j)``, which flows to ``Q_i`` and to ``P_{i+o_j}``;
        ``dL/dv = sum_j dL/ds_j h_j``."""
        p_pad, q, v, score_bias, run_max, den, hagg = ctx.saved_tensors
        offsets, pad = ctx.offsets, ctx.pad
        B, H, dims = q.shape[0], q.shape[-1], tuple(q.shape[1:4])
        nonempty = den > 0
        grad = grad_hagg * nonempty.unsqueeze(-1)
        inv_den = 1.0 / torch.where(nonempty, den, 1.0)
        centre = (grad * hagg).sum(dim=-1)                      # G . hagg, (B, X, Y, Z)
        d_p_pad = torch.zeros_like(p_pad)
        d_q = torch.zeros_like(q)
        d_v = torch.zeros_like(v)
        for x0, x1 in _slabs(dims, B * dims[1] * dims[2] * H, ctx.chunk_elems):
            q_s, d_q_s = q[:, x0:x1], d_q[:, x0:x1]
            g_s = grad[:, x0:x1].reshape(B, -1, H)
            m_s = run_max[:, x0:x1].reshape(B, -1)
            inv_den_s = inv_den[:, x0:x1].reshape(B, -1)
            centre_s = centre[:, x0:x1].reshape(B, -1)
            u = torch.empty_like(q_s)
            u_flat = u.view(B, -1, H)
            for o in offsets:
                torch.add(shifted(p_pad, pad, o, dims)[:, x0:x1], q_s, out=u)
                h = F.gelu(u_flat)                               # (B, M, H)
                s = h @ v                                        # (B, M)
                if score_bias is not None:
                    s.add_(shifted(score_bias, pad, o, dims)[:, x0:x1].reshape(1, -1))
                w = torch.exp(s.sub_(m_s)).mul_(inv_den_s)
                d_s = ((h * g_s).sum(dim=-1) - centre_s).mul_(w)
                d_u = torch.addcmul(g_s * w.unsqueeze(-1), d_s.unsqueeze(-1), v).mul_(_gelu_grad(u_flat))
                d_u = d_u.view_as(u)
                d_q_s.add_(d_u)
                shifted(d_p_pad, pad, o, dims)[:, x0:x1].add_(d_u)
                d_v.add_(torch.einsum("bm,bmh->h", d_s, h))
        return d_p_pad, d_q, d_v, None, None, None, None
