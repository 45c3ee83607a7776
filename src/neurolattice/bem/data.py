"""The two domains of BEM's fine-tuning study: Python source and English prose.

* ``python``: the standard library's ``.py`` files (the LM's default corpus,
  :func:`neurolattice.lm.data.default_corpus_files`, without ``pydoc_data/topics.py``), split
  by file exactly as the base LM's corpus was split (:func:`~neurolattice.lm.data.split_files`
  with the base run's ``heldout_fraction`` and ``seed``), so held-out Python files are files
  the base model never trained on.
* ``prose``: the CPython documentation's language-reference text that ships with the
  interpreter, ``pydoc_data.topics.topics`` (one document per topic), split by topic.

Or the user's own domains (``bem train --data NAME=DIR ...``, ``data.folders``): each is the
text files of a folder (:func:`~neurolattice.lm.data.list_text_files`), split by file with
``heldout_fraction`` and ``seed``.

Each domain is packed into rows of its own (:func:`~neurolattice.lm.data.pack`), so a row is
all one domain and the routing can tell them apart; the training set takes the same number of
rows from each (a balanced mix).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neurolattice.config import Bound, Config
from neurolattice.lm.data import (
    ByteTokenizer,
    PackedDataset,
    cap_documents,
    default_corpus_files,
    list_text_files,
    pack,
    read_document,
    split_files,
)

DOMAINS = ("python", "prose")
TOPICS_FILE = "pydoc_data/topics.py"


@dataclass
class DomainDataConfig(Config):
    """How the two domains are read, split and cut."""

    seq_len: int | None = field(default=None, metadata={"help": "tokens per row (default: the base model's)"})
    train_bytes: int = field(
        default=400_000, metadata={"help": "training text per domain, in bytes", "bound": Bound(int, gt=0)}
    )
    heldout_bytes: int = field(
        default=40_000, metadata={"help": "held-out text per domain, in bytes", "bound": Bound(int, gt=0)}
    )
    prose_heldout_fraction: float = field(
        default=0.15, metadata={"help": "fraction of the topics held out", "bound": Bound(float, gt=0, lt=1)}
    )
    seed: int = field(default=0, metadata={
        "help": "seed of the topic split and of a folder's split (the Python file split is the base's)"})
    folders: dict[str, str] | None = field(default=None, metadata={
        "help": "the domains as {name = folder of text files} (--data NAME=DIR; default: python and prose)",
        "old_runs_lack": True})
    heldout_fraction: float = field(default=0.15, metadata={
        "help": "fraction of a folder's files held out", "bound": Bound(float, gt=0, lt=1), "old_runs_lack": True})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.folders is not None:
            if not isinstance(self.folders, dict) or len(self.folders) < 2:
                raise ValueError(f"folders must name two or more domains {{name: folder}}, got {self.folders!r}")
            self.folders = {str(k): str(Path(v).resolve()) for k, v in self.folders.items()}


@dataclass
class DomainData:
    """Training rows (every domain, balanced) and held-out rows per domain."""

    train: PackedDataset
    train_domain: torch.Tensor  # [n] index into domains of each training row
    heldout: dict[str, PackedDataset]

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(self.heldout)

    @property
    def seq_len(self) -> int:
        return self.train.seq_len


def domain_documents(base_heldout_fraction: float, base_seed: int, prose_heldout_fraction: float,
                     seed: int) -> dict[str, tuple[Iterator[bytes], Iterator[bytes]]]:
    """``{domain: (train documents, held-out documents)}``, as lazy iterators of bytes (a Python
    file is read only when its turn comes)."""
    from pydoc_data.topics import topics

    train_files, held_files = (
        [f for f in part if not f.as_posix().endswith(TOPICS_FILE)]
        for part in split_files(default_corpus_files(), base_heldout_fraction, base_seed))
    names = sorted(topics)
    order = names.copy()
    random.Random(seed).shuffle(order)
    held = set(order[:max(1, round(prose_heldout_fraction * len(names)))])
    return {"python": ((read_document(f) for f in train_files), (read_document(f) for f in held_files)),
            "prose": ((topics[n].encode("utf-8") for n in names if n not in held),
                      (topics[n].encode("utf-8") for n in names if n in held))}


def folder_documents(folders: dict[str, str], heldout_fraction: float, seed: int
                     ) -> dict[str, tuple[Iterator[bytes], Iterator[bytes]]]:
    """``{name: (train documents, held-out documents)}`` of the user's domain folders, each split
    by file; a folder without text files is a one-line ``ValueError``."""
    docs = {}
    for name, folder in folders.items():
        train, held = split_files(list_text_files(folder), heldout_fraction, seed)
        docs[name] = ((read_document(f) for f in train), (read_document(f) for f in held))
    return docs


def load_domain_data(cfg: DomainDataConfig, seq_len: int, base_heldout_fraction: float = 0.1,
                     base_seed: int = 0) -> DomainData:
    """Read, split and pack the domains (see the module docstring)."""
    tokenizer = ByteTokenizer()
    if cfg.folders is None:
        docs = domain_documents(base_heldout_fraction, base_seed, cfg.prose_heldout_fraction, cfg.seed)
    else:
        docs = folder_documents(cfg.folders, cfg.heldout_fraction, cfg.seed)
    rows, heldout = {}, {}
    for domain, (train_docs, held_docs) in docs.items():
        rows[domain] = pack(cap_documents(train_docs, cfg.train_bytes), seq_len, tokenizer)
        heldout[domain] = PackedDataset(pack(cap_documents(held_docs, cfg.heldout_bytes), seq_len, tokenizer,
                                             pad=True))
        if len(rows[domain]) == 0 or len(heldout[domain]) == 0:
            raise ValueError(f"domain {domain!r} has less than one row of seq_len + 1 = {seq_len + 1} tokens")
    n = min(len(r) for r in rows.values())
    train = torch.cat([r[:n] for r in rows.values()])
    domain = torch.arange(len(rows)).repeat_interleave(n)
    return DomainData(PackedDataset(train), domain, heldout)
