"""The DAG: random graphs point forward, user edge lists are validated."""

import torch

from neurolattice.neurograph import Graph, NeuroGraphConfig

from ..errors import one_line_error


def test_random_graph_is_a_forward_dag():
    config = NeuroGraphConfig(n=300, n_input=50, n_output=10, fan_in=6, seed=3)
    graph = Graph.random(config, torch.Generator().manual_seed(3))
    src, tgt = graph.edges.T
    assert (src < tgt).all()
    assert torch.equal(torch.bincount(tgt, minlength=300)[50:], torch.full((250,), 6))
    assert (torch.bincount(tgt, minlength=300)[:50] == 0).all()
    pairs = {tuple(e) for e in graph.edges.tolist()}
    assert len(pairs) == len(graph.edges)                    # distinct sources per target
    for u in range(300):                                     # out_targets lists exactly the out-edges, ascending
        row = [v for v in graph.out_targets[u].tolist() if v >= 0]
        assert row == sorted(v for s, v in pairs if s == u)


def _error(edges, n=5):
    with one_line_error() as excinfo:
        Graph.from_edges(n, 2, 1, edges)
    return str(excinfo.value)


def test_cycle_is_rejected():
    assert "cycle" in _error([[0, 2], [2, 3], [3, 4], [4, 2]])


def test_missing_node_is_rejected():
    message = _error([[0, 2], [1, 7]])
    assert "missing node" in message and "1 -> 7" in message


def test_self_loop_and_bad_shape_are_rejected():
    assert "self-loop" in _error([[2, 2]])
    assert "[E, 2]" in _error([[0, 1, 2]])
    assert "integers" in _error([[0.0, 1.0]])


def test_valid_edges_build():
    graph = Graph.from_edges(5, 2, 1, [[0, 2], [1, 2], [2, 4], [0, 3], [3, 4]])
    assert graph.out_targets.tolist() == [[2, 3], [2, -1], [4, -1], [4, -1], [-1, -1]]
