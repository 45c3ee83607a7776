"""``neurolattice lattice train | eval | show``: the command-line side of :mod:`.experiment`.

Each command has the shape :mod:`neurolattice.cli` expects: ``HELP``, ``add_arguments``,
``check`` (one-line ``ValueError``) and ``run``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neurolattice.config import sections_help
from neurolattice.io import atomic_write_json
from neurolattice.train import TrainConfig, options, resolve_checkpoint

from . import experiment
from .config import LatticeConfig
from .model import LatticeModelConfig
from .tasks import scale_warning


def config_help() -> str:
    """The keys a TOML file or ``SECTION.KEY=VALUE`` may set, generated from the dataclasses."""
    return sections_help({"model": LatticeModelConfig, "lattice": LatticeConfig, "train": TrainConfig},
                         experiment.DEFAULTS,
                         skip=tuple(f"model.{k}" for k in ("lattice", *experiment.SET_BY_DATA)))


def _json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write the held-out figures here as JSON")


def _report(exp, result: dict, json_path: str | None) -> None:
    print(experiment.format_summary(exp.data, result, exp.model.steps))
    if json_path:
        atomic_write_json(json_path, result)
        print(f"figures: {json_path}")


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
        _json_arg(parser)
        parser.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides")

    @staticmethod
    def check(args: argparse.Namespace) -> None:
        options.check_run_arguments(args)
        args.experiment = experiment.build_experiment(args.data, args.config, args.overrides)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        exp = args.experiment
        warning = scale_warning(exp.data)
        if warning:
            print(warning, file=sys.stderr)
        result, reached = experiment.train(exp, args.out, resume=args.resume, deadline=options.deadline(args))
        if reached < exp.train.steps:
            print(f"stopped at step {reached} of {exp.train.steps}: --max-minutes {args.max_minutes} ran out")
        _report(exp, result, args.json)
        print(f"checkpoint: {resolve_checkpoint(args.out)}   (T = 0 baseline: {Path(args.out) / 'T0'})")
        print(f"plots: neurolattice lattice show {args.out}")
        return 0


class _OnRun:
    """A command on a trained run: ``CKPT`` is loaded (and checked) before it runs."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("ckpt", metavar="CKPT", help="run directory or one of its step directories")

    @staticmethod
    def check(args: argparse.Namespace) -> None:
        args.loaded = experiment.load_run(args.ckpt)


class Eval(_OnRun):
    HELP = "held-out figures of a trained lattice run, beside its T = 0 baseline and scikit-learn's"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        _OnRun.add_arguments(parser)
        _json_arg(parser)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        exp, model, baseline = args.loaded
        _report(exp, experiment.summarize(exp.data, model, baseline), args.json)
        return 0


class Show(_OnRun):
    HELP = "PNG plots of a trained lattice run: curves, gate usage, state norms, metric vs T"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        _OnRun.add_arguments(parser)
        parser.add_argument("--out", help="folder for the PNGs (default: CKPT's run directory /plots)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from .plots import show

        exp, model, baseline = args.loaded
        run_dir = resolve_checkpoint(args.ckpt).parent
        out = Path(args.out) if args.out else run_dir / "plots"
        for path in show(exp, model, baseline, run_dir, out):
            print(f"wrote {path}")
        return 0
