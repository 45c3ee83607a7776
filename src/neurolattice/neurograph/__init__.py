"""NeuroGraph: a discrete phase-signal graph that learns.

The math and the results: docs/neurograph.md. Where each role lives:

- config: :mod:`.config` (``NeuroGraphConfig``: graph, tables, dynamics, readout, learning);
- model: :mod:`.tables` (the signal tables), :mod:`.graph` (``Graph``, the static DAG),
  :mod:`.propagate` (``NeuroGraph``, the batched fast path, the readout), :mod:`.learn` (loss,
  index updates, training: ``fit``);
- reference: :mod:`.reference` (the per-node oracle and its cache);
- task: :mod:`.task` (the data, from the shared :mod:`neurolattice.data`, the held-out figures,
  a run's config and data, loading a saved run);
- commands: :mod:`.commands` (``train | eval | show``), :mod:`.plots`;
- bench: :mod:`.bench` (a training step per sample: reference vs fast path).
"""

from .config import NeuroGraphConfig
from .graph import Graph
from .propagate import InputState, NeuroGraph, Run, propagate, readout

__all__ = ["Graph", "InputState", "NeuroGraph", "NeuroGraphConfig", "Run", "propagate", "readout"]
