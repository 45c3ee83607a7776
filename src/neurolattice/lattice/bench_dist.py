"""``neurolattice lattice bench-dist``: the sharded lattice step (:mod:`.shard`) on 1, 2, 4, ...
CPU processes: strong and weak scaling, the halo bytes, and the exchange's share of the time.

**Runs.** For every mode of ``--modes`` and process count ``P`` of ``--processes``, one launch
(:func:`~neurolattice.bench.harness.run_isolated`: a plain process for ``P = 1``, a real
``torchrun`` of ``P`` gloo ranks otherwise) steps a :class:`~.shard.ShardedLatticeMoE` with the
default tiers (S = 32, a halo of ``h = 4`` planes) on random states ``[B, x1 - x0, Y, Z, S]``:

- ``strong``: the lattice ``--dims (X, Y, Z)`` whatever ``P``: each rank steps about ``X / P`` planes;
- ``weak``: ``(P X, Y, Z)``: each rank steps ``X`` planes.

The one-process lattice is the same in both modes, so it is measured once. Each rank gets
``max(1, T // P)`` torch threads, ``T`` those of the launching process; ``oversubscribed`` says
that the ranks' threads outnumber the cores this process may run on (4 ranks on 2 cores), where
the ranks take turns on the cores and the times say little about a machine with enough of them.

**Figures.** Each launch gives two rows, ``pass = forward`` (under ``torch.no_grad``) and
``forward+backward`` (the backward of ``<step(x), c>`` for a random ``c``, into ``x`` and the
parameters). Every rank waits at a barrier, then times one call; after one warm-up the median of
``--repeats`` such calls is the rank's, and the row reports the slowest rank's:

- ``ms_per_step``: the step;
- ``ms_exchange``: the :class:`~.shard.HaloExchange` alone on the same slab (for
  ``forward+backward`` the exchange and its adjoint), timed the same way: communication;
- ``ms_compute = ms_per_step - ms_exchange`` and ``comm_fraction = ms_exchange / ms_per_step``;
- ``halo_bytes``: what the ranks sent one another during one step, all ranks together, counted by
  ``torch.profiler`` from the process group's send operations (``gloo:send`` events, each tensor's
  shape times the element size), not computed. Expected: ``2 h Y Z S B`` elements per boundary
  between neighbouring ranks (``P - 1`` of them, open faces), twice for ``forward+backward``;
- ``scaling_efficiency``: ``t_1 / (P t_P)`` for strong scaling, ``t_1 / t_P`` for weak (1 is
  ideal), ``t_1`` the one-process row of the same pass (None when ``--processes`` lacks 1);
- ``cell_steps_per_s = B X Y Z * 1000 / ms_per_step`` over the whole lattice.

No memory column: the profiler's own buffers would dominate the peak resident memory of a
launch of several ranks (``lattice bench`` and ``bench-train`` measure the step's memory).

JSON (``--json``): a list of rows with exactly the keys of :data:`ROW_KEYS`; the machine header
beside it (:func:`~neurolattice.bench.report.machine_path`).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from neurolattice.bench.harness import run_isolated, synchronize
from neurolattice.bench.report import Benchmark, Column, Table, check_at_least, format_bytes, make_row
from neurolattice.train import distributed

from .backends import BACKENDS
from .config import LatticeConfig
from .shard import HaloExchange, ShardedLatticeMoE, halo_width, slab_bounds

MODES = ("strong", "weak")
PASSES = ("forward", "forward+backward")
ROW_KEYS = ("mode", "processes", "threads_per_process", "oversubscribed", "dims", "slab_planes", "halo", "pass",
            "ms_per_step", "ms_exchange", "ms_compute", "comm_fraction", "halo_bytes", "scaling_efficiency",
            "cell_steps_per_s", "status")
TIMEOUT_S = 900   # one launch; a hung process group is killed whole after it


def lattice_dims(mode: str, dims: list[int], processes: int) -> tuple[int, int, int]:
    """The lattice a run of ``mode`` on ``processes`` ranks steps (module docstring)."""
    X, Y, Z = dims
    return (X * processes, Y, Z) if mode == "weak" else (X, Y, Z)


def measure(dims: list[int], batch: int, backend: str, repeats: int) -> dict[str, dict[str, float]]:
    """What every rank runs (inside :func:`run_isolated`): per pass, the slowest rank's medians
    and the bytes all ranks sent in one step."""
    with distributed.init_from_env("cpu"):
        return _measure(LatticeConfig(dims=tuple(dims)), batch, backend, repeats)


def _measure(config: LatticeConfig, batch: int, backend: str, repeats: int) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    step = ShardedLatticeMoE(config, backend=backend)
    layout = step.layout
    (x0, x1), h = layout.slab, layout.halo
    _, Y, Z = config.dims
    slab = torch.randn(batch, x1 - x0, Y, Z, config.state_size)
    c_step, c_halo = torch.randn_like(slab), torch.randn(batch, x1 - x0 + 2 * h, Y, Z, config.state_size)

    def forward() -> None:
        with torch.no_grad():
            step(slab)

    def forward_backward() -> None:
        step.zero_grad(set_to_none=True)
        x = slab.clone().requires_grad_()
        (step(x) * c_step).sum().backward()

    def exchange() -> None:
        with torch.no_grad():
            HaloExchange.apply(slab, layout)

    def exchange_and_adjoint() -> None:
        x = slab.clone().requires_grad_()
        torch.autograd.grad(HaloExchange.apply(x, layout), x, c_halo)

    out = {}
    for name, run, comm in (("forward", forward, exchange), ("forward+backward", forward_backward,
                                                              exchange_and_adjoint)):
        out[name] = {"ms_per_step": _slowest_median(run, repeats), "ms_exchange": _slowest_median(comm, repeats),
                     "halo_bytes": _sent_bytes(run, slab.element_size())}
    return out


def _slowest_median(fn: Callable[[], None], repeats: int) -> float:
    """The slowest rank's median over ``repeats`` calls of ``fn``, each after a barrier, in ms."""
    fn()
    times = []
    for _ in range(repeats):
        distributed.barrier()
        start = time.perf_counter()
        fn()
        synchronize("cpu")
        times.append(1000.0 * (time.perf_counter() - start))
    return max(distributed.all_gather_object(statistics.median(times)))


def _sent_bytes(fn: Callable[[], None], element_size: int) -> int:
    """Bytes the process group's send operations carried during ``fn()``, summed over the ranks
    (0 without a group: one rank sends nothing)."""
    if distributed.world_size() == 1:
        return 0
    name = f"{dist.get_backend()}:send"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    sent = sum(math.prod(e.input_shapes[0]) for e in prof.events() if e.name == name)
    return sum(distributed.all_gather_object(sent * element_size))


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class LatticeDistBench(Benchmark):
    """The command: every ``(mode, processes)`` of ``--modes`` and ``--processes``, two rows each."""

    HELP = "strong and weak scaling of the sharded lattice step on 1, 2, 4 CPU processes: halo bytes, comm vs compute"
    DEFAULT_JSON = "results/lattice_bench_dist.json"
    DEVICE = False
    TABLE = Table([
        Column("mode", "mode", 6, align="<"),
        Column("processes", "procs", 5),
        Column("threads_per_process", "threads", 7),
        Column("oversubscribed", "oversub", 7, lambda v: "yes" if v else "no"),
        Column("dims", "lattice", 11, lambda v: "x".join(map(str, v))),
        Column("pass", "pass", 16, align="<"),
        Column("ms_per_step", "ms/step", 9, lambda v: f"{v:,.1f}"),
        Column("ms_exchange", "exchange", 8, lambda v: f"{v:,.2f}"),
        Column("ms_compute", "compute", 9, lambda v: f"{v:,.1f}"),
        Column("comm_fraction", "comm", 5, lambda v: f"{v:.0%}"),
        Column("halo_bytes", "halo/step", 9, format_bytes),
        Column("scaling_efficiency", "efficiency", 10, lambda v: f"{v:.2f}"),
        Column("status", "status", 6, align="<"),
    ])

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--dims", type=int, nargs=3, default=[32, 16, 16], metavar=("X", "Y", "Z"),
                            help="the lattice of strong scaling, and each rank's share of weak scaling "
                                 "(default %(default)s)")
        parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4],
                            help="process counts (default %(default)s)")
        parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                            help="strong (a fixed lattice) and/or weak (a fixed slab per rank)")
        parser.add_argument("--batch", type=int, default=1, help="batch size B (default %(default)s)")
        parser.add_argument("--backend", default="torch", choices=list(BACKENDS),
                            help="lattice-step backend (default %(default)s)")
        parser.add_argument("--repeats", type=int, default=5,
                            help="timed calls after one warm-up, per figure (default %(default)s)")

    def check_options(self, args: argparse.Namespace) -> None:
        check_at_least(args, 1, "batch", "repeats")
        if min(args.dims) < 1:
            raise ValueError(f"--dims must be positive, got {args.dims}")
        if min(args.processes) < 1:
            raise ValueError(f"--processes must be >= 1, got {args.processes}")
        for mode in args.modes:
            for p in args.processes:
                slab_bounds(LatticeConfig(dims=lattice_dims(mode, args.dims, p)), p)

    def intro(self, args: argparse.Namespace, machine: dict[str, Any]) -> str:
        machine["usable_cores"] = usable_cores()
        config = LatticeConfig(dims=tuple(args.dims))
        return (f"default tiers (S = {config.state_size}, r_distant = {config.r_distant:g}: a halo of "
                f"{halo_width(config)} planes), batch {args.batch}, "
                f"backend {args.backend}, float32, gloo; {usable_cores()} usable cores, "
                f"{torch.get_num_threads()} torch threads to share among the ranks")

    def rows(self, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
        measured: dict[tuple[tuple[int, int, int], int], dict | str] = {}
        for mode in args.modes:
            one: dict[str, float] = {}
            for p in args.processes:
                dims = lattice_dims(mode, args.dims, p)
                if (dims, p) not in measured:
                    measured[dims, p] = self._launch(dims, p, args)
                yield from self._rows(mode, p, dims, args.batch, measured[dims, p], one)

    @staticmethod
    def _launch(dims: tuple[int, int, int], p: int, args: argparse.Namespace) -> dict | str:
        """One launch's figures, or why it failed."""
        try:
            return run_isolated(f"{__name__}:measure", dict(dims=list(dims), batch=args.batch, backend=args.backend,
                                                            repeats=args.repeats),
                                threads=max(1, torch.get_num_threads() // p), processes=p, timeout_s=TIMEOUT_S)
        except RuntimeError as err:
            return str(err)

    @staticmethod
    def _rows(mode: str, p: int, dims: tuple[int, int, int], batch: int, result: dict | str,
              one: dict[str, float]) -> Iterator[dict[str, Any]]:
        """The two rows of one launch; ``one`` collects the one-process times of ``mode``."""
        config = LatticeConfig(dims=dims)
        threads = max(1, torch.get_num_threads() // p)
        bounds = slab_bounds(config, p)
        common = dict(mode=mode, processes=p, threads_per_process=threads, oversubscribed=p * threads > usable_cores(),
                      dims=list(dims), slab_planes=max(x1 - x0 for x0, x1 in bounds),
                      halo=halo_width(config))
        for name in PASSES:
            if isinstance(result, str):
                yield make_row(ROW_KEYS, **common, **{"pass": name}, status=f"failed: {result}")
                continue
            fig = result[name]
            ms = fig["ms_per_step"]
            if p == 1:
                one[name] = ms
            efficiency = None if name not in one else one[name] / ms / (p if mode == "strong" else 1)
            yield make_row(ROW_KEYS, **common, **{"pass": name}, ms_per_step=ms, ms_exchange=fig["ms_exchange"],
                           ms_compute=ms - fig["ms_exchange"], comm_fraction=fig["ms_exchange"] / ms,
                           halo_bytes=fig["halo_bytes"], scaling_efficiency=efficiency,
                           cell_steps_per_s=config.num_cells * batch * 1000.0 / ms, status="ok")

    def count(self, args: argparse.Namespace) -> int:
        return len(PASSES) * len(args.modes) * len(args.processes)


COMMAND = LatticeDistBench()
