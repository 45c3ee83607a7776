"""Tier structure: the stencil geometry against a brute-force neighbour search."""

import itertools

import pytest
import torch

from neurolattice.lattice import LatticeConfig, LatticeMoE
from neurolattice.lattice.geometry import lattice_geometry
from neurolattice.lattice.reference import neighbours


@pytest.mark.parametrize("config", [
    LatticeConfig(dims=(6, 5, 7)),
    LatticeConfig(dims=(6, 5, 7), boundary="periodic"),
    LatticeConfig(dims=(1, 2, 9), boundary="periodic"),
    LatticeConfig(dims=(4, 4, 3), boundary="periodic", r_local=1.0, r_functional=1.5, r_distant=2.0),
    LatticeConfig.relative((8, 3, 5)),
])
def test_counts_match_brute_force(config):
    counts = LatticeMoE(config).counts
    for cell in itertools.product(*[range(n) for n in config.dims]):
        expected = [len(t) for t in neighbours(cell, config)]
        assert counts[cell].tolist() == expected, cell


def test_default_interior_tier_sizes():
    counts = LatticeMoE(LatticeConfig(dims=(11, 11, 11))).counts
    assert counts[5, 5, 5].tolist() == [26, 96, 266]


def test_relative_tiers_match_the_prototype():
    config = LatticeConfig.relative((15, 15, 15))
    assert (config.r_local, config.r_functional, config.r_distant) == pytest.approx((1.8, 3.6, 4.455))
    counts = LatticeMoE(config).counts
    assert counts[7, 7, 7].tolist() == [26, 152, 186]
    tiny = LatticeConfig.relative((2, 2, 2))      # R clamped to 1
    assert tiny.r_distant == pytest.approx(0.99)


def test_geometry_is_computed_once_per_config():
    a = LatticeMoE(LatticeConfig(dims=(4, 4, 4))).geometry
    b = LatticeMoE(LatticeConfig(dims=(4, 4, 4))).geometry
    assert a is b
    assert lattice_geometry.cache_info().hits >= 1


def test_buffers_follow_the_module():
    model = LatticeMoE(LatticeConfig(dims=(3, 3, 3))).double()
    assert model.counts.dtype == torch.float64 and model.functional_bias.dtype == torch.float64
    assert "counts" not in model.state_dict()
