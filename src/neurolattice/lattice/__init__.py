"""The lattice MoE network: a 3D lattice of cells updated by a mixture of three experts."""

from .config import LatticeConfig
from .step import LatticeMoE

__all__ = ["LatticeConfig", "LatticeMoE"]
