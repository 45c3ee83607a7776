"""One lattice over the ranks of a process group: domain decomposition along x, halo exchange.

**Slabs.** The ``X`` planes are cut into contiguous slabs, one per rank of the group in rank
order, sized as ``numpy.array_split`` sizes them (the first ``X mod W`` slabs one plane thicker).
The step is local: a cell reads cells at most ``h = geometry.pad[0]`` planes away along x (the
largest ``|dx|`` of any tier offset, ``<= floor(r_distant)``), so before every step each rank
needs ``h`` planes from each neighbour, its *halo*. Every slab must be at least ``h`` planes
thick (and one), so that a halo comes from the adjacent rank alone: a lattice of ``X`` planes
splits over at most ``X // max(h, 1)`` ranks.

**Stepping a slab.** :class:`~.step.LatticeMoE` steps cells from states padded by
``geometry.pad``, with the per-cell neighbour counts ``counts`` (the tier means, ``has_tier``,
the gate's masks) and the functional score bias ``functional_bias`` (``-inf`` where an open
lattice has no cell) of exactly those cells. :class:`ShardedLatticeMoE` supplies both for its
slab and then runs the same step:

* the padded states: along x the halo (from the neighbours; zeros past an open lattice's faces,
  where no cell exists), along y and z the lattice's own boundary;
* ``counts`` and ``functional_bias``: the same padding of an all-ones lattice, whose halo planes
  past an open face are zeros. A cell next to a face counts the neighbours it has in the whole
  lattice, the softmax gives the missing ones ``-inf``, a periodic slab counts every offset: the
  buffers are the rows ``x0:x1`` of the single-process ones, and the new states its rows too.

The geometry (the offsets, their z-runs) is the whole lattice's: a periodic side shorter than the
stencil keeps its minimum-image offsets, each distinct cell once.

**The exchange** (:class:`HaloExchange`, differentiable). Forward: a slab ``[B, sx, Y, Z, S]``
becomes ``[B, h + sx + h, Y, Z, S]``: the rank's first ``h`` planes go to its left neighbour
(becoming that one's right halo), its last ``h`` to the right one (its left halo), in one
``dist.batch_isend_irecv``. Neighbours are the ranks ``r - 1`` and ``r + 1``, wrapped for
``periodic``, none past the faces for ``open``; a rank that is its own neighbour (one rank,
periodic) copies. Backward: the adjoint. The gradient of the left halo belongs to the left
neighbour's last ``h`` planes and that of the right halo to the right one's first ``h``: the
same exchange carries the halo gradients back, and each rank adds what it receives into its
border planes (the halo past an open face is no cell: its gradient is dropped).

**Parameters** are replicated. A rank's backward gives the gradient of the cells it steps, so a
parameter's whole gradient is the sum over the ranks: the shared trainer, given a
:class:`ShardedLatticeModel` over all its ranks, sums them in one all-reduce per optimizer step
(every rank runs the whole batch; data parallelism on top of the split is refused in one line).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from neurolattice.config import Config

from .config import LatticeConfig
from .geometry import lattice_geometry, pad_lattice, tier_sums
from .model import LatticeModel, LatticeModelConfig
from .step import LatticeMoE

RIGHTWARD, LEFTWARD = 0, 1   # P2P tags: the direction a message travels
JOIN_TIMEOUT_S = 60.0


def halo_width(config: LatticeConfig) -> int:
    """``h``: how many x-planes on each side a slab needs from its neighbours."""
    radii = (config.r_local, config.r_functional, config.r_distant)
    return lattice_geometry(config.dims, config.boundary, radii).pad[0]


def slab_bounds(config: LatticeConfig, world: int) -> list[tuple[int, int]]:
    """``(x0, x1)`` of each of ``world`` slabs (``numpy.array_split`` sizes); a one-line
    ``ValueError`` when a slab would be thinner than the halo (or than one plane)."""
    X, h = config.dims[0], halo_width(config)
    need = max(h, 1)
    if world < 1 or X // world < need:
        raise ValueError(
            f"a lattice of X = {X} planes cannot be split over {world} ranks: a slab needs at least {need} "
            f"plane(s) (the halo of r_distant = {config.r_distant}), so at most {X // need} ranks")
    base, extra = divmod(X, world)
    starts = [r * base + min(r, extra) for r in range(world + 1)]
    return list(zip(starts[:-1], starts[1:]))


@dataclass(frozen=True)
class SlabLayout:
    """Where this rank's slab lies and whom it trades halos with.

    Attributes:
        group: the process group (None: no process group, one rank).
        rank, world: this rank in the group, the group's size.
        bounds: ``(x0, x1)`` of every rank's slab; ``bounds[rank]`` is this one's.
        halo: ``h``, planes per side.
        me, left, right: global ranks of this process and its neighbours (None past an open face).
    """

    group: dist.ProcessGroup | None
    rank: int
    world: int
    bounds: tuple[tuple[int, int], ...]
    halo: int
    me: int
    left: int | None
    right: int | None

    @classmethod
    def build(cls, config: LatticeConfig, group: dist.ProcessGroup | None = None,
              timeout_s: float = JOIN_TIMEOUT_S) -> SlabLayout:
        """The layout of ``config`` over ``group`` (default: the world, or one rank without a
        process group), after checking that every rank of the group is there (within
        ``timeout_s``) with the same config: one-line errors otherwise."""
        if not (dist.is_available() and dist.is_initialized()):
            group, rank, world, globals_ = None, 0, 1, [0]
        else:
            group = dist.group.WORLD if group is None else group
            rank, world = dist.get_rank(group), dist.get_world_size(group)
            globals_ = [dist.get_global_rank(group, r) for r in range(world)]
        bounds = slab_bounds(config, world)
        if world > 1:
            _check_presence(group, globals_, timeout_s)
            check_same(config, "lattice config", group, globals_)
        periodic = config.boundary == "periodic"

        def neighbour(r: int) -> int | None:
            return globals_[r % world] if periodic or 0 <= r < world else None

        return cls(group, rank, world, tuple(bounds), halo_width(config), globals_[rank],
                   neighbour(rank - 1), neighbour(rank + 1))

    @property
    def slab(self) -> tuple[int, int]:
        return self.bounds[self.rank]

    def swap(self, to_left: torch.Tensor, to_right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Send ``to_left`` to the left neighbour and ``to_right`` to the right one; return
        ``(from_left, from_right)``: the left neighbour's ``to_right`` and the right one's
        ``to_left``, zeros where there is no neighbour. Both are ``[B, h, Y, Z, C]``."""
        if self.left == self.me:   # one periodic rank, its own neighbour: what leaves one side enters the other
            return to_right.clone(), to_left.clone()
        from_left, from_right = to_right.new_zeros(to_right.shape), to_left.new_zeros(to_left.shape)
        ops = []
        for peer, send, send_tag, recv, recv_tag in ((self.left, to_left, LEFTWARD, from_left, RIGHTWARD),
                                                     (self.right, to_right, RIGHTWARD, from_right, LEFTWARD)):
            if peer is not None:
                ops += [dist.P2POp(dist.isend, send.contiguous(), peer, self.group, tag=send_tag),
                        dist.P2POp(dist.irecv, recv, peer, self.group, tag=recv_tag)]
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        return from_left, from_right


def _check_presence(group: dist.ProcessGroup, ranks: list[int], timeout_s: float) -> None:
    """Every rank of ``group`` (global ``ranks``) there within ``timeout_s``: a monitored barrier
    on gloo (which names the missing ranks), a barrier elsewhere."""
    try:
        if dist.get_backend(group) == "gloo":
            dist.monitored_barrier(group, timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
        else:
            dist.barrier(group)
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[0]
        raise RuntimeError(f"the sharded lattice over ranks {ranks} did not assemble within {timeout_s:g} s: "
                           f"{reason}") from None


def check_same(config: Config, what: str, group: dist.ProcessGroup, ranks: list[int]) -> None:
    """One-line ``ValueError`` on every rank of ``group`` unless all hold the ``config`` of its
    first rank (the first differing field named)."""
    configs: list[dict | None] = [None] * len(ranks)
    dist.all_gather_object(configs, config.to_dict(), group=group)
    for r, other in zip(ranks, configs):
        diff = [k for k in configs[0] if other[k] != configs[0][k]]
        if diff:
            k = diff[0]
            raise ValueError(f"rank {r}'s {what} differs from rank {ranks[0]}'s: "
                             f"{k} = {other[k]!r} vs {configs[0][k]!r}")


class HaloExchange(torch.autograd.Function):
    """``[B, sx, Y, Z, C] -> [B, h + sx + h, Y, Z, C]``: the slab between its neighbours' border
    planes; the backward sends the halo gradients back to their owners (module docstring)."""

    @staticmethod
    def forward(ctx, slab: torch.Tensor, layout: SlabLayout) -> torch.Tensor:
        ctx.layout = layout
        h = layout.halo
        left, right = layout.swap(slab[:, :h], slab[:, -h:])
        return torch.cat([left, slab, right], dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h = ctx.layout.halo
        from_left, from_right = ctx.layout.swap(grad[:, :h], grad[:, -h:])
        d_slab = grad[:, h:-h].clone()
        d_slab[:, :h] += from_left      # the left neighbour's right halo: my first h planes
        d_slab[:, -h:] += from_right    # the right neighbour's left halo: my last h planes
        return d_slab, None


class ShardedLatticeMoE(LatticeMoE):
    """:class:`~.step.LatticeMoE` on this rank's slab of the lattice (module docstring).

    Args:
        config: the whole lattice.
        group: the process group the lattice is split over (default: the world; without a
            process group, one rank holding the whole lattice).
        timeout_s: how long construction waits for every rank of the group.
        **kwargs: :class:`~.step.LatticeMoE`'s (``block_elems``, ``chunk_elems``, ...).

    Parameters and their names are :class:`~.step.LatticeMoE`'s, replicated on every rank.
    Construction is collective (every rank of the group) and fails in one line when the lattice
    does not split into ``W`` slabs of at least the halo, when a rank is missing, or when the
    ranks' configs differ. Every forward is collective too.

    Shapes: ``slab: [B, x1 - x0, Y, Z, S] -> [B, x1 - x0, Y, Z, S]``, ``(x0, x1) = layout.slab``.
    """

    def __init__(self, config: LatticeConfig, group: dist.ProcessGroup | None = None,
                 timeout_s: float = JOIN_TIMEOUT_S, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.layout = SlabLayout.build(config, group, timeout_s)
        (x0, x1), h = self.layout.slab, self.layout.halo
        _, Y, Z = config.dims
        # which planes of the slab and its halo are cells: all of them but those past an open face
        planes = torch.arange(x0 - h, x1 + h)
        real = torch.ones_like(planes, dtype=torch.bool)
        if config.boundary == "open":
            real = (planes >= 0) & (planes < config.dims[0])
        ones = real.float().view(1, -1, 1, 1, 1).expand(1, -1, Y, Z, 1)
        padded = pad_lattice(ones, (0, *self.geometry.pad[1:]), config.boundary)   # (1, sx + 2h, Y', Z', 1)
        counts = tier_sums(padded, self.geometry, (x1 - x0, Y, Z))
        self.counts = torch.cat(counts, dim=-1)[0]                                 # (sx, Y, Z, 3)
        if self.functional_bias is not None:
            self.functional_bias = torch.zeros(padded.shape).masked_fill(padded == 0, float("-inf"))

    def pad_states(self, states: torch.Tensor) -> torch.Tensor:
        """The slab between its halo planes along x, padded by the lattice's boundary along y, z."""
        if self.layout.halo:
            states = HaloExchange.apply(states, self.layout)
        return pad_lattice(states, (0, *self.geometry.pad[1:]), self.config.boundary)

    def extra_repr(self) -> str:
        (x0, x1), layout = self.layout.slab, self.layout
        return f"{super().extra_repr()}, slab x={x0}:{x1} (rank {layout.rank} of {layout.world}), halo={layout.halo}"


class _SumOverRanks(torch.autograd.Function):
    """The all-reduced sum of every rank's partial. Its backward is the identity: every rank
    computes the same loss from the sum, so each holds the whole gradient of the sum, which is
    the gradient of its own partial."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        total = partial.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class SlabHead(nn.Module):
    r"""The head ``W f + b`` of a :class:`~.model.LatticeModel` on a sharded lattice: rank ``r``
    holds the columns of its slab's planes in the flattened ``(x, y, s)`` face and computes
    ``W_r f_r`` (plus ``b`` on the group's first rank); the logits are their all-reduced sum.

    Shapes: ``flat: [B, (x1 - x0) * Y * S] -> [B, num_outputs]``.
    """

    def __init__(self, head: nn.Linear, layout: SlabLayout, plane: int) -> None:
        super().__init__()
        self.weight, self.bias = head.weight, head.bias
        self.layout = layout
        x0, x1 = layout.slab
        self.columns = (x0 * plane, x1 * plane)

    def forward(self, flat: torch.Tensor) -> torch.Tensor:
        c0, c1 = self.columns
        partial = F.linear(flat, self.weight[:, c0:c1], self.bias if self.layout.rank == 0 else None)
        return _SumOverRanks.apply(partial, self.layout.group) if self.layout.world > 1 else partial

    def extra_repr(self) -> str:
        return f"out_features={self.weight.shape[0]}, columns={self.columns[0]}:{self.columns[1]}"


class ShardedLatticeModel(LatticeModel):
    """:class:`~.model.LatticeModel` with its lattice split over ``group``
    (:class:`ShardedLatticeMoE`): the same parameters and names, so the same checkpoints.

    Every rank encodes the whole input face and keeps its slab's planes; the steps run on the
    slab; the head reads the slab's part of the ``z = Z - 1`` face (:class:`SlabHead`), and
    every rank gets the whole logits. The parameters are the single-process model's for the same
    seed, then broadcast from the group's first rank, so the replicas start equal whatever the
    ranks' RNGs. A ``trace`` holds this rank's slab. The shared trainer sees
    :attr:`model_parallel_world` and sums the gradients over the ranks (no DDP).
    Construction fails in one line when the ranks' model configs differ.
    """

    def __init__(self, config: LatticeModelConfig, group: dist.ProcessGroup | None = None,
                 timeout_s: float = JOIN_TIMEOUT_S, **kwargs) -> None:
        super().__init__(config, **kwargs)
        plain = self.lattice
        with torch.random.fork_rng(devices=[]):   # the RNG continues as after LatticeModel(config)
            self.lattice = ShardedLatticeMoE(config.lattice, group, timeout_s, **kwargs)
        self.lattice.load_state_dict(plain.state_dict())
        layout = self.lattice.layout
        _, Y, _ = config.lattice.dims
        self.head = SlabHead(self.head, layout, Y * config.lattice.state_size)
        if layout.world > 1:
            check_same(config, "model config", layout.group, [dist.get_global_rank(layout.group, r)
                                                               for r in range(layout.world)])
            with torch.no_grad():
                for tensor in self.state_dict().values():
                    dist.broadcast(tensor, dist.get_global_rank(layout.group, 0), layout.group)

    @property
    def model_parallel_world(self) -> int:
        """How many ranks the model spans (the shared trainer sums its gradients over them)."""
        return self.lattice.layout.world

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """This rank's planes of the input face, ``[B, x1 - x0, Y, S]``."""
        x0, x1 = self.lattice.layout.slab
        return super().encode(inputs)[:, x0:x1]
