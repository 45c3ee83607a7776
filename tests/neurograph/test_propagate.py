"""The fast path against the per-node reference: same active sets, indices and radiation
targets at every timestep, strengths (float64 for a net of either dtype) within 1e-9, same gradients."""

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neurolattice.neurograph import Graph, InputState, propagate, readout
from neurolattice.neurograph.learn import loss_terms
from neurolattice.neurograph.propagate import radiation_targets
from neurolattice.neurograph.reference import SignalCache, reference_propagate

from .conftest import features, make_net, small_config


def assert_same_runs(fast, ref):
    assert len(fast.trace) == len(ref.trace)
    for t, (a, b) in enumerate(zip(fast.trace, ref.trace), 1):
        for key in ("rows", "radiation", "act", "cP", "cA"):
            assert torch.equal(a[key], b[key]), f"step {t}: {key} differs"
        torch.testing.assert_close(a["s"], b["s"], rtol=0, atol=1e-9)
    assert torch.equal(fast.steps, ref.steps)
    assert torch.equal(fast.out_active, ref.out_active)
    assert torch.equal(fast.out_P, ref.out_P) and torch.equal(fast.out_A, ref.out_A)
    assert torch.equal(fast.activity, ref.activity)


@pytest.mark.parametrize("seed", range(6))
def test_fast_matches_reference_on_random_graphs(seed):
    config = small_config(seed=seed, t_min=seed % 4, T_max=5 + seed % 3, gamma=0.5 + 0.08 * seed)
    net = make_net(config)
    inputs = net.project(features(3, seed=seed))
    assert_same_runs(propagate(net, inputs, record=True), reference_propagate(net, inputs, record=True))


@settings(max_examples=15, deadline=None)
@given(n_hidden=st.integers(0, 12), n_input=st.integers(1, 5), n_output=st.integers(1, 3), D=st.integers(1, 3),
       k=st.integers(0, 8), N=st.sampled_from([2, 4, 8]), batch=st.integers(1, 3), seed=st.integers(0, 10_000),
       tau=st.floats(0.2, 3.0))
def test_fast_matches_reference_hypothesis(n_hidden, n_input, n_output, D, k, N, batch, seed, tau):
    """Tiny graphs, many exact score ties (few phase bins), k above the candidates, no hidden nodes."""
    config = small_config(n=n_input + n_hidden + n_output, n_input=n_input, n_output=n_output,
                          fan_in=min(2, n_input), D=D, k=k, N=N, M=8, tau=tau, T_max=4, t_min=1, seed=seed)
    net = make_net(config, features=3)
    inputs = net.project(features(batch, 3, seed=seed))
    assert_same_runs(propagate(net, inputs, record=True), reference_propagate(net, inputs, record=True))


def test_radiation_ties_go_to_the_lower_node_index():
    config = small_config(n=30, N=4, D=2, k=4)
    net = make_net(config)
    net.P.zero_()                                    # every candidate scores the same for a given cP
    nodes = torch.tensor([0, 5, 29])
    targets = radiation_targets(net, nodes, torch.tensor([[1, 2], [0, 0], [3, 3]]))
    cache = SignalCache()
    for row, u in zip(targets.tolist(), nodes.tolist()):
        static = set(net.out_targets[u].tolist())
        assert row == [v for v in range(30) if v != u and v not in static][:4]
        assert row == cache.radiation(net, u, (0, 0))


def test_radiation_blocks_agree(monkeypatch):
    """Blocks of rows (bounded memory) give the targets of one whole-matrix product."""
    prop = importlib.import_module("neurolattice.neurograph.propagate")      # the module, not the function
    net = make_net(small_config(n=60, N=8))
    gen = torch.Generator().manual_seed(2)
    nodes = torch.randint(0, 60, (50,), generator=gen)
    cP = torch.randint(0, 8, (50, 3), generator=gen)
    whole = radiation_targets(net, nodes, cP)
    monkeypatch.setattr(prop, "SCORE_BLOCK", 60 * 7)
    assert torch.equal(radiation_targets(net, nodes, cP), whole)


def test_user_graph_and_float32_match_reference():
    """A hand-made DAG (edges used source -> target) in float32: the same runs (strengths are float64)."""
    config = small_config(n=8, n_input=2, n_output=2, fan_in=1, k=1, T_max=5, t_min=2)
    graph = Graph.from_edges(8, 2, 2, [[0, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7], [2, 7]])
    net = make_net(config, dtype=torch.float32)
    net = type(net)(config, 5, graph=graph, dtype=torch.float32)
    inputs = net.project(features(4, dtype=torch.float32))
    fast, ref = propagate(net, inputs, record=True), reference_propagate(net, inputs, record=True)
    assert_same_runs(fast, ref)
    assert fast.trace[0]["rows"].tolist()[:2] == [0, 1]
    assert [v for v in graph.out_targets[0].tolist() if v >= 0] == [2]    # 0 sends to 2, not the other way
    assert [v for v in graph.out_targets[2].tolist() if v >= 0] == [4, 7]


@pytest.mark.parametrize("seed", range(3))
def test_gradients_match_reference(seed):
    config = small_config(seed=seed, t_min=2, hidden_credit=0.5)
    y = torch.tensor([0, 3, 1])
    grads = []
    for forward in (propagate, reference_propagate):
        net = make_net(config)
        inputs = net.project(features(3, seed=seed))
        run = forward(net, inputs, grad=True)
        loss_terms(net, run, y)[0].backward()
        grads.append((net.proj.weight.grad, run.node_P.grad, run.node_A.grad))
    for fast, ref in zip(*grads):
        torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-12)
    assert grads[0][0].abs().sum() > 0 and grads[0][1].abs().sum() > 0


def test_inputs_below_tau_stay_inactive_and_empty_samples_stop():
    config = small_config(n_input=3)
    net = make_net(config)
    P = torch.zeros(2, 3, 3, dtype=torch.long)
    inputs = InputState(P, P.clone(), torch.tensor([[0.5, 0.5, 0.5], [2.0, 0.5, 0.5]], dtype=torch.float64))
    fast = propagate(net, inputs, record=True)
    assert fast.trace[0]["rows"].tolist() == [config.n]          # sample 1's input 0 only
    assert fast.steps[0] == 1 and not fast.out_active[0].any()
    assert (readout(net, fast)[0] == 0).all()
    assert_same_runs(fast, reference_propagate(net, inputs, record=True))
