"""A small Llama-architecture language model on real text: byte tokenizer, corpus split by
file, packing, and the :class:`LMTask` of the shared trainer (spec: shared/spec/lm.md)."""

from .config import PRESETS, LMConfig
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
    "IGNORE", "PRESETS", "ByteTokenizer", "LMConfig", "LMData", "LMTask", "PackedDataset", "build_model",
    "count_parameters", "default_corpus_dir", "default_corpus_files", "flops_per_token", "list_text_files",
    "llama_config", "load_lm_data", "pack", "read_documents", "split_files",
]
