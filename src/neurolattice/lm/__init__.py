"""A small Llama-architecture language model on real text: byte tokenizer, corpus split by
file, packing, and the :class:`LMTask` of the shared trainer.

Laid out as every system is: ``config.py`` (:class:`LMConfig`, :class:`DataConfig`), ``data.py``
and ``model.py``, ``task.py``, ``experiment.py`` (a run's configs, loading a saved run),
``commands.py`` and ``bench.py``. There is no ``reference.py``: the model is Hugging Face's
Llama, and what this system adds, exact gradient accumulation, is held to one batch's gradient
by the trainer's exact-accumulation tests (``tests/train/test_trainer.py``) and by
``tests/lm/test_task.py``.
"""

from .config import PRESETS, DataConfig, LMConfig
from .data import (
    IGNORE,
    ByteTokenizer,
    LMData,
    PackedDataset,
    default_corpus_dir,
    default_corpus_files,
    list_text_files,
    load_lm_data,
    pack,
    read_documents,
    split_files,
)
from .model import build_model, count_parameters, flops_per_token, llama_config
from .task import LMTask

__all__ = [
    "IGNORE", "PRESETS", "ByteTokenizer", "DataConfig", "LMConfig", "LMData", "LMTask", "PackedDataset", "build_model",
    "count_parameters", "default_corpus_dir", "default_corpus_files", "flops_per_token", "list_text_files",
    "llama_config", "load_lm_data", "pack", "read_documents", "split_files",
]
