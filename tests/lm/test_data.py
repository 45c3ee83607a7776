"""Byte tokenizer, default corpus, text folders, split by file and packing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from neurolattice.lm import (
    IGNORE,
    ByteTokenizer,
    default_corpus_dir,
    default_corpus_files,
    list_text_files,
    load_lm_data,
    pack,
    split_files,
)
from neurolattice.lm.data import EXCLUDED_DIRS

from ..errors import one_line_error


def test_tokenizer_round_trip_non_ascii():
    tok = ByteTokenizer()
    text = "naïve café — 日本語 🎉\n\ttabs"
    ids = tok.encode(text)
    assert ids.dtype == torch.int64 and ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text and tok.decode(ids.tolist()) == text
    assert tok.encode(text.encode("utf-8")).equal(ids)
    assert tok.decode([104, tok.eod_id, 105, IGNORE]) == "hi"
    assert tok.decode(tok.encode(b"\xffok")) == "\ufffdok"
    assert len(tok.encode("")) == 0
    assert tok.byte_lengths().tolist() == [1] * 256 + [0]


def stream_of(docs, tok):
    return torch.cat([t for d in docs for t in (tok.encode(d), torch.tensor([tok.eod_id]))])


@pytest.mark.parametrize("seq_len", [1, 3, 8, 50])
def test_pack_keeps_order_and_covers_the_stream(seq_len):
    tok, g = ByteTokenizer(), torch.Generator().manual_seed(seq_len)
    docs = [bytes(torch.randint(256, (int(n),), generator=g).tolist())
            for n in torch.randint(0, 40, (7,), generator=g)]
    stream = stream_of(docs, tok)
    rows = pack(docs, seq_len)
    n = (len(stream) - 1) // seq_len
    assert rows.shape == (n, seq_len + 1)
    assert rows[:, 1:].flatten().equal(stream[1:1 + n * seq_len])  # labels: the stream, in order
    assert rows[1:, 0].equal(rows[:-1, -1])  # each row starts where the previous one ended
    padded = pack(docs, seq_len, pad=True)
    labels = padded[:, 1:].flatten()
    assert labels[labels != IGNORE].equal(stream[1:])  # every token after the first, once
    assert (labels[labels == IGNORE].numel()) < seq_len
    assert padded[:n].equal(rows)


def test_split_by_file_is_deterministic_and_disjoint():
    files = [f"/corpus/f{i:02d}.txt" for i in range(20)]
    train, held = split_files(files, 0.25, seed=3)
    assert (train, held) == split_files(list(reversed(files)), 0.25, seed=3)
    assert len(held) == 5 and not set(train) & set(held)
    assert sorted(map(str, train + held)) == files
    assert len({tuple(split_files(files, 0.25, seed=s)[1]) for s in range(5)}) > 1
    assert split_files(files, 0.0)[1] == []
    with one_line_error("at least 2 files"):
        split_files(files[:1], 0.1)
    with one_line_error("heldout_fraction"):
        split_files(files, 1.0)


def test_default_corpus_is_the_standard_library():
    root, files = default_corpus_dir(), default_corpus_files()
    assert len(files) > 100 and all(f.is_file() and f.suffix == ".py" for f in files)
    assert root / "pydoc_data" / "topics.py" in files
    assert root / "os.py" in files
    assert not any(EXCLUDED_DIRS & set(f.relative_to(root).parts) for f in files)


def label_bytes(rows: torch.Tensor) -> bytes:
    """The text bytes among the labels of packed rows (end-of-document and padding left out)."""
    labels = rows[:, 1:].flatten()
    return bytes(labels[(labels >= 0) & (labels < 256)].tolist())


def test_default_corpus_capped_and_split():
    data = load_lm_data(seq_len=64, max_bytes=20_000, heldout_fraction=0.1)
    assert data.seq_len == 64 and data.heldout_files and not set(data.train_files) & set(data.heldout_files)
    train_text = b"".join(Path(f).read_bytes() for f in data.train_files)[:18_000]
    held_text = b"".join(Path(f).read_bytes() for f in data.heldout_files)[:2_000]
    got = label_bytes(data.train.rows)
    assert train_text[1:].startswith(got) and len(got) > 18_000 - 1 - 64
    assert label_bytes(data.heldout.rows) == held_text[1:]  # padded: every held-out byte is a label


def test_folder_of_text_files(tmp_path):
    (tmp_path / "sub").mkdir()
    texts = {tmp_path / "a.txt": "first document\n", tmp_path / "sub" / "b.md": "second — document\n"}
    for path, text in texts.items():
        path.write_text(text)
    (tmp_path / "c.bin").write_bytes(b"\x00\x01binary")
    (tmp_path / ".hidden").write_text("not listed")
    assert list_text_files(tmp_path) == list(texts)
    data = load_lm_data(tmp_path, seq_len=4, heldout_fraction=0.5, seed=0)
    assert len(data.heldout_files) == 1 and len(data.train_files) == 1
    train_text, held_text = (texts[Path(f)].encode() for f in (*data.train_files, *data.heldout_files))
    assert label_bytes(data.heldout.rows) == held_text[1:]
    assert train_text[1:].startswith(label_bytes(data.train.rows))


def test_bad_folders_and_lengths(tmp_path):
    with one_line_error("does not exist"):
        list_text_files(tmp_path / "missing")
    with one_line_error("no text files"):
        list_text_files(tmp_path)
    (tmp_path / "only.bin").write_bytes(b"\x00" * 10)
    with one_line_error("no text files"):
        load_lm_data(tmp_path)
    (tmp_path / "a.txt").write_text("tiny")
    (tmp_path / "b.txt").write_text("text")
    with one_line_error("shorter than one sequence"):
        load_lm_data(tmp_path, seq_len=64, heldout_fraction=0.5)
    with one_line_error("seq_len must be a positive integer"):
        pack([b"abc"], 0)
    with one_line_error("max_bytes"):
        load_lm_data(tmp_path, max_bytes=0)


def bpe_corpus(folder: Path) -> Path:
    """Four training files of real source and one held-out file of a word the training files never
    hold (and a byte that is not UTF-8): a BPE that saw the held-out file would merge the word."""
    lm_sources = Path(__file__).parents[2] / "src" / "neurolattice" / "lm"
    folder.mkdir()
    for name in ("config.py", "data.py", "model.py", "task.py"):
        (folder / name).write_bytes((lm_sources / name).read_bytes())
    (folder / "zz_heldout.txt").write_bytes(b"zyzzyvaqux " * 400 + b"caf\xe9 \xc3\xa9 end\n")
    return folder


def test_bpe_is_trained_on_the_training_files_only_and_round_trips_every_byte(tmp_path):
    folder = bpe_corpus(tmp_path / "text")
    # seed 7: the split that holds out zz_heldout.txt
    data = load_lm_data(folder, seq_len=16, heldout_fraction=0.2, seed=7, tokenizer="bpe", bpe_vocab_size=600)
    held = (folder / "zz_heldout.txt").read_bytes()
    assert data.heldout_files == [str(folder / "zz_heldout.txt")]   # the split this test is about
    tok = data.tokenizer
    assert tok.vocab_size == 600 and tok.eod_id == 0
    vocab = tok.tokenizer.get_vocab()
    assert not any("zyzz" in token or "qux" in token for token in vocab)   # never saw the held-out word
    assert any(len(token) >= 4 for token in vocab)                          # but did learn merges
    # every held-out byte comes back, and bits per byte count each of them once
    ids = tok.encode(held)
    assert tok.decode_bytes(ids.tolist()) == held and len(ids) < len(held)
    labels = data.heldout.rows[:, 1:]
    first = len(tok.decode_bytes(ids[:1].tolist()))   # the stream's first token is no label
    assert int(tok.byte_lengths()[labels[labels != IGNORE]].sum()) == len(held) - first
    for path in data.train_files:
        text = Path(path).read_bytes()
        assert tok.decode_bytes(tok.encode(text).tolist()) == text
    # the same ids as the transformers tokenizer saved with the checkpoints, on text; "<eod>" written
    # in a document is its five bytes there too, never the end-of-document id
    hf = tok.to_transformers()
    text = "def f(x):\n    return x  # café, 日本語 🎉 <eod>"
    assert tok.eod_id not in tok.encode(text).tolist()
    assert hf(text)["input_ids"] == tok.encode(text).tolist() and hf.decode(hf(text)["input_ids"]) == text
    # the same documents give the same tokenizer (every rank of a launch trains its own)
    again = load_lm_data(folder, seq_len=16, heldout_fraction=0.2, seed=7, tokenizer="bpe", bpe_vocab_size=600)
    assert again.tokenizer.tokenizer.to_str() == tok.tokenizer.to_str()
    with one_line_error("bpe_vocab_size must be at least 257"):
        load_lm_data(folder, seq_len=16, heldout_fraction=0.2, tokenizer="bpe", bpe_vocab_size=100)
    with one_line_error("cannot read the BPE tokenizer"):
        load_lm_data(folder, seq_len=16, heldout_fraction=0.2, tokenizer="bpe", tokenizer_file=tmp_path / "none.json")
