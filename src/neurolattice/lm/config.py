"""Configuration of the language model (:class:`LMConfig`) and of the text it trains on
(:class:`DataConfig`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from neurolattice.config import config_from_dict, config_to_dict

from .data import LMData, load_lm_data

# Sizes of the named presets; every other field keeps its default unless overridden.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 128, "n_layers": 4, "n_heads": 4, "ffn_size": 384, "seq_len": 256},
    "small": {"d_model": 256, "n_layers": 6, "n_heads": 8, "ffn_size": 768, "seq_len": 512},
    "base": {"d_model": 512, "n_layers": 8, "n_heads": 8, "ffn_size": 1536, "seq_len": 1024},
}


@dataclass
class LMConfig:
    """A Llama-architecture decoder: pre-RMSNorm blocks of causal self-attention with rotary
    positions and a SwiGLU MLP. The defaults are the ``tiny`` preset; ``name`` only records
    which preset the sizes started from (overrides may have changed them since)."""

    name: str = field(default="tiny", metadata={"help": f"preset the sizes started from: {list(PRESETS)}"})
    d_model: int = field(default=128, metadata={"help": "hidden size d"})
    n_layers: int = field(default=4, metadata={"help": "transformer blocks L"})
    n_heads: int = field(default=4, metadata={"help": "attention heads (d_model / n_heads must be even)"})
    ffn_size: int = field(default=384, metadata={"help": "hidden size of the SwiGLU MLP"})
    seq_len: int = field(default=256, metadata={"help": "maximum positions (longest training sequence)"})
    vocab_size: int = field(default=257, metadata={"help": "token ids (byte tokenizer: 256 bytes + end-of-doc)"})
    eod_id: int = field(default=256, metadata={"help": "end-of-document id (bos and eos of the HF config)"})
    tie_embeddings: bool = field(
        default=True, metadata={"help": "share the input embedding with the output head"}
    )
    rope_theta: float = field(default=10000.0, metadata={"help": "base of the rotary position angles"})
    norm_eps: float = field(default=1e-5, metadata={"help": "epsilon of the RMSNorms"})
    init_std: float = field(default=0.02, metadata={"help": "std of the normal weight initialisation"})

    def __post_init__(self) -> None:
        if self.name not in PRESETS:
            raise ValueError(f"name must be a preset, one of {list(PRESETS)}, got {self.name!r}")
        for name in ("d_model", "n_layers", "n_heads", "ffn_size", "seq_len", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model / n_heads must be an even integer (rotary pairs), "
                             f"got {self.d_model} / {self.n_heads}")
        if not isinstance(self.eod_id, int) or not 0 <= self.eod_id < self.vocab_size:
            raise ValueError(f"eod_id must be an integer in [0, vocab_size={self.vocab_size}), got {self.eod_id!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LMConfig:
        """The preset ``name`` (see :data:`PRESETS`) with ``overrides`` on top."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {list(PRESETS)}")
        return cls.from_dict({**PRESETS[name], "name": name, **overrides})

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LMConfig:
        return config_from_dict(cls, data)


@dataclass
class DataConfig:
    """The text the model trains on and how it is split and cut (see :func:`.load_lm_data`)."""

    folder: str | None = field(
        default=None, metadata={"help": "folder of text files (--data; default: the Python standard library)"}
    )
    seq_len: int | None = field(default=None, metadata={"help": "tokens per sequence (default: model.seq_len)"})
    heldout_fraction: float = field(default=0.1, metadata={"help": "fraction of the files held out"})
    seed: int = field(default=0, metadata={"help": "seed of the split by file"})
    max_bytes: int | None = field(default=None, metadata={"help": "cap on the text read (default: all of it)"})

    def __post_init__(self) -> None:
        if self.seq_len is not None and (not isinstance(self.seq_len, int) or isinstance(self.seq_len, bool)
                                         or self.seq_len < 1):
            raise ValueError(f"seq_len must be a positive integer, got {self.seq_len!r}")

    def load(self) -> LMData:
        return load_lm_data(self.folder, self.seq_len, self.heldout_fraction, self.seed, self.max_bytes)
