"""LatticeModel: the lattice step wrapped for learning tasks (docs/lattice.md, "The model
around the lattice").

    input  --encoder-->  z = 0 face  --T lattice steps-->  z = Z-1 face  --head-->  output

* image-like input ``[B, X, Y, C]``: a per-cell linear map ``C -> S`` plus a learned position
  embedding ``[X, Y, S]``; vector input ``[B, F]``: a linear map ``F -> X * Y * S``. Either way
  the encoding is written into the ``z = 0`` face of an all-zero lattice.
* ``T`` steps of :class:`LatticeMoE`; with ``redrive`` the encoding is added to the input face
  again before every step, otherwise only at ``t = 0``.
* the ``z = Z - 1`` face, flattened, through a linear head. With ``T = 0`` the model is the
  encoder and the head alone (the head reads the input face): the baseline that shows what
  the lattice itself adds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from neurolattice.config import Bound, Config

from .config import LatticeConfig
from .step import LatticeMoE

TASKS = ("classification", "regression")


@dataclass
class LatticeModelConfig(Config):
    """A lattice model: the lattice, the input it reads, the output it predicts."""

    lattice: LatticeConfig = field(
        default_factory=lambda: LatticeConfig(dims=(8, 8, 3)),
        metadata={"help": "the lattice (LatticeConfig fields, e.g. lattice.state_size=16)"},
    )
    input_shape: tuple[int, ...] = field(
        default=(8, 8, 1), metadata={"help": "(X, Y, C) for image-like input, (F,) for vectors"}
    )
    num_outputs: int = field(default=10, metadata={"help": "classes, or regression targets", "bound": Bound(int, gt=0)})
    task: str = field(
        default="classification", metadata={"help": "'classification' or 'regression'", "bound": Bound(choices=TASKS)}
    )
    steps: int = field(default=8, metadata={"help": "lattice steps T per forward", "bound": Bound(int, ge=0)})
    redrive: bool = field(default=True, metadata={"help": "re-drive the input face before every step"})

    def __post_init__(self) -> None:
        if isinstance(self.lattice, dict):
            self.lattice = LatticeConfig.from_dict(self.lattice)
        super().__post_init__()
        self.input_shape = tuple(self.input_shape)
        if len(self.input_shape) not in (1, 3) or not all(
            isinstance(n, int) and n >= 1 for n in self.input_shape
        ):
            raise ValueError(f"input_shape must be (X, Y, C) or (F,) of positive ints, got {self.input_shape}")
        if len(self.input_shape) == 3 and self.input_shape[:2] != self.lattice.dims[:2]:
            raise ValueError(
                f"image-like input of {self.input_shape[0]}x{self.input_shape[1]} needs lattice dims "
                f"(X, Y) = {self.input_shape[:2]}, got {self.lattice.dims[:2]}"
            )
        if self.task == "classification" and self.num_outputs < 2:
            raise ValueError(f"classification needs num_outputs >= 2, got {self.num_outputs}")


class LatticeModel(nn.Module):
    """Encoder, ``T`` lattice steps, head. See the module docstring. ``backend``: the lattice
    step's (:class:`LatticeMoE`), not part of the config or the checkpoint.

    Shapes: ``inputs: [B, X, Y, C]`` or ``[B, F]`` -> ``[B, num_outputs]``.
    """

    def __init__(self, config: LatticeModelConfig, backend: str = "auto") -> None:
        super().__init__()
        self.config = config
        X, Y, _ = config.lattice.dims
        S = config.lattice.state_size
        if len(config.input_shape) == 3:
            self.encoder = nn.Linear(config.input_shape[2], S)
            self.position = nn.Parameter(torch.randn(X, Y, S) / math.sqrt(S))
        else:
            self.encoder = nn.Linear(config.input_shape[0], X * Y * S)
            self.position = None
        self.lattice = LatticeMoE(config.lattice, backend=backend)
        self.head = nn.Linear(X * Y * S, config.num_outputs)

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """The input face ``[B, X, Y, S]``."""
        self.check_inputs(inputs)
        X, Y, Z = self.config.lattice.dims
        if self.position is not None:
            return self.encoder(inputs) + self.position
        return self.encoder(inputs).view(inputs.shape[0], X, Y, -1)

    def forward(self, inputs: torch.Tensor, steps: int | None = None, grad_checkpointing: bool = False,
                trace: dict | None = None) -> torch.Tensor:
        """Outputs ``[B, num_outputs]``. ``steps`` overrides ``T``; ``grad_checkpointing``
        recomputes each lattice step in the backward instead of keeping its activations; a
        ``trace`` dict receives the gate weights of every step (``"gates"``: list of
        ``[B, X, Y, Z, 3]``) and the final states (``"states"``)."""
        steps = self.config.steps if steps is None else steps
        Z = self.config.lattice.dims[2]
        face = self.encode(inputs)
        drive = F.pad(face.unsqueeze(3), (0, 0, 0, Z - 1))                 # (B, X, Y, Z, S)
        states = drive
        for t in range(steps):
            if t > 0 and self.config.redrive:
                states = states + drive
            if grad_checkpointing and torch.is_grad_enabled():
                states, gates = checkpoint(self.lattice, states, True, False, use_reentrant=False)
            else:
                states, gates = self.lattice(states, return_gates=True, validate=False)
            if trace is not None:
                trace.setdefault("gates", []).append(gates.detach())
        if trace is not None:
            trace["states"] = states.detach()
        out_face = states[:, :, :, -1] if steps > 0 else face
        return self.head(out_face.flatten(1))

    def check_inputs(self, inputs: torch.Tensor) -> None:
        shape = self.config.input_shape
        if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
            got = inputs.dtype if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ValueError(f"inputs must be a floating-point tensor, got {got}")
        if tuple(inputs.shape[1:]) != shape or inputs.dim() != len(shape) + 1:
            raise ValueError(f"inputs must be [B, {', '.join(map(str, shape))}], got {list(inputs.shape)}")
        if not torch.isfinite(inputs).all():
            raise ValueError("inputs contain NaN or inf")

    def extra_repr(self) -> str:
        c = self.config
        return f"task={c.task!r}, steps={c.steps}, redrive={c.redrive}, input_shape={c.input_shape}"
