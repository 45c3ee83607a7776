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
from neurolattice.train import TrainConfig, load_checkpoint, read_config, resolve_checkpoint

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
        lm, data, model = load_lm_run(path)
        return cls(str(resolve_checkpoint(path).resolve()), base_fingerprint(model), model, lm.seq_len,
                   lm.eod_id, data.heldout_fraction, data.seed)

    def record(self) -> dict[str, Any]:
        return {"path": self.path, "fingerprint": self.fingerprint}

    def domains(self, data: DomainDataConfig) -> DomainData:
        """The two domains in rows of ``data.seq_len`` tokens (default: the base's positions), the
        Python files split as the base's corpus was (its held-out fraction and seed)."""
        return load_domain_data(data, data.seq_len or self.seq_len, self.heldout_fraction, self.seed)


def build_configs(config_file: str | None = None, overrides: list[str] = ()
                  ) -> tuple[BEMConfig, DomainDataConfig, TaskConfig, TrainConfig]:
    """:data:`DEFAULTS`, the TOML file, then the overrides (later wins); unknown keys are
    one-line ``ValueError``s."""
    layers, _ = layered_config(SECTIONS, DEFAULTS, config_file, overrides)
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


def load_run(path: str | Path, base_path: str | None = None
             ) -> tuple[tuple[BEMConfig, DomainDataConfig, TaskConfig], Base, BEMModel]:
    """The configs, the base (``base_path``, default: the one it was trained on) and the model
    (eval mode) of a BEM run or step directory: resolve the path, read its config, load the
    base, build the model, load the adapters. A run that is missing or not a BEM run's, or a
    base with another fingerprint, is a one-line ``ValueError``."""
    ckpt = resolve_checkpoint(path)
    saved = read_config(ckpt).get("model", {})
    if not {"base", "bem", "data", "task"} <= saved.keys():
        raise ValueError(f"{ckpt} is not a BEM checkpoint (its run_config.json has no base/bem/data/task)")
    base = Base.load(base_path or saved["base"]["path"])
    if base.fingerprint != saved["base"]["fingerprint"]:
        raise ValueError(f"{ckpt} holds adapters for another base model: fingerprint {saved['base']['fingerprint']} "
                         f"({saved['base']['path']}), but {base.path} is {base.fingerprint}")
    configs = (BEMConfig.from_dict(saved["bem"]), DomainDataConfig.from_dict(saved["data"]),
               TaskConfig.from_dict(saved["task"]))
    model = BEMModel(base.model, configs[0])
    load_checkpoint(ckpt, model)
    return configs, base, model.eval()
