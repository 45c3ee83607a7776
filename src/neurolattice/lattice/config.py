"""Configuration of the lattice MoE step (docs/lattice.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from neurolattice.config import config_from_dict, config_to_dict

BOUNDARIES = ("open", "periodic")


@dataclass
class LatticeConfig:
    """The lattice: its shape, boundary, the three tier radii and the expert sizes.

    Tiers, for a neighbour at Euclidean distance ``d``: local ``0 < d <= r_local``,
    functional ``r_local < d <= r_functional``, distant ``r_functional < d <= r_distant``.
    """

    dims: tuple[int, int, int] = field(
        default=(15, 15, 15), metadata={"help": "lattice sides (X, Y, Z) in cells"}
    )
    state_size: int = field(default=32, metadata={"help": "state vector size S per cell"})
    boundary: str = field(default="open", metadata={"help": "'open' or 'periodic' (wrap-around)"})
    r_local: float = field(default=1.75, metadata={"help": "outer radius of the local tier"})
    r_functional: float = field(default=3.0, metadata={"help": "outer radius of the functional tier"})
    r_distant: float = field(default=4.5, metadata={"help": "outer radius of the distant tier"})
    hidden_local: int = field(default=32, metadata={"help": "hidden size H_L of the local MLP"})
    hidden_functional: int = field(
        default=32, metadata={"help": "hidden size H_F of the functional message/update MLPs"}
    )
    hidden_distant: int = field(default=32, metadata={"help": "hidden size H_D of the distant ODE field"})
    hidden_gate: int = field(default=32, metadata={"help": "hidden size of the gating MLP"})
    ode_steps: int = field(default=2, metadata={"help": "fixed RK4 steps n_ode over t in [0, 1]"})

    def __post_init__(self) -> None:
        dims = tuple(self.dims)
        if len(dims) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
            raise ValueError(f"dims must be three integers (X, Y, Z), got {self.dims!r}")
        if min(dims) < 1:
            raise ValueError(f"dims must all be >= 1, got {dims}")
        self.dims = dims
        if self.boundary not in BOUNDARIES:
            raise ValueError(f"boundary must be one of {BOUNDARIES}, got {self.boundary!r}")
        for name in ("state_size", "hidden_local", "hidden_functional", "hidden_distant",
                     "hidden_gate", "ode_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        radii = (self.r_local, self.r_functional, self.r_distant)
        if not all(isinstance(r, (int, float)) and math.isfinite(r) for r in radii):
            raise ValueError(f"radii must be finite numbers, got {radii}")
        if not 0 < self.r_local < self.r_functional < self.r_distant:
            raise ValueError(
                "radii must be strictly increasing and positive "
                f"(0 < r_local < r_functional < r_distant), got {radii}"
            )

    @classmethod
    def relative(cls, dims: tuple[int, int, int], ratio: float = 0.3, **kwargs: Any) -> LatticeConfig:
        """The prototype's tiers: ``R = max(ratio * max(dims), 1)``, radii ``0.4R, 0.8R, 0.99R``."""
        if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 0):
            raise ValueError(f"ratio must be a positive number, got {ratio!r}")
        dims = tuple(dims)
        if len(dims) != 3:
            raise ValueError(f"dims must be three integers (X, Y, Z), got {dims!r}")
        radius = max(ratio * max(dims), 1.0)
        return cls(dims=dims, r_local=0.4 * radius, r_functional=0.8 * radius,
                   r_distant=0.99 * radius, **kwargs)

    @property
    def num_cells(self) -> int:
        x, y, z = self.dims
        return x * y * z

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatticeConfig:
        return config_from_dict(cls, data)
