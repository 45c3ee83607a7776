"""Fast path, on every backend, vs the per-cell reference: values, gradients, boundaries, edge cases."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neurolattice.lattice import LatticeConfig
from neurolattice.lattice.reference import reference_step

from ..bounds import float32_bound
from .conftest import backend_params, make, states_for

BACKENDS = backend_params()

SMALL = dict(state_size=6, hidden_local=5, hidden_functional=7, hidden_distant=4, hidden_gate=3)

CASES = {
    "open": LatticeConfig(dims=(5, 4, 6), **SMALL),
    "periodic": LatticeConfig(dims=(5, 4, 6), boundary="periodic", **SMALL),
    "relative": LatticeConfig.relative((7, 6, 5), **SMALL),
    "relative-periodic": LatticeConfig.relative((6, 6, 4), boundary="periodic", **SMALL),
    "side-1": LatticeConfig(dims=(1, 6, 5), **SMALL),
    "side-2-periodic": LatticeConfig(dims=(2, 5, 7), boundary="periodic", **SMALL),
    "sides-1-2": LatticeConfig(dims=(1, 2, 9), **SMALL),
    # r_local < 1: no cell has a local neighbour; a 1x1x2 lattice has no distant tier either.
    "empty-local-tier": LatticeConfig(dims=(4, 3, 5), r_local=0.5, r_functional=1.5, r_distant=2.5, **SMALL),
    "single-cell": LatticeConfig(dims=(1, 1, 1), **SMALL),
    "no-functional": LatticeConfig(dims=(1, 1, 2), **SMALL),
    "default-sizes": LatticeConfig(dims=(4, 5, 3)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_fast_matches_reference_float64(name, batch, backend):
    config = CASES[name]
    # Small blocks and chunks so the block, halo and slab (run) paths are all exercised.
    model = make(config, block_elems=1, chunk_elems=1, backend=backend)
    x = states_for(config, batch)
    assert (model(x) - reference_step(model, x)).abs().max().item() <= 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["open", "periodic", "relative", "default-sizes"])
def test_fast_matches_reference_float32(name, backend):
    config = CASES[name]
    model = make(config, dtype=torch.float32, backend=backend)
    x = states_for(config, 3, dtype=torch.float32)
    expected = reference_step(model, x)
    # float32: the fast path sums in other orders (tier sums, blocked matmuls, streamed softmax); terms: the
    # largest tier's mean, the S-input and H-hidden layers, then 4 RK4 stages per ODE step, each S + H_D.
    c = config
    terms = (max(model.geometry.num_offsets) + c.state_size + max(c.hidden_local, c.hidden_functional, c.hidden_gate)
             + 4 * c.ode_steps * (c.state_size + c.hidden_distant))
    assert (model(x) - expected).abs().max().item() <= float32_bound(expected, terms=terms)


@pytest.mark.parametrize("backend", BACKENDS)
def test_blocking_does_not_change_the_result(backend):
    config = LatticeConfig(dims=(11, 5, 6), **SMALL)
    x = states_for(config, 2)
    whole = make(config, backend="torch")(x)
    # cpp runs of 1, 2 (one partial run per z-row), 10 and 16 cells
    for block_elems, chunk_elems in [(1, 1), (500, 14), (500, 70), (5000, 10**6)]:
        out = make(config, block_elems=block_elems, chunk_elems=chunk_elems, backend=backend)(x)
        assert (out - whole).abs().max().item() <= 1e-12


def test_empty_tier_is_really_empty():
    model = make(CASES["empty-local-tier"])
    assert model.geometry.num_offsets[0] == 0 and (model.counts[..., 0] == 0).all()
    assert (make(CASES["no-functional"]).counts[..., 1:] == 0).all()


@settings(max_examples=25, deadline=None)
@given(
    dims=st.tuples(*[st.integers(1, 5)] * 3),
    boundary=st.sampled_from(["open", "periodic"]),
    radii=st.tuples(st.floats(0.5, 2.0), st.floats(0.1, 1.5), st.floats(0.1, 1.5)),
    batch=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_matches_reference_random_configs(backend, dims, boundary, radii, batch, seed):
    r_local = radii[0]
    config = LatticeConfig(dims=dims, boundary=boundary, r_local=r_local,
                           r_functional=r_local + radii[1], r_distant=r_local + radii[1] + radii[2],
                           state_size=3, hidden_local=2, hidden_functional=3, hidden_distant=2,
                           hidden_gate=2)
    model = make(config, seed=seed, block_elems=seed % 200, chunk_elems=seed % 50, backend=backend)
    x = states_for(config, batch, seed=seed + 1)
    assert (model(x) - reference_step(model, x)).abs().max().item() <= 1e-10


def _grads(fn, model, x, weight):
    params = list(model.parameters())
    return torch.autograd.grad((fn(x) * weight).sum(), [x, *params], allow_unused=True,
                               materialize_grads=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["open", "periodic", "relative", "empty-local-tier", "side-2-periodic",
                                  "no-functional"])
def test_gradients_match_reference(name, backend):
    config = CASES[name]
    model = make(config, block_elems=200, chunk_elems=20, backend=backend)
    x = states_for(config, 2).requires_grad_()
    weight = states_for(config, 2, seed=7)
    fast = _grads(model, model, x, weight)
    ref = _grads(lambda s: reference_step(model, s), model, x, weight)
    names = ["states"] + [n for n, _ in model.named_parameters()]
    for name_, a, b in zip(names, fast, ref):
        assert (a - b).abs().max().item() <= 1e-8, name_


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("boundary", ["open", "periodic"])
def test_gradcheck_tiny(boundary, backend):
    config = LatticeConfig(dims=(3, 2, 3), boundary=boundary, state_size=3, hidden_local=2,
                           hidden_functional=4, hidden_distant=2, hidden_gate=2,
                           r_local=1.0, r_functional=1.5, r_distant=2.3)
    model = make(config, block_elems=20, chunk_elems=10, backend=backend)
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().requires_grad_() for p in model.parameters()]
    x = states_for(config, 2).requires_grad_()

    def fn(states, *ps):
        return torch.func.functional_call(model, dict(zip(names, ps)), (states,))

    assert torch.autograd.gradcheck(fn, (x, *params))
