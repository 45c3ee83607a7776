"""Text for the LM: the byte tokenizer, the corpus (the interpreter's standard library or a
folder of the user's text files), the split by file, and the packing into fixed-length rows."""

from __future__ import annotations

import os
import random
import re
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IGNORE = -100  # label of a position that is not a target (cross-entropy's ignore_index)
# Directories left out of the default corpus: third-party packages and the test suites.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


class ByteTokenizer:
    """Ids ``0..255`` are the bytes of the UTF-8 text; ``eod_id = 256`` ends a document."""

    vocab_size = 257
    eod_id = 256

    def encode(self, text: str | bytes) -> torch.Tensor:
        """``text`` (a str is UTF-8 encoded) as ids ``[n]`` (int64), without end-of-document."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64))

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The text of byte ids (any shape); other ids (end-of-document, -100) are skipped and
        invalid UTF-8 becomes U+FFFD."""
        ids = torch.as_tensor(ids).flatten()
        return bytes(ids[(ids >= 0) & (ids < 256)].tolist()).decode("utf-8", errors="replace")

    def byte_lengths(self) -> torch.Tensor:
        """Bytes of text each id stands for, ``[vocab_size]``: 1 per byte, 0 for end-of-document."""
        return (torch.arange(self.vocab_size) < 256).long()

    def to_transformers(self):
        """The same ids as a ``transformers.PreTrainedTokenizerFast``, saved with every checkpoint
        so that ``AutoTokenizer.from_pretrained(step_dir)`` works beside the model: a ``tokenizers``
        byte-level BPE without merges whose token ``i`` is byte ``i`` (spelled as the byte-level
        alphabet's character for it) and ``<eod>`` = 256, the end-of-document token, as
        ``eos_token`` (and ``bos_token``: the LM reads a document as following one)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        vocab = {char: byte for byte, char in enumerate(byte_level_alphabet())}
        vocab[EOD_TOKEN] = self.eod_id
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tokenizer.decoder = decoders.ByteLevel()
        return transformers_tokenizer(tokenizer)


EOD_TOKEN = "<eod>"


def transformers_tokenizer(tokenizer):
    """A ``tokenizers.Tokenizer`` of ours as a ``transformers.PreTrainedTokenizerFast``: ``<eod>``
    is its eos, bos and pad token, and the text "<eod>" is five bytes, as in training data
    (``split_special_tokens``, which ``save_pretrained`` keeps)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOD_TOKEN, bos_token=EOD_TOKEN,
                                   pad_token=EOD_TOKEN, split_special_tokens=True,
                                   clean_up_tokenization_spaces=False)


class BPETokenizer:
    """A byte-level BPE (``tokenizers``) trained on the training documents only: GPT-2's
    pre-tokenization (words, numbers, punctuation and spaces split apart), merges learned until
    ``vocab_size`` ids, ``<eod>`` = id 0, then the 256 bytes, then the merges. Bytes that are not
    UTF-8 (which ``tokenizers`` cannot take as text) are encoded as their single-byte tokens, so
    every byte sequence round-trips exactly; bits per byte count each token's bytes
    (:meth:`byte_lengths`).

    The same ids as a ``transformers`` tokenizer: :meth:`to_transformers`, saved with every
    checkpoint (an LM run is evaluated and sampled with the tokenizer its checkpoint holds).
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        tokenizer.encode_special_tokens = True      # the text "<eod>" in a document is bytes too
        self.eod_id = tokenizer.token_to_id(EOD_TOKEN)
        self.vocab_size = tokenizer.get_vocab_size()
        alphabet = byte_level_alphabet()
        self._byte_of = {char: byte for byte, char in enumerate(alphabet)}
        self._byte_ids = [tokenizer.token_to_id(char) for char in alphabet]
        if self.eod_id is None or None in self._byte_ids:
            raise ValueError("not a byte-level BPE of neurolattice: it lacks <eod> or a byte's token")

    @classmethod
    def train(cls, docs: Iterable[bytes], vocab_size: int) -> BPETokenizer:
        """Learn merges from ``docs`` (deterministic: the same documents give the same tokenizer)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 257:
            raise ValueError(f"bpe_vocab_size must be at least 257 (256 bytes + <eod>), got {vocab_size}")
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TOKEN], show_progress=False,
                                      initial_alphabet=byte_level_alphabet())
        tokenizer.train_from_iterator((doc.decode("utf-8", errors="ignore") for doc in docs), trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        """The tokenizer a checkpoint holds (``tokenizer.json``), one line if it cannot be read."""
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as err:   # a missing file, bad JSON, another kind of tokenizer
            raise ValueError(f"cannot read the BPE tokenizer {path}: {str(err).splitlines()[0]}") from None

    def encode(self, text: str | bytes) -> torch.Tensor:
        """``text`` (a str is UTF-8 encoded) as ids ``[n]`` (int64), without end-of-document."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        ids: list[int] = []
        # stretches of valid UTF-8 go through the BPE; each other byte is its own token
        for piece in re.split("([\udc80-\udcff])", data.decode("utf-8", errors="surrogateescape")):
            if len(piece) == 1 and "\udc80" <= piece <= "\udcff":
                ids.append(self._byte_ids[ord(piece) - 0xDC00])
            elif piece:
                ids.extend(self.tokenizer.encode(piece, add_special_tokens=False).ids)
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The text of ``ids`` (any shape); ``<eod>`` and ids outside the vocabulary (-100) are
        skipped and invalid UTF-8 becomes U+FFFD."""
        ids = torch.as_tensor(ids).flatten().tolist()
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        tokens = (self.tokenizer.id_to_token(i) for i in ids if 0 <= i < self.vocab_size and i != self.eod_id)
        return bytes(self._byte_of[char] for token in tokens for char in token)

    def byte_lengths(self) -> torch.Tensor:
        """Bytes of text each id stands for, ``[vocab_size]`` (0 for ``<eod>``)."""
        return torch.tensor([0 if i == self.eod_id else len(self.tokenizer.id_to_token(i))
                             for i in range(self.vocab_size)])

    def to_transformers(self):
        """This tokenizer as a ``transformers.PreTrainedTokenizerFast`` (``<eod>`` as its eos, bos
        and pad token)."""
        return transformers_tokenizer(self.tokenizer)


def byte_level_alphabet() -> list[str]:
    """The character byte-level BPE (GPT-2's, the ``tokenizers`` ``ByteLevel`` pre-tokenizer's)
    writes for each byte ``0..255``: itself where it is a printable Latin-1 character other than
    the space, else ``chr(256 + k)`` for the ``k``-th byte that is not, in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    alphabet, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(256 + shifted))
            shifted += 1
    return alphabet


def default_corpus_dir() -> Path:
    """The running interpreter's standard library, ``sysconfig.get_paths()["stdlib"]``."""
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files() -> list[Path]:
    """The standard library's ``.py`` sources, sorted, ``pydoc_data/topics.py`` (the language
    reference's prose) among them. Directories in :data:`EXCLUDED_DIRS` are left out:
    ``site-packages`` is third-party code, not the standard library, and the test suites hold,
    besides tests, data files and deliberately malformed sources (bad encodings, bad syntax)."""
    files = []
    for folder, subdirs, names in os.walk(default_corpus_dir()):
        subdirs[:] = [d for d in subdirs if d not in EXCLUDED_DIRS]  # prune: never walk site-packages
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return sorted(files)


def list_text_files(folder: str | Path) -> list[Path]:
    """Every regular, non-hidden file under ``folder`` (recursively, sorted) whose first 8 KiB
    hold no NUL byte (git's test for binary). A missing or unreadable folder, or one with no
    such file, is a one-line ``ValueError``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"text folder {folder} does not exist or is not a folder")
    try:
        files = [p for p in sorted(folder.rglob("*")) if p.is_file() and _is_text(p)
                 and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    except OSError as err:
        raise ValueError(f"cannot read text folder {folder}: {err}") from None
    if not files:
        raise ValueError(f"text folder {folder} holds no text files (non-hidden files without NUL bytes)")
    return files


def _is_text(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" not in f.read(8192)


def split_files(files: Iterable[str | Path], heldout_fraction: float = 0.1,
                seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Split BY FILE into ``(train, heldout)``, both sorted: the sorted files are shuffled by
    ``random.Random(seed)`` and the first ``round(heldout_fraction * n)`` (at least 1, at most
    ``n - 1``, none when the fraction is 0) are held out. Same files and seed, same split."""
    if not isinstance(heldout_fraction, (int, float)) or not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction!r}")
    files = sorted(Path(f) for f in files)
    if heldout_fraction > 0 and len(files) < 2:
        raise ValueError(f"a split by file needs at least 2 files, got {len(files)}")
    n_held = min(max(1, round(heldout_fraction * len(files))), len(files) - 1) if heldout_fraction else 0
    order = files.copy()
    random.Random(seed).shuffle(order)
    held = set(order[:n_held])
    return [f for f in files if f not in held], sorted(held)


def read_documents(files: Iterable[str | Path], max_bytes: int | None = None) -> list[bytes]:
    """The files' bytes, one document each, in order; with ``max_bytes``, reading stops once
    that many bytes are read (the last document cut short, see :func:`cap_documents`)."""
    return cap_documents((read_document(path) for path in files), max_bytes)


def cap_documents(docs: Iterable[bytes], max_bytes: int | None = None) -> list[bytes]:
    """The documents in order, cut to ``max_bytes`` bytes in all (the last one cut short;
    ``None``: all). ``docs`` is consumed lazily: nothing after the cap is read."""
    out, left = [], max_bytes
    for data in docs:
        if left is not None and left <= 0:
            break
        out.append(data if left is None else data[:left])
        left = None if left is None else left - len(out[-1])
    return out


def read_document(path: str | Path) -> bytes:
    """The bytes of one text file; an unreadable file is a one-line ``ValueError``."""
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read text file {path}: {err}") from None


def pack(docs: Iterable[str | bytes], seq_len: int, tokenizer: ByteTokenizer | BPETokenizer | None = None,
         pad: bool = False) -> torch.Tensor:
    """Documents, each followed by end-of-document, packed into rows ``[n, seq_len + 1]``.

    The stream ``s = doc_1 EOD doc_2 EOD ...`` is cut into consecutive windows that overlap by
    one token, ``row_i = s[i T : i T + T + 1]`` with ``T = seq_len``: with ``inputs = row[:-1]``
    and ``labels = row[1:]``, every token of the stream after the first is a label exactly once,
    in stream order. A last window shorter than ``T + 1`` is dropped, or with ``pad=True``
    filled up with :data:`IGNORE`.
    """
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    tokenizer = tokenizer or ByteTokenizer()
    eod = torch.tensor([tokenizer.eod_id])
    stream = torch.cat([t for doc in docs for t in (tokenizer.encode(doc), eod)] or [eod[:0]])
    if pad and len(stream) > 1:
        stream = torch.cat([stream, stream.new_full((-(len(stream) - 1) % seq_len,), IGNORE)])
    if len(stream) < seq_len + 1:
        return stream.new_empty((0, seq_len + 1))
    return stream.unfold(0, seq_len + 1, seq_len).clone()  # (n, T + 1)


class PackedDataset:
    """Packed rows ``[n, T + 1]`` for the trainer: ``dataset[idx]`` (a LongTensor of row indices,
    or a slice) is the batch ``(inputs [B, T], labels [B, T])``, int64. Labels are
    :data:`IGNORE` at padding; padded inputs read id 0, which only ever predicts ignored labels."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows[idx]
        return rows[..., :-1].clamp(min=0), rows[..., 1:]

    @property
    def seq_len(self) -> int:
        return self.rows.shape[-1] - 1


@dataclass
class LMData:
    """A corpus split by file and packed: training rows and held-out rows, and which files."""

    train: PackedDataset
    heldout: PackedDataset
    train_files: list[str]
    heldout_files: list[str]
    tokenizer: ByteTokenizer | BPETokenizer

    @property
    def seq_len(self) -> int:
        return self.train.seq_len


@dataclass
class Corpus:
    """A corpus split by file and read: the documents' bytes, before packing."""

    train_files: list[Path]
    heldout_files: list[Path]
    train_docs: list[bytes]
    heldout_docs: list[bytes]


def read_corpus(folder: str | Path | None = None, heldout_fraction: float = 0.1, seed: int = 0,
                max_bytes: int | None = None) -> Corpus:
    """The text files under ``folder`` (default: :func:`default_corpus_files`), split by file
    (:func:`split_files`) and read. ``max_bytes`` caps the text read: the training files get
    ``1 - heldout_fraction`` of it, the held-out files the rest."""
    if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1):
        raise ValueError(f"max_bytes must be a positive integer or None, got {max_bytes!r}")
    files = default_corpus_files() if folder is None else list_text_files(folder)
    train_files, heldout_files = split_files(files, heldout_fraction, seed)
    held_cap = None if max_bytes is None else round(max_bytes * heldout_fraction)
    train_cap = None if max_bytes is None else max_bytes - held_cap
    return Corpus(train_files, heldout_files, read_documents(train_files, train_cap),
                  read_documents(heldout_files, held_cap))


def load_lm_data(folder: str | Path | None = None, seq_len: int = 256, heldout_fraction: float = 0.1,
                 seed: int = 0, max_bytes: int | None = None, tokenizer: str = "byte", bpe_vocab_size: int = 2048,
                 tokenizer_file: str | Path | None = None) -> LMData:
    """:func:`read_corpus`, tokenized and packed. ``tokenizer``: ``byte`` (:class:`ByteTokenizer`)
    or ``bpe`` (:class:`BPETokenizer`, read from ``tokenizer_file``, else trained on the training
    documents only: the held-out ones never reach it). Training rows drop the short last window;
    held-out rows are padded so every held-out byte is scored."""
    corpus = read_corpus(folder, heldout_fraction, seed, max_bytes)
    if tokenizer == "byte":
        tokens = ByteTokenizer()
    elif tokenizer == "bpe":
        tokens = (BPETokenizer.from_file(tokenizer_file) if tokenizer_file is not None
                  else BPETokenizer.train(corpus.train_docs, bpe_vocab_size))
    else:
        raise ValueError(f"tokenizer must be 'byte' or 'bpe', got {tokenizer!r}")
    train = pack(corpus.train_docs, seq_len, tokens)
    if len(train) == 0:
        raise ValueError(f"the training text is shorter than one sequence of seq_len + 1 = {seq_len + 1} tokens")
    heldout = pack(corpus.heldout_docs, seq_len, tokens, pad=True)
    return LMData(PackedDataset(train), PackedDataset(heldout), [str(f) for f in corpus.train_files],
                  [str(f) for f in corpus.heldout_files], tokens)
