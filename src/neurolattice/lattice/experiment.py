"""Train and evaluate a LatticeModel on a dataset: configs, the run, its summary.

A run directory (``--out``) holds the model's checkpoints (see :mod:`neurolattice.train`), the
``T = 0`` baseline's in ``T0/``, and ``metrics.jsonl``. Its ``run_config.json`` records the model
config and where the data came from, so ``eval`` and ``show`` rebuild everything from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from neurolattice.cmdline import percent
from neurolattice.config import layered_config
from neurolattice.data import Dataset, baselines, load_digits, load_npz, primary_metric
from neurolattice.train import (
    SavedRun,
    TrainConfig,
    Trainer,
    distributed,
    load_checkpoint,
    read_run_config,
    seed_everything,
)

from .config import LatticeConfig
from .model import LatticeModel, LatticeModelConfig
from .shard import ShardedLatticeModel
from .tasks import LatticeTask, held_out

SECTIONS = ("model", "lattice", "train")
# The default experiment (digits). Every value can be overridden by a TOML file with these
# tables or by SECTION.KEY=VALUE on the command line.
DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"steps": 4, "redrive": True},
    "lattice": {"dims": [8, 8, 2], "state_size": 16, "hidden_local": 16, "hidden_functional": 16,
                "hidden_distant": 16, "hidden_gate": 16, "r_local": 1.75, "r_functional": 2.0,
                "r_distant": 2.5},
    "train": {"steps": 400, "batch_size": 32, "lr": 3e-3, "warmup_steps": 15, "weight_decay": 0.1,
              "eval_every": 50, "checkpoint_every": 100, "log_every": 10},
}
SET_BY_DATA = ("input_shape", "num_outputs", "task")


@dataclass
class Experiment:
    data: Dataset
    data_spec: dict[str, str]        # {"task": "digits"} or {"path": "/abs/file.npz"}
    model: LatticeModelConfig
    train: TrainConfig


def load_data(spec: dict[str, str]) -> Dataset:
    return load_digits() if spec.get("task") == "digits" else load_npz(spec["path"])


def build_experiment(data_path: str | None = None, config_file: str | None = None,
                     overrides: list[str] = ()) -> Experiment:
    """Data (digits, or ``data_path``) and configs: :data:`DEFAULTS`, then the TOML file, then
    the ``SECTION.KEY=VALUE`` overrides. Unknown keys are one-line ``ValueError``s."""
    spec = {"task": "digits"} if data_path is None else {"path": str(Path(data_path).resolve())}
    data = load_data(spec)
    layers, user = layered_config(SECTIONS, DEFAULTS, config_file, overrides)
    fixed = sorted(set(SET_BY_DATA) & set(layers["model"]))
    if fixed:
        raise ValueError(f"model keys {fixed} are set by the data, not by the config")
    lattice = dict(layers["lattice"])
    if len(data.input_shape) == 3 and "dims" not in user["lattice"]:
        lattice["dims"] = [*data.input_shape[:2], lattice["dims"][2]]
    model = LatticeModelConfig.from_dict({
        **layers["model"], "lattice": LatticeConfig.from_dict(lattice),
        "input_shape": data.input_shape, "num_outputs": data.num_outputs, "task": data.task,
    })
    return Experiment(data, spec, model, TrainConfig.from_dict(layers["train"]))


def _run_config(exp: Experiment, model: LatticeModelConfig) -> dict[str, Any]:
    return {"model": model.to_dict(), "data": exp.data_spec}


def train(exp: Experiment, out: str | Path, resume: bool = False, progress: bool = True,
          deadline: float | None = None, device: str | torch.device = "cpu",
          sharded: bool = False) -> tuple[dict[str, Any] | None, int]:
    """Train the model and its ``T = 0`` baseline on ``device`` into ``out`` (``resume``: continue
    each from its checkpoint there); with ``deadline`` (a ``time.monotonic()`` time) each stops,
    with a checkpoint, at its first logging step past it. ``sharded``: both lattices split over
    every rank of the process group (:class:`~.shard.ShardedLatticeModel`; every rank calls this,
    the main process writes, and the checkpoints are those of the plain model). Returns
    :func:`summarize`'s result (None on the other ranks, which only take part in the held-out
    passes) and the optimizer steps the model (not the baseline) has reached."""
    out = Path(out)
    build = ShardedLatticeModel if sharded else LatticeModel
    models, reached = [], []
    for model_cfg, run_dir in ((exp.model, out), (dataclasses.replace(exp.model, steps=0), out / "T0")):
        seed_everything(exp.train.seed)
        model = build(model_cfg).to(device)
        trainer = Trainer(model, LatticeTask(exp.data), exp.train, out_dir=run_dir,
                          model_config=_run_config(exp, model_cfg), name=f"train T = {model_cfg.steps}")
        if resume and (run_dir / "latest").exists():
            trainer.resume()
        trainer.fit(progress=progress, deadline=deadline)
        models.append(model.eval())
        reached.append(trainer.step)
    result = summarize(exp.data, *models, fit_baselines=distributed.is_main())
    return result if distributed.is_main() else None, reached[0]


@dataclass
class LatticeRun(SavedRun):
    """A saved lattice run: the trained model, its experiment and its ``T = 0`` baseline."""

    experiment: Experiment
    baseline: LatticeModel | None


def _saved_model_config(data: dict[str, Any]) -> LatticeModelConfig:
    """The saved model config: its keys, then those of the lattice inside it, then the values."""
    LatticeModelConfig.check_keys(data, saved=True)
    return LatticeModelConfig.from_dict({**data, "lattice": LatticeConfig.from_dict(data["lattice"], saved=True)},
                                        saved=True)


def _saved_data_spec(spec: dict[str, str]) -> dict[str, str]:
    """The saved data spec, checked: ``{"task": "digits"}`` or ``{"path": ...}``."""
    if spec.get("task") != "digits" and not isinstance(spec.get("path"), str):
        raise ValueError(f"the saved data is neither the digits task nor a file path: {spec!r}")
    return spec


def load_run(path: str | Path) -> LatticeRun:
    """The trained model, its experiment and (if present) the ``T = 0`` baseline of a run
    directory or one of its step directories (:func:`~neurolattice.train.read_run_config`)."""
    ckpt, (model_cfg, spec, train_cfg) = read_run_config(path, "a lattice model", lambda saved: (
        _saved_model_config(saved["model"]["model"]), _saved_data_spec(saved["model"]["data"]),
        TrainConfig.from_dict(saved["train"], saved=True)))
    exp = Experiment(load_data(spec), spec, model_cfg, train_cfg)
    model = LatticeModel(model_cfg).eval()
    load_checkpoint(ckpt, model)
    baseline = None
    if (ckpt.parent / "T0" / "latest").exists():
        baseline = LatticeModel(dataclasses.replace(model_cfg, steps=0)).eval()
        load_checkpoint(ckpt.parent / "T0", baseline)
    return LatticeRun(ckpt, model, exp, baseline)


def summarize(data: Dataset, model: LatticeModel, baseline: LatticeModel | None,
              progress: bool = False, fit_baselines: bool = True) -> dict[str, Any]:
    """Held-out figures: the model's (``accuracy`` and ``ci95``, or ``mse`` and ``r2``), the
    ``T = 0`` baseline's primary metric (``accuracy_T0`` / ``r2_T0``) and scikit-learn's
    (``fit_baselines=False``: not fitted, ``baselines`` is None).
    ``progress``: a bar over the held-out batches of each model, a line before the baselines."""
    result: dict[str, Any] = held_out(model, data, progress=progress and f"held-out T = {model.config.steps}")
    key = primary_metric(data.task)
    result[f"{key}_T0"] = None if baseline is None else held_out(
        baseline, data, progress=progress and "held-out T = 0")[key]
    if progress and fit_baselines:
        print(f"fitting the scikit-learn baselines on {len(data.y_train)} training samples", flush=True)
    result["baselines"] = baselines(data) if fit_baselines else None
    result["test_samples"] = len(data.y_test)
    return result


def format_summary(data: Dataset, result: dict[str, Any], steps: int) -> str:
    key = primary_metric(data.task)

    def pct(v: float | None) -> str:
        return percent(v) if key == "accuracy" or v is None else f"{v:.4f}"

    head = f"held-out {key} on {data.name} ({result['test_samples']} samples), T = {steps}: {pct(result[key])}"
    if "ci95" in result:
        lo, hi = result["ci95"]
        head += f"  (95% CI {pct(lo)} - {pct(hi)})"
    lines = [head, f"  T = 0 (encoder + head only): {pct(result[f'{key}_T0'])}"]
    lines += [f"  {name.replace('_', ' ')} (scikit-learn): {pct(v)}" for name, v in result["baselines"].items()]
    return "\n".join(lines)


@torch.no_grad()
def accuracy_by_steps(data: Dataset, model: LatticeModel, steps: list[int], progress: bool = False) -> list[float]:
    """The trained model's held-out primary metric when run for each number of steps
    (``progress``: a bar over them)."""
    key = primary_metric(data.task)
    return [held_out(model, data, steps=t)[key]
            for t in tqdm(steps, desc="held-out by T", dynamic_ncols=True, disable=not progress)]
