"""One synchronous step of the lattice MoE network, on the whole lattice at once.

The math: docs/lattice.md ("One step"). The per-cell reading of the same math is
:mod:`neurolattice.lattice.reference`; tests hold the two to 1e-10 in float64.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch import nn

from .backends import check_backend, resolve
from .config import LatticeConfig
from .experts import DistantExpert, FunctionalExpert, Gate, LocalExpert
from .geometry import lattice_geometry, pad_lattice, shifted, tier_sums

DEFAULT_CHUNK_ELEMS = 1 << 18


def last_level_cache_bytes(sysfs: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """This CPU's largest cache (Linux's ``sysfs`` entries such as ``index3/size = 32768K``,
    else ``sysconf``), or None where neither says."""
    sizes = []
    for path in sysfs.glob("index*/size"):
        try:
            text = path.read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        if text.rstrip("KMG").isdigit():
            sizes.append(int(text.rstrip("KMG")) * scale)
    if not sizes:
        sizes = [os.sysconf(name) for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE")
                 if name in os.sysconf_names and os.sysconf(name) > 0]
    return max(sizes, default=None)


@functools.cache
def default_block_elems() -> int:
    """Elements of ``[B, planes, Y, Z, S]`` per block: as many float32 bytes as a quarter of the
    last-level cache (2^21 for 32 MB; 2^21 where the cache size is unknown), within [2^18, 2^23].
    Measured at 100^3 on a 32 MB-L3 CPU (docs/lattice.md): blocks of LLC/16 to LLC/4 bytes within
    noise, LLC x 2 2.4x slower (the blocks' intermediates stream from memory), LLC/32 and less
    slower (per-op overhead)."""
    llc = last_level_cache_bytes()
    return 1 << 21 if llc is None else min(1 << 23, max(1 << 18, llc // 16))


class LatticeMoE(nn.Module):
    r"""One step of the lattice: three experts over three distance tiers, mixed by a gate.

    .. math::
        x_i' = \mathrm{LN}_{out}(x_i + g_L o_L + g_F o_F + g_D o_D)

    with ``o_L, o_F, o_D`` from :class:`LocalExpert`, :class:`FunctionalExpert`,
    :class:`DistantExpert` and ``g`` from :class:`Gate`. Tier means are zero for an empty tier;
    an empty tier's expert gets gate weight 0, a cell with no neighbour keeps ``x_i`` (then
    the norm).

    The step is local (a cell sees cells within ``r_distant``), so it runs block by block:
    slabs of x-planes with their halo, each a view of the states padded once. The functional
    tier's ``P`` is computed once per step, on the padding that tier reaches, and sliced by
    every block, so slabs can be thin without recomputing it on their halos.

    Args:
        config: the lattice (dims, boundary, radii, sizes).
        block_elems: about how many elements of ``[B, x-planes, Y, Z, S]`` one block holds
            (default :func:`default_block_elems`, from the CPU's last-level cache).
        chunk_elems: the same for one slab of the functional tier's streamed softmax (the
            ``cpp`` backend: for one run of cells). Both trade overhead against cache use,
            never the result.
        backend: how the functional tier is aggregated: ``auto`` (the fastest available for
            the states' device), ``torch`` or ``cpp`` (:mod:`.backends`). Not part of the
            config: a checkpoint does not depend on it.

    Shapes: ``states: [B, X, Y, Z, S] -> [B, X, Y, Z, S]``.
    """

    def __init__(self, config: LatticeConfig, block_elems: int | None = None,
                 chunk_elems: int = DEFAULT_CHUNK_ELEMS, backend: str = "auto") -> None:
        super().__init__()
        self.config = config
        self.backend = check_backend(backend)
        self.block_elems = default_block_elems() if block_elems is None else block_elems
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
        # valid: pure functions of the geometry, computed once, moved (and cast) with the module.
        ones = torch.ones(1, *config.dims, 1)
        counts = tier_sums(pad_lattice(ones, self.geometry.pad, config.boundary), self.geometry)
        self.register_buffer("counts", torch.cat(counts, dim=-1)[0], persistent=False)   # (X, Y, Z, 3)
        bias = None
        if config.boundary == "open":   # additive score mask: 0 inside, -inf in the padding
            inside = pad_lattice(ones, self.geometry.pad, "open") > 0         # (1, X', Y', Z', 1)
            bias = torch.zeros(inside.shape).masked_fill(~inside, float("-inf"))
        self.register_buffer("functional_bias", bias, persistent=False)
        # the functional offsets' largest |d| per axis: how far P is padded
        self.functional_reach = tuple(max((abs(o[a]) for o in self.geometry.offsets[1]), default=0)
                                      for a in range(3))

    def forward(self, states: torch.Tensor, return_gates: bool = False, validate: bool = True):
        """New states ``[B, X, Y, Z, S]``; with ``return_gates``, also the gate weights
        ``[B, X, Y, Z, 3]`` (local, functional, distant). ``validate=False`` skips
        :meth:`check_states` (for callers that feed the step its own outputs)."""
        if validate:
            self.check_states(states)
        B, X, Y, Z, S = states.shape
        kernels = self.kernels(states.device)
        xp = self.pad_states(states)                                             # (B, X', Y', Z', S)
        # P of the functional tier once for every block, on the padding that tier reaches
        trim = (slice(None), *(slice(p - r, xp.shape[a + 1] - (p - r))
                               for a, (p, r) in enumerate(zip(self.geometry.pad, self.functional_reach))))
        p_pad = self.functional.project(xp[trim], kernels.z_major)              # (B, X+2rx, Y+2ry, Z+2rz, H)
        bias = None if self.functional_bias is None else self.functional_bias[trim]
        slab = min(X, max(1, self.block_elems // (B * Y * Z * S)))
        blocks = [self._block(xp, p_pad, bias, kernels, x0, min(X, x0 + slab)) for x0 in range(0, X, slab)]
        new_states, gates = (torch.cat(parts, dim=1) if len(parts) > 1 else parts[0] for parts in zip(*blocks))
        return (new_states, gates) if return_gates else new_states

    def pad_states(self, states: torch.Tensor) -> torch.Tensor:
        """``states`` padded by ``geometry.pad`` (zeros or wrapped copies); a sharded step
        (:mod:`.shard`) pads x with its neighbours' planes instead."""
        return pad_lattice(states, self.geometry.pad, self.config.boundary)

    def _block(self, xp: torch.Tensor, p_pad: torch.Tensor, bias: torch.Tensor | None, kernels,
               x0: int, x1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """New states and gate weights of the cells ``x0 <= x < x1``, from the padded ``xp`` and
        the functional tier's ``p_pad`` and score ``bias`` (padded by :attr:`functional_reach`)."""
        geometry = self.geometry
        pad, px, rx = geometry.pad, geometry.pad[0], self.functional_reach[0]
        dims = (x1 - x0, *geometry.dims[1:])
        xb = xp[:, x0: x1 + 2 * px]                                             # block and its halo
        x = shifted(xb, pad, (0, 0, 0), dims).contiguous()                      # (B, sx, Y, Z, S)
        counts = self.counts[x0:x1]                                             # (sx, Y, Z, 3)
        has_tier = counts > 0
        sum_local, sum_functional, sum_distant = kernels.tier_sums(xb, geometry, dims)
        mean_local = sum_local / counts[..., 0:1].clamp_min(1)
        mean_distant = sum_distant / counts[..., 2:3].clamp_min(1)
        mean_all = (sum_local + sum_functional + sum_distant) / counts.sum(-1, keepdim=True).clamp_min(1)

        o_local = self.local(x, mean_local)
        o_functional = self.functional(x, p_pad[:, x0: x1 + 2 * rx], geometry.offsets[1], self.functional_reach,
                                       None if bias is None else bias[:, x0: x1 + 2 * rx], has_tier[..., 1],
                                       self.chunk_elems, kernels)
        o_distant = self.distant(x, mean_distant) * has_tier[..., 2:3]
        g = self.gate(x, mean_all, has_tier)                                    # (B, sx, Y, Z, 3)
        mixed = g[..., 0:1] * o_local + g[..., 1:2] * o_functional + g[..., 2:3] * o_distant
        return self.norm(x + mixed), g

    def kernels(self, device: torch.device):
        """The :class:`~.backends.Kernels` (tier sums, the functional tier's aggregate) of
        :attr:`backend` on ``device``."""
        return resolve(self.backend, device.type, self.config.dims[2])[1]

    def backend_in_use(self, device: torch.device) -> str:
        """The backend that runs on ``device`` (``auto`` resolved, a fallback applied)."""
        return resolve(self.backend, device.type, self.config.dims[2])[0]

    def check_states(self, states: torch.Tensor) -> None:
        """Raise a one-line ``ValueError`` unless ``states`` is a finite ``[B, X, Y, Z, S]`` float
        tensor, ``(X, Y, Z)`` the cells this module steps (those of :attr:`counts`)."""
        X, Y, Z = self.counts.shape[:3]
        S = self.config.state_size
        expected = f"[B, X, Y, Z, S] = [*, {X}, {Y}, {Z}, {S}]"
        if not isinstance(states, torch.Tensor):
            raise ValueError(f"states must be a torch.Tensor {expected}, got {type(states).__name__}")
        if states.dim() != 5 or tuple(states.shape[1:4]) != (X, Y, Z):
            raise ValueError(f"states must be {expected}, got {list(states.shape)}")
        if states.shape[-1] != S:
            raise ValueError(
                f"states must have state size S = {S}, got {states.shape[-1]} ({list(states.shape)})"
            )
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
        # One reduction first (no [B, N, S] temporary); the elementwise test only if it is not
        # finite, which may also be an overflow of finite values.
        if not torch.isfinite(states.sum()) and not torch.isfinite(states).all():
            raise ValueError("states contain NaN or inf")

    def extra_repr(self) -> str:
        c = self.config
        k = self.geometry.num_offsets
        return (f"dims={c.dims}, state_size={c.state_size}, boundary={c.boundary!r}, "
                f"radii=({c.r_local}, {c.r_functional}, {c.r_distant}), offsets per tier={k}, "
                f"backend={self.backend!r}")
