"""Backends of the functional tier's aggregation: one switch, never part of a checkpoint.

A backend computes :class:`~neurolattice.lattice.experts.FunctionalAggregate`'s function
(same inputs, same output, same gradients) its own way:

- ``torch``: :class:`~neurolattice.lattice.experts.FunctionalAggregate`, whole-tensor torch
  ops per offset; runs anywhere, the benchmark's baseline.
- ``cpp``: :class:`~neurolattice.lattice.kernels.cpu_functional.FusedFunctionalAggregate`,
  one fused C++ kernel per direction, CPU tensors only, built on first use.
- ``triton``: :class:`~neurolattice.lattice.kernels.triton_functional.TritonFunctionalAggregate`,
  Triton kernels for CUDA tensors (tested in Triton's CPU interpreter; no GPU has run them yet).
- ``auto``: the fastest one available for the tensors' device (:data:`AUTO_ORDER`); ``cpp``
  only where the lattice's z-rows fill a float32 vector register (``Backend.min_z``: its kernel
  vectorises along z, so shorter rows leave lanes idle, and the torch path is faster there:
  a 12 x 12 x 6 lattice's forward took 10.4 ms with cpp, 7.6 ms with torch, docs/lattice.md).

The choice is :class:`~neurolattice.lattice.LatticeMoE`'s ``backend`` attribute (a
constructor argument, default ``auto``), not a :class:`~neurolattice.lattice.LatticeConfig`
field, so a checkpoint neither records nor depends on it; every backend equals the per-cell
reference to 1e-10 in float64 (tests/lattice/test_step.py). A backend that cannot be loaded
here (no compiler, a failed build) gives one warning and the ``torch`` backend instead.

A backend also says how the tier sums are computed (:class:`Kernels`): ``cpp`` has its own
kernel (:class:`~neurolattice.lattice.kernels.cpu_functional.FusedTierSums`), the others use
:func:`~neurolattice.lattice.geometry.tier_sums`.

A new backend is one :data:`BACKENDS` entry (and its place in :data:`AUTO_ORDER`): the devices
it runs on and a loader returning its :class:`Kernels` or raising with a one-line reason.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .experts import FunctionalAggregate
from .geometry import LatticeGeometry, tier_sums

Aggregate = Callable[..., object]


@dataclass(frozen=True)
class Kernels:
    """What a backend computes its own way.

    ``aggregate(p_pad, q, v, score_bias, offsets, pad, chunk_elems)``: the function of
    :class:`~neurolattice.lattice.experts.FunctionalAggregate`;
    ``tier_sums(xp, geometry, dims)``: that of :func:`~neurolattice.lattice.geometry.tier_sums`.
    """

    aggregate: Aggregate
    tier_sums: Callable[..., list] = tier_sums
    z_major: bool = False     # aggregate reads P and Q stored [.., H, Z] per z-row (transposed views)


def _cpp() -> Kernels:
    from .kernels import cpu_functional

    cpu_functional.load()

    def aggregate(p_pad, q, v, score_bias, offsets, pad, chunk_elems):
        # chunk_elems elements of [cells, H] per run, at most one vector register of cells
        run_cells = min(cpu_functional.lanes(q.dtype), max(1, chunk_elems // q.shape[-1]))
        return cpu_functional.FusedFunctionalAggregate.apply(p_pad, q, v, score_bias, offsets, pad, run_cells)

    def sums(xp, geometry: LatticeGeometry, dims=None):
        return list(cpu_functional.FusedTierSums.apply(xp, geometry.offsets, geometry.pad, dims or geometry.dims))

    return Kernels(aggregate, sums, z_major=True)


def _triton() -> Kernels:
    from .kernels.triton_functional import TritonFunctionalAggregate

    return Kernels(TritonFunctionalAggregate.apply)


def _cpp_lanes() -> int:
    from .kernels import cpu_functional

    return cpu_functional.lanes(torch.float32)


@dataclass(frozen=True)
class Backend:
    devices: tuple[str, ...]             # torch device types it runs on, () for any
    load: Callable[[], Kernels]          # its kernels, or an exception saying why not
    # the shortest z-row ``auto`` gives it, where its kernel vectorises along z (None: any)
    min_z: Callable[[], int] | None = None


BACKENDS: dict[str, Backend] = {
    "torch": Backend((), lambda: Kernels(FunctionalAggregate.apply)),
    "cpp": Backend(("cpu",), _cpp, min_z=_cpp_lanes),
    "triton": Backend(("cuda",), _triton),
}
AUTO_ORDER = ("triton", "cpp", "torch")   # fastest first, among those for the tensors' device
CHOICES = ("auto", *BACKENDS)


def check_backend(name: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"backend must be one of {list(CHOICES)}, got {name!r}")
    return name


@functools.cache
def _load(name: str) -> tuple[Kernels | None, str]:
    try:
        return BACKENDS[name].load(), ""
    except Exception as err:   # a missing compiler, a failed build, a missing module: all say why
        return None, f"{type(err).__name__}: {err}".splitlines()[0]


def availability(name: str, device_type: str = "cpu") -> str:
    """Why backend ``name`` cannot run on ``device_type`` here, or "" if it can."""
    backend = BACKENDS[name]
    if backend.devices and device_type not in backend.devices:
        return f"the {name} backend runs on {'/'.join(backend.devices)}, not {device_type}"
    return _load(name)[1]


def _suits(name: str, device_type: str, z: int | None) -> bool:
    backend = BACKENDS[name]
    if backend.devices and device_type not in backend.devices:
        return False
    if backend.min_z is None or z is None:
        return True
    try:
        return z >= backend.min_z()
    except Exception:   # it cannot load: resolve says why, once
        return True


@functools.cache
def resolve(name: str, device_type: str, z: int | None = None) -> tuple[str, Kernels]:
    """The backend ``name`` (for ``auto``, the first of :data:`AUTO_ORDER` made for
    ``device_type`` whose ``min_z`` the lattice's z-rows of ``z`` cells reach) and its kernels;
    ``torch`` with one warning if it cannot run here."""
    if check_backend(name) == "auto":
        name = next(n for n in AUTO_ORDER if _suits(n, device_type, z))
    why = availability(name, device_type)
    if why:
        warnings.warn(f"neurolattice: {why}; using the torch backend", stacklevel=3)
        name = "torch"
    return name, _load(name)[0]

