"""Learning in NeuroGraph: the loss, its gradients, the index updates and the training loop.

- Loss of a batch: ``CE(logit_scale * cosine(s_out, e_c), y)`` (mean over samples) plus the
  intermediate credit of hidden nodes, ``hidden_credit * mean_i -cos(s_i, e_{y_b(i)})`` over the
  hidden nodes active when their sample stopped.
- Gradients: autograd through the carriers (:mod:`.propagate`): the signal's table
  derivatives (:mod:`.tables`), ``d cP_v / d cP_u = 1`` along each message, the
  straight-through rounding of the input projection.
- Node indices (:func:`update_indices`): with ``g`` the gradient with respect to the angle
  (``2 pi P / N`` for phases, ``2 pi A / M`` for magnitudes) and ``w`` the bin width in
  radians, ``acc += lr * g / w``; where ``|acc| >= threshold`` the index moves one bin against
  the sign of ``acc`` (phase wraps mod ``N``, magnitude clamps to ``[0, M-1]``) and ``acc``
  restarts at 0.
- The input projection (continuous) takes Adam steps at ``lr_input``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .propagate import NeuroGraph, Run, propagate, readout
from .tables import signal


def check_labels(y: torch.Tensor, classes: int) -> None:
    """One-line ``ValueError`` unless ``y`` is int64 class indices in ``[0, classes)``."""
    if not isinstance(y, torch.Tensor) or y.dtype != torch.long or y.dim() != 1:
        raise ValueError(f"labels must be an int64 tensor [B], got {getattr(y, 'dtype', type(y).__name__)} "
                         f"{list(getattr(y, 'shape', []))}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise ValueError(f"labels must be in [0, {classes - 1}] (n_output = {classes} classes), "
                         f"got {int(y.min())}..{int(y.max())}")


def loss_terms(net: NeuroGraph, run: Run, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, cross_entropy, hidden_term)`` of a forward ``run`` with labels ``y`` ``[B]``."""
    ce = F.cross_entropy(readout(net, run), y)
    hidden = torch.zeros((), dtype=ce.dtype, device=ce.device)
    if len(run.hidden_sample):
        sig = signal(run.hidden_P, run.hidden_A, net.tables(net.dtype))                 # (H, D)
        hidden = -F.cosine_similarity(sig, net.codes[y[run.hidden_sample]], dim=1, eps=1e-12).mean()
    return ce + net.config.hidden_credit * hidden, ce, hidden


@torch.no_grad()
def update_indices(net: NeuroGraph, run: Run, lr_factor: float = 1.0) -> int:
    """Thresholded accumulation of the gradients on ``run.node_P``/``node_A`` (module docstring),
    the learning rates times ``lr_factor``; returns how many indices moved and bumps
    ``net.version`` if any did."""
    c = net.config
    moved = 0
    for grad, acc, index, lr, bins, wraps in ((run.node_P.grad, net.acc_P, net.P, c.lr_phase * lr_factor, c.N, True),
                                             (run.node_A.grad, net.acc_A, net.A, c.lr_mag * lr_factor, c.M, False)):
        if grad is None:
            continue
        width = 2 * math.pi / bins
        acc += lr * (grad.double() / width) / width          # grad per index -> per radian, / bin width
        step = (acc >= c.threshold).long() - (acc <= -c.threshold).long()
        new = index - step
        index.copy_(new.remainder(bins) if wraps else new.clamp(0, bins - 1))
        acc[step != 0] = 0.0
        moved += int((step != 0).sum())
    if moved:
        net.version += 1
    return moved


def train_step(net: NeuroGraph, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               forward: Callable[..., Run] = propagate, lr_factor: float = 1.0) -> dict[str, float]:
    """Forward (``forward(net, inputs, grad=True)``: the fast path, or the reference), loss,
    backward, Adam step of the projection (at ``lr_input * lr_factor``), index updates of the
    nodes (:func:`update_indices` with ``lr_factor``)."""
    for group in optimizer.param_groups:
        group["lr"] = net.config.lr_input * lr_factor
    check_labels(y, net.config.n_output)
    optimizer.zero_grad(set_to_none=True)
    run = forward(net, net.project(x), grad=True)
    loss, ce, hidden = loss_terms(net, run, y)
    loss.backward()
    optimizer.step()
    moved = update_indices(net, run, lr_factor)
    correct = int((readout(net, run).argmax(1) == y).sum())
    return {"loss": loss.item(), "ce": ce.item(), "hidden": hidden.item(), "correct": correct,
            "moved": moved, "active": float(run.activity.sum(0).float().mean()),
            "steps": float(run.steps.float().mean())}


@torch.no_grad()
def predict(net: NeuroGraph, x: torch.Tensor, batch_size: int = 128) -> dict[str, torch.Tensor]:
    """``logits`` ``[n, C]``, ``steps`` ``[n]`` and ``activity`` ``[T_max, n]`` (active nodes
    after each step, 0 after a sample stopped) of features ``x`` in batches."""
    net.check_features(x)
    logits, steps, activity = [], [], torch.zeros(net.config.T_max, len(x), dtype=torch.long)
    for i in range(0, len(x), batch_size):
        run = propagate(net, net.project(x[i:i + batch_size]))
        logits.append(readout(net, run).cpu())
        steps.append(run.steps.cpu())
        activity[:len(run.activity), i:i + batch_size] = run.activity.cpu()
    return {"logits": torch.cat(logits), "steps": torch.cat(steps), "activity": activity}


def accuracy(net: NeuroGraph, x: torch.Tensor, y: torch.Tensor) -> float:
    check_labels(y, net.config.n_output)
    return float((predict(net, x)["logits"].argmax(1) == y).float().mean())


def train(net: NeuroGraph, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor | None = None,
          y_test: torch.Tensor | None = None,
          on_epoch: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """``config.epochs`` epochs of :func:`train_step` over ``(x, y)`` in shuffled batches
    (seeded by ``config.seed``), every learning rate scaled by a cosine decay from 1 to 0 over
    the steps; after each epoch, the held-out accuracy when ``x_test`` is given.
    Returns the history: one dict per epoch (``epoch``, ``loss``, ``train_accuracy``,
    ``test_accuracy``, ``active_nodes``, ``steps``, ``moved``)."""
    c = net.config
    net.check_features(x)
    check_labels(y, c.n_output)
    if len(x) != len(y):
        raise ValueError(f"features and labels must have the same number of rows, got {len(x)} and {len(y)}")
    optimizer = torch.optim.Adam(net.proj.parameters(), lr=c.lr_input)
    gen = torch.Generator().manual_seed(c.seed)
    history = []
    per_epoch = math.ceil(len(x) / c.batch_size)
    total, done = c.epochs * per_epoch, 0
    for epoch in range(1, c.epochs + 1):
        order = torch.randperm(len(x), generator=gen)
        totals = {"loss": 0.0, "correct": 0, "moved": 0, "active": 0.0, "steps": 0.0}
        batches = range(0, len(x), c.batch_size)
        with tqdm(batches, desc=f"neurograph epoch {epoch}/{c.epochs}", unit="batch", disable=None, leave=False) as bar:
            for i in bar:
                idx = order[i:i + c.batch_size]
                factor = 0.5 * (1 + math.cos(math.pi * done / total))
                stats = train_step(net, optimizer, x[idx], y[idx], lr_factor=factor)
                done += 1
                for key in totals:
                    totals[key] += stats[key] * (len(idx) if key in ("loss", "active", "steps") else 1)
                bar.set_postfix(loss=f"{stats['loss']:.3f}", active=f"{stats['active']:.0f}")
        entry = {"epoch": epoch, "loss": totals["loss"] / len(x), "train_accuracy": totals["correct"] / len(x),
                 "active_nodes": totals["active"] / len(x), "steps": totals["steps"] / len(x),
                 "moved": totals["moved"]}
        if x_test is not None:
            entry["test_accuracy"] = accuracy(net, x_test, y_test)
        history.append(entry)
        if on_epoch is not None:
            on_epoch(entry)
    return history


def load_data(path: str | None):
    """The task: scikit-learn digits (``path`` None) or a user's ``.npz`` (arrays ``x``, ``y``
    with integer labels), stratified 75/25 with seed 0 (:mod:`neurolattice.lattice.tasks`),
    features flattened to ``[n, F]``. Returns the :class:`~neurolattice.lattice.tasks.Dataset`."""
    import zipfile
    from pathlib import Path

    from neurolattice.lattice.tasks import load_digits, load_npz

    if path is not None and Path(path).is_file() and not zipfile.is_zipfile(path):
        raise ValueError(f"cannot read {path} as a .npz file: it is not a zip archive")
    data = load_digits() if path is None else load_npz(path)
    if data.task != "classification":
        raise ValueError(f"{path}: NeuroGraph classifies: y must be integer class labels, got float targets")
    data.x_train, data.x_test = data.x_train.flatten(1), data.x_test.flatten(1)
    return data


def evaluate(net: NeuroGraph, data) -> dict[str, Any]:
    """Held-out ``accuracy`` with its 95% Wilson interval ``ci95``, mean ``steps`` and the mean
    active nodes after each timestep ``activity`` (over all test samples; 0 once stopped)."""
    from neurolattice.lattice.tasks import wilson_interval

    check_labels(data.y_test, net.config.n_output)
    out = predict(net, data.x_test.to(net.P.device))
    correct = int((out["logits"].argmax(1) == data.y_test).sum())
    last = int(out["steps"].max())
    return {"accuracy": correct / len(data.y_test), "ci95": list(wilson_interval(correct, len(data.y_test))),
            "steps": float(out["steps"].float().mean()),
            "activity": out["activity"][:last].float().mean(1).tolist()}
