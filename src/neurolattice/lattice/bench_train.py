"""``neurolattice lattice bench-train``: time and peak memory of one training step of a
LatticeModel, for several numbers of lattice steps ``T``, with and without gradient
checkpointing per lattice step.

One training step is the shared trainer's :meth:`~neurolattice.train.Trainer.train_step`
(forward, backward, clipping, AdamW) on one batch of random image-like inputs, with the
default experiment's model (:data:`neurolattice.lattice.experiment.DEFAULTS`) unless
``--dims`` / ``--state-size`` say otherwise. Each ``(T, checkpointing)`` runs in a fresh process
(:func:`neurolattice.bench.harness.run_isolated`): one warm-up step, then up to ``repeats``
timed steps, median reported; ``peak_mem_bytes`` as in ``lattice bench``.

JSON (``--json``): a list of rows with the keys of :data:`ROW_KEYS`, the machine header beside it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

import torch

from neurolattice.bench.harness import run_isolated, time_ms
from neurolattice.bench.report import Benchmark, Column, Table, check_at_least, format_bytes, make_row

ROW_KEYS = ("steps_T", "grad_checkpointing", "dims", "state_size", "batch", "ms_per_step",
            "samples_per_s", "peak_mem_bytes", "status")


def measure(steps: int, grad_checkpointing: bool, dims: list[int], state_size: int, batch: int,
            repeats: int) -> dict[str, Any]:
    """One training step of the model described by the arguments (inside :func:`run_isolated`)."""
    from neurolattice.data import Dataset
    from neurolattice.train import TrainConfig, Trainer

    from .config import LatticeConfig
    from .experiment import DEFAULTS
    from .model import LatticeModel, LatticeModelConfig
    from .tasks import LatticeTask

    torch.manual_seed(0)
    hidden = {k: state_size for k in ("hidden_local", "hidden_functional", "hidden_distant", "hidden_gate")}
    lattice = LatticeConfig(**{**DEFAULTS["lattice"], "dims": tuple(dims), "state_size": state_size, **hidden})
    model = LatticeModel(LatticeModelConfig(lattice=lattice, input_shape=(dims[0], dims[1], 1),
                                            num_outputs=10, steps=steps))
    x, y = torch.rand(batch, dims[0], dims[1], 1), torch.randint(0, 10, (batch,))
    task = LatticeTask(Dataset("random", "classification", x, y, x, y, num_outputs=10))
    trainer = Trainer(model, task, TrainConfig(steps=10**6, batch_size=batch, warmup_steps=0,
                                               grad_checkpointing=grad_checkpointing))
    return {"ms_per_step": time_ms(trainer.train_step, repeats=repeats, budget_s=20.0)}


class LatticeTrainBench(Benchmark):
    """The command: every ``T`` of ``--steps``, without then with checkpointing, on the CPU."""

    HELP = "time and memory of one training step for T = 4, 8, 16, with and without gradient checkpointing"
    DEFAULT_JSON = "results/lattice_train_bench.json"
    DEVICE = False
    TABLE = Table([
        Column("steps_T", "T", 3),
        Column("grad_checkpointing", "checkpointing", 13, lambda v: "yes" if v else "no"),
        Column("ms_per_step", "ms/step", 10, lambda v: f"{v:,.1f}"),
        Column("samples_per_s", "samples/s", 10, lambda v: f"{v:,.1f}"),
        Column("peak_mem_bytes", "peak mem", 9, format_bytes),
        Column("status", "status", 6, align="<"),
    ])

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16],
                            help="lattice steps T (default %(default)s)")
        parser.add_argument("--dims", type=int, nargs=3, default=[12, 12, 6],
                            help="lattice sides (default %(default)s)")
        parser.add_argument("--state-size", type=int, default=16,
                            help="S and every hidden size (default %(default)s)")
        parser.add_argument("--batch", type=int, default=8, help="samples per training step (default %(default)s)")
        parser.add_argument("--repeats", type=int, default=2,
                            help="timed steps after one warm-up (default %(default)s)")

    def check_options(self, args: argparse.Namespace) -> None:
        if min(args.steps) < 0:
            raise ValueError(f"--steps must be non-negative, got {args.steps}")
        if min(args.dims) < 1:
            raise ValueError(f"--dims must be positive, got {args.dims}")
        check_at_least(args, 1, "state_size", "batch", "repeats")

    def intro(self, args: argparse.Namespace, machine: dict[str, Any]) -> str:
        return f"model: lattice {args.dims}, S = H = {args.state_size}, batch {args.batch}"

    def rows(self, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
        for t in args.steps:
            for ckpt in (False, True):
                row = dict(steps_T=t, grad_checkpointing=ckpt, dims=args.dims, state_size=args.state_size,
                           batch=args.batch)
                try:
                    result = run_isolated(f"{__name__}:measure", dict(
                        steps=t, grad_checkpointing=ckpt, dims=args.dims, state_size=args.state_size,
                        batch=args.batch, repeats=args.repeats))
                except RuntimeError as err:
                    yield make_row(ROW_KEYS, **row, status=f"skipped: {err}")
                    continue
                yield make_row(ROW_KEYS, **row, ms_per_step=result["ms_per_step"],
                               samples_per_s=args.batch * 1000 / result["ms_per_step"],
                               peak_mem_bytes=result["peak_mem_bytes"], status="ok")

    def count(self, args: argparse.Namespace) -> int:
        return 2 * len(args.steps)


COMMAND = LatticeTrainBench()
