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
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm import tqdm

from neurolattice.bench.harness import machine_info, run_isolated, time_ms
from neurolattice.bench.report import Column, Results, Table, format_bytes, format_machine

from .config import NeuroGraphConfig
from .learn import train_step
from .propagate import NeuroGraph
from .reference import SignalCache, reference_propagate
from .task import load_data

HELP = "time a NeuroGraph training step per sample: per-node reference vs fast path, at 1k to 100k nodes"
METHODS = ("reference", "fast")
DEFAULT_SIZES = (1000, 10000, 100000)
ROW_KEYS = ("method", "nodes", "batch", "ms_per_sample", "speedup", "steps", "peak_mem_bytes", "status")
TIME_BUDGET_S = 20.0
TIMEOUT_S = 1800.0
DEFAULT_JSON = "results/neurograph_bench.json"

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


def _row(method: str, nodes: int, batch: int, **values: Any) -> dict[str, Any]:
    row = {"method": method, "nodes": nodes, "batch": batch, "ms_per_sample": None, "speedup": None,
           "steps": None, "peak_mem_bytes": None, **values}
    return {key: row[key] for key in ROW_KEYS}


def bench_row(method: str, nodes: int, batch: int, repeats: int, device: str = "cpu",
              threads: int | None = None) -> dict[str, Any]:
    """Measure one ``(method, nodes)`` in a fresh process, or say why it failed."""
    kwargs = dict(method=method, nodes=nodes, batch=batch, repeats=repeats, device=device)
    try:
        result = run_isolated(f"{__name__}:measure", kwargs, device=device, threads=threads, timeout_s=TIMEOUT_S)
    except RuntimeError as err:
        return _row(method, nodes, batch, status=f"failed: {err}")
    return _row(method, nodes, batch, ms_per_sample=result["ms_per_sample"], steps=result["steps"],
                peak_mem_bytes=result["peak_mem_bytes"], status="ok")


def check_options(sizes: Sequence[int], batch: int, reference_batch: int, reference_max: int, repeats: int,
                  device: str, threads: int | None) -> None:
    """Raise a one-line ``ValueError`` on the first bad option."""
    if not sizes or min(sizes) < NeuroGraphConfig().n_input + NeuroGraphConfig().n_output:
        raise ValueError(f"--sizes must be node counts >= 210 (200 input + 10 output), got {list(sizes)}")
    for name, value in (("--batch", batch), ("--reference-batch", reference_batch), ("--repeats", repeats),
                        ("--reference-max", reference_max), ("--threads", threads)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise ValueError(f"--device must be cpu or cuda (with CUDA available), got {device!r}")


def run_bench(sizes: Sequence[int] = DEFAULT_SIZES, *, batch: int = 32, reference_batch: int = 2,
              reference_max: int = 1000, repeats: int = 5, device: str = "cpu", threads: int | None = None,
              on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Every size, reference (where ``n <= reference_max``) then fast; returns the rows."""
    check_options(sizes, batch, reference_batch, reference_max, repeats, device, threads)
    tasks = [(n, m) for n in sizes for m in METHODS if m == "fast" or n <= reference_max]
    rows: list[dict[str, Any]] = []
    with tqdm(tasks, desc="neurograph bench", unit="run", disable=None, leave=False) as bar:
        for nodes, method in bar:
            bar.set_postfix_str(f"{method} {nodes}")
            row = bench_row(method, nodes, reference_batch if method == "reference" else fast_batch(batch, nodes),
                            repeats, device, threads)
            before = next((r for r in rows if r["method"] == "reference" and r["nodes"] == nodes
                           and r["ms_per_sample"] is not None), None)
            if method == "fast" and before is not None and row["ms_per_sample"] is not None:
                row["speedup"] = before["ms_per_sample"] / row["ms_per_sample"]
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the measuring processes")
    parser.add_argument("--json", default=DEFAULT_JSON,
                        help="rows written here as a JSON list (default %(default)s); the machine header "
                             "beside it as <name>.machine.json")


def check(args: argparse.Namespace) -> None:
    check_options(args.sizes, args.batch, args.reference_batch, args.reference_max, args.repeats, args.device,
                  args.threads)


def run(args: argparse.Namespace) -> int:
    """Print the machine header and the table row by row; write the JSON after every row."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    machine = machine_info(args.device)
    print(format_machine(machine), end="\n\n")
    print(TABLE.header())
    results = Results(TABLE, args.json, machine)
    run_bench(args.sizes, batch=args.batch, reference_batch=args.reference_batch, reference_max=args.reference_max,
              repeats=args.repeats, device=args.device, threads=args.threads, on_row=results.add)
    results.done()
    return 0
