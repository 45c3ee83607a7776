"""The training curve of a run, from the trainer's ``metrics.jsonl`` (PNG, matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter  # noqa: E402

LOSS_COLOR, EVAL_COLOR = "tab:blue", "tab:green"


def training_curves(metrics_file: str | Path, out: str | Path, eval_key: str, eval_label: str,
                    loss_label: str = "loss per target",
                    eval_limits: tuple[float, float] | None = None) -> Path | None:
    """Plot the logged training loss and the held-out ``eval_<eval_key>`` per evaluation on a
    second axis (``eval_limits``: its fixed range, e.g. (0, 1) for an accuracy) into ``out``,
    with a legend above naming both; None if there is no metrics file. The loss axis is
    logarithmic (ticks 1-2-5 in plain numbers) only when the loss spans more than a factor of
    10: within one decade a log axis looks like a linear one and has hardly any labelled ticks."""
    metrics_file, out = Path(metrics_file), Path(out)
    if not metrics_file.is_file():
        return None
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    logged = [r for r in records if "loss" in r]
    losses = [r["loss"] for r in logged]
    ax.plot([r["step"] for r in logged], losses, color=LOSS_COLOR, label="train loss")
    ax.set_xlabel("optimizer step")
    if losses and min(losses) > 0 and max(losses) > 10 * min(losses):
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))      # 0.1, 0.2, 0.5, 1, 2, ...
        ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        loss_label += ", log scale"
    ax.set_ylabel(loss_label, color=LOSS_COLOR)
    lines = ax.get_lines()
    evals = [(r["step"], r[f"eval_{eval_key}"]) for r in records if f"eval_{eval_key}" in r]
    if evals:
        twin = ax.twinx()
        lines += twin.plot(*zip(*evals), "o-", color=EVAL_COLOR, label=eval_label)
        twin.set_ylabel(eval_label, color=EVAL_COLOR)
        if eval_limits is not None:
            twin.set_ylim(*eval_limits)
    ax.legend(lines, [line.get_label() for line in lines], loc="lower center", bbox_to_anchor=(0.5, 1.0),
              ncol=len(lines), frameon=False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
