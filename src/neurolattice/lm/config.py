"""Configuration of the language model (:class:`LMConfig`) and of the text it trains on
(:class:`DataConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neurolattice.config import Bound, Config

from .data import Corpus, LMData, load_lm_data, read_corpus

# Sizes of the named presets; every other field keeps its default unless overridden.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 128, "n_layers": 4, "n_heads": 4, "ffn_size": 384, "seq_len": 256},
    "small": {"d_model": 256, "n_layers": 6, "n_heads": 8, "ffn_size": 768, "seq_len": 512},
    "base": {"d_model": 512, "n_layers": 8, "n_heads": 8, "ffn_size": 1536, "seq_len": 1024},
}


@dataclass
class LMConfig(Config):
    """A Llama-architecture decoder: pre-RMSNorm blocks of causal self-attention with rotary
    positions and a SwiGLU MLP. The defaults are the ``tiny`` preset; ``name`` only records
    which preset the sizes started from (overrides may have changed them since)."""

    name: str = field(default="tiny", metadata={
        "help": f"preset the sizes started from: {list(PRESETS)}",
        "bound": Bound(choices=tuple(PRESETS), says=f"a preset, one of {list(PRESETS)}")})
    d_model: int = field(default=128, metadata={"help": "hidden size d", "bound": Bound(int, gt=0)})
    n_layers: int = field(default=4, metadata={"help": "transformer blocks L", "bound": Bound(int, gt=0)})
    n_heads: int = field(
        default=4, metadata={"help": "attention heads (d_model / n_heads must be even)", "bound": Bound(int, gt=0)}
    )
    ffn_size: int = field(default=384, metadata={"help": "hidden size of the SwiGLU MLP", "bound": Bound(int, gt=0)})
    seq_len: int = field(
        default=256, metadata={"help": "maximum positions (longest training sequence)", "bound": Bound(int, gt=0)}
    )
    vocab_size: int = field(default=257, metadata={
        "help": "token ids (byte tokenizer: 256 bytes + end-of-doc)", "bound": Bound(int, gt=0)})
    eod_id: int = field(default=256, metadata={"help": "end-of-document id (bos and eos of the HF config)"})
    tie_embeddings: bool = field(
        default=True, metadata={"help": "share the input embedding with the output head", "bound": Bound(bool)}
    )
    rope_theta: float = field(
        default=10000.0, metadata={"help": "base of the rotary position angles", "bound": Bound(float, gt=0)}
    )
    norm_eps: float = field(default=1e-5, metadata={"help": "epsilon of the RMSNorms", "bound": Bound(float, gt=0)})
    init_std: float = field(
        default=0.02, metadata={"help": "std of the normal weight initialisation", "bound": Bound(float, gt=0)}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model / n_heads must be an even integer (rotary pairs), "
                             f"got {self.d_model} / {self.n_heads}")
        if not isinstance(self.eod_id, int) or not 0 <= self.eod_id < self.vocab_size:
            raise ValueError(f"eod_id must be an integer in [0, vocab_size={self.vocab_size}), got {self.eod_id!r}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LMConfig:
        """The preset ``name`` (see :data:`PRESETS`) with ``overrides`` on top."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {list(PRESETS)}")
        return cls.from_dict({**PRESETS[name], "name": name, **overrides})

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class DataConfig(Config):
    """The text the model trains on and how it is split and cut (see :func:`.load_lm_data`)."""

    folder: str | None = field(
        default=None, metadata={"help": "folder of text files (--data; default: the Python standard library)"}
    )
    seq_len: int | None = field(default=None, metadata={
        "help": "tokens per sequence (default: model.seq_len)", "bound": Bound(int, gt=0, optional=True)})
    heldout_fraction: float = field(default=0.1, metadata={"help": "fraction of the files held out"})
    seed: int = field(default=0, metadata={"help": "seed of the split by file"})
    max_bytes: int | None = field(default=None, metadata={"help": "cap on the text read (default: all of it)"})
    tokenizer: str = field(default="bpe", metadata={
        "help": "byte (256 bytes + end-of-doc) or bpe (a byte-level BPE trained on the training files)",
        "bound": Bound(choices=("byte", "bpe")), "old_runs_had": "byte"})
    bpe_vocab_size: int = field(default=2048, metadata={
        "help": "ids of the BPE tokenizer, <eod> and the 256 bytes included (sets model.vocab_size unless given)",
        "bound": Bound(int, ge=257), "old_runs_lack": True})

    def load(self, tokenizer_file: str | Path | None = None) -> LMData:
        """The corpus packed with this config's tokenizer: for ``bpe``, the one in
        ``tokenizer_file`` (a checkpoint's ``tokenizer.json``), else one trained here on the
        training files."""
        return load_lm_data(self.folder, self.seq_len, self.heldout_fraction, self.seed, self.max_bytes,
                            self.tokenizer, self.bpe_vocab_size, tokenizer_file)

    def corpus(self) -> Corpus:
        """The same split and cap as :meth:`load`, the documents unpacked."""
        return read_corpus(self.folder, self.heldout_fraction, self.seed, self.max_bytes)
