"""The NeuroGraph DAG: node roles, static edges (source -> target) and their validation.

Nodes ``0 .. n_input-1`` are inputs, the last ``n_output`` are outputs, the rest hidden.
Edges point from source to target and messages travel that way. A user's edge list is
checked (nodes exist, no self-loops, no cycle); the random graph of a config gives every
non-input node ``fan_in`` distinct sources among the nodes before it, so it is acyclic by
construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import NeuroGraphConfig


@dataclass
class Graph:
    """Static edges as tensors.

    - ``edges``: ``[E, 2]`` int64 rows ``(source, target)``.
    - ``out_targets``: ``[n, W]`` int64, row ``u`` the static targets of ``u`` in ascending
      order, padded with ``-1`` (``W`` the largest out-degree, at least 1).
    """

    n: int
    n_input: int
    n_output: int
    edges: torch.Tensor
    out_targets: torch.Tensor

    @classmethod
    def from_edges(cls, n: int, n_input: int, n_output: int, edges) -> Graph:
        """Validate ``edges`` (``[E, 2]`` integers ``(source, target)``) and build the graph;
        a missing node, a self-loop or a cycle is a one-line ``ValueError``."""
        edges = torch.as_tensor(edges)
        if edges.numel() == 0:
            edges = edges.reshape(0, 2)
        if edges.dim() != 2 or edges.shape[1] != 2:
            raise ValueError(f"edges must be [E, 2] (source, target) pairs, got shape {list(edges.shape)}")
        if edges.dtype.is_floating_point or edges.dtype == torch.bool:
            raise ValueError(f"edges must be integers, got {edges.dtype}")
        edges = edges.long()
        bad = (edges < 0) | (edges >= n)
        if bad.any():
            i = int(bad.any(1).nonzero()[0])
            src, tgt = edges[i].tolist()
            raise ValueError(f"edge {i} ({src} -> {tgt}) names a missing node: nodes are 0..{n - 1}")
        loops = edges[:, 0] == edges[:, 1]
        if loops.any():
            i = int(loops.nonzero()[0])
            raise ValueError(f"edge {i} is a self-loop on node {int(edges[i, 0])}; the graph must be a DAG")
        edges = torch.unique(edges, dim=0)          # sorted by (source, target), duplicates merged
        cycle = find_cycle_node(n, edges)
        if cycle is not None:
            raise ValueError(f"the edges contain a cycle through node {cycle}; the graph must be a DAG")
        degree = torch.bincount(edges[:, 0], minlength=n)
        width = max(int(degree.max()) if len(edges) else 0, 1)
        out_targets = torch.full((n, width), -1, dtype=torch.long)
        first = torch.cumsum(degree, 0) - degree
        slot = torch.arange(len(edges)) - first[edges[:, 0]]
        out_targets[edges[:, 0], slot] = edges[:, 1]
        return cls(n, n_input, n_output, edges, out_targets)

    @classmethod
    def random(cls, config: NeuroGraphConfig, generator: torch.Generator) -> Graph:
        """Every non-input node ``v`` gets ``fan_in`` distinct sources drawn uniformly from the
        nodes ``0 .. v-1`` (``fan_in <= n_input <= v``)."""
        targets = torch.arange(config.n_input, config.n)
        span = targets[:, None].double()
        sources = (torch.rand(len(targets), config.fan_in, generator=generator, dtype=torch.float64) * span).long()
        while True:                                  # redraw the rows that drew a source twice
            ordered = sources.sort(1).values
            repeated = (ordered[:, 1:] == ordered[:, :-1]).any(1)
            if not repeated.any():
                break
            draw = torch.rand(int(repeated.sum()), config.fan_in, generator=generator, dtype=torch.float64)
            sources[repeated] = (draw * span[repeated]).long()
        edges = torch.stack([sources.flatten(), targets.repeat_interleave(config.fan_in)], 1)
        return cls.from_edges(config.n, config.n_input, config.n_output, edges)

    def is_output(self, nodes: torch.Tensor) -> torch.Tensor:
        return nodes >= self.n - self.n_output

    def is_hidden(self, nodes: torch.Tensor) -> torch.Tensor:
        return (nodes >= self.n_input) & (nodes < self.n - self.n_output)


def find_cycle_node(n: int, edges: torch.Tensor) -> int | None:
    """A node on (or downstream of) a cycle of ``edges`` ``[E, 2]``, or None for a DAG
    (Kahn's algorithm: repeatedly remove the nodes with no incoming edges)."""
    indegree = torch.bincount(edges[:, 1], minlength=n)
    alive = torch.ones(len(edges), dtype=torch.bool)
    removed = torch.zeros(n, dtype=torch.bool)
    while True:
        free = (indegree == 0) & ~removed
        if not free.any():
            break
        removed |= free
        leaving = alive & free[edges[:, 0]]
        alive &= ~leaving
        indegree -= torch.bincount(edges[leaving, 1], minlength=n)
    return None if removed.all() else int((~removed).nonzero()[0])
