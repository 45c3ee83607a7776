"""``neurolattice bem train | eval | generate | experiment | bench`` on a tiny base LM trained by
the LM system: the run's files, the figures' keys and counts, one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from neurolattice.cli import main

from ..errors import cli_error as error

LM_SOURCES = Path(__file__).parents[2] / "src" / "neurolattice" / "lm"
TINY_LM = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.ffn_size=64", "model.seq_len=64",
           "data.seq_len=32", "data.tokenizer=byte", "train.batch_size=4", "train.warmup_steps=1", "train.steps=1"]
SMALL_DATA = ["data.seq_len=32", "data.train_bytes=6000", "data.heldout_bytes=1500"]


def make_base(tmp_path: Path, name: str, seed: int) -> Path:
    corpus = tmp_path / f"text-{name}"
    corpus.mkdir()
    for source in ("config.py", "model.py", "task.py"):
        shutil.copy(LM_SOURCES / source, corpus / source)
    out = tmp_path / name
    assert main(["lm", "train", "--data", str(corpus), "--out", str(out), *TINY_LM, f"train.seed={seed}"]) == 0
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("bases")
    return make_base(tmp, "base", 0), make_base(tmp, "other", 1)


def test_train_eval_generate(tmp_path, bases, capsys):
    base, other = bases
    out = tmp_path / "bem"
    assert main(["bem", "train", "--base", str(base), "--out", str(out), *SMALL_DATA, "bem.rank=2",
                 "bem.chunk_size=4", "bem.prefix_len=8", "train.steps=2", "train.batch_size=4",
                 "train.eval_every=0"]) == 0
    step = out / "step-00000002"
    tensors = load_file(step / "model.safetensors")
    assert tensors and all(k.startswith("bem_controller.") or k.endswith((".U", ".V")) for k in tensors)
    assert tensors["model.layers.0.self_attn.q_proj.U"].shape == (32, 2)
    saved = json.loads((step / "run_config.json").read_text())["model"]
    assert saved["base"]["path"] == str((base / "step-00000001").resolve())

    figures = tmp_path / "eval.json"
    assert main(["bem", "eval", str(out), "--json", str(figures)]) == 0
    result = json.loads(figures.read_text())
    assert set(result) == {"base", "bem"}
    assert set(result["bem"]) == {"python_loss", "python_bpb", "prose_loss", "prose_bpb", "bpb"}
    assert result["bem"]["python_bpb"] != result["base"]["python_bpb"]  # the trained adapters act

    capsys.readouterr()
    assert main(["bem", "generate", str(step), "--prompt", "def ", "--max-new-tokens", "5", "--greedy"]) == 0
    assert capsys.readouterr().out.startswith("def ")

    assert "holds adapters for another base model" in error(capsys, ["bem", "eval", str(out), "--base", str(other)])
    assert "already holds a run" in error(capsys, ["bem", "train", "--base", str(base), "--out", str(out)])


def test_train_and_eval_on_the_users_domains(tmp_path, bases, capsys):
    """``--data NAME=DIR``: each folder a domain, split by file; eval rebuilds them from the run."""
    base, _ = bases
    folders = {}
    for name, package in (("lm", "lm"), ("train", "train")):
        folders[name] = tmp_path / name
        shutil.copytree(LM_SOURCES.parent / package, folders[name], ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "bem"
    data = [arg for name, folder in folders.items() for arg in ("--data", f"{name}={folder}")]
    assert main(["bem", "train", "--base", str(base), "--out", str(out), *data, *SMALL_DATA,
                 "data.heldout_fraction=0.3", "bem.rank=2", "bem.chunk_size=4", "bem.prefix_len=8", "train.steps=1",
                 "train.batch_size=4", "train.eval_every=0"]) == 0
    saved = json.loads((out / "step-00000001" / "run_config.json").read_text())["model"]["data"]
    assert saved["folders"] == {name: str(folder.resolve()) for name, folder in folders.items()}
    figures = tmp_path / "eval.json"
    assert main(["bem", "eval", str(out), "--json", str(figures)]) == 0
    assert set(json.loads(figures.read_text())["bem"]) == {"lm_loss", "lm_bpb", "train_loss", "train_bpb", "bpb"}

    argv = ["bem", "train", "--base", str(base), "--out", str(tmp_path / "x")]
    assert "--data takes NAME=DIR" in error(capsys, argv + ["--data", str(folders["lm"])])
    assert "two or more domains" in error(capsys, argv + ["--data", f"lm={folders['lm']}"])
    assert "does not exist" in error(capsys, argv + ["--data", f"lm={folders['lm']}", "--data", "x=/no/such/dir"])


def test_bad_config_is_one_line(tmp_path, bases, capsys):
    base, _ = bases
    argv = ["bem", "train", "--base", str(base), "--out", str(tmp_path / "x")]
    assert "rank must be a positive integer" in error(capsys, argv + ["bem.rank=0"])
    assert "unknown BEMConfig key(s) ['ranks']" in error(capsys, argv + ["bem.ranks=2"])
    assert "no checkpoint at" in error(capsys, ["bem", "train", "--base", str(tmp_path / "nope"), "--out", "x"])
    assert "not a BEM checkpoint" in error(capsys, ["bem", "eval", str(base)])
    bpe = tmp_path / "bpe"   # an LM on BPE tokens cannot be a base: the domains are packed as bytes
    assert main(["lm", "train", "--data", str(base.parent / "text-base"), "--out", str(bpe), *TINY_LM,
                 "data.tokenizer=bpe", "data.bpe_vocab_size=300"]) == 0
    capsys.readouterr()
    assert "base must be trained with data.tokenizer=byte" in error(capsys, ["bem", "train", "--base", str(bpe),
                                                                             "--out", str(tmp_path / "y")])


def test_experiment_rows_and_parameter_counts(tmp_path, bases):
    base, _ = bases
    figures = tmp_path / "experiment.json"
    assert main(["bem", "experiment", "--base", str(base), "--steps", "1", "--batch-size", "2", "--rank", "2",
                 "--levels", "token", "--train-bytes", "3000", "--heldout-bytes", "600", "--json", str(figures)]) == 0
    rows = {r["method"]: r for r in json.loads(figures.read_text())}
    assert list(rows) == ["base", "lora (peft)", "bem-token", "bem-imitation"]
    # rank r on q, k, v, o (32 -> 32), gate, up (32 -> 64) and down (64 -> 32) of the one layer
    lora = 2 * (4 * (32 + 32) + 3 * (32 + 64))
    assert rows["base"]["trainable_params"] == 0
    assert rows["lora (peft)"]["trainable_params"] == lora
    assert rows["bem-token"]["trainable_params"] > lora  # the same adapters plus the controller
    assert rows["bem-imitation"]["trainable_params"] > lora  # two rank-1 experts + controller
    assert rows["bem-imitation"]["level"] == "prefix"
    for row in rows.values():
        assert 0 < row["python_bpb"] < 12 and 0 < row["prose_bpb"] < 12


def test_bench_rows(tmp_path):
    figures = tmp_path / "bench.json"
    assert main(["bem", "bench", "--preset", "tiny", "--configs", "1x16", "2x8", "--repeats", "1",
                 "--decode-tokens", "2", "--no-memory", "--json", str(figures)]) == 0
    rows = json.loads(figures.read_text())
    methods = ["base", "lora", "bem-token", "bem-chunk", "bem-prefix", "xlora"]
    assert [(r["method"], r["phase"], r["batch"], r["seq"]) for r in rows] == [
        (m, phase, b, s) for phase, b, s in [("prefill", 1, 16), ("prefill", 2, 8), ("decode", 1, 128)]
        for m in methods]
    for row in rows:
        if row["method"] != "xlora":  # a peer: it may be skipped, with the reason
            assert row["status"] == "ok" and row["ms"] > 0
        if row["method"] == "lora":
            assert row["vs_lora"] == 1.0
