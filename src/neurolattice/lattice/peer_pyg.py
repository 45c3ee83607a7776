"""The lattice step written the PyTorch Geometric way: a peer to benchmark the fast path against.

The lattice becomes a graph: one directed edge ``j -> i`` for every neighbour ``j`` of every
cell ``i`` in any of the three tiers, with the tier as an edge attribute. Tier means are
:class:`~torch_geometric.nn.MessagePassing` mean aggregations over each tier's edges, the
functional expert's attention is a message function normalised by
:func:`torch_geometric.utils.softmax` over the functional edges, and the rest (the local MLP,
the ODE, the gate, the norm) is node-wise. Same math, same parameters as
:class:`~neurolattice.lattice.LatticeMoE` (it takes one and reuses its modules); only the
neighbour handling differs: index gathers over ``E ~ 380 N`` edges instead of stencil views.

Batch: the ``B`` lattices share one graph. Node features are ``[N, B, S]`` (cells first,
``node_dim=0``), so one ``edge_index`` serves the whole batch; this is PyG's ``[N, B * S]``
layout with the batch kept as its own axis, and cheaper than a disjoint union of ``B`` graphs
(which would repeat the ``2 x E`` index ``B`` times).

Needs ``torch_geometric`` (``pip install 'neurolattice[peers]'``); nothing else in the package
imports this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:
    from torch_geometric.nn import MessagePassing
    from torch_geometric.utils import softmax
except ImportError as err:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError(
        "neurolattice.lattice.peer_pyg needs torch_geometric: pip install 'neurolattice[peers]'"
    ) from err

from .experts import FunctionalExpert
from .geometry import lattice_geometry
from .step import LatticeMoE


def lattice_edges(dims: tuple[int, int, int], boundary: str,
                  radii: tuple[float, float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """All tier edges of the lattice, from the stencil offsets of :func:`lattice_geometry`.

    Returns ``edge_index [2, E]`` (row 0 the neighbour ``j``, row 1 the cell ``i``, linear
    indices ``(x * Y + y) * Z + z``) and ``edge_tier [E]`` (0 local, 1 functional, 2
    distant). Edges are sorted by tier, then by cell ``i``. ``open``: offsets leaving the
    lattice are dropped; ``periodic``: they wrap (the geometry lists each distinct neighbour
    cell once, so there are no duplicate edges and no self-loops).
    """
    geometry = lattice_geometry(tuple(dims), boundary, tuple(radii))
    X, Y, Z = dims
    cell = torch.arange(X * Y * Z).view(X, Y, Z, 1)
    sources, targets, tiers = [], [], []
    for t, offsets in enumerate(geometry.offsets):
        off = torch.tensor(offsets, dtype=torch.long).view(-1, 3)                  # (K, 3)
        # Neighbour coordinate along each axis, per cell coordinate and offset: (n, K).
        cx, cy, cz = (torch.arange(n).unsqueeze(1) + off[:, a] for a, n in enumerate(dims))
        if boundary == "periodic":
            cx, cy, cz = cx % X, cy % Y, cz % Z
        source = (cx[:, None, None] * Y + cy[None, :, None]) * Z + cz[None, None, :]  # (X, Y, Z, K)
        target = cell.expand_as(source)
        if boundary == "open":
            inside = [(0 <= c) & (c < n) for c, n in zip((cx, cy, cz), dims)]
            valid = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
            source, target = source[valid], target[valid]
        sources.append(source.reshape(-1))
        targets.append(target.reshape(-1))
        tiers.append(torch.full((len(sources[-1]),), t, dtype=torch.long))
    return torch.stack([torch.cat(sources), torch.cat(targets)]), torch.cat(tiers)


class TierMean(MessagePassing):
    r"""Mean of the neighbours' features: :math:`\bar x_i = \frac{1}{|N(i)|} \sum_{j \in N(i)} x_j`
    (zero for a cell without edges).

    Shapes: ``x: [N, B, S]``, ``edge_index: [2, E] -> [N, B, S]``.
    """

    def __init__(self) -> None:
        super().__init__(aggr="mean", node_dim=0)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.propagate(edge_index, x=x)


class FunctionalAttention(MessagePassing):
    r"""Attention aggregation of the functional expert over the functional edges.

    .. math::
        m_{ij} = M_2\,\mathrm{gelu}(M_1 [x_j ; x_i] + b_1) + b_2, \quad
        w_{ij} = \mathrm{softmax}_{j \in F(i)}\, a \cdot [m_{ij} ; x_i], \quad
        \mathrm{agg}_i = \textstyle\sum_j w_{ij} m_{ij}

    with the parameters of ``expert`` (``msg1``, ``msg2``, ``attn``); zero for a cell
    without functional edges.

    Shapes: ``x: [N, B, S]``, ``edge_index: [2, E_F] -> [N, B, S]``.
    """

    def __init__(self, expert: FunctionalExpert) -> None:
        super().__init__(aggr="sum", node_dim=0)
        self.expert = expert

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.propagate(edge_index, x=x)

    def message(self, x_i: torch.Tensor, x_j: torch.Tensor, index: torch.Tensor,
                size_i: int) -> torch.Tensor:
        fe = self.expert
        m = fe.msg2(F.gelu(fe.msg1(torch.cat([x_j, x_i], dim=-1))))     # (E_F, B, S)
        e = fe.attn(torch.cat([m, x_i], dim=-1))                         # (E_F, B, 1)
        return softmax(e, index, num_nodes=size_i, dim=0) * m


class PyGLatticeStep(nn.Module):
    r"""One lattice step on the lattice's graph, with the parameters of ``model``.

    .. math::
        x_i' = \mathrm{LN}_{out}(x_i + g_L o_L + g_F o_F + g_D o_D)

    exactly as :class:`~neurolattice.lattice.LatticeMoE` (docs/lattice.md, "One step"):
    tier means by :class:`TierMean` over each tier's edges (``mean_A`` is their
    count-weighted mean), ``agg`` by :class:`FunctionalAttention`, then ``model.local``,
    ``model.functional.upd1/upd2``, ``model.distant``, ``model.gate`` and ``model.norm`` on the
    nodes. The graph (:func:`lattice_edges`) is built once, here, on the model's device.

    Args:
        model: the step whose parameters (and configuration) are used; shared, not copied.

    Shapes: ``states: [B, X, Y, Z, S] -> [B, X, Y, Z, S]``.
    """

    def __init__(self, model: LatticeMoE) -> None:
        super().__init__()
        self.model = model
        self.tier_mean = TierMean()
        self.attention = FunctionalAttention(model.functional)
        c = model.config
        device = model.norm.weight.device
        edge_index, edge_tier = lattice_edges(c.dims, c.boundary, (c.r_local, c.r_functional, c.r_distant))
        num_cells = c.num_cells
        counts = torch.bincount(edge_index[1] * 3 + edge_tier, minlength=3 * num_cells).view(num_cells, 3)
        self.register_buffer("edge_index", edge_index.to(device), persistent=False)   # (2, E)
        self.register_buffer("edge_tier", edge_tier.to(device), persistent=False)     # (E,)
        self.register_buffer("counts", counts.to(device), persistent=False)           # (N, 3) edges per tier
        self.tier_sizes = torch.bincount(edge_tier, minlength=3).tolist()

    @property
    def num_edges(self) -> int:
        return self.edge_index.shape[1]

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        model = self.model
        model.check_states(states)
        B, X, Y, Z, S = states.shape
        x = states.permute(1, 2, 3, 0, 4).reshape(X * Y * Z, B, S)               # (N, B, S)
        edges = self.edge_index.split(self.tier_sizes, dim=1)                    # per tier (2, E_t)
        means = [self.tier_mean(x, e) for e in edges]                            # per tier (N, B, S)
        counts = self.counts.to(x.dtype).unsqueeze(1)                            # (N, 1, 3)
        has_tier = counts > 0
        total = counts.sum(-1, keepdim=True).clamp_min(1)
        mean_all = sum(counts[..., t: t + 1] * means[t] for t in range(3)) / total   # (N, B, S)

        fe = model.functional
        agg = self.attention(x, edges[1])                                        # (N, B, S)
        o_local = model.local(x, means[0])
        o_functional = fe.upd2(F.gelu(fe.upd1(torch.cat([x, agg], dim=-1)))) * has_tier[..., 1:2]
        o_distant = model.distant(x, means[2]) * has_tier[..., 2:3]
        g = model.gate(x, mean_all, has_tier)                                    # (N, B, 3)
        mixed = g[..., 0:1] * o_local + g[..., 1:2] * o_functional + g[..., 2:3] * o_distant
        out = model.norm(x + mixed)                                              # (N, B, S)
        return out.view(X, Y, Z, B, S).permute(3, 0, 1, 2, 4).contiguous()

    def extra_repr(self) -> str:
        return f"num_edges={self.num_edges}, edges per tier={tuple(self.tier_sizes)}"
