"""An LM run: its configs, what its ``run_config.json`` records, and loading it back.

A run directory (``--out``) holds the checkpoints, ``metrics.jsonl`` and
``heldout_files.json`` (the files that never train). Each step directory is also a
``save_pretrained`` directory (see :mod:`neurolattice.train.checkpoint`); its
``run_config.json`` records the model and data configs (:func:`run_config`), so
:func:`load_run` rebuilds the model and the held-out set from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neurolattice.config import layered_config
from neurolattice.train import SavedRun, TrainConfig, load_checkpoint, read_run_config

from .config import DataConfig, LMConfig
from .data import BPETokenizer, ByteTokenizer, LMData
from .model import build_model
from .task import LMTask

SECTIONS = ("model", "data", "train")
# Training defaults for the LM (a 32 x 256-byte batch suits the tiny preset); every value can
# be overridden by a TOML file with these tables or by SECTION.KEY=VALUE.
DEFAULTS: dict[str, dict[str, Any]] = {
    "train": {"steps": 2000, "batch_size": 32, "lr": 3e-3, "warmup_steps": 100, "weight_decay": 0.1,
              "eval_every": 250, "checkpoint_every": 250, "log_every": 10},
}
HELDOUT_FILES = "heldout_files.json"


@dataclass
class Experiment:
    """What a training run is made of: the configs and the task (its data, loaded)."""

    lm: LMConfig
    data: DataConfig
    train: TrainConfig
    task: LMTask


def build_experiment(preset: str, data_dir: str | None = None, config_file: str | None = None,
                     overrides: list[str] = ()) -> Experiment:
    """:func:`build_configs`, and the task on the data they name."""
    lm, data, train = build_configs(preset, data_dir, config_file, overrides)
    return Experiment(lm, data, train, LMTask(data.load(), lm))


def build_configs(preset: str, data_dir: str | None = None, config_file: str | None = None,
                  overrides: list[str] = ()) -> tuple[LMConfig, DataConfig, TrainConfig]:
    """The preset, :data:`DEFAULTS`, the TOML file, then the overrides (later wins); ``data_dir``
    sets ``data.folder``. Unknown keys and a ``data.seq_len`` above ``model.seq_len`` are
    one-line ``ValueError``s."""
    layers, _ = layered_config(SECTIONS, DEFAULTS, config_file, overrides)
    if data_dir is not None:
        layers["data"]["folder"] = data_dir
    data = DataConfig.from_dict(layers["data"])
    model = dict(layers["model"])
    if data.tokenizer == "bpe":   # the BPE's ids, <eod> first, unless the model's keys say otherwise
        model.setdefault("vocab_size", data.bpe_vocab_size)
        model.setdefault("eod_id", 0)
    lm = LMConfig.preset(preset, **model)
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


@dataclass
class LMRun(SavedRun):
    """A saved LM run: the trained model and its model and data configs."""

    lm: LMConfig
    data: DataConfig

    def tokenizer(self) -> ByteTokenizer | BPETokenizer:
        """The tokenizer the model was trained with (a BPE from the checkpoint's ``tokenizer.json``)."""
        return BPETokenizer.from_file(self.tokenizer_file()) if self.data.tokenizer == "bpe" else ByteTokenizer()

    def load_data(self) -> LMData:
        """The run's corpus, split, tokenized (with the checkpoint's tokenizer) and packed."""
        return self.data.load(self.tokenizer_file() if self.data.tokenizer == "bpe" else None)

    def tokenizer_file(self) -> Path:
        return self.checkpoint / "tokenizer.json"


def load_run(path: str | Path) -> LMRun:
    """The trained model (eval mode, CPU) and configs of a run or step directory
    (:func:`~neurolattice.train.read_run_config`, then build, then load the weights)."""
    ckpt, (lm, data) = read_run_config(path, "an LM", lambda saved: (
        LMConfig.from_dict(saved["model"]["model"], saved=True),
        DataConfig.from_dict(saved["model"]["data"], saved=True)))
    model = build_model(lm)
    load_checkpoint(ckpt, model)
    return LMRun(ckpt, model.eval(), lm, data)
