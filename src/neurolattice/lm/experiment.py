"""An LM run: its configs, what its ``run_config.json`` records, and loading it back.

A run directory (``--out``) holds the checkpoints, ``metrics.jsonl`` and
``heldout_files.json`` (the files that never train). Each step directory is also a
``save_pretrained`` directory (see :mod:`neurolattice.train.checkpoint`); its
``run_config.json`` records the model and data configs (:func:`run_config`), so
:func:`load_run` rebuilds the model and the held-out set from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from neurolattice.config import layered_config
from neurolattice.train import TrainConfig, load_checkpoint, read_config, resolve_checkpoint

from .config import DataConfig, LMConfig
from .model import build_model

SECTIONS = ("model", "data", "train")
# Training defaults for the LM (a 32 x 256-byte batch suits the tiny preset); every value can
# be overridden by a TOML file with these tables or by SECTION.KEY=VALUE.
DEFAULTS: dict[str, dict[str, Any]] = {
    "train": {"steps": 2000, "batch_size": 32, "lr": 3e-3, "warmup_steps": 100, "weight_decay": 0.1,
              "eval_every": 250, "checkpoint_every": 250, "log_every": 10},
}
HELDOUT_FILES = "heldout_files.json"


def build_configs(preset: str, data_dir: str | None = None, config_file: str | None = None,
                  overrides: list[str] = ()) -> tuple[LMConfig, DataConfig, TrainConfig]:
    """The preset, :data:`DEFAULTS`, the TOML file, then the overrides (later wins); ``data_dir``
    sets ``data.folder``. Unknown keys and a ``data.seq_len`` above ``model.seq_len`` are
    one-line ``ValueError``s."""
    layers, _ = layered_config(SECTIONS, DEFAULTS, config_file, overrides)
    lm = LMConfig.preset(preset, **layers["model"])
    if data_dir is not None:
        layers["data"]["folder"] = data_dir
    data = DataConfig.from_dict(layers["data"])
    if data.folder is not None:
        data.folder = str(Path(data.folder).resolve())
    data.seq_len = data.seq_len or lm.seq_len
    if data.seq_len > lm.seq_len:
        raise ValueError(f"data.seq_len {data.seq_len} exceeds the model's maximum positions "
                         f"model.seq_len = {lm.seq_len}")
    return lm, data, TrainConfig.from_dict(layers["train"])


def run_config(lm: LMConfig, data: DataConfig) -> dict[str, Any]:
    """What the trainer saves under ``"model"`` in ``run_config.json`` (and checks on resume)."""
    return {"model": lm.to_dict(), "data": data.to_dict()}


def load_run(path: str | Path) -> tuple[LMConfig, DataConfig, torch.nn.Module]:
    """The configs and the trained model (eval mode, CPU) of a run or step directory: resolve
    the path, read its config, build the model, load the weights. A run that is missing, or
    whose ``run_config.json`` is not an LM's, is a one-line ``ValueError``."""
    ckpt = resolve_checkpoint(path)
    saved = read_config(ckpt)
    try:
        lm = LMConfig.from_dict(saved["model"]["model"])
        data = DataConfig.from_dict(saved["model"]["data"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{ckpt} is not an LM checkpoint (run_config.json lacks {err})") from None
    model = build_model(lm)
    load_checkpoint(ckpt, model)
    return lm, data, model.eval()
