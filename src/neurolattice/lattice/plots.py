"""PNG plots of a trained lattice run (``neurolattice lattice show``)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from neurolattice.data import primary_metric  # noqa: E402
from neurolattice.train.plots import training_curves  # noqa: E402

from .experiment import Experiment, accuracy_by_steps  # noqa: E402
from .model import LatticeModel  # noqa: E402
from .tasks import held_out  # noqa: E402

TIERS = ("local", "functional", "distant")


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def gate_usage(trace: dict, out: Path) -> Path:
    """Mean gate weight of each tier's expert at every lattice step (held-out samples, all cells)."""
    usage = torch.stack([g.mean(dim=(0, 1, 2, 3)) for g in trace["gates"]]).cpu()      # (T, 3)
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    steps = range(1, len(usage) + 1)
    for k, name in enumerate(TIERS):
        ax.plot(steps, usage[:, k], "o-", label=name)
    ax.set_xticks(list(steps))
    ax.set_xlabel("lattice step t")
    ax.set_ylabel("mean gate weight")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("gate usage per tier (held-out samples, all cells)")
    return _save(fig, out / "gate_usage.png")


def state_norms(trace: dict, out: Path) -> Path:
    """``|x_i|`` of every cell after the last step, for the first held-out sample: one heat map
    of the (x, y) plane per layer z, on one colour scale."""
    norms = trace["states"][0].norm(dim=-1).cpu()                               # (X, Y, Z)
    Z = norms.shape[2]
    cols = min(Z, 4)
    rows = -(-Z // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 1, 3.2 * rows + 0.6), squeeze=False,
                             layout="constrained")
    low, high = float(norms.min()), float(norms.max())
    for z, ax in enumerate(axes.flat):
        if z >= Z:
            ax.set_axis_off()
            continue
        image = ax.imshow(norms[:, :, z].T.numpy(), origin="lower", cmap="viridis", vmin=low, vmax=high)
        roles = [role for role, layer in (("input face", 0), ("read by the head", Z - 1)) if layer == z]
        ax.set_title(f"z = {z}" + (f" ({', '.join(roles)})" if roles else ""), fontsize=10)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=axes, label=r"state norm $\|x_i\|$ (L2 over the cell's state vector)")
    fig.suptitle("state norm of each cell after the last step (first held-out sample)")
    return _save(fig, out / "state_norms.png")


def metric_by_steps(exp: Experiment, model: LatticeModel, baseline_value: float | None, out: Path) -> Path:
    """Held-out metric of the trained model run for ``T' = 0 .. 2T`` steps, and the ``T = 0``
    baseline (encoder and head trained alone)."""
    steps = list(range(0, 2 * exp.model.steps + 1))
    values = accuracy_by_steps(exp.data, model, steps, progress=True)
    metric = primary_metric(exp.data.task)
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    ax.plot(steps, values, "o-", label=f"model trained with T = {exp.model.steps}")
    if baseline_value is not None:
        ax.axhline(baseline_value, color="gray", ls="--", label="T = 0 model (encoder + head)")
    ax.axvline(exp.model.steps, color="tab:red", lw=0.8, label=f"T' = {exp.model.steps} (its training steps)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if metric == "accuracy":
        ax.set_ylim(0, 1)
    ax.set_xlabel("lattice steps T' at evaluation")
    ax.set_ylabel("held-out " + metric)
    ax.set_title(f"held-out {metric} vs lattice steps at evaluation")
    ax.legend(loc="best")
    return _save(fig, out / "metric_by_steps.png")


def show(exp: Experiment, model: LatticeModel, baseline: LatticeModel | None, run_dir: Path,
         out: Path) -> list[Path]:
    """Write every plot into ``out`` (the models on any one device); return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    trace: dict = {}
    with torch.no_grad():
        model(exp.data.x_test[:64].to(next(model.parameters()).device), trace=trace)
    baseline_value = None
    if baseline is not None:
        baseline_value = held_out(baseline, exp.data, progress="held-out T = 0")[primary_metric(exp.data.task)]
    key = primary_metric(exp.data.task)
    loss = "cross-entropy (nats per sample)" if exp.data.task == "classification" else "squared error per target"
    curves = training_curves(run_dir / "metrics.jsonl", out / "training_curves.png", key, f"held-out {key}",
                             loss_label=loss, eval_limits=(0, 1) if key == "accuracy" else None)
    paths = [curves, metric_by_steps(exp, model, baseline_value, out)]
    if exp.model.steps > 0:
        paths += [gate_usage(trace, out), state_norms(trace, out)]
    return [p for p in paths if p is not None]
