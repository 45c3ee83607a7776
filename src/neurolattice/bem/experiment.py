"""A BEM run: its base LM, its configs, what its ``run_config.json`` records, and loading it back.

The base model is an LM trained by the LM system (``neurolattice lm train``: a run directory
or one of its step directories). A BEM run directory (``--out``) holds step directories whose
``model.safetensors`` has the BEM tensors only (controller, U, V) and whose
``run_config.json`` names the base (its path and :func:`~neurolattice.bem.train.base_fingerprint`):
loading adapters onto another base model is refused with one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neurolattice.config import layered_config
from neurolattice.lm.experiment import load_run as load_lm_run
from neurolattice.train import SavedRun, TrainConfig, load_checkpoint, read_run_config

from .config import BEMConfig
from .data import DomainData, DomainDataConfig, load_domain_data
from .train import BEMModel, BEMTask, TaskConfig, base_fingerprint

SECTIONS = ("bem", "data", "task", "train")
# Fine-tuning defaults (a few minutes on a CPU for the LM system's tiny preset).
DEFAULTS: dict[str, dict[str, Any]] = {
    "train": {"steps": 300, "batch_size": 16, "lr": 2e-3, "warmup_steps": 20, "weight_decay": 0.0,
              "eval_every": 100, "checkpoint_every": 100, "log_every": 10},
}


@dataclass
class Base:
    """A base LM of the LM system, loaded: where from, its fingerprint, the model (eval, CPU)."""

    path: str
    fingerprint: str
    model: torch.nn.Module
    seq_len: int
    eod_id: int
    heldout_fraction: float
    seed: int

    @classmethod
    def load(cls, path: str | Path) -> Base:
        run = load_lm_run(path)
        if run.data.tokenizer != "byte":
            raise ValueError(f"{path} is an LM on {run.data.tokenizer} tokens: BEM's domains are packed as bytes, "
                             "so its base must be trained with data.tokenizer=byte")
        return cls(str(run.checkpoint.resolve()), base_fingerprint(run.model), run.model, run.lm.seq_len,
                   run.lm.eod_id, run.data.heldout_fraction, run.data.seed)

    def record(self) -> dict[str, Any]:
        return {"path": self.path, "fingerprint": self.fingerprint}

    def domains(self, data: DomainDataConfig) -> DomainData:
        """The domains in rows of ``data.seq_len`` tokens (default: the base's positions); the
        built-in Python files split as the base's corpus was (its held-out fraction and seed)."""
        return load_domain_data(data, data.seq_len or self.seq_len, self.heldout_fraction, self.seed)


@dataclass
class Experiment:
    """What a training run is made of: the base, the configs and the task (its data, loaded)."""

    base: Base
    bem: BEMConfig
    data: DomainDataConfig
    task_config: TaskConfig
    train: TrainConfig
    task: BEMTask


def build_experiment(base_path: str | Path, config_file: str | None = None, overrides: list[str] = (),
                     folders: dict[str, str] | None = None) -> Experiment:
    """The base LM at ``base_path``, :func:`build_configs` (``folders``: ``data.folders``, the
    user's domains) and the task on their data."""
    bem, data, task_cfg, train = build_configs(config_file, overrides, folders)
    base = Base.load(base_path)
    return Experiment(base, bem, data, task_cfg, train, build_task(base, bem, data, task_cfg))


def build_configs(config_file: str | None = None, overrides: list[str] = (), folders: dict[str, str] | None = None
                  ) -> tuple[BEMConfig, DomainDataConfig, TaskConfig, TrainConfig]:
    """:data:`DEFAULTS`, the TOML file, then the overrides (later wins), then ``folders`` as
    ``data.folders``; unknown keys are one-line ``ValueError``s."""
    layers, _ = layered_config(SECTIONS, DEFAULTS, config_file, overrides)
    if folders is not None:
        layers["data"]["folders"] = folders
    return (BEMConfig.from_dict(layers["bem"]), DomainDataConfig.from_dict(layers["data"]),
            TaskConfig.from_dict(layers["task"]), TrainConfig.from_dict(layers["train"]))


def build_task(base: Base, bem: BEMConfig, data: DomainDataConfig, task: TaskConfig) -> BEMTask:
    """The task of a run on ``base``, with the held-out text of both domains. Sets
    ``data.seq_len`` to the base's positions when it is none; more than those is a one-line
    ``ValueError``."""
    data.seq_len = data.seq_len or base.seq_len
    if data.seq_len > base.seq_len:
        raise ValueError(f"data.seq_len {data.seq_len} exceeds the base model's {base.seq_len} positions")
    return BEMTask(base.domains(data), bem, task)


def run_config(base: Base, bem: BEMConfig, data: DomainDataConfig, task: TaskConfig) -> dict[str, Any]:
    """What the trainer saves under ``"model"`` in ``run_config.json`` (and checks on resume)."""
    return {"base": base.record(), "bem": bem.to_dict(), "data": data.to_dict(), "task": task.to_dict()}


@dataclass
class BEMRun(SavedRun):
    """A saved BEM run: the model (BEM on its base), its configs and the base."""

    bem: BEMConfig
    data: DomainDataConfig
    task_config: TaskConfig
    base: Base


def load_run(path: str | Path, base_path: str | None = None) -> BEMRun:
    """The model (eval mode), configs and base (``base_path``, default: the one it was trained
    on) of a BEM run or step directory: :func:`~neurolattice.train.read_run_config`, load the
    base, build the model, load the adapters. A base with another fingerprint is a one-line
    ``ValueError``."""
    ckpt, (record, bem, data, task_cfg) = read_run_config(path, "a BEM", lambda saved: (
        saved["model"]["base"], BEMConfig.from_dict(saved["model"]["bem"], saved=True),
        DomainDataConfig.from_dict(saved["model"]["data"], saved=True),
        TaskConfig.from_dict(saved["model"]["task"], saved=True)))
    base = Base.load(base_path or record["path"])
    if base.fingerprint != record["fingerprint"]:
        raise ValueError(f"{ckpt} holds adapters for another base model: fingerprint {record['fingerprint']} "
                         f"({record['path']}), but {base.path} is {base.fingerprint}")
    model = BEMModel(base.model, bem)
    load_checkpoint(ckpt, model)
    return BEMRun(ckpt, model.eval(), bem, data, task_cfg, base)
