"""``neurolattice neurograph bench``: per-sample training time, fast path vs per-node reference.

A training step is the forward pass with gradients, the loss, the backward pass, the Adam
step of the input projection and the index updates (:func:`~neurolattice.neurograph.learn.train_step`).
Each row times it on the default config with ``n`` nodes (200 input, 10 output), fed the
first digits training samples:

- ``fast``: :func:`~neurolattice.neurograph.propagate.propagate` on a batch of
  ``--batch`` samples at 1000 nodes, fewer on bigger graphs (:func:`fast_batch`: the batch
  shrinks as ``1000 / n``, at least 1) so every row costs about the same;
- ``reference``: :func:`~neurolattice.neurograph.reference.reference_propagate` (loops, with
  its parameter-keyed cache) on ``--reference-batch`` samples, only at ``n <= --reference-max``.

``ms_per_sample`` = median step time / samples in the step (one warm-up step, then up to
``--repeats`` timed ones, fewer once :data:`TIME_BUDGET_S` is spent). ``speedup`` (fast rows):
the reference's ``ms_per_sample`` at the same ``n`` over the fast one. Every row runs in a
fresh process (:func:`neurolattice.bench.harness.run_isolated`), which also measures its peak
memory. JSON (``--json``): a list of rows with the keys of :data:`ROW_KEYS`, the machine
header beside it.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Iterator
from typing import Any

import torch

from neurolattice.bench.harness import run_isolated, time_ms
from neurolattice.bench.report import Benchmark, Column, Table, check_at_least, format_bytes, make_row

from .config import NeuroGraphConfig
from .learn import train_step
from .propagate import NeuroGraph
from .reference import SignalCache, reference_propagate
from .task import load_data

METHODS = ("reference", "fast")
DEFAULT_SIZES = (1000, 10000, 100000)
ROW_KEYS = ("method", "nodes", "batch", "ms_per_sample", "speedup", "steps", "peak_mem_bytes", "status")
TIME_BUDGET_S = 20.0
TIMEOUT_S = 1800.0


def fast_batch(batch: int, nodes: int) -> int:
    """Samples per fast step on ``nodes`` nodes: ``batch`` up to 1000 nodes, then
    ``batch * 1000 // nodes`` (at least 1)."""
    return max(1, min(batch, batch * 1000 // nodes))


def measure(method: str, nodes: int, batch: int, repeats: int, device: str = "cpu") -> dict[str, Any]:
    """Time one training step of ``method`` on ``nodes`` nodes (runs inside :func:`run_isolated`)."""
    config = NeuroGraphConfig(n=nodes)
    data = load_data(None)
    x, y = data.x_train[:batch].to(device), data.y_train[:batch].to(device)
    torch.manual_seed(0)
    net = NeuroGraph(config, x.shape[1]).to(device)
    optimizer = torch.optim.Adam(net.proj.parameters(), lr=config.lr_input)
    forward = functools.partial(reference_propagate, cache=SignalCache()) if method == "reference" else None
    steps: list[float] = []

    def step() -> None:
        stats = train_step(net, optimizer, x, y, forward) if forward else train_step(net, optimizer, x, y)
        steps.append(stats["steps"])

    ms = time_ms(step, device=device, repeats=repeats, budget_s=TIME_BUDGET_S)
    return {"ms_per_sample": ms / batch, "steps": sum(steps) / len(steps)}


def bench_row(method: str, nodes: int, batch: int, repeats: int, device: str = "cpu",
              threads: int | None = None) -> dict[str, Any]:
    """Measure one ``(method, nodes)`` in a fresh process, or say why it failed."""
    kwargs = dict(method=method, nodes=nodes, batch=batch, repeats=repeats, device=device)
    try:
        result = run_isolated(f"{__name__}:measure", kwargs, device=device, threads=threads, timeout_s=TIMEOUT_S)
    except RuntimeError as err:
        return make_row(ROW_KEYS, method=method, nodes=nodes, batch=batch, status=f"failed: {err}")
    return make_row(ROW_KEYS, method=method, nodes=nodes, batch=batch, ms_per_sample=result["ms_per_sample"],
                    steps=result["steps"], peak_mem_bytes=result["peak_mem_bytes"], status="ok")


class NeuroGraphBench(Benchmark):
    """The command: every size of ``--sizes``, the reference (where ``n <= --reference-max``) then
    the fast path."""

    HELP = "time a NeuroGraph training step per sample: per-node reference vs fast path, at 1k to 100k nodes"
    DEFAULT_JSON = "results/neurograph_bench.json"
    THREADS = True
    TABLE = Table([
        Column("method", "method", 9, align="<"),
        Column("nodes", "nodes", 7, lambda v: f"{v:,}"),
        Column("batch", "batch", 5),
        Column("ms_per_sample", "ms/sample", 11, lambda v: f"{v:,.2f}"),
        Column("speedup", "speedup", 8, lambda v: f"{v:,.0f}x"),
        Column("steps", "steps", 5, lambda v: f"{v:.1f}"),
        Column("peak_mem_bytes", "peak mem", 9, format_bytes),
        Column("status", "status", 6, align="<"),
    ])

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES),
                            help="node counts n, default %(default)s")
        parser.add_argument("--batch", type=int, default=32,
                            help="samples per fast training step at 1000 nodes, fewer above (default %(default)s)")
        parser.add_argument("--reference-batch", type=int, default=2,
                            help="samples per reference training step (default %(default)s)")
        parser.add_argument("--reference-max", type=int, default=1000,
                            help="time the reference only up to this many nodes (default %(default)s)")
        parser.add_argument("--repeats", type=int, default=5,
                            help=f"at most this many timed steps after one warm-up, fewer once {TIME_BUDGET_S:.0f} s "
                                 "are spent (default %(default)s)")

    def check_options(self, args: argparse.Namespace) -> None:
        config = NeuroGraphConfig()
        if not args.sizes or min(args.sizes) < config.n_input + config.n_output:
            raise ValueError(f"--sizes must be node counts >= {config.n_input + config.n_output} ({config.n_input} "
                             f"input + {config.n_output} output), got {list(args.sizes)}")
        check_at_least(args, 1, "batch", "reference_batch", "reference_max", "repeats")

    def tasks(self, args: argparse.Namespace) -> list[tuple[int, str]]:
        """``(nodes, method)`` in the order measured."""
        return [(n, m) for n in args.sizes for m in METHODS if m == "fast" or n <= args.reference_max]

    def rows(self, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
        reference_ms: dict[int, float] = {}     # nodes -> the reference's ms_per_sample
        for nodes, method in self.tasks(args):
            batch = args.reference_batch if method == "reference" else fast_batch(args.batch, nodes)
            row = bench_row(method, nodes, batch, args.repeats, args.device, args.threads)
            if row["ms_per_sample"] is not None:
                if method == "reference":
                    reference_ms[nodes] = row["ms_per_sample"]
                elif nodes in reference_ms:
                    row["speedup"] = reference_ms[nodes] / row["ms_per_sample"]
            yield row

    def count(self, args: argparse.Namespace) -> int:
        return len(self.tasks(args))


COMMAND = NeuroGraphBench()
