"""``neurolattice lm bench``: training throughput of the LM with the shared trainer, in tokens/s
and model FLOPs utilisation (MFU), on 1 and 2 data-parallel processes.

Each (preset, processes) runs in fresh processes (:func:`~neurolattice.bench.harness.run_isolated`):
one plain process for 1, a real ``python -m torch.distributed.run --standalone --nproc_per_node P`` launch
(a free port; gloo on CPU, NCCL on CUDA) for ``P > 1``. Every rank builds the preset's model
(seed 0), trains it with :meth:`~neurolattice.train.Trainer.train_step` on synthetic random
tokens (no corpus is read: the throughput does not depend on the text), ``warmup`` untimed steps
then ``steps`` timed ones (:func:`~neurolattice.bench.harness.time_ms`, median); a step's time
is the slowest rank's median. One optimizer step is ``global_batch`` sequences of ``seq_len``
tokens: each rank takes ``global_batch / P`` of them, in ``accum_steps`` micro-batches of
``micro_batch`` (gradient sync on the last), as in training.

Threads: on the CPU a run of ``P`` processes gives each rank ``max(1, T // P)`` torch threads
(``torch.set_num_threads`` in the worker, and ``OMP_NUM_THREADS``), ``T`` the torch threads of
the launching process, so the ranks together use the cores the peak is measured on; on 2 cores,
1 process uses 2 threads and each of 2 ranks 1 thread.

MFU is ``model_flops_per_token * tokens_per_s / peak``, with the FLOPs per token of
:func:`~neurolattice.lm.model.flops_per_token` (``6 N + 12 L d T``) at the benchmark's
``seq_len``. The peak is MEASURED, not taken from a datasheet: the best of 10 timed square
matmuls (``--peak-size``, default 2048 on the CPU, 8192 on CUDA) in the training's compute dtype
(fp32, or bf16 with ``--precision bf16``, the default on CUDA) in the launching process, with
all its torch threads on the CPU, measured again just before each row's launch: on a shared or
virtual machine the attainable FLOP/s drift by tens of percent within minutes, and a row is
best compared with the peak of its own moment. The peak of a row is that of the hardware the row used: the
whole CPU whatever ``P`` (the ranks share its cores), ``P`` times one GPU's peak on CUDA (a
GPU per rank). A real kernel rarely reaches the best large matmul, so MFU is a lower bound of
how well the hardware is used, comparable between runs on the same machine.

JSON (``--json``): a list of rows with the keys of :data:`ROW_KEYS`; the machine header (with
how the peak is measured under ``matmul_peak``) beside it (:func:`~neurolattice.bench.report.write_results`).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from neurolattice.bench.harness import PEAK_REPEATS, matmul_peak, run_isolated, time_ms
from neurolattice.bench.report import Benchmark, Column, Table, check_at_least, make_row
from neurolattice.config import parse_overrides
from neurolattice.train import TrainConfig, Trainer, distributed, seed_everything

from .config import PRESETS, LMConfig
from .data import ByteTokenizer, LMData, PackedDataset
from .model import build_model, count_parameters, flops_per_token
from .task import LMTask

ROW_KEYS = ("preset", "processes", "threads_per_process", "device", "precision", "global_batch", "micro_batch",
            "accum_steps", "seq_len", "tokens_per_step", "matmul_params", "model_flops_per_token",
            "ms_per_step", "tokens_per_s", "achieved_tflops", "peak_tflops", "mfu", "status")
TIMEOUT_S = 1800  # default limit of one launch; a hung process group is killed whole after it


def compute_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def measure(preset: str, overrides: dict[str, Any], global_batch: int, micro_batch: int, seq_len: int,
            steps: int, warmup: int, device: str, precision: str) -> dict[str, Any]:
    """What every rank runs (in a plain process, or under ``torchrun``): ``warmup`` then ``steps``
    timed trainer steps of the preset's model on random tokens. Returns the model's size and the
    slowest rank's median ``ms_per_step`` (the same on every rank)."""
    with distributed.init_from_env(device) as dev:
        # The trainer and its DDP wrapper are freed when _time_steps returns, while the group
        # lives: a DDP reducer left as the group's last owner after destroy_process_group joins
        # gloo's threads holding the GIL and can deadlock.
        return _time_steps(LMConfig.preset(preset, **overrides), global_batch, micro_batch, seq_len, steps,
                           warmup, dev, precision)


def _time_steps(cfg: LMConfig, global_batch: int, micro_batch: int, seq_len: int, steps: int, warmup: int,
                device: torch.device, precision: str) -> dict[str, Any]:
    seed_everything(0)
    model = build_model(cfg).to(device).train()
    rows = torch.randint(cfg.vocab_size, (global_batch * (warmup + steps), seq_len + 1),
                         generator=torch.Generator().manual_seed(0))  # (n, T + 1) random tokens
    data = LMData(PackedDataset(rows), PackedDataset(rows[:0]), [], [], ByteTokenizer())
    train = TrainConfig(steps=warmup + steps, batch_size=global_batch, micro_batch_size=micro_batch,
                        warmup_steps=0, precision=precision)
    trainer = Trainer(model, LMTask(data, cfg), train)
    ms = time_ms(trainer.train_step, device=device, warmup=warmup, repeats=steps)
    return {"ms_per_step": max(distributed.all_gather_object(ms)),
            "matmul_params": count_parameters(model)["matmul"],
            "model_flops_per_token": flops_per_token(model, seq_len)}


def bench_rows(presets: Sequence[str], processes: Sequence[int], *, global_batch: int, micro_batch: int,
               seq_len: int | None, steps: int, warmup: int, device: str, precision: str,
               peak_size: int, overrides: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """One row per (preset, processes), as soon as it is measured, each with the peak measured
    just before it (:func:`matmul_peak` of side ``peak_size``); ``seq_len`` None is the model's
    maximum positions."""
    overrides = overrides or {}
    cuda = device == "cuda"
    for preset in presets:
        cfg = LMConfig.preset(preset, **overrides)
        length = seq_len or cfg.seq_len
        for p in processes:
            threads = None if cuda else max(1, torch.get_num_threads() // p)
            peak = matmul_peak(device, compute_dtype(precision), peak_size) * (p if cuda else 1)
            row = dict(preset=preset, processes=p, threads_per_process=threads, device=device,
                       precision=precision, global_batch=global_batch, micro_batch=micro_batch,
                       accum_steps=global_batch // p // micro_batch, seq_len=length,
                       tokens_per_step=global_batch * length, peak_tflops=peak / 1e12)
            if cuda and torch.cuda.device_count() < p:
                yield make_row(ROW_KEYS, **row, status=f"skipped: {p} processes need {p} GPUs, "
                                                       f"{torch.cuda.device_count()} visible")
                continue
            spec = dict(preset=preset, overrides=overrides, global_batch=global_batch, micro_batch=micro_batch,
                        seq_len=length, steps=steps, warmup=warmup, device=device, precision=precision)
            try:
                result = run_isolated(f"{__name__}:measure", spec, device=device, threads=threads, processes=p,
                                      timeout_s=TIMEOUT_S)
            except RuntimeError as err:
                yield make_row(ROW_KEYS, **row, status=f"failed: {err}")
                continue
            tokens_per_s = row["tokens_per_step"] / (result["ms_per_step"] / 1000)
            achieved = result["model_flops_per_token"] * tokens_per_s
            yield make_row(ROW_KEYS, **row, **{k: result[k] for k in ("ms_per_step", "matmul_params",
                                                                        "model_flops_per_token")},
                           tokens_per_s=tokens_per_s, achieved_tflops=achieved / 1e12, mfu=achieved / peak,
                           status="ok")


def default_peak_size(device: str) -> int:
    return 8192 if device == "cuda" else 2048


def resolved_precision(args: argparse.Namespace) -> str:
    if args.precision != "auto":
        return args.precision
    return "bf16" if args.device == "cuda" else "fp32"


class LMBench(Benchmark):
    """The command: every (preset, processes) of ``--presets`` and ``--processes``
    (:func:`bench_rows`)."""

    HELP = "training throughput (tokens/s) and MFU of the LM on 1 and 2 data-parallel processes"
    DEFAULT_JSON = "results/lm_bench.json"
    TABLE = Table([
        Column("preset", "preset", 6, align="<"),
        Column("processes", "procs", 5),
        Column("threads_per_process", "threads", 7),
        Column("global_batch", "global batch", 12),
        Column("micro_batch", "micro", 5),
        Column("accum_steps", "accum/rank", 10),
        Column("seq_len", "seq", 5),
        Column("ms_per_step", "ms/step", 9, lambda v: f"{v:,.0f}"),
        Column("tokens_per_s", "tokens/s", 9, lambda v: f"{v:,.0f}"),
        Column("achieved_tflops", "TFLOP/s", 8, lambda v: f"{v:.4f}"),
        Column("peak_tflops", "peak", 8, lambda v: f"{v:.4f}"),
        Column("mfu", "MFU", 6, lambda v: f"{v:.1%}"),
        Column("status", "status", 6, align="<"),
    ])

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--presets", nargs="+", default=["tiny"], choices=list(PRESETS),
                            help="model presets (default %(default)s)")
        parser.add_argument("--processes", type=int, nargs="+", default=[1, 2],
                            help="data-parallel process counts (default %(default)s)")
        parser.add_argument("--batch-size", type=int, default=16,
                            help="global batch: sequences per optimizer step over all ranks (default %(default)s)")
        parser.add_argument("--micro-batch-size", type=int, default=4,
                            help="sequences per forward/backward (default %(default)s)")
        parser.add_argument("--seq-len", type=int, default=None,
                            help="tokens per sequence (default: the preset's seq_len)")
        parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default %(default)s)")
        parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default %(default)s)")
        parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                            help="compute dtype of training and of the peak (auto: bf16 on cuda, fp32 on cpu)")
        parser.add_argument("--peak-size", type=int, default=None,
                            help="side of the peak's square matmul (default 2048 on cpu, 8192 on cuda)")
        parser.add_argument("overrides", nargs="*", metavar="model.KEY=VALUE",
                            help="LMConfig overrides on top of every preset, e.g. model.n_layers=2")

    def check_options(self, args: argparse.Namespace) -> None:
        """Also keeps the parsed overrides in ``args.model_overrides``."""
        check_at_least(args, 1, "batch_size", "micro_batch_size", "steps", "seq_len", "peak_size")
        check_at_least(args, 0, "warmup")
        if min(args.processes) < 1:
            raise ValueError(f"--processes must be >= 1, got {args.processes}")
        for p in args.processes:
            if args.batch_size % (p * args.micro_batch_size):
                raise ValueError(f"--batch-size {args.batch_size} must split into {p} processes x micro-batches of "
                                 f"{args.micro_batch_size}, i.e. be a multiple of {p * args.micro_batch_size}")
        if args.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda (rank r takes GPU r), or auto, got {args.device!r}")
        args.model_overrides = parse_overrides(args.overrides, ("model",)).get("model", {})
        for preset in args.presets:
            cfg = LMConfig.preset(preset, **args.model_overrides)
            if args.seq_len is not None and args.seq_len > cfg.seq_len:
                raise ValueError(f"--seq-len {args.seq_len} exceeds the maximum positions of preset {preset!r} "
                                 f"({cfg.seq_len}); raise it with model.seq_len={args.seq_len}")

    def intro(self, args: argparse.Namespace, machine: dict[str, Any]) -> str:
        precision, size = resolved_precision(args), args.peak_size or default_peak_size(args.device)
        machine["matmul_peak"] = {"dtype": str(compute_dtype(precision)), "size": size, "repeats": PEAK_REPEATS,
                                  "torch_threads": torch.get_num_threads(), "when": "before each row"}
        where = "one GPU, times the processes" if args.device == "cuda" else f"{torch.get_num_threads()} torch threads"
        return (f"peak: best of {PEAK_REPEATS} {precision} {size}x{size} matmuls ({where}), measured before each row\n"
                f"{args.steps} timed steps after {args.warmup} warm-up; synthetic random tokens; "
                f"model overrides {args.model_overrides or 'none'}")

    def rows(self, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
        return bench_rows(args.presets, args.processes, global_batch=args.batch_size,
                          micro_batch=args.micro_batch_size, seq_len=args.seq_len, steps=args.steps,
                          warmup=args.warmup, device=args.device, precision=resolved_precision(args),
                          peak_size=args.peak_size or default_peak_size(args.device), overrides=args.model_overrides)

    def count(self, args: argparse.Namespace) -> int:
        return len(args.presets) * len(args.processes)


COMMAND = LMBench()
