"""``neurolattice neurograph train | eval | show``: the command-line side of :mod:`.task`.

Each command has the shape :mod:`neurolattice.cli` expects (see :mod:`neurolattice.cmdline`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from neurolattice import cmdline, device
from neurolattice.cmdline import percent
from neurolattice.config import sections_help
from neurolattice.train import options, resolve_checkpoint

from . import learn, task
from .config import NeuroGraphConfig
from .propagate import NeuroGraph


def _report(result: dict[str, Any], json_path: str | None) -> None:
    lo, hi = result["ci95"]
    print(f"held-out accuracy {percent(result['accuracy'])} (95% CI {percent(lo)} - {percent(hi)}), "
          f"untrained {percent(result['untrained_accuracy'])}, "
          f"logistic regression (scikit-learn) {percent(result['logistic_regression'])}; "
          f"{result['steps']:.2f} propagation steps per sample on average")
    cmdline.write_json(json_path, result)


class Train:
    HELP = ("train a NeuroGraph network (digits by default; restarts and the epoch kept chosen on a validation split "
            "of the training set), beside the untrained one and a logistic regression")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.epilog = sections_help({"neurograph": NeuroGraphConfig}, {})
        parser.add_argument("--data", metavar="FILE.npz", help="a .npz with x [n, ...] and integer labels y [n] "
                                                              "(default: scikit-learn digits)")
        parser.add_argument("--config", metavar="FILE.toml", help="TOML file with a [neurograph] table")
        options.add_run_arguments(parser, "runs/neurograph", stops_at="the end of the first epoch")
        cmdline.add_json_argument(parser)
        parser.add_argument("overrides", nargs="*", metavar="neurograph.KEY=VALUE", help="config overrides")

    @staticmethod
    def check(args: argparse.Namespace) -> task.Experiment:
        options.check_run_arguments(args)
        return task.build(args.data, args.config, args.overrides)

    @staticmethod
    def run(args: argparse.Namespace, exp: task.Experiment) -> int:
        config, data = exp.config, exp.data
        where = device.use(args)
        torch.manual_seed(config.seed)
        x_test, y_test = data.x_test.to(where), data.y_test.to(where)

        def report(entry: dict[str, Any], net: NeuroGraph) -> None:
            entry["test_accuracy"] = learn.accuracy(net, x_test, y_test)       # for the plot; never for a choice
            val = f", validation {percent(entry['validation_accuracy'])}" if "validation_accuracy" in entry else ""
            print(f"restart {entry['restart']} (seed {entry['seed']}) epoch {entry['epoch']}: "
                  f"loss {entry['loss']:.4f}, train accuracy {percent(entry['train_accuracy'])}{val}, "
                  f"held-out {percent(entry['test_accuracy'])}, "
                  f"active nodes {entry['active_nodes']:.0f}, steps {entry['steps']:.2f}", flush=True)

        with options.run_folder(args.out, args.resume):
            fitting, seconds = task.train(exp, args.out, args.resume, options.deadline(args), report, where)
        ckpt = resolve_checkpoint(args.out)
        if not fitting.finished:
            print(f"{options.stopped(args, fitting.step, fitting.steps)}; saved {ckpt}; run the same command with "
                  "--resume to continue")
            return 0
        result = fitting.result()
        figures = {**task.held_out_figures(result.net, data), "validation_accuracy": result.validation_accuracy,
                   "best_epoch": result.best_epoch, "chosen_seed": result.seed, "restarts": result.restarts,
                   "train_seconds": seconds, "test_samples": len(data.y_test), "seed": config.seed}
        _report(figures, args.json)
        print(f"checkpoint: {ckpt}\nplots: neurolattice neurograph show {args.out}")
        return 0


class _OnRun(cmdline.OnRun):
    @classmethod
    def add_options(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--data", metavar="FILE.npz", help="evaluate on this data instead of the run's")

    @classmethod
    def load(cls, args: argparse.Namespace) -> task.NeuroGraphRun:
        run = task.load_run(args.ckpt, args.data)
        if run.unfinished:
            print(run.unfinished)
        return run


class Eval(_OnRun):
    HELP = "held-out accuracy of a trained NeuroGraph run, beside a logistic regression on the same split"

    @classmethod
    def add_options(cls, parser: argparse.ArgumentParser) -> None:
        super().add_options(parser)
        cmdline.add_json_argument(parser)

    @staticmethod
    def run(args: argparse.Namespace, run: task.NeuroGraphRun) -> int:
        _report(task.held_out_figures(run.model.to(device.use(args)), run.data), args.json)
        return 0


class Show(_OnRun):
    HELP = "PNG plots of a trained NeuroGraph run: accuracy and active nodes over training, activity per timestep"

    @classmethod
    def add_options(cls, parser: argparse.ArgumentParser) -> None:
        super().add_options(parser)
        parser.add_argument("--out", help="folder for the PNGs (default: CKPT's run directory /plots)")

    @staticmethod
    def run(args: argparse.Namespace, run: task.NeuroGraphRun) -> int:
        from .plots import activity_per_step, training_curves

        net = run.model.to(device.use(args))
        out = Path(args.out) if args.out else run.run_dir / "plots"
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        if run.history_path.is_file():
            paths.append(training_curves(json.loads(run.history_path.read_text()), out))
        paths.append(activity_per_step(task.held_out_run(net, run.data), net.config, out))
        for path in paths:
            print(f"wrote {path}")
        return 0
