"""The per-cell reference step: the equations of docs/lattice.md ("One step") read literally.

A loop over cells, and inside it a loop over each neighbour, one cell at a time, written
from the parameters of a :class:`~neurolattice.lattice.LatticeMoE` with ``torch.nn.functional``
and nothing from the fast path (its own neighbour search, its own RK4, its own softmax).
Obviously right and slow on purpose: it is the oracle of the tests and the "before" of the
benchmark. Differentiable, so gradients can be compared too.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .step import LatticeMoE


def neighbours(cell: tuple[int, int, int], config) -> list[list[tuple[int, int, int]]]:
    """Neighbour cells of ``cell`` in the local, functional and distant tiers (brute force
    over the cube of half-width ``ceil(r_distant)``, minimum-image distance when periodic)."""
    dims, periodic = config.dims, config.boundary == "periodic"
    reach = math.ceil(config.r_distant)
    tiers: list[list[tuple[int, int, int]]] = [[], [], []]
    seen = {cell}
    for delta in itertools.product(range(-reach, reach + 1), repeat=3):
        other = tuple(c + d for c, d in zip(cell, delta))
        if periodic:
            other = tuple(o % n for o, n in zip(other, dims))
        elif not all(0 <= o < n for o, n in zip(other, dims)):
            continue
        if other in seen:
            continue
        seen.add(other)
        sq = 0
        for a, b, n in zip(cell, other, dims):
            d = abs(a - b)
            if periodic:
                d = min(d, n - d)
            sq += d * d
        dist = math.sqrt(sq)
        if dist <= config.r_local:
            tiers[0].append(other)
        elif dist <= config.r_functional:
            tiers[1].append(other)
        elif dist <= config.r_distant:
            tiers[2].append(other)
    return tiers


def _mean(vectors: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if not vectors:
        return torch.zeros_like(like)
    total = vectors[0]
    for v in vectors[1:]:
        total = total + v
    return total / len(vectors)


def _mlp(x: torch.Tensor, fc1, fc2, act=F.gelu) -> torch.Tensor:
    return F.linear(act(F.linear(x, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)


def reference_cell(model: LatticeMoE, states: torch.Tensor, cell: tuple[int, int, int]) -> torch.Tensor:
    """New state ``[B, S]`` of one cell from the snapshot ``states [B, X, Y, Z, S]``."""
    x_i = states[:, cell[0], cell[1], cell[2]]                         # (B, S)
    tiers = neighbours(cell, model.config)
    vecs = [[states[:, a, b, c] for a, b, c in tier] for tier in tiers]
    mean_local = _mean(vecs[0], x_i)
    mean_distant = _mean(vecs[2], x_i)
    mean_all = _mean(vecs[0] + vecs[1] + vecs[2], x_i)

    o_local = _mlp(torch.cat([x_i, mean_local], -1), model.local.fc1, model.local.fc2)

    fe = model.functional
    if vecs[1]:
        messages, scores = [], []
        for x_j in vecs[1]:
            m_ij = _mlp(torch.cat([x_j, x_i], -1), fe.msg1, fe.msg2)
            messages.append(m_ij)
            scores.append(F.linear(torch.cat([m_ij, x_i], -1), fe.attn.weight))   # (B, 1)
        e = torch.cat(scores, -1)                                                    # (B, K)
        w = torch.exp(e - e.max(-1, keepdim=True).values)
        w = w / w.sum(-1, keepdim=True)
        agg = sum(w[:, j: j + 1] * m for j, m in enumerate(messages))
        o_functional = _mlp(torch.cat([x_i, agg], -1), fe.upd1, fe.upd2)
    else:
        o_functional = torch.zeros_like(x_i)

    de = model.distant
    if vecs[2]:
        def field(z):
            h = torch.tanh(F.linear(torch.cat([z, mean_distant], -1), de.fc1.weight, de.fc1.bias))
            return F.linear(h, de.fc2.weight, de.fc2.bias) - F.softplus(de.lam) * z

        z, dt = x_i, 1.0 / de.ode_steps
        for _ in range(de.ode_steps):
            k1 = field(z)
            k2 = field(z + dt / 2 * k1)
            k3 = field(z + dt / 2 * k2)
            k4 = field(z + dt * k3)
            z = z + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        o_distant = z - x_i
    else:
        o_distant = torch.zeros_like(x_i)

    normed = F.layer_norm(x_i, x_i.shape[-1:], eps=1e-5)
    logits = _mlp(torch.cat([normed, mean_all], -1), model.gate.fc1, model.gate.fc2)     # (B, 3)
    present = [bool(t) for t in tiers]
    mixed = torch.zeros_like(x_i)
    if any(present):
        kept = [k for k in range(3) if present[k]]
        g = torch.softmax(logits[:, kept], -1)
        outputs = (o_local, o_functional, o_distant)
        for col, k in enumerate(kept):
            mixed = mixed + g[:, col: col + 1] * outputs[k]
    return F.layer_norm(x_i + mixed, x_i.shape[-1:], model.norm.weight, model.norm.bias, eps=1e-5)


def reference_step(model: LatticeMoE, states: torch.Tensor,
                   cells: Iterable[tuple[int, int, int]] | None = None) -> torch.Tensor:
    """The per-cell step. With ``cells``, only those cells are computed and returned as
    ``[B, len(cells), S]`` (for timing a sample); otherwise the full ``[B, X, Y, Z, S]``."""
    model.check_states(states)
    if cells is not None:
        return torch.stack([reference_cell(model, states, c) for c in cells], dim=1)
    X, Y, Z = model.config.dims
    out = [reference_cell(model, states, c) for c in itertools.product(range(X), range(Y), range(Z))]
    return torch.stack(out, dim=1).reshape(states.shape)
