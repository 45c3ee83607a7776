"""PNG plots of a NeuroGraph run (``neurolattice neurograph show``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .config import NeuroGraphConfig  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_curves(history: list[dict[str, Any]], out: Path) -> Path:
    """Train, validation and held-out accuracy per epoch of the chosen run, and the mean active
    nodes per training sample (summed over its timesteps) on a second axis; the legend sits
    above the axes, clear of the curves."""
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6.5, 4.3), layout="constrained")
    ax.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train accuracy")
    for key, style, label in (("validation_accuracy", "d-", "validation accuracy"),
                              ("test_accuracy", "s-", "held-out accuracy")):
        if all(key in h for h in history):
            ax.plot(epochs, [h[key] for h in history], style, label=label)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    right = ax.twinx()
    right.plot(epochs, [h["active_nodes"] for h in history], "^--", color="tab:gray", label="active nodes")
    right.set_ylabel("active nodes per training sample\n(summed over its timesteps)", color="tab:gray")
    lines = ax.get_lines() + right.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="lower center", bbox_to_anchor=(0.5, 1.0),
              ncol=2, frameon=False)
    return _save(fig, out / "neurograph_training.png")


def activity_per_step(run: dict[str, torch.Tensor], config: NeuroGraphConfig, out: Path) -> Path:
    """Two panels over the held-out samples (``run``: :func:`~.task.held_out_run`): how many
    samples ran each number of timesteps (shown up to one past the most any sample ran), and,
    after each timestep, the spread of the active nodes over the samples still running then (box:
    quartiles, whiskers: 5th-95th percentile)."""
    steps, activity = run["steps"], run["activity"]
    last = int(steps.max())
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")

    shown = min(config.T_max, max(last, config.t_min) + 1)                     # one empty slot past the last
    counts = torch.bincount(steps, minlength=shown + 1)[1:shown + 1]
    bars = left.bar(range(1, shown + 1), counts.tolist(), width=0.6)
    left.bar_label(bars, labels=[str(c) if c else "" for c in counts.tolist()])
    left.set_xlim(0.5, shown + 0.5)
    left.margins(y=0.08)                                                       # room for the counts
    left.set_xlabel(f"timesteps run (at most T_max = {config.T_max}; t_min = {config.t_min})")
    left.set_ylabel("held-out samples")
    left.set_title(f"timesteps run per held-out sample\n(mean {float(steps.float().mean()):.2f})", fontsize=10)

    running = [activity[t, steps > t].tolist() for t in range(last)]          # active nodes at step t + 1
    right.boxplot(running, positions=range(1, last + 1), whis=(5, 95), showfliers=False, widths=0.5,
                  manage_ticks=False)
    right.set_xlim(0.5, last + 0.5)
    right.set_xlabel("timestep t")
    right.set_ylabel(f"active nodes after step t (of {config.n})")
    right.set_title("active nodes of the samples still running\n"
                    "(box: quartiles, median; whiskers: 5th-95th percentile)", fontsize=10)
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    return _save(fig, out / "neurograph_activity.png")
