"""Configuration of the lattice MoE step (docs/lattice.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from neurolattice.config import Bound, Config

BOUNDARIES = ("open", "periodic")


@dataclass
class LatticeConfig(Config):
    """The lattice: its shape, boundary, the three tier radii and the expert sizes.

    Tiers, for a neighbour at Euclidean distance ``d``: local ``0 < d <= r_local``,
    functional ``r_local < d <= r_functional``, distant ``r_functional < d <= r_distant``.
    """

    dims: tuple[int, int, int] = field(
        default=(15, 15, 15), metadata={"help": "lattice sides (X, Y, Z) in cells"}
    )
    state_size: int = field(default=32, metadata={"help": "state vector size S per cell", "bound": Bound(int, gt=0)})
    boundary: str = field(
        default="open", metadata={"help": "'open' or 'periodic' (wrap-around)", "bound": Bound(choices=BOUNDARIES)}
    )
    r_local: float = field(default=1.75, metadata={"help": "outer radius of the local tier", "bound": Bound(float)})
    r_functional: float = field(
        default=3.0, metadata={"help": "outer radius of the functional tier", "bound": Bound(float)}
    )
    r_distant: float = field(default=4.5, metadata={"help": "outer radius of the distant tier", "bound": Bound(float)})
    hidden_local: int = field(
        default=32, metadata={"help": "hidden size H_L of the local MLP", "bound": Bound(int, gt=0)}
    )
    hidden_functional: int = field(
        default=32,
        metadata={"help": "hidden size H_F of the functional message/update MLPs", "bound": Bound(int, gt=0)},
    )
    hidden_distant: int = field(
        default=32, metadata={"help": "hidden size H_D of the distant ODE field", "bound": Bound(int, gt=0)}
    )
    hidden_gate: int = field(default=32, metadata={"help": "hidden size of the gating MLP", "bound": Bound(int, gt=0)})
    ode_steps: int = field(
        default=2, metadata={"help": "fixed RK4 steps n_ode over t in [0, 1]", "bound": Bound(int, gt=0)}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        dims = tuple(self.dims)
        if len(dims) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
            raise ValueError(f"dims must be three integers (X, Y, Z), got {self.dims!r}")
        if min(dims) < 1:
            raise ValueError(f"dims must all be >= 1, got {dims}")
        self.dims = dims
        radii = (self.r_local, self.r_functional, self.r_distant)
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
