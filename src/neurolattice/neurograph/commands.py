"""``neurolattice neurograph train | eval | show``.

Each command has the shape :mod:`neurolattice.cli` expects: ``HELP``, ``add_arguments``,
``check`` (one-line ``ValueError``) and ``run``. A run directory holds the checkpoint
(``latest`` -> ``step-*/model.safetensors`` + ``run_config.json``, written atomically by
:func:`neurolattice.train.save_checkpoint`) and ``history.json`` (one entry per epoch).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from neurolattice.config import layered_config, sections_help
from neurolattice.data import Dataset, baselines
from neurolattice.io import atomic_write_json
from neurolattice.train import load_checkpoint, read_config, resolve_checkpoint, save_checkpoint

from . import learn, task
from .config import NeuroGraphConfig
from .propagate import NeuroGraph

SECTIONS = ("neurograph",)
HISTORY = "history.json"


def build(data_path: str | None, config_file: str | None, overrides: list[str]) -> tuple[NeuroGraphConfig, Dataset]:
    """The config (defaults, TOML file, ``neurograph.KEY=VALUE`` overrides) and the data,
    checked against each other (labels in range of ``n_output``)."""
    merged, _ = layered_config(SECTIONS, {"neurograph": {}}, config_file, overrides)
    config = NeuroGraphConfig.from_dict(merged["neurograph"])
    data = task.load_data(data_path)
    for y in (data.y_train, data.y_test):
        learn.check_labels(y, config.n_output)
    return config, data


def load_run(path: str, data_path: str | None = None,
             expected: NeuroGraphConfig | None = None) -> tuple[NeuroGraph, Dataset, dict[str, Any]]:
    """The trained network at ``path`` (run or step directory), its data (``data_path`` or the
    run's own) and its saved run config. ``expected``: the config the checkpoint must have. The
    network is built with the seed of the restart the run kept (``selection.seed``), so its
    ``config.seed`` is that one."""
    saved = read_config(path)
    try:
        config = NeuroGraphConfig.from_dict(saved["neurograph"])
        n_features, source = int(saved["data"]["n_features"]), saved["data"]["path"]
    except (KeyError, TypeError) as err:
        where = resolve_checkpoint(path)
        raise ValueError(f"{where} is not a neurograph checkpoint (no {err} in its config)") from None
    data = task.load_data(data_path if data_path is not None else source)
    if data.x_test.shape[1] != n_features:
        raise ValueError(f"the checkpoint expects {n_features} features per sample, "
                         f"the data has {data.x_test.shape[1]}")
    chosen = saved.get("selection", {}).get("seed", config.seed)         # the restart the run kept
    net = NeuroGraph(replace(config, seed=chosen), n_features)
    load_checkpoint(path, net, {"neurograph": (expected or config).to_dict()})
    return net, data, saved


def held_out_figures(net: NeuroGraph, data: Dataset) -> dict[str, Any]:
    """:func:`.task.evaluate` of ``net`` beside the same network untrained
    (``untrained_accuracy``) and scikit-learn's logistic regression on the same split."""
    untrained = task.evaluate(NeuroGraph(net.config, net.n_features), data)["accuracy"]
    return {**task.evaluate(net, data), "untrained_accuracy": untrained,
            "logistic_regression": baselines(data, ("logistic_regression",))["logistic_regression"]}


def _report(result: dict[str, Any], json_path: str | None) -> None:
    lo, hi = result["ci95"]
    print(f"held-out accuracy {result['accuracy']:.4f} (95% CI {lo:.3f}-{hi:.3f}), "
          f"untrained {result['untrained_accuracy']:.4f}, logistic regression {result['logistic_regression']:.4f}; "
          f"{result['steps']:.2f} steps per sample on average")
    if json_path:
        atomic_write_json(json_path, result)
        print(f"figures: {json_path}")


def _json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write the held-out figures here as JSON")


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
        parser.add_argument("--out", default="runs/neurograph", help="run directory (default: %(default)s)")
        _json_arg(parser)
        parser.add_argument("overrides", nargs="*", metavar="neurograph.KEY=VALUE", help="config overrides")

    @staticmethod
    def check(args: argparse.Namespace) -> None:
        args.config_obj, args.data_obj = build(args.data, args.config, args.overrides)
        if (Path(args.out) / "latest").exists():
            raise ValueError(f"{args.out} already holds a run: choose another --out")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        config, data = args.config_obj, args.data_obj
        torch.manual_seed(config.seed)
        x_test, y_test = data.x_test, data.y_test

        def report(entry: dict[str, Any], net: NeuroGraph) -> None:
            entry["test_accuracy"] = learn.accuracy(net, x_test, y_test)       # for the plot; never for a choice
            val = f", validation {entry['validation_accuracy']:.4f}" if "validation_accuracy" in entry else ""
            print(f"restart {entry['restart']} (seed {entry['seed']}) epoch {entry['epoch']}: "
                  f"loss {entry['loss']:.4f}, train accuracy {entry['train_accuracy']:.4f}{val}, "
                  f"held-out {entry['test_accuracy']:.4f}, "
                  f"active nodes {entry['active_nodes']:.0f}, steps {entry['steps']:.2f}", flush=True)

        start = time.perf_counter()
        result = learn.fit(config, data.x_train, data.y_train, on_epoch=report)
        seconds = time.perf_counter() - start
        net = result.net
        print(net)
        run_config = {"neurograph": config.to_dict(), "selection": {"seed": result.seed},
                      "data": {"path": args.data, "n_features": data.x_train.shape[1], "name": data.name}}
        ckpt = save_checkpoint(args.out, config.epochs, net, run_config)
        atomic_write_json(Path(args.out) / HISTORY, result.history)
        figures = {**held_out_figures(net, data), "validation_accuracy": result.validation_accuracy,
                   "best_epoch": result.best_epoch, "chosen_seed": result.seed, "restarts": result.restarts,
                   "train_seconds": seconds, "test_samples": len(data.y_test), "seed": config.seed}
        _report(figures, args.json)
        print(f"checkpoint: {ckpt}\nplots: neurolattice neurograph show {args.out}")
        return 0


class _OnRun:
    """A command on a trained run: ``CKPT`` (and ``--data``) are loaded and checked first."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("ckpt", metavar="CKPT", help="run directory or one of its step directories")
        parser.add_argument("--data", metavar="FILE.npz", help="evaluate on this data instead of the run's")

    @staticmethod
    def check(args: argparse.Namespace) -> None:
        args.net, args.data_obj, args.saved = load_run(args.ckpt, args.data)


class Eval(_OnRun):
    HELP = "held-out accuracy of a trained NeuroGraph run, beside a logistic regression on the same split"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        _OnRun.add_arguments(parser)
        _json_arg(parser)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        _report(held_out_figures(args.net, args.data_obj), args.json)
        return 0


class Show(_OnRun):
    HELP = "PNG plots of a trained NeuroGraph run: accuracy and active nodes over training, activity per timestep"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        _OnRun.add_arguments(parser)
        parser.add_argument("--out", help="folder for the PNGs (default: CKPT's run directory /plots)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from .plots import activity_per_step, training_curves

        run_dir = resolve_checkpoint(args.ckpt).parent
        out = Path(args.out) if args.out else run_dir / "plots"
        out.mkdir(parents=True, exist_ok=True)
        history_path = run_dir / HISTORY
        paths = []
        if history_path.is_file():
            paths.append(training_curves(json.loads(history_path.read_text()), out))
        paths.append(activity_per_step(task.held_out_run(args.net, args.data_obj), args.net.config, out))
        for path in paths:
            print(f"wrote {path}")
        return 0
