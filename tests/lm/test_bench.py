"""``lm bench`` on a shrunk tiny model (d = 32, one layer, 32 tokens, 2 timed steps): a plain
1-process run through the command's ``run`` (table, JSON rows, machine header) and a real
2-rank ``torchrun`` launch. Numbers are checked for shape and sense, never for speed."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from neurolattice.bench.report import machine_path
from neurolattice.lm import bench

SHRUNK = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.ffn_size=64"]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.COMMAND.add_arguments(parser)
    args = parser.parse_args(list(argv))
    bench.COMMAND.check(args)
    return args


def check_row(row: dict, processes: int) -> None:
    assert tuple(row) == bench.ROW_KEYS
    assert row["status"] == "ok"
    assert (row["preset"], row["processes"], row["seq_len"], row["global_batch"], row["micro_batch"]) == (
        "tiny", processes, 32, 4, 1)
    assert row["accum_steps"] == 4 // processes  # 4 sequences = processes x accum_steps x 1
    assert row["tokens_per_step"] == 4 * 32
    for key in ("matmul_params", "model_flops_per_token", "ms_per_step", "tokens_per_s", "achieved_tflops",
                "peak_tflops"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    # d = 32, L = 1, ffn 64, vocab 257 tied: 4 d^2 + 3 d ffn + V d, plus the 3 RMSNorm gains of
    # d that count_parameters keeps in N
    assert row["matmul_params"] == 4 * 32**2 + 3 * 32 * 64 + 257 * 32 + 3 * 32
    assert row["model_flops_per_token"] == 6 * row["matmul_params"] + 12 * 1 * 32 * 32
    assert row["tokens_per_s"] == pytest.approx(row["tokens_per_step"] * 1000 / row["ms_per_step"])
    assert row["mfu"] == pytest.approx(row["achieved_tflops"] / row["peak_tflops"])
    assert 0 < row["mfu"] <= 1


def test_one_process_through_the_command(tmp_path, capsys):
    out = tmp_path / "lm_bench.json"
    args = parse("--processes", "1", "--batch-size", "4", "--micro-batch-size", "1", "--seq-len", "32",
                 "--steps", "2", "--warmup", "1", "--peak-size", "256", "--json", str(out), *SHRUNK)
    assert bench.COMMAND.run(args) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 1
    check_row(rows[0], processes=1)
    assert rows[0]["threads_per_process"] >= 1 and rows[0]["precision"] == "fp32"
    machine = json.loads(machine_path(out).read_text())
    assert machine["matmul_peak"]["size"] == 256 and machine["matmul_peak"]["dtype"] == "torch.float32"
    printed = capsys.readouterr().out
    assert "peak: best of" in printed and "accum/rank" in printed and "MFU" in printed


def test_two_processes_under_torchrun():
    [row] = bench.bench_rows(["tiny"], [2], global_batch=4, micro_batch=1, seq_len=32, steps=2, warmup=1,
                             device="cpu", precision="fp32", peak_size=256,
                             overrides={"d_model": 32, "n_layers": 1, "n_heads": 2, "ffn_size": 64})
    check_row(row, processes=2)


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "6", "--micro-batch-size", "2"], r"^--batch-size 6 must split into 2 processes x micro"),
    (["--presets", "tiny", "--seq-len", "300"], r"^--seq-len 300 exceeds the maximum positions of preset 'tiny'"),
    (["--device", "tpu"], r"^--device must be cpu or cuda"),
    (["model.d_model=30"], r"^d_model / n_heads must be an even integer"),
    (["train.lr=1"], r"^unknown config section 'train'"),
    (["--steps", "0"], r"^--steps must be >= 1, got 0$"),
])
def test_bad_options_are_one_line_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        parse(*argv)
