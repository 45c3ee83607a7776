"""LatticeModel, its training through the shared trainer, and the CLI."""

import json

import numpy as np
import pytest
import torch

from neurolattice.cli import main
from neurolattice.data import load_npz
from neurolattice.lattice import LatticeConfig
from neurolattice.lattice.model import LatticeModel, LatticeModelConfig
from neurolattice.lattice.tasks import LatticeTask
from neurolattice.train import (
    TrainConfig,
    Trainer,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    seed_everything,
)

from ..errors import cli_error, one_line_error
from ..npz import write_npz

TINY = LatticeConfig(dims=(4, 3, 2), state_size=4, hidden_local=3, hidden_functional=3, hidden_distant=3,
                     hidden_gate=3, r_local=1.0, r_functional=1.5, r_distant=2.0)


def tiny_model(input_shape=(4, 3, 2), steps=2, seed=0, **kwargs) -> LatticeModel:
    torch.manual_seed(seed)
    return LatticeModel(LatticeModelConfig(lattice=TINY, input_shape=input_shape, num_outputs=3,
                                           steps=steps, **kwargs)).double()


def test_image_and_vector_inputs():
    x = torch.randn(5, 4, 3, 2, dtype=torch.float64)
    assert tiny_model()(x).shape == (5, 3)
    assert tiny_model(input_shape=(7,))(torch.randn(5, 7, dtype=torch.float64)).shape == (5, 3)


def test_steps_zero_is_encoder_and_head():
    model = tiny_model()
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64)
    expected = model.head(model.encode(x).flatten(1))
    assert torch.equal(model(x, steps=0), expected)


def test_redrive_changes_the_dynamics():
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64)
    a, b = tiny_model(redrive=True), tiny_model(redrive=False)
    assert torch.equal(a(x, steps=1), b(x, steps=1))        # identical until the second step
    assert not torch.allclose(a(x), b(x))


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model()
    x = torch.randn(3, 4, 3, 2, dtype=torch.float64)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model(x, grad_checkpointing=ckpt).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-12


def test_bad_inputs():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"\[B, 4, 3, 2\]"):
        model(torch.zeros(2, 4, 3, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN or inf"):
        model(torch.full((1, 4, 3, 2), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="lattice dims"):
        LatticeModelConfig(lattice=TINY, input_shape=(8, 8, 1))


def _task(n=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 3, 2, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)

    class Data:
        task, x_train, y_train, x_test, y_test = "classification", x, y, x[:8], y[:8]

    return LatticeTask(Data())


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_one_batch_equals_accumulated_micro_batches():
    results = []
    for micro in (16, 4):
        model = tiny_model()
        trainer = Trainer(model, _task(), TrainConfig(steps=1, batch_size=16, micro_batch_size=micro,
                                                      warmup_steps=0))
        trainer.train_step()
        results.append(_params(model))
    assert (results[0] - results[1]).abs().max() <= 1e-6
    assert (results[0] - _params(tiny_model())).abs().max() > 1e-4     # the step did move the weights


def test_stop_and_resume_equals_uninterrupted(tmp_path):
    cfg = TrainConfig(steps=6, batch_size=8, micro_batch_size=4, warmup_steps=2, log_every=1)
    straight = tiny_model()
    Trainer(straight, _task(), cfg).fit(progress=False)
    first = tiny_model()
    Trainer(first, _task(), cfg, out_dir=tmp_path).fit(until=3, progress=False)
    resumed = tiny_model(seed=123)                        # different init: everything must come back
    trainer = Trainer(resumed, _task(), cfg, out_dir=tmp_path)
    assert trainer.resume() == 3
    trainer.fit(progress=False)
    assert (_params(straight) - _params(resumed)).abs().max() <= 1e-6


def test_checkpoint_for_another_config_names_the_tensor(tmp_path):
    save_checkpoint(tmp_path, 1, tiny_model(), {"model": {}})
    other = LatticeModel(LatticeModelConfig(
        lattice=LatticeConfig(dims=(4, 3, 2), state_size=5), input_shape=(4, 3, 2), num_outputs=3))
    with one_line_error(r"tensor '[\w.]+' has shape \[.*\] in checkpoint .* but \["):
        load_checkpoint(tmp_path, other)


TINY_RUN = ["lattice.dims=[4, 3, 2]", "lattice.state_size=4", "model.steps=2", "train.steps=4",
            "train.batch_size=8", "train.eval_every=2", "train.warmup_steps=1"]


def _train_and_eval(tmp_path, data: str) -> tuple[dict, dict]:
    """``lattice train`` of a tiny model on ``data`` into ``tmp_path/run``, then ``lattice eval``
    of the run: the figures each wrote."""
    out = tmp_path / "run"
    seed_everything(0)
    assert main(["lattice", "train", "--data", data, "--out", str(out), "--json", str(tmp_path / "t.json"),
                 *TINY_RUN]) == 0
    assert main(["lattice", "eval", str(out), "--json", str(tmp_path / "e.json")]) == 0
    return json.loads((tmp_path / "t.json").read_text()), json.loads((tmp_path / "e.json").read_text())


def test_cli_train_eval_show(tmp_path, capsys):
    rng = np.random.default_rng(0)
    y = np.arange(48) % 3
    x = rng.normal(size=(48, 4, 3)) + y[:, None, None]
    trained, evaluated = _train_and_eval(tmp_path, write_npz(tmp_path / "d.npz", x=x, y=y))
    out = tmp_path / "run"
    assert set(trained) >= {"accuracy", "ci95", "accuracy_T0", "baselines"}
    assert set(trained["baselines"]) == {"logistic_regression", "mlp"}
    assert evaluated["accuracy"] == trained["accuracy"] and evaluated["accuracy_T0"] == trained["accuracy_T0"]
    assert main(["lattice", "show", str(out)]) == 0
    for name in ("training_curves", "gate_usage", "state_norms", "metric_by_steps"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000
    assert "95% CI" in capsys.readouterr().out


def test_cli_max_minutes_stops_with_a_checkpoint_and_resume_finishes_the_run(tmp_path, capsys):
    """``--max-minutes 0`` stops the model and its T = 0 baseline at their first logging step;
    ``--resume`` ends both where an uninterrupted run ends (the same held-out figures)."""
    rng = np.random.default_rng(0)
    y = np.arange(48) % 3
    data = write_npz(tmp_path / "d.npz", x=rng.normal(size=(48, 4, 3)) + y[:, None, None], y=y)
    run = [*TINY_RUN, "train.log_every=1"]

    def train(out, *flags):
        seed_everything(0)
        assert main(["lattice", "train", "--data", data, "--out", str(tmp_path / out),
                     "--json", str(tmp_path / f"{out}.json"), *flags, *run]) == 0
        return json.loads((tmp_path / f"{out}.json").read_text())

    train("stopped", "--max-minutes", "0")
    assert "stopped at step 1 of 4: --max-minutes 0.0 ran out" in capsys.readouterr().out
    assert resolve_checkpoint(tmp_path / "stopped").name == "step-00000001"
    assert resolve_checkpoint(tmp_path / "stopped" / "T0").name == "step-00000001"
    assert "already holds a run" in cli_error(capsys, ["lattice", "train", "--data", data,
                                                      "--out", str(tmp_path / "stopped"), *run])
    assert "holds no run to continue" in cli_error(capsys, ["lattice", "train", "--data", data,
                                                           "--out", str(tmp_path / "empty"), "--resume", *run])
    resumed, straight = train("stopped", "--resume"), train("straight")
    assert "stopped at step" not in capsys.readouterr().out
    assert resolve_checkpoint(tmp_path / "stopped").name == "step-00000004"
    assert {k: resumed[k] for k in ("accuracy", "accuracy_T0")} == {k: straight[k] for k in ("accuracy", "accuracy_T0")}


def test_cli_regression(tmp_path, capsys):
    """Float targets ``y [n]``: the model reports ``mse`` and ``r2``, the baselines are regressors
    scored by the same R^2 (recomputed here with scikit-learn's own)."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5))
    y = x @ rng.normal(size=5) + 0.1 * rng.normal(size=64)
    path = write_npz(tmp_path / "reg.npz", x=x, y=y)
    trained, evaluated = _train_and_eval(tmp_path, path)
    assert set(trained) >= {"mse", "r2", "r2_T0", "baselines"} and "accuracy" not in trained
    assert evaluated == trained
    assert set(trained["baselines"]) == {"ridge", "mlp"} and trained["baselines"]["mlp"] > 0.5
    data = load_npz(path)
    ridge = make_pipeline(StandardScaler(), Ridge()).fit(data.x_train.numpy(), data.y_train.numpy()[:, 0])
    expected = r2_score(data.y_test.numpy()[:, 0], ridge.predict(data.x_test.numpy()))
    assert abs(trained["baselines"]["ridge"] - expected) <= 1e-5
    assert "warning" not in capsys.readouterr().err


def test_cli_unscaled_features(tmp_path, capsys):
    """scikit-learn's wine, raw (features up to 1680): the baselines standardise theirs (the MLP
    on the raw features was below chance) and ``train`` warns, in one line, that the lattice
    model's are not."""
    from sklearn.datasets import load_wine

    wine = load_wine()
    trained, evaluated = _train_and_eval(tmp_path, write_npz(tmp_path / "wine.npz", x=wine.data, y=wine.target))
    assert set(trained["baselines"]) == {"logistic_regression", "mlp"}
    assert min(trained["baselines"].values()) > 0.9
    assert evaluated["accuracy"] == trained["accuracy"] and 0 <= trained["accuracy"] <= 1
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "wine are not standardised" in warnings[0] and "docs/lattice.md" in warnings[0]


def test_cli_rejects_unknown_keys(tmp_path, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["lattice", "train", "--out", str(tmp_path / "r"), "lattice.r_lcoal=2"])
    assert excinfo.value.code == 2
    assert "r_lcoal" in capsys.readouterr().err
