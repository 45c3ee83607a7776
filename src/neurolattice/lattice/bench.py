"""``neurolattice lattice bench``: the time and memory of one lattice step, per method and size.

Methods, each on an ``n x n x n`` lattice with the default tiers (:class:`LatticeConfig`
defaults, S = 32), random states ``[B, n, n, n, S]``, forward only under ``torch.no_grad``:

- ``reference``: :func:`~neurolattice.lattice.reference.reference_step` on a sample of cells
  spread evenly over the lattice (boundary and interior alike), scaled to all cells:
  ``ms_per_step = t_check + (t_sample - t_check) * N / n_sample`` where ``t_check`` is the
  per-call validation of the states (done once per step, not per cell). ``scaled: true``
  unless the sample is the whole lattice. Its ``peak_mem_bytes`` is that of the sample run.
- ``pyg``: the PyTorch Geometric peer, :class:`~neurolattice.lattice.peer_pyg.PyGLatticeStep`
  (``skipped: torch_geometric not installed`` without it).
- one row per backend of :mod:`~neurolattice.lattice.backends` (``torch``: today's whole-tensor
  ops, the baseline; ``cpp``: the fused C++ kernel): :class:`~neurolattice.lattice.LatticeMoE`
  with that backend, the stencil fast path. A backend that cannot run here is reported
  ``skipped: <why>``, never silently replaced by another.

``gflops`` is ``B * N * flops_per_cell / time`` with :func:`flops_per_cell`, the analytic count of
docs/lattice.md ("Flops of a step"); ``peak_fraction`` is that over the machine's peak measured
in the same run, right after the row (:func:`~neurolattice.bench.harness.matmul_peak`: the best
of 10 square matmuls of side ``--peak-size`` in the bench's dtype, with the bench's threads).

Every ``(method, size)`` runs in a fresh process (:func:`neurolattice.bench.harness.run_isolated`):
model and inputs are built there, one warm-up step, then up to ``repeats`` timed steps, fewer
once :data:`TIME_BUDGET_S` is spent (at least one); ``ms_per_step`` is the median.
``cell_steps_per_s = B * N * 1000 / ms_per_step``. A method whose estimated memory
(:func:`estimate_bytes`) exceeds what is available is reported ``skipped: needs ~X GB, have
Y GB`` and not run.

JSON (``--json``): a list of rows with exactly the keys of :data:`ROW_KEYS`; the machine
header (with how the peak is measured, under ``matmul_peak``) goes beside it
(:func:`neurolattice.bench.report.machine_path`).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from neurolattice.bench.harness import PEAK_REPEATS, available_memory_bytes, matmul_peak, run_isolated, time_ms
from neurolattice.bench.report import Benchmark, Column, Table, check_at_least, format_bytes, make_row

from .backends import BACKENDS, availability
from .config import LatticeConfig
from .geometry import lattice_geometry
from .reference import reference_step
from .step import LatticeMoE

METHODS = ("reference", "pyg", *BACKENDS)


def default_methods(device_type: str) -> list[str]:
    """The methods a plain ``lattice bench`` times on ``device_type``: the reference, the PyG
    peer and every backend made for that device (a backend for another device is left out, not
    listed as skipped)."""
    return [m for m in METHODS if m not in BACKENDS or not BACKENDS[m].devices or device_type in BACKENDS[m].devices]
DEFAULT_SIZES = (10, 15, 30, 50, 100)
DTYPES = {"float32": torch.float32, "float64": torch.float64}
ROW_KEYS = ("method", "size", "ms_per_step", "cell_steps_per_s", "gflops", "peak_fraction", "peak_mem_bytes",
            "scaled", "status")
PEAK_SIZE = 1024
TIME_BUDGET_S = 10.0


def bench_config(size: int) -> LatticeConfig:
    """The benchmarked lattice: ``size`` cells per side, every other setting the default."""
    return LatticeConfig(dims=(size, size, size))


def sample_cells(dims: tuple[int, int, int], count: int) -> list[tuple[int, int, int]]:
    """``count`` cells with evenly spaced linear indices (all cells if ``count >= N``), so the
    sample holds boundary and interior cells in about the lattice's proportions."""
    X, Y, Z = dims
    n = X * Y * Z
    if count >= n:
        indices = range(n)
    else:
        indices = sorted({round(k * (n - 1) / max(count - 1, 1)) for k in range(count)})
    return [(i // (Y * Z), i // Z % Y, i % Z) for i in indices]


def flops_per_cell(config: LatticeConfig) -> float:
    """Flops of one step per cell, averaged over the lattice (docs/lattice.md, "Flops of a step"):
    what the fast path's algorithm executes, a multiply-add counted 2, every other arithmetic or
    elementwise function (gelu, exp, tanh) 1. Neighbour terms use the mean neighbour count."""
    c = config
    S, HL, HF, HD, HG = c.state_size, c.hidden_local, c.hidden_functional, c.hidden_distant, c.hidden_gate
    K_L, K_F, K_D = (e / c.num_cells for e in tier_edge_counts(c))

    def linear(n_in: int, n_out: int) -> int:
        return 2 * n_in * n_out

    means = S * (K_L + K_F + K_D) + 2 * S + 3 * S                   # tier sums, mean_A's sum, 3 divisions
    local = linear(2 * S, HL) + HL + linear(HL, S)
    functional = (linear(2 * S, HF) + K_F * (7 * HF + 4) + HF        # P, Q; per neighbour; hagg / den
                  + linear(HF, S) + linear(2 * S, HF) + HF + linear(HF, S) + S)
    stage = linear(S, HD) + 2 * HD + linear(HD, S) + 2 * S           # one RK4 field evaluation
    distant = linear(S, HD) + c.ode_steps * (4 * stage + 10 * S) + 2 * S
    gate = 5 * S + linear(2 * S, HG) + HG + linear(HG, 3) + 9
    update = 6 * S + 2 * S + 8 * S                                   # mix, residual, layer norm
    return means + local + functional + distant + gate + update


def tier_edge_counts(config: LatticeConfig) -> tuple[int, int, int]:
    """Neighbour pairs (graph edges) per tier, counted from the offsets without building them:
    ``N`` per offset when periodic, ``prod(n - |d|)`` over the axes when open."""
    geometry = lattice_geometry(config.dims, config.boundary,
                                (config.r_local, config.r_functional, config.r_distant))
    if config.boundary == "periodic":
        return tuple(config.num_cells * len(t) for t in geometry.offsets)
    return tuple(sum(math.prod(max(n - abs(d), 0) for n, d in zip(config.dims, o)) for o in t)
                 for t in geometry.offsets)


# Peak memory of a run, fitted to runs on CPU (float32 and float64, B = 1 and 2, sizes 10-100)
# and rounded up. PyG peer: per byte of one gathered message tensor [E, B, S] (measured
# 1.3-1.5) plus per edge (int64 edge index and tiers: ~45); at 50^3 this says 10.5 GB for a
# measured 8.5 GB. Fast path: a working set bounded by its blocking (measured up to ~0.4 GB)
# plus a few copies of the states (3.6 per state byte from 50^3 to 100^3). Reference: the
# states and the states check's temporaries (4.7 per state byte at 100^3).
PYG_PEAK_PER_MESSAGE_BYTE = 1.5
PYG_PEAK_PER_EDGE = 48
FAST_PEAK_FIXED = 500_000_000
FAST_PEAK_PER_STATE_BYTE = 8
REFERENCE_PEAK_PER_STATE_BYTE = 5


def estimate_bytes(method: str, size: int, batch: int, dtype: str) -> int:
    """Estimated peak memory of one ``(method, size)`` run, from its edge or cell count and
    the constants above."""
    config = bench_config(size)
    element_bytes = batch * config.state_size * DTYPES[dtype].itemsize      # one cell's [B, S]
    if method == "reference":
        return REFERENCE_PEAK_PER_STATE_BYTE * config.num_cells * element_bytes
    if method in BACKENDS:
        return FAST_PEAK_FIXED + FAST_PEAK_PER_STATE_BYTE * config.num_cells * element_bytes
    edges = sum(tier_edge_counts(config))
    return int(edges * (PYG_PEAK_PER_MESSAGE_BYTE * element_bytes + PYG_PEAK_PER_EDGE))


def measure(method: str, size: int, batch: int, dtype: str, device: str, repeats: int,
            reference_cells: int) -> dict[str, Any]:
    """Build ``method``'s step and states on ``size^3`` cells and time one step (runs inside
    :func:`run_isolated`). Returns ``{"ms_per_step": float, "scaled": bool}``."""
    torch.manual_seed(0)
    config = bench_config(size)
    backend = method if method in BACKENDS else "torch"
    model = LatticeMoE(config, backend=backend).to(device=device, dtype=DTYPES[dtype]).eval()
    states = torch.randn(batch, *config.dims, config.state_size, device=device, dtype=DTYPES[dtype])

    def timed(fn: Callable[[], Any]) -> float:
        return time_ms(fn, device=device, repeats=repeats, budget_s=TIME_BUDGET_S)

    with torch.no_grad():
        if method == "reference":
            cells = sample_cells(config.dims, reference_cells)
            ms_check = timed(lambda: model.check_states(states))
            ms_sample = timed(lambda: reference_step(model, states, cells))
            ms = ms_check + max(ms_sample - ms_check, 0.0) * config.num_cells / len(cells)
            return {"ms_per_step": ms, "scaled": len(cells) < config.num_cells}
        if method == "pyg":
            from .peer_pyg import PyGLatticeStep

            step = PyGLatticeStep(model)
            return {"ms_per_step": timed(lambda: step(states)), "scaled": False}
        return {"ms_per_step": timed(lambda: model(states)), "scaled": False}


def bench_row(method: str, size: int, *, batch: int, dtype: str, device: str, repeats: int,
              reference_cells: int, threads: int | None = None, peak_size: int = PEAK_SIZE) -> dict[str, Any]:
    """Measure one ``(method, size)`` in a fresh process, or say why it was skipped."""
    def skipped(why: str) -> dict[str, Any]:
        return make_row(ROW_KEYS, method=method, size=size, scaled=False, status=f"skipped: {why}")

    if method == "pyg" and importlib.util.find_spec("torch_geometric") is None:
        return skipped("torch_geometric not installed")
    if method in BACKENDS and availability(method, torch.device(device).type):
        return skipped(availability(method, torch.device(device).type))
    need, have = estimate_bytes(method, size, batch, dtype), available_memory_bytes(device)
    if have is not None and need > have:
        return skipped(f"needs ~{need / 1e9:.1f} GB, have {have / 1e9:.1f} GB")
    kwargs = dict(method=method, size=size, batch=batch, dtype=dtype, device=device,
                  repeats=repeats, reference_cells=reference_cells)
    try:
        result = run_isolated(f"{__name__}:measure", kwargs, device=device, threads=threads,
                              imports=["torch_geometric"] if method == "pyg" else [])
    except RuntimeError as err:
        return skipped(str(err))
    ms = result["ms_per_step"]
    gflops = batch * size**3 * flops_per_cell(bench_config(size)) / (ms * 1e6)
    peak = matmul_peak(device, DTYPES[dtype], peak_size)
    return make_row(ROW_KEYS, method=method, size=size, ms_per_step=ms,
                    cell_steps_per_s=batch * size**3 * 1000.0 / ms, gflops=gflops, peak_fraction=gflops * 1e9 / peak,
                    peak_mem_bytes=result["peak_mem_bytes"], scaled=result["scaled"], status="ok")


class LatticeBench(Benchmark):
    """The command: every ``(size, method)`` of ``--sizes`` and ``--methods``, sizes outer."""

    HELP = "time one lattice step: per-cell reference vs PyG peer vs each fast-path backend"
    DEFAULT_JSON = "results/lattice_bench.json"
    THREADS = True
    TABLE = Table([
        Column("method", "method", 9, align="<"),
        Column("size", "size", 4),
        Column("ms_per_step", "ms/step", 13, lambda v: f"{v:,.1f}"),
        Column("cell_steps_per_s", "cell-steps/s", 12, lambda v: f"{v:,.0f}"),
        Column("gflops", "GFLOP/s", 8, lambda v: f"{v:,.1f}"),
        Column("peak_fraction", "of peak", 7, lambda v: f"{v:.2f}"),
        Column("peak_mem_bytes", "peak mem", 9, format_bytes),
        Column("scaled", "scaled", 6, lambda v: "yes" if v else "no"),
        Column("status", "status", 6, align="<"),
    ])

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES),
                            help="lattice sides n (n^3 cells), default %(default)s")
        parser.add_argument("--methods", nargs="+", choices=METHODS,
                            help="methods to time (default: all that run on --device)")
        parser.add_argument("--batch", type=int, default=1, help="batch size B (default %(default)s)")
        parser.add_argument("--repeats", type=int, default=5,
                            help=f"at most this many timed steps after one warm-up, fewer once "
                                 f"{TIME_BUDGET_S:.0f} s are spent (default %(default)s)")
        parser.add_argument("--reference-cells", type=int, default=32,
                            help="cells the reference computes, its time scaled to the lattice "
                                 "(default %(default)s)")
        parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="default %(default)s")
        parser.add_argument("--peak-size", type=int, default=PEAK_SIZE,
                            help=f"side of the square matmuls whose best of {PEAK_REPEATS} is the peak "
                                 "(default %(default)s)")

    def check_options(self, args: argparse.Namespace) -> None:
        if not args.sizes or min(args.sizes) < 1:
            raise ValueError(f"--sizes must be positive integers, got {list(args.sizes)}")
        unknown = [m for m in args.methods or () if m not in METHODS]
        if args.methods == [] or unknown:
            raise ValueError(f"--methods must be among {list(METHODS)}, got {list(args.methods)}")
        check_at_least(args, 1, "batch", "repeats", "reference_cells", "peak_size")
        if args.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {list(DTYPES)}, got {args.dtype!r}")

    def rows(self, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
        for size in args.sizes:
            for method in self.methods(args):
                yield bench_row(method, size, batch=args.batch, dtype=args.dtype, device=args.device,
                                repeats=args.repeats, reference_cells=args.reference_cells, threads=args.threads,
                                peak_size=args.peak_size)

    def intro(self, args: argparse.Namespace, machine: dict[str, Any]) -> str:
        machine["matmul_peak"] = {"dtype": args.dtype, "size": args.peak_size, "repeats": PEAK_REPEATS,
                                  "torch_threads": torch.get_num_threads(), "when": "after each row"}
        return (f"flops per cell-step (docs/lattice.md): {flops_per_cell(bench_config(args.sizes[0])):,.0f} at "
                f"{args.sizes[0]}^3; peak: best of {PEAK_REPEATS} {args.dtype} {args.peak_size}^2 matmuls, "
                "measured after each row")

    def count(self, args: argparse.Namespace) -> int:
        return len(args.sizes) * len(self.methods(args))

    @staticmethod
    def methods(args: argparse.Namespace) -> list[str]:
        """``--methods``, or by default :func:`default_methods` of the (checked) ``--device``."""
        return args.methods or default_methods(torch.device(args.device).type)


COMMAND = LatticeBench()
