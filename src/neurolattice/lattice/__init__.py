"""The lattice MoE network: a 3D lattice of cells updated by a mixture of three experts.

The math and the results: docs/lattice.md. Where each role lives:

- config: :mod:`.config` (``LatticeConfig``: shape, boundary, tiers, expert sizes);
- model: :mod:`.geometry` (the stencil), :mod:`.experts`, :mod:`.step` (``LatticeMoE``, one
  step), :mod:`.model` (``LatticeModel``: encoder, ``T`` steps, head; ``LatticeModelConfig``);
- reference: :mod:`.reference` (the per-cell oracle); :mod:`.peer_pyg` (the step written the
  PyTorch Geometric way, a benchmark peer);
- task: :mod:`.tasks` (``LatticeTask`` for the shared trainer, held-out figures) on the shared
  data of :mod:`neurolattice.data`; :mod:`.experiment` (a run: configs, training, loading, summary);
- commands: :mod:`.commands` (``train | eval | show``), :mod:`.plots`;
- bench: :mod:`.bench` (one step per method and size), :mod:`.bench_train` (one training step).
"""

from .config import LatticeConfig
from .model import LatticeModel, LatticeModelConfig
from .step import LatticeMoE

__all__ = ["LatticeConfig", "LatticeModel", "LatticeModelConfig", "LatticeMoE"]
