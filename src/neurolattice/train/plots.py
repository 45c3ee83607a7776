"""The training curve of a run, from the trainer's ``metrics.jsonl`` (PNG, matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def training_curves(metrics_file: str | Path, out: str | Path, eval_key: str, eval_label: str,
                    loss_label: str = "loss per target") -> Path | None:
    """Plot the logged training loss (log scale) and the held-out ``eval_<eval_key>`` per
    evaluation on a second axis into ``out``; None if there is no metrics file."""
    metrics_file, out = Path(metrics_file), Path(out)
    if not metrics_file.is_file():
        return None
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 4))
    logged = [r for r in records if "loss" in r]
    ax.plot([r["step"] for r in logged], [r["loss"] for r in logged], label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(loss_label)
    ax.set_yscale("log")
    evals = [(r["step"], r[f"eval_{eval_key}"]) for r in records if f"eval_{eval_key}" in r]
    if evals:
        twin = ax.twinx()
        twin.plot(*zip(*evals), "o-", color="tab:green")
        twin.set_ylabel(eval_label)
    ax.set_title("training")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
