"""Neighbour structure of the lattice as a stencil: tier offsets, padding, tier sums.

A regular lattice is a stencil, not a graph. Every cell sees the same set of integer
offsets ``(dx, dy, dz)``; with an ``open`` boundary an offset is simply invalid where it
leaves the lattice, with a ``periodic`` one it wraps (minimum image, each distinct
neighbour cell counted once even on sides shorter than the stencil).

The structure is a pure function of ``(dims, boundary, radii)`` and is built once per
configuration (:func:`lattice_geometry` is cached). On the hot path the states are padded
once (zeros for ``open``, wrapped copies for ``periodic``) and every offset is a shifted
*view* of the padded tensor: no index gathers, no ``[N, K, S]`` tensors.

Tier sums stream over z-runs: the offsets of a tier that share ``(dx, dy)`` form at most
two contiguous runs in ``dz``; a run of length ``n`` is one shifted view of a z-window
sum of length ``n``. The ~260-offset distant tier costs ~100 shifted adds instead of 260.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TIERS = ("local", "functional", "distant")

Offset = tuple[int, int, int]
Run = tuple[int, int, int]  # (dx, dy, dz_start) of a run of consecutive dz


def axis_displacements(size: int, reach: int, boundary: str) -> list[int]:
    """Distinct displacements along one axis of ``size`` cells within ``|d| <= reach``.

    ``open``: ``-min(reach, size-1) .. min(reach, size-1)``. ``periodic``: one minimum-image
    representative per distinct residue, in ``(-size/2, size/2]``.
    """
    if boundary == "open":
        r = min(reach, size - 1)
        return list(range(-r, r + 1))
    disps = [res if res <= size // 2 else res - size for res in range(size)]
    return sorted(d for d in disps if abs(d) <= reach)


def tier_of(distance: float, radii: tuple[float, float, float]) -> int | None:
    """0, 1, 2 for the local, functional, distant tier; None if outside (or the cell itself)."""
    if distance == 0.0:
        return None
    for t, r in enumerate(radii):
        if distance <= r:
            return t
    return None


@dataclass(frozen=True)
class LatticeGeometry:
    """Tier offsets and how to stream over them, for one ``(dims, boundary, radii)``.

    Attributes:
        offsets: per tier, the list of ``(dx, dy, dz)`` offsets (distinct neighbour cells).
        runs: per tier, ``{n: [(dx, dy, dz0), ...]}``: runs of ``n`` consecutive dz.
        pad: the padding ``(px, py, pz)`` that makes every offset a view of the padded states.
    """

    dims: tuple[int, int, int]
    boundary: str
    radii: tuple[float, float, float]
    offsets: tuple[tuple[Offset, ...], ...]
    runs: tuple[dict[int, tuple[Run, ...]], ...]
    pad: tuple[int, int, int]

    @property
    def num_offsets(self) -> tuple[int, int, int]:
        return tuple(len(o) for o in self.offsets)


@functools.lru_cache(maxsize=32)
def lattice_geometry(
    dims: tuple[int, int, int], boundary: str, radii: tuple[float, float, float]
) -> LatticeGeometry:
    reach = math.floor(radii[2])
    axes = [axis_displacements(size, reach, boundary) for size in dims]
    offsets: list[list[Offset]] = [[], [], []]
    for dx in axes[0]:
        for dy in axes[1]:
            for dz in axes[2]:
                t = tier_of(math.sqrt(dx * dx + dy * dy + dz * dz), radii)
                if t is not None:
                    offsets[t].append((dx, dy, dz))
    runs = tuple(_z_runs(tier) for tier in offsets)
    pad = tuple(max((abs(o[a]) for tier in offsets for o in tier), default=0) for a in range(3))
    return LatticeGeometry(
        dims=tuple(dims), boundary=boundary, radii=tuple(radii),
        offsets=tuple(tuple(t) for t in offsets), runs=runs, pad=pad,
    )


def _z_runs(offsets: list[Offset]) -> dict[int, tuple[Run, ...]]:
    columns: dict[tuple[int, int], list[int]] = {}
    for dx, dy, dz in offsets:
        columns.setdefault((dx, dy), []).append(dz)
    runs: dict[int, list[Run]] = {}
    for (dx, dy), dzs in columns.items():
        dzs.sort()
        start = prev = dzs[0]
        for dz in dzs[1:] + [None]:
            if dz is not None and dz == prev + 1:
                prev = dz
                continue
            runs.setdefault(prev - start + 1, []).append((dx, dy, start))
            if dz is not None:
                start = prev = dz
    return {n: tuple(r) for n, r in sorted(runs.items())}


def pad_lattice(x: torch.Tensor, pad: tuple[int, int, int], boundary: str) -> torch.Tensor:
    """Pad ``[B, X, Y, Z, C]`` to ``[B, X+2px, Y+2py, Z+2pz, C]``: zeros or wrapped copies."""
    if boundary == "open":
        px, py, pz = pad
        return F.pad(x, (0, 0, pz, pz, py, py, px, px))
    for axis, p in enumerate(pad):
        if p:
            size = x.shape[axis + 1]
            idx = torch.arange(-p, size + p, device=x.device) % size
            x = x.index_select(axis + 1, idx)
    return x


def shifted(xp: torch.Tensor, pad: tuple[int, int, int], offset: Offset,
            dims: tuple[int, int, int]) -> torch.Tensor:
    """View of the padded ``xp`` holding, at cell ``(x, y, z)``, the value at ``(x, y, z) + offset``."""
    (px, py, pz), (dx, dy, dz), (X, Y, Z) = pad, offset, dims
    return xp[:, px + dx: px + dx + X, py + dy: py + dy + Y, pz + dz: pz + dz + Z]


def tier_sums(xp: torch.Tensor, geometry: LatticeGeometry,
              dims: tuple[int, int, int] | None = None) -> list[torch.Tensor]:
    """Sums over the local, functional and distant neighbours, ``[B, X, Y, Z, C]`` each, from
    ``xp`` padded by ``geometry.pad``. ``dims`` (default ``geometry.dims``) is the block of cells ``xp`` pads.

    Streams over z-runs: ``window`` holds sums of ``n`` consecutive z-cells of ``xp``, grown
    one cell at a time, and every run of length ``n`` adds one shifted view of it. Memory:
    two padded tensors and the outputs, whatever the number of offsets.
    """
    dims = dims or geometry.dims
    shape = (*xp.shape[:1], *dims, xp.shape[-1])
    out = [xp.new_zeros(shape) for _ in TIERS]
    lengths = sorted({n for runs in geometry.runs for n in runs})
    window, n_have = xp, 1
    for n in lengths:
        while n_have < n:
            window = window[:, :, :, :-1] + xp[:, :, :, n_have:]
            n_have += 1
        for total, runs in zip(out, geometry.runs):
            for run in runs.get(n, ()):
                total.add_(shifted(window, geometry.pad, run, dims))
    return out
