"""Configuration of NeuroGraph (docs/neurograph.md): the graph, the signal
tables, the dynamics, the readout and the learning rules, in one dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field

from neurolattice.config import Bound, Config


@dataclass
class NeuroGraphConfig(Config):
    """Everything that defines a NeuroGraph network and its training run.

    Nodes ``0 .. n_input-1`` are the input nodes, the last ``n_output`` the output nodes and
    the rest hidden; every non-input node has ``fan_in`` static incoming edges from earlier
    nodes (a DAG). docs/neurograph.md gives the math behind every field; the defaults of
    ``t_min``, ``input_strength``, ``input_scale``, ``logit_scale``, ``hidden_credit`` and the
    training schedule are choices measured there ("Choices made here", "Results").
    """

    n: int = field(default=1000, metadata={"help": "number of nodes", "bound": Bound(int)})
    n_input: int = field(default=200, metadata={"help": "input nodes (the first n_input)", "bound": Bound(int, ge=1)})
    n_output: int = field(default=10, metadata={"help": "output nodes (the last n_output)", "bound": Bound(int, ge=1)})
    fan_in: int = field(default=6, metadata={
        "help": "static incoming edges of each hidden/output node", "bound": Bound(int, ge=0)})
    N: int = field(default=512, metadata={"help": "phase bins (phase index in Z_N)", "bound": Bound(int, ge=1)})
    M: int = field(default=1024, metadata={
        "help": "magnitude bins (magnitude index in [0, M))", "bound": Bound(int, ge=1)})
    D: int = field(default=5, metadata={"help": "index vector length per node", "bound": Bound(int, ge=1)})
    k: int = field(default=6, metadata={
        "help": "radiation targets per active node per step", "bound": Bound(int, ge=0)})
    gamma: float = field(default=0.6, metadata={"help": "strength decay per step", "bound": Bound(float, gt=0, le=1)})
    tau: float = field(default=1.0, metadata={"help": "activation threshold on strength", "bound": Bound(float, gt=0)})
    T_max: int = field(default=40, metadata={"help": "most timesteps", "bound": Bound(int, ge=1)})
    t_min: int = field(default=1, metadata={
        "help": "stop once an output node is active after this many steps", "bound": Bound(int, ge=0)})
    input_strength: float = field(default=2.0, metadata={
        "help": "strength of every input node at t = 0", "bound": Bound(float, gt=0)})
    input_scale: float = field(default=0.1, metadata={
        "help": "init scale of the input projection (x N/4 bins)", "bound": Bound(float, ge=0)})
    logit_scale: float = field(default=5.0, metadata={
        "help": "logits are logit_scale * cosine(s_out, e_c)", "bound": Bound(float, gt=0)})
    lr_phase: float = field(default=0.015, metadata={"help": "phase index learning rate", "bound": Bound(float, ge=0)})
    lr_mag: float = field(default=0.012, metadata={
        "help": "magnitude index learning rate", "bound": Bound(float, ge=0)})
    threshold: float = field(default=0.01, metadata={
        "help": "accumulator threshold (bins) for an index step", "bound": Bound(float, gt=0)})
    lr_input: float = field(default=0.5, metadata={
        "help": "Adam learning rate of the input projection", "bound": Bound(float, ge=0)})
    hidden_credit: float = field(default=0.1, metadata={
        "help": "weight of the hidden nodes' -cos(s_i, e_y) term", "bound": Bound(float, ge=0)})
    epochs: int = field(default=12, metadata={"help": "training epochs", "bound": Bound(int, ge=1)})
    batch_size: int = field(default=32, metadata={"help": "samples per training batch", "bound": Bound(int, ge=1)})
    seed: int = field(default=0, metadata={"help": "seed of the graph, the parameters and the data order "
                                                   "(restart r uses seed * restarts + r)", "bound": Bound(int, ge=0)})
    validation_fraction: float = field(default=0.15, metadata={
        "help": "fraction of the training set held back (stratified, fixed seed) to choose the restart and the "
                "epoch kept; 0: train on all of it and keep the last epoch", "bound": Bound(float, ge=0, lt=1)})
    restarts: int = field(default=3, metadata={
        "help": "networks trained for probe_epochs each; the best on validation accuracy trains on (needs validation)",
        "bound": Bound(int, ge=1, says=">= 1")})
    probe_epochs: int = field(default=0, metadata={
        "help": "epochs each restart trains before the choice; 0: all epochs (independent runs, the best kept)",
        "bound": Bound(int, ge=0)})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n < self.n_input + self.n_output:
            raise ValueError(f"n must be >= n_input + n_output = {self.n_input + self.n_output}, got {self.n}")
        if self.fan_in > self.n_input:
            raise ValueError(f"fan_in must be <= n_input = {self.n_input} (the first hidden node's sources), "
                             f"got {self.fan_in}")
        if self.restarts > 1 and self.validation_fraction == 0:
            raise ValueError(f"restarts = {self.restarts} needs a validation split to choose from: "
                             "set validation_fraction > 0 or restarts = 1")
        if self.restarts > 1 and self.probe_epochs > self.epochs:
            raise ValueError(f"probe_epochs must be <= epochs = {self.epochs} when restarts > 1, "
                             f"got {self.probe_epochs}")

    @property
    def n_hidden(self) -> int:
        return self.n - self.n_input - self.n_output
