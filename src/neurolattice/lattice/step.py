"""One synchronous step of the lattice MoE network, on the whole lattice at once.

Spec: shared/spec/lattice.md ("One step"). The per-cell reading of the same math is
:mod:`neurolattice.lattice.reference`; tests hold the two to 1e-10 in float64.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import LatticeConfig
from .experts import DistantExpert, FunctionalExpert, Gate, LocalExpert
from .geometry import lattice_geometry, pad_lattice, tier_sums

DEFAULT_CHUNK_ELEMS = 1 << 18


class LatticeMoE(nn.Module):
    r"""One step of the lattice: three experts over three distance tiers, mixed by a gate.

    .. math::
        x_i' = \mathrm{LN}_{out}(x_i + g_L o_L + g_F o_F + g_D o_D)

    with ``o_L, o_F, o_D`` from :class:`LocalExpert`, :class:`FunctionalExpert`,
    :class:`DistantExpert` and ``g`` from :class:`Gate`. Tier means are zero for an empty tier;
    an empty tier's expert gets gate weight 0, a cell with no neighbour keeps ``x_i`` (then
    the norm).

    Args:
        config: the lattice (dims, boundary, radii, sizes).
        chunk_elems: working-set size, in elements, of one chunk of the functional tier's
            streamed softmax; trades Python overhead against cache use, never the result.

    Shapes: ``states: [B, X, Y, Z, S] -> [B, X, Y, Z, S]``.
    """

    def __init__(self, config: LatticeConfig, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> None:
        super().__init__()
        self.config = config
        self.chunk_elems = chunk_elems
        S = config.state_size
        self.local = LocalExpert(S, config.hidden_local)
        self.functional = FunctionalExpert(S, config.hidden_functional)
        self.distant = DistantExpert(S, config.hidden_distant, config.ode_steps)
        self.gate = Gate(S, config.hidden_gate)
        self.norm = nn.LayerNorm(S, eps=1e-5)
        self.geometry = lattice_geometry(
            config.dims, config.boundary, (config.r_local, config.r_functional, config.r_distant)
        )
        # Neighbour counts per tier and, for an open boundary, where functional offsets are
        # valid: pure functions of the geometry, computed once, moved with the module.
        ones = torch.ones(1, *config.dims, 1, dtype=torch.float64)
        counts = tier_sums(pad_lattice(ones, self.geometry.pad, config.boundary), self.geometry, (0, 1, 2))
        self.register_buffer("counts", torch.cat(counts, dim=-1)[0], persistent=False)   # (X, Y, Z, 3)
        valid = None
        if config.boundary == "open":
            valid = pad_lattice(ones.bool(), self.geometry.pads[1], "open")                 # (1, X', Y', Z', 1)
        self.register_buffer("functional_valid", valid, persistent=False)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        self.check_states(states)
        geometry = self.geometry
        counts = self.counts.to(states.dtype)
        has_tier = counts > 0                                                   # (X, Y, Z, 3)
        xp = pad_lattice(states, geometry.pad, geometry.boundary)               # (B, X', Y', Z', S)
        sum_local, sum_functional, sum_distant = tier_sums(xp, geometry, (0, 1, 2))
        mean_local = sum_local / counts[..., 0:1].clamp_min(1)
        mean_distant = sum_distant / counts[..., 2:3].clamp_min(1)
        mean_all = (sum_local + sum_functional + sum_distant) / counts.sum(-1, keepdim=True).clamp_min(1)

        o_local = self.local(states, mean_local)
        o_functional = self.functional(states, geometry, self.functional_valid, has_tier[..., 1],
                                       self.chunk_elems)
        o_distant = self.distant(states, mean_distant) * has_tier[..., 2:3]
        g = self.gate(states, mean_all, has_tier)                               # (B, X, Y, Z, 3)
        mixed = g[..., 0:1] * o_local + g[..., 1:2] * o_functional + g[..., 2:3] * o_distant
        return self.norm(states + mixed)

    def check_states(self, states: torch.Tensor) -> None:
        """Raise a one-line ``ValueError`` unless ``states`` is a finite ``[B, X, Y, Z, S]`` float tensor."""
        X, Y, Z = self.config.dims
        S = self.config.state_size
        expected = f"[B, X, Y, Z, S] = [*, {X}, {Y}, {Z}, {S}]"
        if not isinstance(states, torch.Tensor):
            raise ValueError(f"states must be a torch.Tensor {expected}, got {type(states).__name__}")
        if states.dim() != 5 or tuple(states.shape[1:4]) != (X, Y, Z):
            raise ValueError(f"states must be {expected}, got {list(states.shape)}")
        if states.shape[-1] != S:
            raise ValueError(f"states must have state size S = {S}, got {states.shape[-1]} ({list(states.shape)})")
        if not states.is_floating_point():
            raise ValueError(f"states must be a floating-point tensor, got dtype {states.dtype}")
        param = self.norm.weight
        if states.dtype != param.dtype or states.device != param.device:
            raise ValueError(
                f"states are {states.dtype} on {states.device} but the parameters are "
                f"{param.dtype} on {param.device}"
            )
        if states.shape[0] == 0:
            raise ValueError("states has an empty batch (B = 0)")
        if not torch.isfinite(states).all():
            raise ValueError("states contain NaN or inf")

    def extra_repr(self) -> str:
        c = self.config
        k = self.geometry.num_offsets
        return (f"dims={c.dims}, state_size={c.state_size}, boundary={c.boundary!r}, "
                f"radii=({c.r_local}, {c.r_functional}, {c.r_distant}), offsets per tier={k}")
