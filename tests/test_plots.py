"""The PNGs `lattice show` and `neurograph show` write, read back as matplotlib figures: every
axis labelled, legends that name the curves, integer ticks where the quantity is a count, and
every title and label inside the saved image."""

import json

import matplotlib.figure
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg

from neurolattice.lattice import plots as lattice_plots
from neurolattice.neurograph import NeuroGraphConfig
from neurolattice.neurograph import plots as neurograph_plots
from neurolattice.train.plots import training_curves


@pytest.fixture
def saved(monkeypatch):
    """The figures saved during a test, by file name."""
    figures = {}
    save = matplotlib.figure.Figure.savefig

    def record(fig, path, *args, **kwargs):
        figures[path.name] = fig
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    return figures


def _texts(fig):
    axes = fig.get_axes()
    texts = [t for ax in axes for t in (ax.title, ax.xaxis.label, ax.yaxis.label)]
    texts += [t for ax in axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    return [t for t in texts + ([fig._suptitle] if fig._suptitle else []) if t.get_text()]


def _drawn(fig):
    """The renderer of ``fig`` drawn again (the plots close their figures after saving)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def _all_inside(fig):
    """Every title, axis label and legend entry drawn within the figure (none cut off)."""
    renderer, box = _drawn(fig), fig.bbox
    for text in _texts(fig):
        extent = text.get_window_extent(renderer)
        assert box.x0 - 1 <= extent.x0 and extent.x1 <= box.x1 + 1, text.get_text()
        assert box.y0 - 1 <= extent.y0 and extent.y1 <= box.y1 + 1, text.get_text()


def _integer_ticks(axis):
    ticks = [t for t in axis.get_ticklocs() if axis.axes.get_xlim()[0] <= t <= axis.axes.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    return ticks


def _metrics(path, losses, accuracies):
    rows = [{"step": 10 * (i + 1), "loss": loss} for i, loss in enumerate(losses)]
    for row, acc in zip(rows[1::2], accuracies):
        row["eval_accuracy"] = acc
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("losses, scale", [([2.45, 2.5, 2.38, 2.31], "linear"),
                                           ([2.4, 1.1, 0.3, 0.08, 0.05, 0.04], "log")])
def test_training_curves_legend_names_loss_and_metric(tmp_path, saved, losses, scale):
    metrics = _metrics(tmp_path / "metrics.jsonl", losses, [0.3, 0.6, 0.9])
    training_curves(metrics, tmp_path / "training_curves.png", "accuracy", "held-out accuracy",
                    loss_label="cross-entropy (nats per sample)", eval_limits=(0, 1))
    fig = saved["training_curves.png"]
    loss_ax, eval_ax = fig.get_axes()
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == ["train loss", "held-out accuracy"]
    assert loss_ax.get_yscale() == scale and "nats" in loss_ax.get_ylabel()
    assert eval_ax.get_ylabel() == "held-out accuracy" and eval_ax.get_ylim() == (0, 1)
    _drawn(fig)
    labels = [t.get_text() for t in loss_ax.get_yticklabels() if t.get_text()]
    assert len(labels) >= 2 and all("10^" not in t and "times" not in t for t in labels), labels
    _all_inside(fig)


def test_state_norms_one_map_per_layer_with_titles_inside(tmp_path, saved):
    trace = {"states": torch.rand(2, 5, 4, 3, 6)}
    lattice_plots.state_norms(trace, tmp_path)
    fig = saved["state_norms.png"]
    maps = [ax for ax in fig.get_axes() if ax.get_images()]
    assert [ax.get_title() for ax in maps] == ["z = 0 (input face)", "z = 1", "z = 2 (read by the head)"]
    assert all(ax.get_xlabel() == "x" and ax.get_ylabel() == "y" for ax in maps)
    assert maps[0].get_images()[0].get_array().shape == (4, 5)                 # y rows, x columns
    colorbar = next(ax for ax in fig.get_axes() if not ax.get_images())
    assert "state norm" in colorbar.get_ylabel()
    _all_inside(fig)


def _history(epochs):
    return [{"epoch": e, "train_accuracy": 0.3 + 0.1 * e, "validation_accuracy": 0.3, "test_accuracy": 0.3,
             "active_nodes": 900.0 - e} for e in range(1, epochs + 1)]


def test_neurograph_training_integer_epochs_and_legend_clear(tmp_path, saved):
    neurograph_plots.training_curves(_history(2), tmp_path)
    fig = saved["neurograph_training.png"]
    ax = fig.get_axes()[0]
    assert _integer_ticks(ax.xaxis) == [1, 2]
    assert len(ax.get_legend().get_texts()) == 4
    _all_inside(fig)


def test_neurograph_activity_steps_per_sample_and_spread(tmp_path, saved):
    config = NeuroGraphConfig(n=300, n_input=20, T_max=40)
    steps = torch.tensor([1] * 30 + [3] * 10)
    activity = torch.zeros(config.T_max, len(steps), dtype=torch.long)
    activity[0] = torch.arange(200, 240)
    activity[1:3, 30:] = 250
    neurograph_plots.activity_per_step({"steps": steps, "activity": activity}, config, tmp_path)
    fig = saved["neurograph_activity.png"]
    counts, spread = fig.get_axes()
    assert [p.get_height() for p in counts.patches] == [30, 0, 10, 0]      # 1 .. one past the most steps run
    assert _integer_ticks(counts.xaxis) == [1, 2, 3, 4]
    assert _integer_ticks(spread.xaxis) == [1, 2, 3]
    assert counts.get_ylabel() == "held-out samples" and "of 300" in spread.get_ylabel()
    medians = [line.get_ydata()[0] for line in spread.get_lines() if line.get_color() == "C1"]
    assert medians == [219.5, 250, 250]                                    # steps 2, 3: the 10 still running
    _all_inside(fig)


def test_neurograph_activity_single_step_has_its_integer_tick(tmp_path, saved):
    config = NeuroGraphConfig(n=300, n_input=20, T_max=40)
    steps = torch.ones(8, dtype=torch.long)
    activity = torch.zeros(config.T_max, 8, dtype=torch.long)
    activity[0] = 230
    neurograph_plots.activity_per_step({"steps": steps, "activity": activity}, config, tmp_path)
    counts, spread = saved["neurograph_activity.png"].get_axes()
    assert _integer_ticks(counts.xaxis) == [1, 2]
    assert _integer_ticks(spread.xaxis) == [1]
