"""``neurolattice lattice bench-train``: time and peak memory of one training step of a
LatticeModel, for several numbers of lattice steps ``T``, with and without gradient
checkpointing per lattice step.

One training step is the shared trainer's :meth:`~neurolattice.train.Trainer.train_step`
(forward, backward, clipping, AdamW) on one batch of random image-like inputs, with the
default experiment's model (:data:`neurolattice.lattice.experiment.DEFAULTS`) unless
``--dims`` / ``--state-size`` say otherwise, on each backend of ``--backends`` (the lattice
step's, :mod:`~neurolattice.lattice.backends`). Each ``(T, checkpointing, backend)`` runs in a fresh process
(:func:`neurolattice.bench.harness.run_isolated`): one warm-up step, then up to ``repeats``
timed steps, median reported; ``peak_mem_bytes`` as in ``lattice bench``. ``gflops`` counts a
training step as 3 forward passes (the backward twice the forward, the usual convention) of
``T`` lattice steps: ``3 T B N flops_per_cell / time`` (:func:`~neurolattice.lattice.bench.flops_per_cell`;
the encoder, head and optimizer are left out), ``peak_fraction`` that over the float32 matmul
peak measured right after the row (:func:`~neurolattice.bench.harness.matmul_peak`).

JSON (``--json``): a list of rows with the keys of :data:`ROW_KEYS`, the machine header beside it.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from typing import Any

import torch

from neurolattice.bench.harness import PEAK_REPEATS, matmul_peak, run_isolated, time_ms
from neurolattice.bench.report import Benchmark, Column, Table, check_at_least, format_bytes, make_row

from .backends import BACKENDS, availability
from .bench import PEAK_SIZE, flops_per_cell

ROW_KEYS = ("steps_T", "grad_checkpointing", "backend", "dims", "state_size", "batch", "ms_per_step",
            "samples_per_s", "gflops", "peak_fraction", "peak_mem_bytes", "status")


def lattice_config(dims: list[int], state_size: int):
    """The benchmarked lattice: the default experiment's, with these sides and S = every hidden size."""
    from .config import LatticeConfig
    from .experiment import DEFAULTS

    hidden = {k: state_size for k in ("hidden_local", "hidden_functional", "hidden_distant", "hidden_gate")}
    return LatticeConfig(**{**DEFAULTS["lattice"], "dims": tuple(dims), "state_size": state_size, **hidden})


def measure(steps: int, grad_checkpointing: bool, backend: str, dims: list[int], state_size: int, batch: int,
            repeats: int) -> dict[str, Any]:
    """One training step of the model described by the arguments (inside :func:`run_isolated`)."""
    from neurolattice.data import Dataset
    from neurolattice.train import TrainConfig, Trainer

    from .model import LatticeModel, LatticeModelConfig
    from .tasks import LatticeTask

    torch.manual_seed(0)
    model = LatticeModel(LatticeModelConfig(lattice=lattice_config(dims, state_size),
                                            input_shape=(dims[0], dims[1], 1), num_outputs=10, steps=steps),
                         backend=backend)
    x, y = torch.rand(batch, dims[0], dims[1], 1), torch.randint(0, 10, (batch,))
    task = LatticeTask(Dataset("random", "classification", x, y, x, y, num_outputs=10))
    trainer = Trainer(model, task, TrainConfig(steps=10**6, batch_size=batch, warmup_steps=0,
                                               grad_checkpointing=grad_checkpointing))
    return {"ms_per_step": time_ms(trainer.train_step, repeats=repeats, budget_s=20.0)}


class LatticeTrainBench(Benchmark):
    """The command: every ``T`` of ``--steps``, without then with checkpointing, on the CPU."""

    HELP = ("time and memory of one training step for T = 4, 8, 16, with and without gradient checkpointing, "
            "per backend")
    DEFAULT_JSON = "results/lattice_train_bench.json"
    DEVICE = False
    TABLE = Table([
        Column("steps_T", "T", 3),
        Column("grad_checkpointing", "checkpointing", 13, lambda v: "yes" if v else "no"),
        Column("backend", "backend", 7, align="<"),
        Column("ms_per_step", "ms/step", 10, lambda v: f"{v:,.1f}"),
        Column("samples_per_s", "samples/s", 10, lambda v: f"{v:,.1f}"),
        Column("gflops", "GFLOP/s", 8, lambda v: f"{v:,.1f}"),
        Column("peak_fraction", "of peak", 7, lambda v: f"{v:.2f}"),
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
        parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS),
                            help="lattice-step backends to time (default all)")

    def check_options(self, args: argparse.Namespace) -> None:
        if min(args.steps) < 0:
            raise ValueError(f"--steps must be non-negative, got {args.steps}")
        if min(args.dims) < 1:
            raise ValueError(f"--dims must be positive, got {args.dims}")
        check_at_least(args, 1, "state_size", "batch", "repeats")

    def intro(self, args: argparse.Namespace, machine: dict[str, Any]) -> str:
        machine["matmul_peak"] = {"dtype": "float32", "size": PEAK_SIZE, "repeats": PEAK_REPEATS,
                                  "torch_threads": torch.get_num_threads(), "when": "after each row"}
        return f"model: lattice {args.dims}, S = H = {args.state_size}, batch {args.batch}"

    def rows(self, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
        flops = 3 * args.batch * flops_per_cell(lattice_config(args.dims, args.state_size)) * math.prod(args.dims)
        for t in args.steps:
            for ckpt in (False, True):
                for backend in args.backends:
                    row = dict(steps_T=t, grad_checkpointing=ckpt, backend=backend, dims=args.dims,
                               state_size=args.state_size, batch=args.batch)
                    why = availability(backend)
                    if why:
                        yield make_row(ROW_KEYS, **row, status=f"skipped: {why}")
                        continue
                    try:
                        result = run_isolated(f"{__name__}:measure", dict(
                            steps=t, grad_checkpointing=ckpt, backend=backend, dims=args.dims,
                            state_size=args.state_size, batch=args.batch, repeats=args.repeats))
                    except RuntimeError as err:
                        yield make_row(ROW_KEYS, **row, status=f"skipped: {err}")
                        continue
                    ms = result["ms_per_step"]
                    gflops = t * flops / (ms * 1e6)
                    yield make_row(ROW_KEYS, **row, ms_per_step=ms, samples_per_s=args.batch * 1000 / ms,
                                   gflops=gflops, peak_fraction=gflops * 1e9 / matmul_peak("cpu", torch.float32,
                                                                                           PEAK_SIZE),
                                   peak_mem_bytes=result["peak_mem_bytes"], status="ok")

    def count(self, args: argparse.Namespace) -> int:
        return 2 * len(args.steps) * len(args.backends)


COMMAND = LatticeTrainBench()
