"""The lattice MoE network: a 3D lattice of cells updated by a mixture of three experts."""

from .config import LatticeConfig
from .model import LatticeModel, LatticeModelConfig
from .step import LatticeMoE

__all__ = ["LatticeConfig", "LatticeModel", "LatticeModelConfig", "LatticeMoE"]
