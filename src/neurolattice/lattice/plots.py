"""PNG plots of a trained lattice run (``neurolattice lattice show``)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from neurolattice.data import primary_metric  # noqa: E402
from neurolattice.train.plots import training_curves  # noqa: E402

from .experiment import Experiment, accuracy_by_steps  # noqa: E402
from .model import LatticeModel  # noqa: E402
from .tasks import held_out  # noqa: E402

TIERS = ("local", "functional", "distant")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def gate_usage(trace: dict, out: Path) -> Path:
    """Mean gate weight of each tier's expert at every lattice step (held-out samples, all cells)."""
    usage = torch.stack([g.mean(dim=(0, 1, 2, 3)) for g in trace["gates"]])      # (T, 3)
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = range(1, len(usage) + 1)
    for k, name in enumerate(TIERS):
        ax.plot(steps, usage[:, k], "o-", label=name)
    ax.set_xticks(list(steps))
    ax.set_xlabel("lattice step t")
    ax.set_ylabel("mean gate weight")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("gate usage per tier")
    return _save(fig, out / "gate_usage.png")


def state_norms(trace: dict, out: Path) -> Path:
    """3D scatter of ``|x_i|`` after the last step, for the first held-out sample."""
    norms = trace["states"][0].norm(dim=-1)                                     # (X, Y, Z)
    X, Y, Z = norms.shape
    grid = torch.stack(torch.meshgrid(torch.arange(X), torch.arange(Y), torch.arange(Z), indexing="ij"), -1)
    fig = plt.figure(figsize=(6, 5))
    ax = fig.add_subplot(projection="3d")
    pts = ax.scatter(*grid.reshape(-1, 3).T.numpy(), c=norms.flatten().numpy(), cmap="viridis", s=40)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_zlabel("z")
    ax.set_zticks(range(Z))
    fig.colorbar(pts, label="state norm")
    ax.set_title("state norms after the last step (one sample; input face z = 0)")
    return _save(fig, out / "state_norms.png")


def metric_by_steps(exp: Experiment, model: LatticeModel, baseline_value: float | None, out: Path) -> Path:
    """Held-out metric of the trained model run for ``T' = 0 .. 2T`` steps, and the ``T = 0``
    baseline (encoder and head trained alone)."""
    steps = list(range(0, 2 * exp.model.steps + 1))
    values = accuracy_by_steps(exp.data, model, steps)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, values, "o-", label=f"trained with T = {exp.model.steps}")
    if baseline_value is not None:
        ax.axhline(baseline_value, color="gray", ls="--", label="T = 0 model (encoder + head)")
    ax.axvline(exp.model.steps, color="tab:red", lw=0.8)
    ax.set_xlabel("lattice steps T at evaluation")
    ax.set_ylabel("held-out " + primary_metric(exp.data.task))
    ax.legend()
    return _save(fig, out / "metric_by_steps.png")


def show(exp: Experiment, model: LatticeModel, baseline: LatticeModel | None, run_dir: Path,
         out: Path) -> list[Path]:
    """Write every plot into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    trace: dict = {}
    with torch.no_grad():
        model(exp.data.x_test[:64], trace=trace)
    baseline_value = None
    if baseline is not None:
        baseline_value = held_out(baseline, exp.data)[primary_metric(exp.data.task)]
    key = primary_metric(exp.data.task)
    curves = training_curves(run_dir / "metrics.jsonl", out / "training_curves.png", key, f"held-out {key}")
    paths = [curves, metric_by_steps(exp, model, baseline_value, out)]
    if exp.model.steps > 0:
        paths += [gate_usage(trace, out), state_norms(trace, out)]
    return [p for p in paths if p is not None]
