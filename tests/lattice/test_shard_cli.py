"""``lattice train --shards 2`` under a real 2-rank ``torchrun`` against the same run in one process.

Two launches share the module fixture: a whole sharded run, and the sharded resume of a run
stopped in one process after step 1. The tiny config of test_model.py (a 4 x 3 x 2 lattice, the
default radii: a halo of 2 planes, so two slabs of 2) trains 4 steps in float32; about 25 s on
2 cores, most of it the ranks starting.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from neurolattice.cli import main
from neurolattice.lattice.experiment import load_run

from ..errors import cli_error
from ..npz import write_npz
from ..train.test_ddp import torchrun
from .test_model import TINY_RUN

RUN = [*TINY_RUN, "train.log_every=1"]   # a logging step every step: --max-minutes 0 stops at step 1


def train_argv(data: str, out: Path, *flags: str) -> list[str]:
    return ["lattice", "train", "--data", data, "--out", str(out), "--json", f"{out}.json", *flags, *RUN]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, str]:
    """``single`` and ``sharded``: the whole run in one process and on 2 ranks; ``crossed``:
    stopped at step 1 in one process, resumed on 2 ranks. Also the 2-rank launch's output."""
    root = tmp_path_factory.mktemp("shard-cli")
    rng = np.random.default_rng(0)
    y = np.arange(48) % 3
    data = write_npz(root / "d.npz", x=rng.normal(size=(48, 4, 3)) + y[:, None, None], y=y)
    assert main(train_argv(data, root / "single")) == 0
    assert main(train_argv(data, root / "crossed", "--max-minutes", "0")) == 0
    output = torchrun(2, ["-m", "neurolattice.cli", *train_argv(data, root / "sharded", "--shards", "2")])
    torchrun(2, ["-m", "neurolattice.cli", *train_argv(data, root / "crossed", "--shards", "2", "--resume")])
    return root, output


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def figures(root: Path, run: str) -> dict:
    return json.loads((root / f"{run}.json").read_text())


@pytest.mark.parametrize("run", ["sharded", "crossed"])
def test_the_sharded_run_equals_the_single_process_one(runs, run):
    """The model and its T = 0 baseline (float32, <= 1e-6) and every held-out figure."""
    root, _ = runs
    single, other = load_run(root / "single"), load_run(root / run)
    assert other.checkpoint.name == "step-00000004"
    assert max_diff(other.model.state_dict(), single.model.state_dict()) <= 1e-6
    assert max_diff(other.baseline.state_dict(), single.baseline.state_dict()) <= 1e-6
    assert figures(root, run) == figures(root, "single")


def test_rank_0_alone_prints_and_eval_reads_the_run_in_one_process(runs, capsys):
    root, output = runs
    assert output.count("held-out accuracy") == 1 and output.count("checkpoint: ") == 1
    assert "lattice split over 2 ranks: x = 0:2, 2:4 (halo 2 planes)" in output
    assert main(["lattice", "eval", str(root / "sharded"), "--json", str(root / "eval.json")]) == 0
    assert json.loads((root / "eval.json").read_text()) == figures(root, "sharded")


def test_shards_must_match_the_launch_and_the_lattice(tmp_path, capsys, monkeypatch):
    argv = ["lattice", "train", "--out", str(tmp_path / "x")]    # digits: an 8 x 8 x 2 lattice, a halo of 2
    assert cli_error(capsys, [*argv, "--shards", "2"]) == (
        "--shards 2 must equal the processes torchrun started, 1: "
        "torchrun --nproc_per_node N -m neurolattice.cli lattice train --shards N")
    monkeypatch.setenv("RANK", "0")       # as torchrun starts rank 0 of 5, before it joins the group
    monkeypatch.setenv("WORLD_SIZE", "5")
    assert cli_error(capsys, [*argv, "--shards", "5"]) == (
        "a lattice of X = 8 planes cannot be split over 5 ranks: a slab needs at least 2 plane(s) "
        "(the halo of r_distant = 2.5), so at most 4 ranks")
