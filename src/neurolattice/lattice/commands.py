"""``neurolattice lattice train | eval | show``: the command-line side of :mod:`.experiment`.

Each command has the shape :mod:`neurolattice.cli` expects (see :mod:`neurolattice.cmdline`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from neurolattice import cmdline, device
from neurolattice.config import sections_help
from neurolattice.train import TrainConfig, distributed, options, resolve_checkpoint

from . import experiment
from .config import LatticeConfig
from .model import LatticeModel, LatticeModelConfig
from .shard import halo_width, slab_bounds
from .tasks import scale_warning


def config_help() -> str:
    """The keys a TOML file or ``SECTION.KEY=VALUE`` may set, generated from the dataclasses."""
    return sections_help({"model": LatticeModelConfig, "lattice": LatticeConfig, "train": TrainConfig},
                         experiment.DEFAULTS,
                         skip=tuple(f"model.{k}" for k in ("lattice", *experiment.SET_BY_DATA)))


def _report(exp: experiment.Experiment, result: dict, json_path: str | None) -> None:
    print(experiment.format_summary(exp.data, result, exp.model.steps))
    cmdline.write_json(json_path, result)


class Train:
    HELP = "train a lattice model (digits by default) and its T = 0 baseline"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.epilog = config_help()
        source = parser.add_mutually_exclusive_group()
        source.add_argument("--task", choices=["digits"], help="built-in dataset (default: digits)")
        source.add_argument("--data", metavar="FILE.npz", help="a .npz file with arrays x and y")
        parser.add_argument("--config", metavar="FILE.toml", help="TOML file with [model], [lattice], [train]")
        options.add_run_arguments(parser, "runs/lattice")
        parser.add_argument("--shards", type=int, default=1, metavar="N",
                            help="split the lattice along x over the N processes that torchrun started "
                                 "(torchrun --nproc_per_node N -m neurolattice.cli lattice train --shards N); "
                                 "default 1: one process")
        cmdline.add_json_argument(parser)
        parser.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides")

    @staticmethod
    def check(args: argparse.Namespace) -> experiment.Experiment:
        """Also, on every rank before any joins the group: ``--shards`` equal to the processes
        torchrun started, and a lattice that splits into that many slabs."""
        options.check_run_arguments(args)
        launched = distributed.launched_world_size()
        if args.shards != launched:
            raise ValueError(f"--shards {args.shards} must equal the processes torchrun started, {launched}: "
                             f"torchrun --nproc_per_node N -m neurolattice.cli lattice train --shards N")
        exp = experiment.build_experiment(args.data, args.config, args.overrides)
        slab_bounds(exp.model.lattice, args.shards)
        return exp

    @staticmethod
    def run(args: argparse.Namespace, exp: experiment.Experiment) -> int:
        with distributed.init_from_env(device.setup(args).type) as here:
            main = distributed.is_main()
            if main:
                _say_where(exp, here, args.shards)
            with options.main_holds(args.out, args.resume):
                result, reached = experiment.train(exp, args.out, resume=args.resume, deadline=options.deadline(args),
                                                   device=here, sharded=args.shards > 1)
        if not main:
            return 0
        if reached < exp.train.steps:
            print(options.stopped(args, reached, exp.train.steps))
        _report(exp, result, args.json)
        print(f"checkpoint: {resolve_checkpoint(args.out)}   (T = 0 baseline: {Path(args.out) / 'T0'})")
        print(f"plots: neurolattice lattice show {args.out}")
        return 0


def _say_where(exp: experiment.Experiment, here: torch.device, shards: int) -> None:
    """The scale warning (if any), the device and, for a split lattice, its slabs."""
    warning = scale_warning(exp.data)
    if warning:
        print(warning, file=sys.stderr)
    print(f"device: {device.describe(here)}", flush=True)
    if shards > 1:
        slabs = ", ".join(f"{x0}:{x1}" for x0, x1 in slab_bounds(exp.model.lattice, shards))
        print(f"lattice split over {shards} ranks: x = {slabs} (halo {halo_width(exp.model.lattice)} planes)",
              flush=True)


class _OnRun(cmdline.OnRun):
    @classmethod
    def load(cls, args: argparse.Namespace) -> experiment.LatticeRun:
        return experiment.load_run(args.ckpt)


def _to(run: experiment.LatticeRun, where: torch.device) -> tuple[LatticeModel, LatticeModel | None]:
    """The run's model and baseline on ``where``."""
    return run.model.to(where), None if run.baseline is None else run.baseline.to(where)


class Eval(_OnRun):
    HELP = "held-out figures of a trained lattice run, beside its T = 0 baseline and scikit-learn's"

    @classmethod
    def add_options(cls, parser: argparse.ArgumentParser) -> None:
        cmdline.add_json_argument(parser)

    @staticmethod
    def run(args: argparse.Namespace, run: experiment.LatticeRun) -> int:
        model, baseline = _to(run, device.use(args))
        _report(run.experiment, experiment.summarize(run.experiment.data, model, baseline, progress=True), args.json)
        return 0


class Show(_OnRun):
    HELP = "PNG plots of a trained lattice run: curves, gate usage, state norms, metric vs T"

    @classmethod
    def add_options(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--out", help="folder for the PNGs (default: CKPT's run directory /plots)")

    @staticmethod
    def run(args: argparse.Namespace, run: experiment.LatticeRun) -> int:
        from .plots import show

        model, baseline = _to(run, device.use(args))
        out = Path(args.out) if args.out else run.run_dir / "plots"
        for path in show(run.experiment, model, baseline, run.run_dir, out):
            print(f"wrote {path}")
        return 0
