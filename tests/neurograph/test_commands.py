"""`neurolattice neurograph train | eval | show` and bad input: each a one-line error."""

import json

import numpy as np
import pytest
import torch

from neurolattice import cli
from neurolattice.neurograph import NeuroGraphConfig
from neurolattice.neurograph.task import load_run

from ..errors import cli_error, one_line_error
from ..npz import write_npz
from .conftest import features, make_net, small_config

SMALL = ["neurograph.n=230", "neurograph.n_input=20", "neurograph.epochs=1", "neurograph.t_min=1",
         "neurograph.restarts=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "ng"
    path = out.parent / "figures.json"
    assert cli.main(["neurograph", "train", "--out", str(out), "--json", str(path), *SMALL]) == 0
    return out, json.loads(path.read_text())


def test_train_writes_figures_and_checkpoint(trained):
    out, figures = trained
    assert {"accuracy", "ci95", "untrained_accuracy", "logistic_regression"} <= set(figures)
    lo, hi = figures["ci95"]
    assert 0 <= lo <= figures["accuracy"] <= hi <= 1
    assert figures["logistic_regression"] > 0.9
    assert (out / "latest").exists() and (out / "history.json").exists()


def test_choices_never_read_the_held_out_split(tmp_path, monkeypatch):
    """Two runs whose held-out features and labels differ (the second's are scrambled): the
    chosen restart, the validation accuracies, the kept epoch and the saved network are the same;
    only the held-out figures differ."""
    from neurolattice.neurograph import task

    gen = np.random.default_rng(0)
    y = np.arange(160) % 3
    x = gen.normal(size=(3, 4))[y] * 2 + gen.normal(size=(160, 4)) * 0.5
    data_path = write_npz(tmp_path / "blobs.npz", x=x, y=y)
    load = task.load_data
    args = ["neurograph.n=60", "neurograph.n_input=12", "neurograph.n_output=3", "neurograph.D=2",
            "neurograph.epochs=3", "neurograph.restarts=2", "neurograph.probe_epochs=1", "neurograph.batch_size=16"]
    runs = []
    for scramble in (False, True):
        def load_data(path, scramble=scramble):
            data = load(path)
            if scramble:
                data.x_test = torch.randn(data.x_test.shape, generator=torch.Generator().manual_seed(5))
                data.y_test = (data.y_test + 1) % 3
            return data

        monkeypatch.setattr(task, "load_data", load_data)
        out, path = tmp_path / f"run{int(scramble)}", tmp_path / f"run{int(scramble)}.json"
        assert cli.main(["neurograph", "train", "--data", data_path, "--out", str(out), "--json", str(path),
                         *args]) == 0
        runs.append((json.loads(path.read_text()), load_run(str(out), data_path).model))
    (first, net), (second, other) = runs
    for key in ("chosen_seed", "restarts", "best_epoch", "validation_accuracy"):
        assert first[key] == second[key], key
    assert first["accuracy"] != second["accuracy"]
    assert net.config.seed == first["chosen_seed"]
    for name, value in net.state_dict().items():
        assert torch.equal(value, other.state_dict()[name]), name


def test_eval_and_show(trained, tmp_path, capsys):
    out, figures = trained
    path = tmp_path / "eval.json"
    assert cli.main(["neurograph", "eval", str(out), "--json", str(path)]) == 0
    again = json.loads(path.read_text())
    assert again["accuracy"] == figures["accuracy"] and again["untrained_accuracy"] == figures["untrained_accuracy"]
    assert cli.main(["neurograph", "show", str(out), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "neurograph_training.png").stat().st_size > 0
    assert (tmp_path / "plots" / "neurograph_activity.png").stat().st_size > 0


def _cli_error(capsys, argv, *words):
    message = cli_error(capsys, argv)
    for word in words:
        assert word in message, message
    return message


def test_cli_errors(trained, tmp_path, capsys):
    out, _ = trained
    x = np.random.default_rng(0).random((80, 7))
    y = np.arange(80) % 12
    _cli_error(capsys, ["neurograph", "train", "--out", str(tmp_path / "a"), "neurograph.bogus=1"],
               "unknown NeuroGraphConfig key", "bogus")
    _cli_error(capsys, ["neurograph", "train", "--out", str(tmp_path / "a"),
                        "--data", write_npz(tmp_path / "l.npz", x=x, y=y)], "labels must be in [0, 9]", "11")
    bad = x.copy()
    bad[3, 2] = np.nan
    _cli_error(capsys, ["neurograph", "train", "--data", write_npz(tmp_path / "n.npz", x=bad, y=y % 10)], "NaN or inf")
    _cli_error(capsys, ["neurograph", "train", "--data", str(tmp_path / "missing.npz")], "does not exist")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    _cli_error(capsys, ["neurograph", "train", "--data", str(tmp_path / "junk.npz")], "cannot read")
    _cli_error(capsys, ["neurograph", "eval", str(out), "--data", write_npz(tmp_path / "w.npz", x=x, y=y % 10)],
               "expects 64 features", "has 7")
    _cli_error(capsys, ["neurograph", "eval", str(tmp_path / "nowhere")], "no checkpoint")
    _cli_error(capsys, ["neurograph", "train", "--out", str(out), *SMALL], "already holds a run")


def test_corrupt_checkpoint_and_other_config(trained, tmp_path, capsys):
    import shutil

    out, _ = trained
    with one_line_error("config field 'neurograph.n'"):
        load_run(str(out), expected=NeuroGraphConfig(n=231, n_input=20, epochs=1, t_min=1, restarts=1))
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    weights = next(copy.glob("step-*/model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    _cli_error(capsys, ["neurograph", "eval", str(copy)], "corrupt")


@pytest.mark.parametrize("bad, words", [
    (torch.zeros(2, 4, dtype=torch.float64), ["[*, 5]", "[2, 4]"]),
    (torch.zeros(5, dtype=torch.float64), ["[*, 5]", "[5]"]),
    (torch.zeros(0, 5, dtype=torch.float64), ["B >= 1", "[0, 5]"]),
    (torch.zeros(2, 5, dtype=torch.long), ["floating", "int64"]),
    (torch.tensor([[0.0, 1.0, float("inf"), 0.0, 0.0]], dtype=torch.float64), ["NaN or inf"]),
    ([[0.0] * 5], ["torch.Tensor"]),
])
def test_bad_features(bad, words):
    net = make_net(small_config())
    with one_line_error() as excinfo:
        net(bad)
    for word in words:
        assert word in str(excinfo.value)


def test_bad_labels_and_config():
    from neurolattice.neurograph.learn import fit

    for y, word in ((torch.tensor([0, 4, 1]), "labels must be in [0, 3]"), (torch.tensor([0.0, 1.0, 2.0]), "int64")):
        with pytest.raises(ValueError, match=word.replace("[", r"\[").replace("]", r"\]")):
            fit(small_config(), features(3), y)
    for kwargs, word in ((dict(n=100, n_input=95), "n must be >="), (dict(gamma=1.5), "gamma"),
                         (dict(k=-1), "k must be"), (dict(tau=float("nan")), "finite"), (dict(D=2.5), "integer")):
        with pytest.raises(ValueError, match=word):
            NeuroGraphConfig(**kwargs)
