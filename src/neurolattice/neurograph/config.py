"""Configuration of NeuroGraph (docs/neurograph.md): the graph, the signal
tables, the dynamics, the readout and the learning rules, in one dataclass."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from neurolattice.config import config_from_dict, config_to_dict

INT_FIELDS = ("n", "n_input", "n_output", "fan_in", "N", "M", "D", "k", "T_max", "t_min", "epochs",
              "batch_size", "seed", "restarts", "probe_epochs")
FLOAT_FIELDS = ("gamma", "tau", "input_strength", "input_scale", "logit_scale", "lr_phase", "lr_mag",
                "threshold", "lr_input", "hidden_credit", "validation_fraction")


@dataclass
class NeuroGraphConfig:
    """Everything that defines a NeuroGraph network and its training run.

    Nodes ``0 .. n_input-1`` are the input nodes, the last ``n_output`` the output nodes and
    the rest hidden; every non-input node has ``fan_in`` static incoming edges from earlier
    nodes (a DAG). docs/neurograph.md gives the math behind every field; the defaults of
    ``t_min``, ``input_strength``, ``input_scale``, ``logit_scale``, ``hidden_credit`` and the
    training schedule are choices measured there ("Choices made here", "Results").
    """

    n: int = field(default=1000, metadata={"help": "number of nodes"})
    n_input: int = field(default=200, metadata={"help": "input nodes (the first n_input)"})
    n_output: int = field(default=10, metadata={"help": "output nodes (the last n_output)"})
    fan_in: int = field(default=6, metadata={"help": "static incoming edges of each hidden/output node"})
    N: int = field(default=512, metadata={"help": "phase bins (phase index in Z_N)"})
    M: int = field(default=1024, metadata={"help": "magnitude bins (magnitude index in [0, M))"})
    D: int = field(default=5, metadata={"help": "index vector length per node"})
    k: int = field(default=6, metadata={"help": "radiation targets per active node per step"})
    gamma: float = field(default=0.6, metadata={"help": "strength decay per step"})
    tau: float = field(default=1.0, metadata={"help": "activation threshold on strength"})
    T_max: int = field(default=40, metadata={"help": "most timesteps"})
    t_min: int = field(default=1, metadata={"help": "stop once an output node is active after this many steps"})
    input_strength: float = field(default=2.0, metadata={"help": "strength of every input node at t = 0"})
    input_scale: float = field(default=0.1, metadata={"help": "init scale of the input projection (x N/4 bins)"})
    logit_scale: float = field(default=5.0, metadata={"help": "logits are logit_scale * cosine(s_out, e_c)"})
    lr_phase: float = field(default=0.015, metadata={"help": "phase index learning rate"})
    lr_mag: float = field(default=0.012, metadata={"help": "magnitude index learning rate"})
    threshold: float = field(default=0.01, metadata={"help": "accumulator threshold (bins) for an index step"})
    lr_input: float = field(default=0.5, metadata={"help": "Adam learning rate of the input projection"})
    hidden_credit: float = field(default=0.1, metadata={"help": "weight of the hidden nodes' -cos(s_i, e_y) term"})
    epochs: int = field(default=12, metadata={"help": "training epochs"})
    batch_size: int = field(default=32, metadata={"help": "samples per training batch"})
    seed: int = field(default=0, metadata={"help": "seed of the graph, the parameters and the data order "
                                                   "(restart r uses seed * restarts + r)"})
    validation_fraction: float = field(default=0.15, metadata={
        "help": "fraction of the training set held back (stratified, fixed seed) to choose the restart and the "
                "epoch kept; 0: train on all of it and keep the last epoch"})
    restarts: int = field(default=3, metadata={
        "help": "networks trained for probe_epochs each; the best on validation accuracy trains on (needs validation)"})
    probe_epochs: int = field(default=0, metadata={
        "help": "epochs each restart trains before the choice; 0: all epochs (independent runs, the best kept)"})

    def __post_init__(self) -> None:
        for name in INT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("n_input", "n_output", "N", "M", "D", "T_max", "epochs", "batch_size", "restarts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("fan_in", "k", "t_min", "seed", "probe_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.n < self.n_input + self.n_output:
            raise ValueError(f"n must be >= n_input + n_output = {self.n_input + self.n_output}, got {self.n}")
        if self.fan_in > self.n_input:
            raise ValueError(f"fan_in must be <= n_input = {self.n_input} (the first hidden node's sources), "
                             f"got {self.fan_in}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        for name in ("tau", "input_strength", "threshold", "logit_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("lr_phase", "lr_mag", "lr_input", "hidden_credit", "input_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.restarts > 1 and self.validation_fraction == 0:
            raise ValueError(f"restarts = {self.restarts} needs a validation split to choose from: "
                             "set validation_fraction > 0 or restarts = 1")
        if self.restarts > 1 and self.probe_epochs > self.epochs:
            raise ValueError(f"probe_epochs must be <= epochs = {self.epochs} when restarts > 1, "
                             f"got {self.probe_epochs}")

    @property
    def n_hidden(self) -> int:
        return self.n - self.n_input - self.n_output

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NeuroGraphConfig:
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)
