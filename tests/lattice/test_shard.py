"""The lattice split over ranks (lattice/shard.py) against the single process, in one real
``torchrun`` launch of 4 CPU ranks (gloo) shared by the tests through a module fixture.

Inside the launch (see shard_worker.py) groups of 1, 2, 3 and 4 ranks step open and periodic
lattices with uneven slabs and slabs as thin as the halo, batches 1 and 3, in float64; the
trained runs go through the shared trainer sharded over the 4 ranks, and this process trains
the plain model on the same data: about 35 s on 2 cores, most of it starting the ranks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from neurolattice.lattice import LatticeConfig, LatticeModel
from neurolattice.lattice.shard import ShardedLatticeMoE, halo_width, slab_bounds
from neurolattice.train import load_checkpoint

from ..train.test_ddp import launch
from .conftest import make, states_for
from .shard_worker import BATCHES, GROUPS, LATTICE, MODELS, RADII, RUNS, SMALL, step_cases, train

WORKER = Path(__file__).with_name("shard_worker.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """``single/<run>``: trained here; ``sharded/<run>`` and ``sharded/rank<r>.json``: the launch.
    Stopped runs cross over: the single process's step 2 resumes sharded, and the other way."""
    root = tmp_path_factory.mktemp("shard")
    single, sharded = root / "single", root / "sharded"
    for run in RUNS:
        torch.save(train(run, single).model.state_dict(), single / run / "result.pt")
    train("image-stop", single, until=2)
    shutil.copytree(single / "image-stop", sharded / "image-resume")
    launch(4, {"out": str(sharded)}, worker=WORKER)
    shutil.copytree(sharded / "image-stop", single / "image-resume")
    torch.save(train("image-resume", single, resume=True).model.state_dict(), single / "image-resume" / "result.pt")
    return root


def records(runs: Path) -> list[dict]:
    return [json.loads((runs / "sharded" / f"rank{r}.json").read_text()) for r in range(4)]


def test_every_group_size_case_and_batch_ran(runs):
    ran = {(s["world"], s["case"], s["batch"]) for rec in records(runs) for s in rec["steps"]}
    assert ran == {(len(g), c, b) for g in GROUPS for c in step_cases(len(g)) for b in BATCHES}


def test_sharded_steps_equal_the_single_process_float64(runs):
    """Two steps on 1-4 ranks: every slab's states and input gradient, every parameter's gradient
    summed over the ranks, equal the whole lattice's to 1e-12 (relative to the gradients' size)."""
    for rec in records(runs):
        for s in rec["steps"]:
            where = f"{s['world']} ranks, {s['case']}, batch {s['batch']}"
            assert s["states"] <= 1e-12, where
            assert s["input_grad"] <= 1e-12 * max(1.0, s["grad_scale"]), where
            assert s["param_grads"] <= 1e-12 * max(1.0, s["grad_scale"]), where


def test_the_halo_exchange_pads_x_and_its_backward_is_its_adjoint(runs):
    """``F x`` is the lattice padded along x (wrapped, or zeros past open faces) exactly, and
    ``<F x, y> = <x, F^T y>`` summed over the ranks."""
    for rec in records(runs):
        for s in rec["steps"]:
            assert s["exchange"] == 0
            assert s["adjoint"] <= 1e-13


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("run", [*RUNS, "image-resume"])
def test_sharded_training_equals_the_single_process(runs, run):
    """3 optimizer steps (2 micro-batches each) of the model sharded over 4 ranks (slabs 3, 2, 2, 2)
    against the plain model in float32: image and vector input, T = 2, 1 and 0, gradient
    checkpointing (the exchanges recomputed in the backward); and a run stopped
    at step 2 and resumed on the other number of ranks (the checkpoint is one logical model)."""
    single = torch.load(runs / "single" / run / "result.pt")
    sharded = torch.load(runs / "sharded" / run / "result.pt")
    assert max_diff(single, sharded) <= 1e-6
    torch.manual_seed(0)
    assert max_diff(single, LatticeModel(MODELS[run.split("-")[0]]).state_dict()) > 1e-3  # the steps moved them


def test_a_sharded_checkpoint_loads_into_the_plain_model(runs):
    model = LatticeModel(MODELS["image"])
    load_checkpoint(runs / "sharded" / "image", model)
    assert max_diff(model.state_dict(), torch.load(runs / "sharded" / "image" / "result.pt")) == 0


def test_one_line_errors(runs):
    """A lattice too thin for 4 ranks, a rank with another lattice or model config, a slab of the
    wrong shape, a model split over 3 of 4 ranks given to the trainer, and a rank that never comes
    (rank 0 names it; the others point at rank 0): no hang."""
    errors = [rec["errors"] for rec in records(runs)]
    for r, e in enumerate(errors):
        assert e["too_thin"] == ("a lattice of X = 7 planes cannot be split over 4 ranks: a slab needs at least "
                                 "2 plane(s) (the halo of r_distant = 2.5), so at most 3 ranks")
        assert e["mismatch"] == "rank 2's lattice config differs from rank 0's: state_size = 4 vs 3"
        assert e["model_mismatch"] == "rank 1's model config differs from rank 0's: num_outputs = 4 vs 3"
        assert e["data_parallel"] == ("not in the group" if r == 3 else
                                      "the model is split over 3 of the 4 ranks: data parallelism over copies of "
                                      "a split model is not supported; split it over every rank")
        assert e["slab_shape"] == f"states must be [B, X, Y, Z, S] = [*, {3 if r == 0 else 2}, 3, 4, 3], " \
                                  "got [1, 9, 3, 4, 3]"
        assert all("\n" not in message for message in e.values())
    assert errors[0]["missing"].startswith("the sharded lattice over ranks [0, 1, 2, 3] did not assemble within 1 s")
    assert "Ranks 3 failed to pass monitoredBarrier" in errors[0]["missing"]
    assert all("did not assemble" in e["missing"] for e in errors[1:3]) and "missing" not in errors[3]


@pytest.mark.parametrize("boundary", ["open", "periodic"])
def test_one_rank_without_a_process_group_is_the_plain_step(boundary):
    """No process group: one slab, the whole lattice, its halo wrapped or zero; bit for bit."""
    config = LatticeConfig(dims=(5, 4, 6), boundary=boundary, **RADII, **SMALL)
    plain = make(config, block_elems=1, chunk_elems=1)
    sharded = ShardedLatticeMoE(config, block_elems=1, chunk_elems=1).double()
    sharded.load_state_dict(plain.state_dict())
    x = states_for(config, 2)
    assert torch.equal(sharded(x), plain(x))
    assert torch.equal(sharded.counts, plain.counts)


def test_slab_bounds():
    """``numpy.array_split`` sizes; at most ``X // halo`` ranks; the halo is the largest |dx|."""
    assert slab_bounds(LATTICE, 4) == [(0, 3), (3, 5), (5, 7), (7, 9)]
    assert slab_bounds(LATTICE, 1) == [(0, 9)]
    assert halo_width(LATTICE) == 2 and halo_width(LatticeConfig(dims=(9, 3, 3))) == 4
    assert halo_width(LatticeConfig(dims=(4, 3, 3), boundary="periodic")) == 2   # minimum image: |dx| <= X / 2
    assert halo_width(LatticeConfig(dims=(1, 3, 3))) == 0
    assert slab_bounds(LatticeConfig(dims=(3, 3, 3), r_local=0.5, r_functional=0.7, r_distant=0.9), 3) == \
        [(0, 1), (1, 2), (2, 3)]                                                     # no neighbours: one plane each
    with pytest.raises(ValueError, match=r"^a lattice of X = 9 planes cannot be split over 5 ranks: .* most 4 ranks$"):
        slab_bounds(LATTICE, 5)
