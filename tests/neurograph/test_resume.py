"""`neurolattice neurograph train` stopped (--max-minutes, Ctrl-C, a kill) and resumed ends with
the files and figures of the uninterrupted run; a run folder has one writer; every refusal is one line.

The run: blobs of 3 classes (120 training samples, 18 of them for validation), 2 restarts with a
1-epoch probe, 3 epochs, 7 batches an epoch: batches 1-7 are restart 0's probe, 8-14 restart
1's, 15-28 the chosen restart's last two epochs.
"""

import json
import os
import signal

import numpy as np
import pytest

from neurolattice import cli
from neurolattice.io import FolderLock
from neurolattice.neurograph import learn

from ..errors import cli_error
from ..npz import write_npz

CONFIG = ["neurograph.n=60", "neurograph.n_input=12", "neurograph.n_output=3", "neurograph.D=2",
          "neurograph.epochs=3", "neurograph.restarts=2", "neurograph.probe_epochs=1", "neurograph.batch_size=16"]
STEPS = 28


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    gen = np.random.default_rng(0)
    y = np.arange(160) % 3
    x = gen.normal(size=(3, 4))[y] * 2 + gen.normal(size=(160, 4)) * 0.5
    return write_npz(tmp_path_factory.mktemp("data") / "blobs.npz", x=x, y=y)


def train(blobs, out, *extra):
    """``neurograph train`` of the run into ``out``; returns the exit status."""
    return cli.main(["neurograph", "train", "--data", blobs, "--out", str(out), "--json", f"{out}.json",
                     *CONFIG, *extra])


def outcome(out):
    """What a finished run leaves: its one checkpoint's name, weights and run config, the
    history, and the figures but for the seconds they took."""
    steps = sorted(p.name for p in out.glob("step-*"))
    figures = json.loads(out.with_suffix(".json").read_text())
    assert figures.pop("train_seconds") > 0
    ckpt = out / (out / "latest").read_text()
    return (steps, (ckpt / "model.safetensors").read_bytes(), (ckpt / "run_config.json").read_text(),
            (out / "history.json").read_text(), figures)


@pytest.fixture(scope="module")
def uninterrupted(blobs, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    assert train(blobs, out) == 0
    done = outcome(out)
    assert done[0] == [f"step-{STEPS:08d}"] and "unfinished" not in done[2]
    return done


def batches(monkeypatch, at=0, action=None):
    """Count the ``learn.train_step`` calls from here on (the batches trained) and run ``action()``
    as call number ``at`` begins; returns a function that reads the count."""
    calls = 0
    step = learn.train_step

    def train_step(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == at:
            action()
        return step(*args, **kwargs)

    monkeypatch.setattr(learn, "train_step", train_step)
    return lambda: calls


def test_a_time_budget_stops_after_an_epoch_and_resume_ends_as_the_uninterrupted_run(
        blobs, uninterrupted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert train(blobs, out, "--max-minutes", "0") == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"stopped at step 7 of {STEPS}: --max-minutes 0.0 ran out; saved {out}/step-00000007; "
        f"run the same command with --resume to continue")
    assert not out.with_suffix(".json").exists()
    assert cli.main(["neurograph", "eval", str(out)]) == 0           # the network kept so far, said so
    assert capsys.readouterr().out.splitlines()[0] == (
        f"{out} is unfinished (step 7 of {STEPS}): this is the network kept so far; "
        f"the same train command with --resume finishes it")
    trained = batches(monkeypatch)
    assert train(blobs, out, "--resume", "--max-minutes", "0") == 0  # restart 1's probe: the choice is made
    assert trained() == 7 and "stopped at step 14 of 28" in capsys.readouterr().out
    assert train(blobs, out, "--resume") == 0
    assert trained() == STEPS - 7
    assert outcome(out) == uninterrupted
    assert train(blobs, out, "--resume") == 0                      # a finished run: its figures again
    assert trained() == STEPS - 7 and outcome(out) == uninterrupted


def test_ctrl_c_finishes_the_batch_saves_and_resume_ends_as_the_uninterrupted_run(
        blobs, uninterrupted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    batches(monkeypatch, 10, lambda: os.kill(os.getpid(), signal.SIGINT))  # restart 1's third batch
    capsys.readouterr()
    assert train(blobs, out) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"neurolattice neurograph train: error: interrupted at step 10 of {STEPS}: saved {out}/step-00000010; "
        f"run the same command with --resume to continue")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.undo()
    trained = batches(monkeypatch)
    assert train(blobs, out, "--resume") == 0
    assert trained() == STEPS - 10                                      # from batch 11, mid-epoch
    assert capsys.readouterr().out.splitlines()[1].startswith("restart 1 (seed 1) epoch 1: ")
    assert outcome(out) == uninterrupted


def test_a_run_killed_mid_epoch_resumes_from_its_last_epoch_to_the_uninterrupted_run(
        blobs, uninterrupted, tmp_path, monkeypatch):
    """The process dies in batch 20 (mid-epoch 2 of the chosen restart) without saving on the way
    out: the checkpoint of batch 14 is the one left, and the resumed run redoes batches 15-19."""
    def die():
        raise SystemExit(9)

    out = tmp_path / "run"
    batches(monkeypatch, 20, die)
    with pytest.raises(SystemExit):
        train(blobs, out)
    assert (out / "latest").read_text() == "step-00000014"
    monkeypatch.undo()
    trained = batches(monkeypatch)
    assert train(blobs, out, "--resume") == 0
    assert trained() == STEPS - 14
    assert outcome(out) == uninterrupted


def test_refusals_are_one_line(blobs, tmp_path, capsys):
    out = tmp_path / "run"
    assert "holds no run to continue" in cli_error(capsys, ["neurograph", "train", "--out", str(out), "--resume"])
    assert train(blobs, out, "--max-minutes", "0") == 0
    assert "already holds a run: pass --resume, or choose another --out" in cli_error(
        capsys, ["neurograph", "train", "--data", blobs, "--out", str(out), *CONFIG])
    message = cli_error(capsys, ["neurograph", "train", "--data", blobs, "--out", str(out), "--resume", *CONFIG,
                                 "neurograph.epochs=4"])
    assert message.startswith("config field 'neurograph.epochs' is 3 in checkpoint") and message.endswith(
        "but 4 in this run")
    with FolderLock(out):                                       # another process writes the run
        assert train(blobs, out, "--resume") == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"neurolattice neurograph train: error: {out} is in use: process {os.getpid()}"), line
    assert (out / "latest").read_text() == "step-00000007"     # untouched by the refused runs
