"""The shared trainer of every gradient-trained system: see :class:`Trainer` and :class:`Task`."""

from .checkpoint import (
    SavedRun,
    check_config,
    check_state_dict,
    load_checkpoint,
    read_config,
    read_run_config,
    read_trainer_state,
    repair_run,
    resolve_checkpoint,
    save_checkpoint,
)
from .trainer import RESUME_MAY_CHANGE, EpochSampler, Task, TrainConfig, Trainer, lr_factor, seed_everything

__all__ = [
    "RESUME_MAY_CHANGE", "EpochSampler", "SavedRun", "Task", "TrainConfig", "Trainer", "check_config",
    "check_state_dict", "load_checkpoint", "lr_factor", "read_config", "read_run_config", "read_trainer_state",
    "repair_run", "resolve_checkpoint", "save_checkpoint", "seed_everything",
]
