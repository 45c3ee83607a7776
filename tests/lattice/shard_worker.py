"""A ``torchrun`` worker for test_shard.py: the sharded lattice against the single process::

    python -m torch.distributed.run --nproc_per_node 4 tests/lattice/shard_worker.py '{"out": OUT}'

On 4 ranks it builds the groups ``[3]``, ``[1, 2]``, ``[0, 1, 2]`` and the world (1 to 4 ranks, not
all starting at rank 0) and, on each, for every case of :func:`step_cases` and batches 1 and 3:

* two sharded steps, forward and backward, against the whole lattice stepped in this process
  (float64): the slab's states, its input gradient, every parameter's gradient summed over the
  group;
* the halo exchange alone: its output against the lattice padded along x, and the adjoint
  identity ``<F x, y> = <x, F^T y>``, each side summed over the group.

Then, on the world: the one-line errors (a lattice too thin for 4 ranks, a rank with another
lattice or model config, a slab of the wrong shape, a model split over 3 of the 4 ranks given to
the trainer); the runs of :data:`TRAINED` with the shared trainer
(``model_parallel=True``), each rank checking that its parameters equal rank 0's bit for bit;
and last a rank missing: rank 3 never builds the lattice, the others time out naming it.
Every rank writes what it measured to ``OUT/rank<r>.json``; rank 0 the parameters to
``OUT/<run>/result.pt``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from neurolattice.lattice import LatticeConfig, LatticeModel, LatticeModelConfig, LatticeMoE
from neurolattice.lattice.geometry import pad_lattice
from neurolattice.lattice.shard import HaloExchange, ShardedLatticeModel, ShardedLatticeMoE
from neurolattice.train import Task, TrainConfig, Trainer, distributed

SMALL = dict(state_size=3, hidden_local=3, hidden_functional=4, hidden_distant=3, hidden_gate=3)
RADII = dict(r_local=1.2, r_functional=1.8, r_distant=2.5)   # the halo: 2 planes
GROUPS = ([3], [1, 2], [0, 1, 2], [0, 1, 2, 3])
BATCHES = (1, 3)


def step_cases(world: int) -> dict[str, LatticeConfig]:
    """Lattices for ``world`` ranks: uneven slabs (3, 2, ..., 2), every slab as thin as the halo,
    open and periodic, and the default radii (a halo of 4)."""
    return {
        "open-uneven": LatticeConfig(dims=(2 * world + 1, 3, 4), **RADII, **SMALL),
        "periodic-uneven": LatticeConfig(dims=(2 * world + 1, 3, 4), boundary="periodic", **RADII, **SMALL),
        "open-thinnest": LatticeConfig(dims=(2 * world, 3, 4), **RADII, **SMALL),
        "periodic-thinnest": LatticeConfig(dims=(2 * world, 3, 4), boundary="periodic", **RADII, **SMALL),
        "default-radii": LatticeConfig(dims=(4 * world + 1, 2, 3), **SMALL),
    }


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def stepped(config: LatticeConfig) -> LatticeMoE:
    """The single-process step with random parameters (float64), small blocks and chunks."""
    model = LatticeMoE(config, block_elems=1, chunk_elems=1).double()
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(randn(*p.shape, seed=i) * 0.5)
    return model


def check_step(config: LatticeConfig, group: dist.ProcessGroup, batch: int) -> dict[str, float]:
    """Largest differences between two sharded steps and two single-process ones."""
    model = stepped(config)
    X, Y, Z = config.dims
    x = randn(batch, X, Y, Z, config.state_size, seed=100).requires_grad_()
    cotangent = randn(*x.shape, seed=101)
    whole = model(model(x))
    (whole * cotangent).sum().backward()

    sharded = ShardedLatticeMoE(config, group, block_elems=1, chunk_elems=1).double()
    sharded.load_state_dict(model.state_dict())
    x0, x1 = sharded.layout.slab
    slab = x.detach()[:, x0:x1].clone().requires_grad_()
    out = sharded(sharded(slab))
    (out * cotangent[:, x0:x1]).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in sharded.parameters()])
    dist.all_reduce(grads, group=group)
    expected = torch.cat([p.grad.flatten() for p in model.parameters()])

    # the exchange alone: F x is the lattice padded along x; <F x, y> = <x, F^T y> over the group
    h, layout = sharded.layout.halo, sharded.layout
    g = randn(batch, X, Y, Z, config.state_size, seed=102)
    padded_x = pad_lattice(g, (h, 0, 0), config.boundary)[:, x0: x1 + 2 * h]
    xs = g[:, x0:x1].clone().requires_grad_()
    fx = HaloExchange.apply(xs, layout)
    y = randn(*fx.shape, seed=103 + layout.rank)
    ft_y, = torch.autograd.grad(fx, xs, y)
    sides = torch.stack([(fx * y).sum(), (xs * ft_y).sum()]).detach()
    dist.all_reduce(sides, group=group)
    return {"states": (out - whole[:, x0:x1]).abs().max().item(),
            "input_grad": (slab.grad - x.grad[:, x0:x1]).abs().max().item(),
            "param_grads": (grads - expected).abs().max().item(),
            "grad_scale": expected.abs().max().item(),
            "exchange": (fx - padded_x).abs().max().item(),
            "adjoint": abs(sides[0] - sides[1]).item() / sides.abs().max().item()}


# The trained runs: name -> (model config, run to step, resume from another run's checkpoint)
LATTICE = LatticeConfig(dims=(9, 3, 2), state_size=4, hidden_local=4, hidden_functional=4, hidden_distant=4,
                        hidden_gate=4, **RADII)
MODELS = {
    "image": LatticeModelConfig(lattice=LATTICE, input_shape=(9, 3, 1), num_outputs=3, steps=2),
    "vector": LatticeModelConfig(lattice=LATTICE, input_shape=(5,), num_outputs=3, steps=1, redrive=False),
    "T0": LatticeModelConfig(lattice=LATTICE, input_shape=(9, 3, 1), num_outputs=3, steps=0),
}
RUNS = [*MODELS, "image-ckpt"]   # image-ckpt: recomputing each step (and its exchanges) in the backward
TRAIN = TrainConfig(steps=3, batch_size=6, micro_batch_size=3, warmup_steps=1, lr=1e-2, log_every=1)


class Classes(Task):
    """Random inputs of the model's shape, three classes: batch = (x [B, *input_shape], y [B])."""

    def __init__(self, config: LatticeModelConfig) -> None:
        g = torch.Generator().manual_seed(5)
        self.train_data = TensorDataset(torch.randn(10, *config.input_shape, generator=g),
                                        torch.randint(3, (10,), generator=g))

    def count_targets(self, batch):
        return len(batch[1])

    def loss_sum(self, model, batch, grad_checkpointing=False):
        return F.cross_entropy(model(batch[0], grad_checkpointing=grad_checkpointing), batch[1], reduction="sum")


def train(run: str, out: Path, until: int | None = None, resume: bool = False) -> Trainer:
    """The run ``run`` (a key of :data:`MODELS`, its checkpoints in ``out/run``): sharded over
    the world when there is a process group, the plain model in one process."""
    config = MODELS[run.split("-")[0]]
    torch.manual_seed(0)
    model = ShardedLatticeModel(config) if dist.is_initialized() else LatticeModel(config)
    cfg = dataclasses.replace(TRAIN, grad_checkpointing=run.endswith("-ckpt"))
    trainer = Trainer(model, Classes(config), cfg, out_dir=out / run, model_config=config.to_dict())
    if resume:
        trainer.resume()
    trainer.fit(until=until, progress=False)
    return trainer


def save_params(trainer: Trainer, path: Path) -> None:
    params = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    first = distributed.all_gather_object(params)[0]
    for name, value in params.items():
        if not torch.equal(value, first[name]):
            raise AssertionError(f"rank {distributed.rank()}: '{name}' differs from rank 0's")
    if distributed.is_main():
        torch.save(params, path)


def error_of(build) -> str:
    try:
        build()
    except (ValueError, RuntimeError) as err:
        return str(err)
    return "no error"


def main(out: Path) -> None:
    with distributed.init_from_env("cpu"):
        rank = dist.get_rank()
        record: dict = {"steps": [], "errors": {}}
        groups = [dist.new_group(ranks) for ranks in GROUPS]   # collective: every rank makes every group
        for ranks, group in zip(GROUPS, groups):
            if rank in ranks:
                for name, config in step_cases(len(ranks)).items():
                    for batch in BATCHES:
                        record["steps"].append({"world": len(ranks), "case": name, "batch": batch,
                                                **check_step(config, group, batch)})
        dist.barrier()

        errors = record["errors"]
        errors["too_thin"] = error_of(lambda: ShardedLatticeMoE(LatticeConfig(dims=(7, 3, 4), **RADII, **SMALL)))
        other = dict(SMALL, state_size=4 if rank == 2 else 3)
        errors["mismatch"] = error_of(lambda: ShardedLatticeMoE(LatticeConfig(dims=(9, 3, 4), **RADII, **other)))
        sharded = ShardedLatticeMoE(LatticeConfig(dims=(9, 3, 4), **RADII, **SMALL))
        errors["slab_shape"] = error_of(lambda: sharded(torch.zeros(1, 9, 3, 4, 3)))
        outputs = 3 if rank != 1 else 4
        errors["model_mismatch"] = error_of(lambda: ShardedLatticeModel(dataclasses.replace(MODELS["T0"],
                                                                                            num_outputs=outputs)))
        sub = groups[2] if rank in GROUPS[2] else None      # split over 3 of the 4 ranks: no trainer for it
        errors["data_parallel"] = error_of(lambda: Trainer(ShardedLatticeModel(MODELS["T0"], sub), Classes(
            MODELS["T0"]), TRAIN)) if sub is not None else "not in the group"

        for run in RUNS:
            save_params(train(run, out), out / run / "result.pt")
        train("image-stop", out, until=2)
        save_params(train("image-resume", out, resume=True), out / "image-resume" / "result.pt")

        # rank 3 is missing: it waits until the others have given up
        if rank == 3:
            time.sleep(2.5)
        else:
            errors["missing"] = error_of(lambda: ShardedLatticeMoE(LATTICE, timeout_s=1.0))
        (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(json.loads(sys.argv[1])["out"]))
    distributed.exit_process(0)
