"""NeuroGraph's task: classifying feature vectors of a :class:`~neurolattice.data.Dataset`
(scikit-learn digits or the user's ``.npz``, :mod:`neurolattice.data`), its held-out figures,
and a run: its config and data (:func:`build`), training it into a run directory, resumably
(:func:`train`), loading it back (:func:`load_run`).

A run directory holds one checkpoint (``latest`` -> ``step-<S>/``, written atomically by
:func:`neurolattice.train.save_checkpoint`; ``S``: the batches trained, all restarts together)
and ``history.json`` (one entry per epoch of the restart kept). In the checkpoint,
``model.safetensors`` is the network kept (:meth:`~.learn.Fitting.result`) and
``run_config.json`` has the config, ``selection.seed`` (its restart's seed) and the data; a run
under way adds ``unfinished: {"step", "steps"}``. ``trainer_state.pt`` holds what resuming
needs: ``fitting`` (:meth:`~.learn.Fitting.state_dict`: every restart's network, Adam state,
data-order generator, position and snapshot, the histories, the restart chosen) and
``seconds`` (of training so far).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from neurolattice.config import layered_config
from neurolattice.data import Dataset, baselines, load_digits, load_npz, score
from neurolattice.io import atomic_write_json
from neurolattice.train import (
    SavedRun,
    check_config,
    load_checkpoint,
    read_config,
    read_run_config,
    read_trainer_state,
    resolve_checkpoint,
    save_checkpoint,
)
from neurolattice.train.trainer import Interrupted, deferred_interrupt

from .config import NeuroGraphConfig
from .learn import Fitting, check_labels, predict
from .propagate import NeuroGraph

SECTIONS = ("neurograph",)
HISTORY = "history.json"


def load_data(path: str | None) -> Dataset:
    """The task: scikit-learn digits (``path`` None) or a user's ``.npz`` (arrays ``x``, ``y``
    with integer labels), stratified 75/25 with seed 0, features flattened to ``[n, F]``."""
    data = load_digits() if path is None else load_npz(path)
    if data.task != "classification":
        raise ValueError(f"{path}: NeuroGraph classifies: y must be integer class labels, got float targets")
    data.x_train, data.x_test = data.x_train.flatten(1), data.x_test.flatten(1)
    return data


def held_out_run(net: NeuroGraph, data: Dataset) -> dict[str, Any]:
    """:func:`~.learn.predict` on the held-out split (labels checked first): ``logits``, the
    timesteps each sample ran ``steps`` and the active nodes after each timestep ``activity``."""
    check_labels(data.y_test, net.config.n_output)
    return predict(net, data.x_test.to(net.P.device))


def evaluate(net: NeuroGraph, data: Dataset) -> dict[str, Any]:
    """Held-out ``accuracy`` with its 95% Wilson interval ``ci95``, mean ``steps`` and the mean
    active nodes after each timestep ``activity`` (over all test samples; 0 once stopped)."""
    out = held_out_run(net, data)
    last = int(out["steps"].max())
    return {**score(out["logits"], data.y_test, "classification"), "steps": float(out["steps"].float().mean()),
            "activity": out["activity"][:last].float().mean(1).tolist()}


def held_out_figures(net: NeuroGraph, data: Dataset) -> dict[str, Any]:
    """:func:`evaluate` of ``net`` beside the same network untrained (``untrained_accuracy``)
    and scikit-learn's logistic regression on the same split."""
    untrained = evaluate(NeuroGraph(net.config, net.n_features).to(net.P.device), data)["accuracy"]
    return {**evaluate(net, data), "untrained_accuracy": untrained,
            "logistic_regression": baselines(data, ("logistic_regression",))["logistic_regression"]}


@dataclass
class Experiment:
    """A training run's config and data."""

    config: NeuroGraphConfig
    data: Dataset
    data_path: str | None


def build(data_path: str | None, config_file: str | None, overrides: list[str]) -> Experiment:
    """The config (defaults, TOML file, ``neurograph.KEY=VALUE`` overrides) and the data,
    checked against each other (labels in range of ``n_output``)."""
    merged, _ = layered_config(SECTIONS, {"neurograph": {}}, config_file, overrides)
    config = NeuroGraphConfig.from_dict(merged["neurograph"])
    data = load_data(data_path)
    for y in (data.y_train, data.y_test):
        check_labels(y, config.n_output)
    return Experiment(config, data, data_path)


def train(exp: Experiment, out: str | os.PathLike, resume: bool = False, deadline: float | None = None,
          on_epoch: Callable[[dict[str, Any], NeuroGraph], None] | None = None,
          device: str | torch.device = "cpu") -> tuple[Fitting, float]:
    """Train ``exp``'s network on its training split as :func:`~.learn.fit` does, into the run
    directory ``out`` (module docstring), with a checkpoint after every epoch of every restart
    (:func:`save`); ``resume``: from the checkpoint there, whose config and data must be this
    run's (a one-line ``ValueError`` names the first field that differs). ``on_epoch``: as in
    :func:`~.learn.fit`.

    With ``deadline`` (a ``time.monotonic()`` time) training stops after the first epoch that
    ends past it. Ctrl-C lets the batch under way finish, saves, and raises
    :class:`~neurolattice.train.trainer.Interrupted` (one line: the checkpoint and how to go on);
    a second Ctrl-C interrupts at once, leaving the checkpoint of the last epoch. Returns the
    fitting (finished, unless the deadline stopped it) and the seconds trained over all the
    run's sessions."""
    config, data = exp.config, exp.data
    fitting = Fitting(config, data.x_train, data.y_train, device=device)
    sections = {"neurograph": config.to_dict(),
                "data": {"path": exp.data_path, "n_features": data.x_train.shape[1], "name": data.name}}
    seconds = 0.0
    if resume:
        ckpt = resolve_checkpoint(out)
        check_config(sections, read_config(ckpt), f"checkpoint {ckpt}")
        state = read_trainer_state(ckpt)
        fitting.load_state_dict(state["fitting"])
        seconds = state["seconds"]
    start = time.perf_counter()
    with deferred_interrupt() as interrupted:
        while not fitting.finished:
            fitting.epoch(on_epoch, stop=interrupted)
            ckpt = save(out, fitting, sections, seconds + time.perf_counter() - start)
            if interrupted() and not fitting.finished:
                raise Interrupted(fitting.step, fitting.steps, ckpt)
            if deadline is not None and time.monotonic() >= deadline:
                break
    return fitting, seconds + time.perf_counter() - start


def save(out: str | os.PathLike, fitting: Fitting, sections: dict[str, Any], seconds: float) -> Path:
    """Checkpoint ``fitting`` at its ``step`` into ``out`` (the layout of the module docstring;
    the older checkpoint goes) and write ``history.json``; ``sections``: the ``neurograph`` and
    ``data`` parts of the run config. Returns the checkpoint directory."""
    kept = fitting.result()
    run_config = {"neurograph": sections["neurograph"], "selection": {"seed": kept.seed}, "data": sections["data"]}
    if not fitting.finished:
        run_config["unfinished"] = {"step": fitting.step, "steps": fitting.steps}
    ckpt = save_checkpoint(out, fitting.step, kept.net, run_config,
                           {"fitting": fitting.state_dict(), "seconds": seconds}, keep=1)
    atomic_write_json(Path(out) / HISTORY, kept.history)
    return ckpt


@dataclass
class NeuroGraphRun(SavedRun):
    """A saved NeuroGraph run: the trained network, its data and its saved run config."""

    data: Dataset
    saved: dict[str, Any]

    @property
    def history_path(self) -> Path:
        return self.run_dir / HISTORY

    @property
    def unfinished(self) -> str | None:
        """None for a finished run; for one under way, a line saying so and how to finish it."""
        progress = self.saved.get("unfinished")
        return None if progress is None else (
            f"{self.run_dir} is unfinished (step {progress['step']} of {progress['steps']}): this is the network "
            f"kept so far; the same train command with --resume finishes it")


def load_run(path: str, data_path: str | None = None, expected: NeuroGraphConfig | None = None) -> NeuroGraphRun:
    """The trained network at ``path`` (run or step directory), its data (``data_path`` or the
    run's own) and its saved run config. ``expected``: the config the checkpoint must have. The
    network is built with the seed of the restart the run kept (``selection.seed``), so its
    ``config.seed`` is that one."""
    ckpt, (config, n_features, source, saved) = read_run_config(path, "a neurograph", lambda saved: (
        NeuroGraphConfig.from_dict(saved["neurograph"], saved=True), int(saved["data"]["n_features"]),
        saved["data"]["path"], saved))
    data = load_data(data_path if data_path is not None else source)
    if data.x_test.shape[1] != n_features:
        raise ValueError(f"the checkpoint expects {n_features} features per sample, "
                         f"the data has {data.x_test.shape[1]}")
    chosen = saved.get("selection", {}).get("seed", config.seed)         # the restart the run kept
    net = NeuroGraph(replace(config, seed=chosen), n_features)
    load_checkpoint(ckpt, net, {"neurograph": (expected or config).to_dict()})
    return NeuroGraphRun(ckpt, net, data, saved)
