"""A lattice run against what goes wrong around it: a second process on its folder, Ctrl-C,
outputs that cannot be written, a damaged or foreign saved config. Each is one line; none is
accepted silently (the checkpoint files themselves: tests/train/test_checkpoint.py)."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from neurolattice.cli import main
from neurolattice.io import FolderLock
from neurolattice.lattice.tasks import LatticeTask
from neurolattice.train import resolve_checkpoint, seed_everything

from ..errors import cli_error, run_error
from ..npz import write_npz
from .test_model import TINY_RUN


@pytest.fixture
def data(tmp_path) -> str:
    rng = np.random.default_rng(0)
    y = np.arange(48) % 3
    return write_npz(tmp_path / "d.npz", x=rng.normal(size=(48, 4, 3)) + y[:, None, None], y=y)


def train(data: str, out, *flags: str) -> list[str]:
    return ["lattice", "train", "--data", data, "--out", str(out), *flags, *TINY_RUN]


def test_a_second_writer_is_refused_in_one_line_and_changes_nothing(tmp_path, data, capsys):
    out = tmp_path / "run"
    with FolderLock(out):  # another process's lock: flock holds per open file, in one process too
        message = run_error(capsys, train(data, out))
    assert message == f"{out} is in use: process {os.getpid()} is writing a run there (wait for it to end, " \
                      "or choose another --out)"
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    assert main(train(data, out)) == 0  # the lock went with its holder


def test_ctrl_c_saves_says_how_to_resume_and_resume_ends_as_an_uninterrupted_run(tmp_path, data, capsys,
                                                                                 monkeypatch):
    seed_everything(0)
    assert main(train(data, tmp_path / "straight", "--json", str(tmp_path / "straight.json"))) == 0
    real, calls = LatticeTask.loss_sum, []

    def loss_sum(self, model, batch, grad_checkpointing=False):
        calls.append(1)
        if len(calls) == 2:  # step 2 of the model (T = 2): it finishes, then the trainer saves
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, model, batch, grad_checkpointing)

    monkeypatch.setattr(LatticeTask, "loss_sum", loss_sum)
    run = tmp_path / "run"
    seed_everything(0)
    message = run_error(capsys, train(data, run), status=130)
    assert message == (f"interrupted at step 2 of 4: saved {run / 'step-00000002'}; run the same command with "
                       "--resume to continue")
    assert resolve_checkpoint(run).name == "step-00000002"
    monkeypatch.setattr(LatticeTask, "loss_sum", real)
    seed_everything(0)
    assert main(train(data, run, "--resume", "--json", str(tmp_path / "run.json"))) == 0
    resumed, straight = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("run", "straight"))
    assert {k: resumed[k] for k in ("accuracy", "accuracy_T0")} == {k: straight[k] for k in ("accuracy", "accuracy_T0")}


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path, data, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli_error(capsys, train(data, tmp_path / "a", "--json", str(afile / "r.json"))) == \
        f"--json {afile / 'r.json'} cannot be written: {afile} is a file"
    assert cli_error(capsys, train(data, tmp_path / "a", "--json", str(tmp_path))) == \
        f"--json {tmp_path} is a folder; give a file path"
    assert cli_error(capsys, train(data, afile / "run")) == \
        f"--out {afile / 'run'} cannot be written: {afile} is a file"

    def read_only(*args, **kwargs):  # a read-only mount (root passes permission bits, so simulate it)
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("neurolattice.io.tempfile.TemporaryFile", read_only)
    assert cli_error(capsys, train(data, tmp_path / "ro" / "run")) == \
        f"--out {tmp_path / 'ro' / 'run'} is not writable: Read-only file system in {tmp_path}"
    assert not (tmp_path / "a").exists() and not (tmp_path / "ro").exists()  # nothing created


@pytest.fixture
def trained(tmp_path, data) -> tuple:
    out = tmp_path / "run"
    assert main(train(data, out)) == 0
    return out, json.loads((resolve_checkpoint(out) / "run_config.json").read_text())


def _drop_steps(config):
    del config["model"]["model"]["steps"]


def _lattice_a_number(config):
    config["model"]["model"]["lattice"] = 5


def _an_lm_run(config):
    config["model"] = {"model": {"vocab_size": 257, "d_model": 32}, "data": {"folder": None}}  # an LM's layout


@pytest.mark.parametrize(("damage", "reason"), [
    (_drop_steps, "its run_config.json: the saved LatticeModelConfig lacks key(s) ['steps']"),  # not T = 8
    (_lattice_a_number, "its run_config.json: a LatticeConfig must be a table of keys, got int"),
    (_an_lm_run, "its run_config.json: unknown LatticeModelConfig key(s) ['d_model', 'vocab_size']; known keys: "),
])
def test_a_damaged_or_foreign_saved_config_is_one_line_not_defaulted(trained, capsys, damage, reason):
    out, config = trained
    damage(config)
    (resolve_checkpoint(out) / "run_config.json").write_text(json.dumps(config))
    assert cli_error(capsys, ["lattice", "eval", str(out)]).startswith(
        f"{resolve_checkpoint(out)} is not a lattice model checkpoint ({reason}")


def test_a_run_a_crash_left_half_saved_is_repaired_in_one_line_at_resume(trained, data, capsys):
    """What a killed save leaves (a hidden temp folder, ``latest`` naming nothing) is repaired
    under the lock when the run is resumed, and said in one line."""
    out, _ = trained
    (out / ".step-00000005.tmp-abc").mkdir()
    (out / "latest").write_text("step-00000009")
    capsys.readouterr()
    assert main(train(data, out, "--resume")) == 0
    said = capsys.readouterr().out
    assert f"repaired {out}: pointed latest at step-00000004 (it read 'step-00000009'); removed 1 hidden " \
           "leftover of interrupted saves" in said.splitlines()
    assert not (out / ".step-00000005.tmp-abc").exists() and resolve_checkpoint(out).name == "step-00000004"


def test_a_latest_pointing_outside_the_run_is_refused(trained, capsys):
    out, _ = trained
    (out / "latest").write_text("../elsewhere")
    assert cli_error(capsys, ["lattice", "show", str(out)]) == f"{out}/latest names '../elsewhere', not a step " \
                                                               f"directory of {out}"
    assert not (out.parent / "elsewhere").exists()
