"""The cpp backend's kernels one at a time vs their torch versions, float64, forward and backward."""

import pytest
import torch

from neurolattice.lattice import LatticeConfig
from neurolattice.lattice.backends import availability
from neurolattice.lattice.experts import FunctionalAggregate
from neurolattice.lattice.geometry import lattice_geometry, pad_lattice, tier_sums
from neurolattice.lattice.reference import reference_step

from .conftest import make, states_for

pytestmark = pytest.mark.skipif(bool(availability("cpp")), reason=f"cpp backend unavailable: {availability('cpp')}")

RADII = (1.75, 3.0, 4.5)
GEOMETRIES = {
    "open": ((5, 4, 6), "open", RADII),
    "periodic": ((5, 4, 6), "periodic", RADII),
    "side-1": ((1, 6, 5), "open", RADII),
    "side-2-periodic": ((2, 5, 7), "periodic", RADII),
    "sides-1-2": ((1, 2, 9), "open", RADII),
    "empty-local-tier": ((4, 3, 5), "open", (0.5, 1.5, 2.5)),
    "no-functional": ((1, 1, 2), "open", RADII),
    "long-rows": ((3, 2, 37), "open", RADII),      # whole vectors and a shifted last run on any width
}


def _cpu_functional():
    from neurolattice.lattice.kernels import cpu_functional

    return cpu_functional


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_tier_sums_match_torch(name):
    dims, boundary, radii = GEOMETRIES[name]
    geometry = lattice_geometry(dims, boundary, radii)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, *dims, 5, generator=gen, dtype=torch.float64)
    xp = pad_lattice(x, geometry.pad, boundary).requires_grad_()
    fused = _cpu_functional().FusedTierSums.apply(xp, geometry.offsets, geometry.pad, geometry.dims)
    plain = tier_sums(xp, geometry)
    weights = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in plain]
    for a, b in zip(fused, plain):
        assert (a - b).abs().max().item() <= 1e-12
    (grad,) = torch.autograd.grad(sum((t * w).sum() for t, w in zip(fused, weights)), xp)
    # the adjoint by hand: every offset of every tier carries its weight back to the cell it read
    expected = torch.zeros_like(xp)
    px, py, pz = geometry.pad
    X, Y, Z = dims
    for offsets, w in zip(geometry.offsets, weights):
        for dx, dy, dz in offsets:
            expected[:, px + dx: px + dx + X, py + dy: py + dy + Y, pz + dz: pz + dz + Z] += w
    assert (grad - expected).abs().max().item() <= 1e-12


def test_tier_sums_gradcheck():
    geometry = lattice_geometry((3, 2, 4), "periodic", (1.0, 1.5, 2.3))
    xp = pad_lattice(torch.randn(1, 3, 2, 4, 2, dtype=torch.float64), geometry.pad, "periodic").requires_grad_()
    fn = _cpu_functional().FusedTierSums.apply
    assert torch.autograd.gradcheck(lambda t: fn(t, geometry.offsets, geometry.pad, geometry.dims), (xp,))


@pytest.mark.parametrize("run_cells", [1, 3, 64])
@pytest.mark.parametrize("name", ["open", "periodic", "side-2-periodic", "no-functional", "long-rows"])
def test_functional_kernel_matches_torch(name, run_cells):
    dims, boundary, radii = GEOMETRIES[name]
    geometry = lattice_geometry(dims, boundary, radii)
    gen = torch.Generator().manual_seed(1)
    B, H = 2, 5
    p_pad = pad_lattice(torch.randn(B, *dims, H, generator=gen, dtype=torch.float64), geometry.pad, boundary)
    q = torch.randn(B, *dims, H, generator=gen, dtype=torch.float64)
    v = torch.randn(H, generator=gen, dtype=torch.float64)
    bias = None
    if boundary == "open":
        inside = pad_lattice(torch.ones(1, *dims, 1, dtype=torch.float64), geometry.pad, "open") > 0
        bias = torch.zeros(inside.shape, dtype=torch.float64).masked_fill(~inside, float("-inf"))
    inputs = [t.requires_grad_() for t in (p_pad, q, v)]
    args = (bias, geometry.offsets[1], geometry.pad)
    fused = _cpu_functional().FusedFunctionalAggregate.apply(*inputs, *args, run_cells)
    plain = FunctionalAggregate.apply(*inputs, *args, 10**6)
    assert (fused - plain).abs().max().item() <= 1e-12
    weight = torch.randn(plain.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((fused * weight).sum(), inputs),
                    torch.autograd.grad((plain * weight).sum(), inputs)):
        assert (a - b).abs().max().item() <= 1e-12


def test_long_rows_step_matches_reference():
    """z-rows longer than two vector registers: whole-vector runs and the shifted last run, in the whole step."""
    config = LatticeConfig(dims=(2, 2, 37), state_size=4, hidden_local=3, hidden_functional=5, hidden_distant=3,
                           hidden_gate=2)
    model = make(config, backend="cpp")
    x = states_for(config, 1)
    assert (model(x) - reference_step(model, x)).abs().max().item() <= 1e-10
