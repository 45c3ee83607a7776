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
- Training (:func:`fit`, the one entry point; :func:`train_step` is one step of it): a
  validation split carved from the training set (never the held-out one) picks the best of
  ``restarts`` networks and the chosen network's best epoch. Its state (:class:`Fitting`) can be
  saved after any batch and taken back to go on exactly.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import NeuroGraphConfig
from .propagate import NeuroGraph, Run, propagate, readout
from .tables import signal

VALIDATION_SEED = 0          # the validation split is the same for every network seed


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


class Training:
    """One network's training run over ``(x, y)`` (labels checked by :func:`fit`): Adam on the
    input projection, the data order (a generator seeded by the network's ``config.seed``), every
    learning rate scaled by a cosine decay from 1 to 0 over ``config.epochs`` epochs.
    :meth:`epoch` runs the next epoch, or the rest of one cut short after a batch, so
    :class:`Fitting` can stop a run after a few epochs (a restart's probe) or after any batch and
    go on later on the same schedule; :meth:`state_dict` is everything that going on needs."""

    def __init__(self, net: NeuroGraph, x: torch.Tensor, y: torch.Tensor) -> None:
        c = net.config
        net.check_features(x)
        self.net, self.x, self.y = net, x, y
        self.optimizer = torch.optim.Adam(net.proj.parameters(), lr=c.lr_input)
        self.gen = torch.Generator().manual_seed(c.seed)
        self.total = c.epochs * math.ceil(len(x) / c.batch_size)
        self.done = self.epochs_done = 0
        # the epoch under way: its data order (None between epochs), its next sample, its sums so far
        self.order: torch.Tensor | None = None
        self.position = 0
        self.totals: dict[str, float] = {}

    def epoch(self, stop: Callable[[], bool] | None = None) -> dict[str, Any] | None:
        """The next epoch of :func:`train_step` over shuffled batches, or the rest of the one under
        way; returns its entry (``epoch``, ``loss``, ``train_accuracy``, ``active_nodes``,
        ``steps``, ``moved``), or None where ``stop()`` (asked after every batch) was true before
        the epoch's last batch: the next call goes on from the next batch."""
        c, x, y = self.net.config, self.x, self.y
        if self.order is None:
            self.order = torch.randperm(len(x), generator=self.gen)
            self.position = 0
            self.totals = {"loss": 0.0, "correct": 0, "moved": 0, "active": 0.0, "steps": 0.0}
        with tqdm(total=math.ceil(len(x) / c.batch_size), initial=self.position // c.batch_size, unit="batch",
                  desc=f"neurograph epoch {self.epochs_done + 1}/{c.epochs}", disable=None, leave=False) as bar:
            while self.position < len(x):
                idx = self.order[self.position:self.position + c.batch_size]
                factor = 0.5 * (1 + math.cos(math.pi * self.done / self.total))
                stats = train_step(self.net, self.optimizer, x[idx], y[idx], lr_factor=factor)
                self.done += 1
                self.position += len(idx)
                for key in self.totals:
                    self.totals[key] += stats[key] * (len(idx) if key in ("loss", "active", "steps") else 1)
                bar.update()
                bar.set_postfix(loss=f"{stats['loss']:.3f}", active=f"{stats['active']:.0f}")
                if stop is not None and self.position < len(x) and stop():
                    return None
        self.order, self.epochs_done, totals = None, self.epochs_done + 1, self.totals
        return {"epoch": self.epochs_done, "loss": totals["loss"] / len(x),
                "train_accuracy": totals["correct"] / len(x), "active_nodes": totals["active"] / len(x),
                "steps": totals["steps"] / len(x), "moved": totals["moved"]}

    def state_dict(self) -> dict[str, Any]:
        """The network (``state_dict()`` and ``version``), Adam's state, the data order's
        generator, the batches and epochs done, and the epoch under way (``order``, ``position``,
        ``totals``; None between epochs). The tensors are the live ones: save them before
        training on."""
        epoch = None if self.order is None else {"order": self.order, "position": self.position,
                                                 "totals": dict(self.totals)}
        return {"net": self.net.state_dict(), "version": self.net.version, "optimizer": self.optimizer.state_dict(),
                "generator": self.gen.get_state(), "done": self.done, "epochs_done": self.epochs_done, "epoch": epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.net.version = state["version"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.gen.set_state(state["generator"])
        self.done, self.epochs_done = state["done"], state["epochs_done"]
        epoch = state["epoch"]
        self.order = None if epoch is None else epoch["order"]
        if epoch is not None:
            self.position, self.totals = epoch["position"], dict(epoch["totals"])


def validation_split(y: torch.Tensor, fraction: float,
                     seed: int = VALIDATION_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified split of the training rows ``[0, len(y))`` into ``(fit, validation)`` index
    tensors (sorted): for each class, a permutation drawn from a generator seeded by ``seed``
    (fixed, independent of the network's seed), and its first ``round(fraction * count)`` rows go
    to validation. Only ``y`` (the training labels) is read."""
    gen = torch.Generator().manual_seed(seed)
    val = []
    for label in torch.unique(y):
        rows = (y == label).nonzero().squeeze(1)
        val.append(rows[torch.randperm(len(rows), generator=gen)[:round(fraction * len(rows))]])
    is_val = torch.zeros(len(y), dtype=torch.bool)
    is_val[torch.cat(val)] = True
    if not is_val.any() or is_val.all():
        raise ValueError(f"validation_fraction {fraction} of {len(y)} training samples leaves "
                         f"{int(is_val.sum())} for validation and {int((~is_val).sum())} for training; both need >= 1")
    return (~is_val).nonzero().squeeze(1), is_val.nonzero().squeeze(1)


@dataclass
class Fit:
    """What :func:`fit` returns: the trained ``net``, the ``history`` of the chosen run (one
    entry per epoch, with ``validation_accuracy`` when there is a validation split), the
    ``restarts`` (``seed`` and best ``validation_accuracy`` over the probe, for each), the chosen
    ``seed``, the kept ``best_epoch`` and its ``validation_accuracy`` (None without validation)."""

    net: NeuroGraph
    history: list[dict[str, Any]]
    restarts: list[dict[str, Any]]
    seed: int
    best_epoch: int
    validation_accuracy: float | None


class Fitting:
    """:func:`fit` under way, in a state that can be saved and taken back: the ``restarts``
    :class:`Training` runs, the validation split, each run's best-validation snapshot
    (``best[r]``: ``(validation_accuracy, epoch, state_dict)`` or None) and history, and the
    restart ``chosen`` once the probe is over (None while probing).

    :meth:`epoch` trains the next epoch of :func:`fit`'s schedule (every restart's probe in turn,
    then the chosen one on to ``epochs``), or only up to a batch where ``stop()`` says so;
    :meth:`state_dict` / :meth:`load_state_dict` save and restore all of it, so a run stopped
    after any batch and taken back goes on to the uninterrupted run's result, bit for bit.
    ``step`` counts the batches trained (one optimizer step each), all restarts together, out
    of ``steps``; :meth:`result` is :func:`fit`'s return value, or the same for the run so far.
    """

    def __init__(self, config: NeuroGraphConfig, x: torch.Tensor, y: torch.Tensor,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        check_labels(y, config.n_output)
        if len(x) != len(y):
            raise ValueError(f"features and labels must have the same number of rows, got {len(x)} and {len(y)}")
        if config.validation_fraction > 0:
            fit_rows, val_rows = validation_split(y, config.validation_fraction)
            x_fit, y_fit = x[fit_rows].to(device), y[fit_rows].to(device)
            self.x_val, self.y_val = x[val_rows].to(device), y[val_rows].to(device)
        else:
            x_fit, y_fit, self.x_val, self.y_val = x.to(device), y.to(device), None, None
        self.config, self.dtype, self.device = config, dtype, device
        self.seeds = [config.seed * config.restarts + r for r in range(config.restarts)]
        self.runs = [Training(NeuroGraph(replace(config, seed=s), x.shape[1], dtype=dtype).to(device), x_fit, y_fit)
                     for s in self.seeds]
        self.histories: list[list[dict[str, Any]]] = [[] for _ in self.runs]
        self.best: list[tuple[float, int, dict[str, torch.Tensor]] | None] = [None] * len(self.runs)
        self.probe = (config.probe_epochs or config.epochs) if config.restarts > 1 else 0
        self.chosen: int | None = 0 if self.probe == 0 else None
        batches = math.ceil(len(x_fit) / config.batch_size)
        self.steps = batches * (len(self.runs) * self.probe + config.epochs - self.probe)

    @property
    def step(self) -> int:
        return sum(run.done for run in self.runs)

    @property
    def finished(self) -> bool:
        return self.chosen is not None and self.runs[self.chosen].epochs_done == self.config.epochs

    def epoch(self, on_epoch: Callable[[dict[str, Any], NeuroGraph], None] | None = None,
              stop: Callable[[], bool] | None = None) -> dict[str, Any] | None:
        """The next epoch of the schedule, or the rest of the one ``stop`` cut short
        (:meth:`Training.epoch`), its validation accuracy and snapshot, then ``on_epoch(entry,
        net)``; returns the entry, or None where ``stop`` cut this epoch short."""
        r = self.chosen if self.chosen is not None else next(
            i for i, run in enumerate(self.runs) if run.epochs_done < self.probe)
        net = self.runs[r].net
        stats = self.runs[r].epoch(stop)
        if stats is None:
            return None
        entry = {**stats, "restart": r, "seed": self.seeds[r]}
        if self.x_val is not None:
            entry["validation_accuracy"] = accuracy(net, self.x_val, self.y_val)
            if self.best[r] is None or entry["validation_accuracy"] >= self.best[r][0]:
                self.best[r] = (entry["validation_accuracy"], entry["epoch"], copy.deepcopy(net.state_dict()))
        self.histories[r].append(entry)
        if on_epoch is not None:
            on_epoch(entry, net)
        if self.chosen is None and self.runs[-1].epochs_done == self.probe:
            self.chosen = max(range(len(self.runs)), key=lambda i: (self.best[i][0], -i))
        return entry

    def result(self) -> Fit:
        """What :func:`fit` returns; before the end, the same for the run so far: the chosen
        restart (while probing, the best of those validated so far; restart 0 before any) at its
        best epoch so far (without a validation split: the network as it stands)."""
        scored = [r for r, best in enumerate(self.best) if best is not None]
        r = self.chosen if self.chosen is not None else max(scored, key=lambda i: (self.best[i][0], -i), default=0)
        restarts = [{"seed": s, "validation_accuracy": b[0] if self.probe and b is not None else None}
                    for s, b in zip(self.seeds, self.best)]
        run, best = self.runs[r], self.best[r]
        if best is None:
            return Fit(run.net, self.histories[r], restarts, self.seeds[r], run.epochs_done, None)
        net = NeuroGraph(run.net.config, run.net.n_features, run.net.graph, dtype=self.dtype).to(self.device)
        net.load_state_dict(best[2])
        net.version = run.net.version + 1          # one that no cache of the run's network has seen
        return Fit(net, self.histories[r], restarts, self.seeds[r], best[1], best[0])

    def state_dict(self) -> dict[str, Any]:
        """Every run's :meth:`Training.state_dict`, the histories, the snapshots and ``chosen``
        (live tensors: save them before training on)."""
        return {"runs": [run.state_dict() for run in self.runs], "histories": self.histories, "best": self.best,
                "chosen": self.chosen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for run, saved in zip(self.runs, state["runs"], strict=True):
            run.load_state_dict(saved)
        self.histories, self.best, self.chosen = state["histories"], state["best"], state["chosen"]


def fit(config: NeuroGraphConfig, x: torch.Tensor, y: torch.Tensor,
        on_epoch: Callable[[dict[str, Any], NeuroGraph], None] | None = None,
        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Fit:
    """Train a network for ``(x, y)`` (features ``[S, F]``, labels ``[S]``: the training split
    only) with restarts and best-epoch selection on a validation split carved from it; the one
    training entry point (``validation_fraction = 0``, ``restarts = 1``: a plain run of
    ``epochs`` epochs on all of ``(x, y)``). ``dtype``: of the networks' carriers and signals.

    1. ``validation_fraction > 0``: :func:`validation_split` holds that fraction of ``(x, y)``
       back; the networks train on the rest.
    2. ``restarts`` networks, seeds ``seed * restarts + r`` (``r < restarts``; disjoint sets for
       different seeds, and ``restarts = 1`` is the network of ``seed``), each train
       ``probe_epochs`` epochs (0: all ``epochs``) of their ``epochs``-epoch schedule; the one
       with the highest validation accuracy at any of those epochs (the first on ties) goes on
       to ``epochs``.
    3. The chosen run's epoch with the highest validation accuracy (the latest on ties) is the
       one kept. Without validation (``validation_fraction = 0``, then ``restarts = 1``): the last.

    The networks and the data live on ``device``. ``on_epoch(entry, net)`` is called after
    every epoch of every run (``entry`` has ``restart`` and ``seed``); it may add keys to
    ``entry`` (the CLI adds the held-out accuracy for the plot), and nothing it adds is read here.
    The state lives in a :class:`Fitting` run here to its end; a caller that saves it on the way
    (:func:`neurolattice.neurograph.task.train`, with a checkpoint after every epoch) drives the
    :class:`Fitting` itself, one :meth:`~Fitting.epoch` at a time.
    """
    fitting = Fitting(config, x, y, dtype, device)
    while not fitting.finished:
        fitting.epoch(on_epoch)
    return fitting.result()
