"""The PyTorch Geometric peer vs the fast path and the reference, and its graph vs the spec's tiers."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neurolattice.lattice import LatticeConfig
from neurolattice.lattice.bench import tier_edge_counts
from neurolattice.lattice.reference import neighbours, reference_step

from .conftest import make, states_for

pytest.importorskip("torch_geometric")
from neurolattice.lattice.peer_pyg import PyGLatticeStep, lattice_edges  # noqa: E402

SMALL = dict(state_size=6, hidden_local=5, hidden_functional=7, hidden_distant=4, hidden_gate=3)

CASES = {
    "open": LatticeConfig(dims=(5, 6, 7)),
    "periodic": LatticeConfig(dims=(5, 4, 9), boundary="periodic"),
    "periodic-short-sides": LatticeConfig(dims=(3, 2, 9), boundary="periodic"),
    "relative": LatticeConfig.relative((7, 6, 5), **SMALL),
    "relative-periodic": LatticeConfig.relative((6, 6, 4), boundary="periodic", **SMALL),
    "empty-local-tier": LatticeConfig(dims=(4, 3, 5), r_local=0.5, r_functional=1.5, r_distant=2.5, **SMALL),
    "no-functional": LatticeConfig(dims=(1, 1, 2), **SMALL),
    "single-cell": LatticeConfig(dims=(1, 1, 1), **SMALL),
}


@pytest.mark.parametrize("name", list(CASES))
def test_peer_matches_fast_path_float64(name):
    config = CASES[name]
    model = make(config)
    x = states_for(config, 2)
    with torch.no_grad():
        assert (PyGLatticeStep(model)(x) - model(x)).abs().max().item() <= 1e-10


@pytest.mark.parametrize("name", ["relative", "empty-local-tier", "no-functional", "single-cell"])
def test_peer_matches_reference_float64(name):
    config = CASES[name]
    model = make(config)
    x = states_for(config, 2)
    with torch.no_grad():
        assert (PyGLatticeStep(model)(x) - reference_step(model, x)).abs().max().item() <= 1e-10


@settings(max_examples=15, deadline=None)
@given(dims=st.tuples(*[st.integers(1, 6)] * 3), boundary=st.sampled_from(["open", "periodic"]),
       batch=st.integers(1, 3))
def test_peer_matches_fast_path_any_shape(dims, boundary, batch):
    config = LatticeConfig(dims=dims, boundary=boundary, r_local=1.5, r_functional=2.3, r_distant=3.1,
                           **SMALL)
    model = make(config)
    x = states_for(config, batch)
    with torch.no_grad():
        assert (PyGLatticeStep(model)(x) - model(x)).abs().max().item() <= 1e-10


@pytest.mark.parametrize("name", ["open", "periodic-short-sides", "relative-periodic"])
def test_edges_are_the_reference_neighbours(name):
    config = CASES[name]
    radii = (config.r_local, config.r_functional, config.r_distant)
    edge_index, edge_tier = lattice_edges(config.dims, config.boundary, radii)
    X, Y, Z = config.dims
    found = {}
    for j, i, t in zip(edge_index[0].tolist(), edge_index[1].tolist(), edge_tier.tolist()):
        found.setdefault((i, t), []).append(j)
    for cell in itertools.product(range(X), range(Y), range(Z)):
        i = (cell[0] * Y + cell[1]) * Z + cell[2]
        for t, tier in enumerate(neighbours(cell, config)):
            expected = sorted((a * Y + b) * Z + c for a, b, c in tier)
            assert sorted(found.get((i, t), [])) == expected          # no duplicates, no self-loops
    assert (edge_tier.diff() >= 0).all()                              # sorted by tier
    assert tuple(torch.bincount(edge_tier, minlength=3).tolist()) == tier_edge_counts(config)


def test_peer_shares_the_models_parameters():
    config = CASES["relative"]
    model = make(config)
    peer = PyGLatticeStep(model)
    x = states_for(config, 1)
    with torch.no_grad():
        before = peer(x)
        model.functional.msg1.weight.mul_(2.0)
        assert (peer(x) - before).abs().max().item() > 1e-6
        assert (peer(x) - model(x)).abs().max().item() <= 1e-10
