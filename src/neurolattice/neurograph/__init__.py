"""NeuroGraph: a discrete phase-signal graph that learns (spec: shared/spec/neurograph.md)."""

from .config import NeuroGraphConfig
from .graph import Graph
from .propagate import InputState, NeuroGraph, Run, propagate, readout

__all__ = ["Graph", "InputState", "NeuroGraph", "NeuroGraphConfig", "Run", "propagate", "readout"]
