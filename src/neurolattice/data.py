"""Data and evaluation shared by the systems that learn from features: scikit-learn's digits,
the user's ``.npz`` files, held-out scores and scikit-learn baselines.

Both data sources are split 75/25, stratified by class for classification, with seed 0
(:class:`Dataset`); :func:`score` and :func:`baselines` report on the held-out split.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class Dataset:
    """A held-out split. ``x``: ``[n, X, Y, C]`` (image-like) or ``[n, F]``; ``y``: class
    indices ``[n]`` (int64) or regression targets ``[n, k]`` (float32)."""

    name: str
    task: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_outputs: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _split(name: str, x: np.ndarray, y: np.ndarray, task: str, num_outputs: int) -> Dataset:
    from sklearn.model_selection import train_test_split

    stratify = y if task == "classification" else None
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=stratify)
    y_dtype = torch.long if task == "classification" else torch.float32
    return Dataset(name, task, torch.tensor(x_tr, dtype=torch.float32), torch.tensor(y_tr, dtype=y_dtype),
                   torch.tensor(x_te, dtype=torch.float32), torch.tensor(y_te, dtype=y_dtype), num_outputs)


def load_digits() -> Dataset:
    """scikit-learn's 8x8 digits as ``[n, 8, 8, 1]`` images in ``[0, 1]``, 10 classes."""
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    x = (digits.images / 16.0)[..., None]
    return _split("digits", x, digits.target, "classification", 10)


def load_npz(path: str | Path) -> Dataset:
    """A user's ``.npz`` with arrays ``x`` and ``y``.

    ``x``: ``[n, F]`` vectors, ``[n, X, Y]`` or ``[n, X, Y, C]`` images. ``y``: integer class
    labels ``[n]`` (classification, classes ``0..K-1``) or floats ``[n]`` / ``[n, k]``
    (regression). Anything else is a one-line ``ValueError``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"cannot read {path} as a .npz file: it is not a zip archive")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("x", "y") if k not in data.files]
            if missing:
                raise ValueError(f"{path} has no array(s) {missing} (found {data.files}); it needs 'x' and 'y'")
            x, y = data["x"], data["y"]
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"cannot read {path} as a .npz file: {err}") from None
    if x.dtype.kind not in "biuf" or y.dtype.kind not in "biuf":
        raise ValueError(f"{path}: x and y must be numeric, got {x.dtype} and {y.dtype}")
    if x.ndim not in (2, 3, 4):
        raise ValueError(f"{path}: x must be [n, F], [n, X, Y] or [n, X, Y, C], got shape {list(x.shape)}")
    if y.ndim not in (1, 2) or len(y) != len(x):
        raise ValueError(f"{path}: y must be [n] or [n, k] with n = {len(x)} rows like x, got {list(y.shape)}")
    if len(x) < 8:
        raise ValueError(f"{path}: needs at least 8 samples, got {len(x)}")
    if not np.isfinite(x).all() or not np.isfinite(y).all():
        raise ValueError(f"{path}: x or y contains NaN or inf")
    if x.ndim == 3:
        x = x[..., None]
    if y.dtype.kind in "biu":
        if y.ndim != 1:
            raise ValueError(f"{path}: integer labels y must be [n], got {list(y.shape)}")
        if y.min() < 0:
            raise ValueError(f"{path}: class labels must be >= 0, got {y.min()}")
        classes = int(y.max()) + 1
        counts = np.bincount(y, minlength=classes)
        if classes < 2 or counts.min() < 2:
            raise ValueError(f"{path}: classification needs classes 0..K-1 (K >= 2) with at least 2 "
                             f"samples each, got counts {counts.tolist()}")
        return _split(path.stem, x, y, "classification", classes)
    y = y.reshape(len(y), -1)
    return _split(path.stem, x, y, "regression", y.shape[1])


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if total == 0:
        return (0.0, 1.0)
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))


def primary_metric(task: str) -> str:
    """The figure :func:`score` leads with: ``accuracy`` (classification) or ``r2`` (regression)."""
    return "accuracy" if task == "classification" else "r2"


def score(outputs: torch.Tensor, y: torch.Tensor, task: str) -> dict[str, float]:
    """Classification (``outputs``: one score per class, ``[n, K]``): ``accuracy`` and its 95%
    interval ``ci95``; regression (``outputs`` shaped like ``y``): ``mse`` and ``r2``."""
    if task == "classification":
        correct = int((outputs.argmax(-1) == y).sum())
        return {"accuracy": correct / len(y), "ci95": list(wilson_interval(correct, len(y)))}
    mse = float(((outputs - y) ** 2).mean())
    return {"mse": mse, "r2": 1.0 - mse / float(((y - y.mean(0)) ** 2).mean())}


def baselines(data: Dataset, names: tuple[str, ...] | None = None) -> dict[str, float]:
    """scikit-learn on the same split, on flattened inputs, each model a ``Pipeline`` behind a
    ``StandardScaler`` (fitted on the training split): ``logistic_regression`` and ``mlp`` (one
    hidden layer of 128) for classification, ``ridge`` and ``mlp`` (the same MLP, regressing)
    for regression. Each is the :func:`primary_metric` of :func:`score` on the held-out split,
    the figure the systems report for themselves. ``names``: only these of them (default: all)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classification = data.task == "classification"
    if classification:
        models = {"logistic_regression": LogisticRegression(max_iter=5000),
                  "mlp": MLPClassifier(hidden_layer_sizes=(128,), max_iter=1000, random_state=0)}
    else:
        models = {"ridge": Ridge(), "mlp": MLPRegressor(hidden_layer_sizes=(128,), max_iter=1000, random_state=0)}
    x_tr, x_te = data.x_train.flatten(1).numpy(), data.x_test.flatten(1).numpy()
    y_tr = data.y_train.numpy()
    if not classification and y_tr.shape[1] == 1:
        y_tr = y_tr[:, 0]                                   # one target: scikit-learn takes y as [n]
    key = primary_metric(data.task)
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for name, model in models.items():
            if names is not None and name not in names:
                continue
            fitted = make_pipeline(StandardScaler(), model).fit(x_tr, y_tr)
            # classes are 0..K-1, all in the training split, so predict_proba's columns are the classes
            out = fitted.predict_proba(x_te) if classification else fitted.predict(x_te).reshape(len(x_te), -1)
            results[name] = score(torch.from_numpy(out), data.y_test, data.task)[key]
    return results
