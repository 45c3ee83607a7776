"""``neurolattice lm train | eval | sample`` on a tiny model and a folder of a few text files:
the run's files, the time budget, resume (also from a 2-rank torchrun launch), one-line errors."""

from __future__ import annotations

import bz2
import json
import lzma
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from neurolattice.cli import main
from neurolattice.lm.data import ByteTokenizer

from ..errors import cli_error as error

LM_SOURCES = Path(__file__).parents[2] / "src" / "neurolattice" / "lm"
TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.ffn_size=64", "data.seq_len=32",
        "data.tokenizer=byte", "train.batch_size=4", "train.warmup_steps=1", "train.log_every=2"]


@pytest.fixture
def corpus(tmp_path) -> Path:
    folder = tmp_path / "text"
    folder.mkdir()
    for name in ("config.py", "data.py", "model.py", "task.py"):
        shutil.copy(LM_SOURCES / name, folder / name)
    return folder


def train(corpus: Path, out: Path, *extra: str, steps: int = 4) -> int:
    return main(["lm", "train", "--data", str(corpus), "--out", str(out), *TINY, f"train.steps={steps}", *extra])


def test_train_eval_sample(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert train(corpus, out) == 0
    step = out / "step-00000004"
    assert (out / "latest").read_text() == step.name
    assert json.loads((out / "heldout_files.json").read_text()) == [str(corpus / "model.py")]
    assert AutoModelForCausalLM.from_pretrained(step).config.hidden_size == 32

    figures = tmp_path / "eval.json"
    assert main(["lm", "eval", str(out), "--json", str(figures)]) == 0
    result = json.loads(figures.read_text())
    assert set(result) == {"bits_per_byte", "tokens", "heldout_bytes", "compressors"}
    assert result["tokens"] == (corpus / "model.py").stat().st_size  # bytes 2.. and end-of-document
    assert 0 < result["bits_per_byte"] < 9
    printed = capsys.readouterr().out
    assert f"held-out bits per byte: {result['bits_per_byte']:.4f}" in printed
    # the compressors saw exactly the held-out file's bytes, and xz also the training files first
    held = (corpus / "model.py").read_bytes()
    train_text = b"".join(p.read_bytes() for p in sorted(corpus.iterdir()) if p.name != "model.py")
    assert result["heldout_bytes"] == len(held)
    assert result["compressors"]["zlib"] == 8 * len(zlib.compress(held, 9)) / len(held)
    assert result["compressors"]["bzip2"] == 8 * len(bz2.compress(held, 9)) / len(held)
    xz = lzma.PRESET_EXTREME | 9
    assert result["compressors"]["xz"] == 8 * len(lzma.compress(held, preset=xz)) / len(held)
    given = len(lzma.compress(train_text + held, preset=xz)) - len(lzma.compress(train_text, preset=xz))
    assert result["compressors"]["xz_given_training_text"] == 8 * given / len(held)
    assert f"  {'xz -9e given the training text':<32} {8 * given / len(held):.4f}\n" in printed
    assert main(["lm", "eval", str(out), "--no-compressors", "--json", str(figures)]) == 0
    assert set(json.loads(figures.read_text())) == {"bits_per_byte", "tokens"}
    assert "zlib" not in capsys.readouterr().out

    assert main(["lm", "sample", str(step), "--prompt", "def ", "--max-new-tokens", "5", "--greedy"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert "--max-new-tokens 300 must fit" in error(capsys, ["lm", "sample", str(out), "--prompt", "x",
                                                  "--max-new-tokens", "300"])


def test_a_checkpoint_encodes_generates_and_decodes_in_plain_transformers(tmp_path, corpus):
    assert train(corpus, tmp_path / "run", steps=2) == 0
    step = tmp_path / "run" / "step-00000002"
    tokenizer = AutoTokenizer.from_pretrained(step)
    model = AutoModelForCausalLM.from_pretrained(step)
    text = "def f(x):\n\treturn x  # é, €, 😀\x00"
    ids = tokenizer(text, return_tensors="pt").input_ids            # (1, T): the UTF-8 bytes, nothing added
    assert ids[0].tolist() == list(text.encode()) and tokenizer.decode(ids[0]) == text
    assert tokenizer.eos_token == tokenizer.bos_token == "<eod>" and tokenizer.eos_token_id == ByteTokenizer.eod_id
    prompt = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)   # a document starts after <eod>
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    new = out[0, prompt.shape[1]:]
    assert tokenizer.decode(new, skip_special_tokens=True) == ByteTokenizer().decode(new)


def test_a_bpe_run_trains_evaluates_samples_and_travels(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert train(corpus, out, "data.tokenizer=bpe", "data.bpe_vocab_size=300", steps=2) == 0
    step = out / "step-00000002"
    saved = json.loads((step / "run_config.json").read_text())["model"]
    assert saved["model"]["vocab_size"] == 300 and saved["model"]["eod_id"] == 0   # set by the tokenizer
    tokenizer = AutoTokenizer.from_pretrained(step)
    assert len(tokenizer) == 300 and tokenizer.eos_token_id == 0
    figures = tmp_path / "eval.json"
    capsys.readouterr()
    assert main(["lm", "eval", str(out), "--no-compressors", "--json", str(figures)]) == 0
    result = json.loads(figures.read_text())
    held = (corpus / "model.py").read_bytes()
    assert result["tokens"] == len(tokenizer(held.decode())["input_ids"])   # BPE tokens, + <eod> - the first
    assert 0 < result["bits_per_byte"] < 12
    assert main(["lm", "sample", str(step), "--prompt", "def ", "--max-new-tokens", "5", "--greedy"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("def ")


def test_time_budget_stops_with_a_checkpoint_and_resume_finishes(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert train(corpus, out, "--max-minutes", "0", steps=6) == 0
    assert "stopped at step 2 of 6" in capsys.readouterr().out
    assert (out / "latest").read_text() == "step-00000002"
    assert train(corpus, out, "--resume", steps=6) == 0
    assert (out / "latest").read_text() == "step-00000006"


def test_bad_input_is_one_line(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert train(corpus, out, steps=2) == 0
    assert error(capsys, ["lm", "train", "--data", str(corpus), "--out", str(out), "--resume", *TINY,
                          "train.steps=2", "model.d_model=64"]) == (
        f"config field 'model.model.d_model' is 32 in checkpoint {out / 'step-00000002'} but 64 in this run")
    assert "already holds a run" in error(capsys, ["lm", "train", "--data", str(corpus), "--out", str(out)])
    (tmp_path / "empty").mkdir()
    assert "holds no text files" in error(capsys, ["lm", "train", "--data", str(tmp_path / "empty"),
                                                   "--out", str(tmp_path / "x")])
    assert error(capsys, ["lm", "train", "--data", str(corpus), "--out", str(tmp_path / "x"),
                          "data.seq_len=512"]) == (
        "data.seq_len 512 exceeds the model's maximum positions model.seq_len = 256")
    assert "unknown DataConfig key(s) ['bogus']" in error(
        capsys, ["lm", "train", "--data", str(corpus), "--out", str(tmp_path / "x"), "data.bogus=1"])


def test_two_rank_torchrun_stops_together_and_resumes_on_one(tmp_path, corpus):
    """About 10 s: two ranks importing torch and transformers."""
    from tests.train.test_ddp import free_port

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "neurolattice.cli",
           "lm", "train", "--data", str(corpus), "--out", str(out), "--max-minutes", "0", *TINY, "train.steps=6"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("stopped at step 2 of 6") == 1  # rank 0 alone prints
    assert train(corpus, out, "--resume", steps=6) == 0
    assert (out / "latest").read_text() == "step-00000006"


def test_a_run_saved_before_the_tokenizer_key_reads_as_bytes(tmp_path, corpus):
    # runs saved before data.tokenizer existed trained on bytes, though BPE is today's default
    out = tmp_path / "run"
    assert train(corpus, out, steps=1) == 0
    config = out / "step-00000001" / "run_config.json"
    saved = json.loads(config.read_text())
    for key in ("tokenizer", "bpe_vocab_size"):
        del saved["model"]["data"][key]
    config.write_text(json.dumps(saved))
    from neurolattice.lm.experiment import load_run

    assert load_run(out).data.tokenizer == "byte"
