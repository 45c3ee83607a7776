"""NeuroGraph's task: classifying feature vectors of a :class:`~neurolattice.data.Dataset`
(scikit-learn digits or the user's ``.npz``, :mod:`neurolattice.data`) and the held-out figures."""

from __future__ import annotations

from typing import Any

from neurolattice.data import Dataset, load_digits, load_npz, score

from .learn import check_labels, predict
from .propagate import NeuroGraph


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
