"""PNG plots of a NeuroGraph run (``neurolattice neurograph show``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_curves(history: list[dict[str, Any]], out: Path) -> Path:
    """Train, validation and held-out accuracy per epoch of the chosen run, and the mean active
    nodes per sample (summed over its timesteps) on a second axis."""
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train accuracy")
    for key, style, label in (("validation_accuracy", "d-", "validation accuracy"),
                              ("test_accuracy", "s-", "held-out accuracy")):
        if all(key in h for h in history):
            ax.plot(epochs, [h[key] for h in history], style, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    right = ax.twinx()
    right.plot(epochs, [h["active_nodes"] for h in history], "^--", color="tab:gray", label="active nodes")
    right.set_ylabel("active nodes per sample (summed over steps)")
    lines = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], loc="lower right")
    ax.set_title("NeuroGraph training")
    return _save(fig, out / "neurograph_training.png")


def activity_per_step(result: dict[str, Any], out: Path) -> Path:
    """Mean active nodes after each timestep over the held-out samples (0 once a sample stopped)."""
    activity = result["activity"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(range(1, len(activity) + 1), activity)
    ax.set_xlabel("timestep t")
    ax.set_ylabel("mean active nodes")
    ax.set_title(f"activity per timestep (held-out; mean {result['steps']:.2f} steps)")
    return _save(fig, out / "neurograph_activity.png")
