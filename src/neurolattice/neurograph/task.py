"""NeuroGraph's task: classifying feature vectors of a :class:`~neurolattice.data.Dataset`
(scikit-learn digits or the user's ``.npz``, :mod:`neurolattice.data`), its held-out figures,
and a run: its config and data (:func:`build`), loading it back (:func:`load_run`).

A run directory holds the checkpoint (``latest`` -> ``step-*/model.safetensors`` +
``run_config.json``, written atomically by :func:`neurolattice.train.save_checkpoint`) and
``history.json`` (one entry per epoch).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from neurolattice.config import layered_config
from neurolattice.data import Dataset, baselines, load_digits, load_npz, score
from neurolattice.train import SavedRun, load_checkpoint, read_run_config

from .config import NeuroGraphConfig
from .learn import check_labels, predict
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


@dataclass
class NeuroGraphRun(SavedRun):
    """A saved NeuroGraph run: the trained network, its data and its saved run config."""

    data: Dataset
    saved: dict[str, Any]

    @property
    def history_path(self) -> Path:
        return self.run_dir / HISTORY


def load_run(path: str, data_path: str | None = None, expected: NeuroGraphConfig | None = None) -> NeuroGraphRun:
    """The trained network at ``path`` (run or step directory), its data (``data_path`` or the
    run's own) and its saved run config. ``expected``: the config the checkpoint must have. The
    network is built with the seed of the restart the run kept (``selection.seed``), so its
    ``config.seed`` is that one."""
    ckpt, (config, n_features, source, saved) = read_run_config(path, "a neurograph", lambda saved: (
        NeuroGraphConfig.from_dict(saved["neurograph"]), int(saved["data"]["n_features"]), saved["data"]["path"],
        saved))
    data = load_data(data_path if data_path is not None else source)
    if data.x_test.shape[1] != n_features:
        raise ValueError(f"the checkpoint expects {n_features} features per sample, "
                         f"the data has {data.x_test.shape[1]}")
    chosen = saved.get("selection", {}).get("seed", config.seed)         # the restart the run kept
    net = NeuroGraph(replace(config, seed=chosen), n_features)
    load_checkpoint(ckpt, net, {"neurograph": (expected or config).to_dict()})
    return NeuroGraphRun(ckpt, net, data, saved)
