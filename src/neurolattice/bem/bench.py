"""``neurolattice bem bench``: what routing costs over a static LoRA.

One process builds the base model (the LM system's ``--preset``, random weights, its maximum
positions raised to fit the longest sequence) and, on copies of it, every method:

* ``base``: the model alone;
* ``lora``: PEFT's static LoRA (rank ``r``, unmerged) on the modules BEM attaches to;
* ``bem-token`` / ``bem-chunk`` / ``bem-prefix``: BEM at each routing level, controller included;
* ``xlora``: PEFT's X-LoRA over two such LoRAs (its routing classifier runs a scaling pass, a
  second forward), where it runs.

For each ``(batch, seq)`` of ``--configs`` it times a prefill (a forward over the whole batch,
no cache) and, at batch 1, per-token decoding: a 128-token prompt is prefilled into the KV
cache, then ``--decode-tokens`` single-token forwards are timed and divided by their number.
Timings are medians over ``--repeats`` rounds after one warm-up call of each method, the
methods interleaved within each round so a drifting machine hurts them alike; ``vs_lora`` is
the time over the static LoRA's. Peak memory of a prefill is measured per method in a fresh process
(:func:`~neurolattice.bench.harness.run_isolated`: RSS growth on the CPU, the allocator's peak on
CUDA).

JSON (``--json``): rows with the keys of :data:`ROW_KEYS`, the machine header beside them.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from neurolattice.bench.harness import run_isolated, synchronize
from neurolattice.bench.report import Benchmark, Column, Table, check_at_least, format_bytes, make_row
from neurolattice.lm.config import PRESETS, LMConfig
from neurolattice.lm.model import build_model, cache_keyword, find_cache

from .attach import attach
from .config import TABLES, BEMConfig
from .peers import static_lora, x_lora

METHODS = ("base", "lora", "bem-token", "bem-chunk", "bem-prefix", "xlora")
CONFIGS = ((1, 128), (4, 256), (8, 512), (2, 2048))
PROMPT = 128  # tokens prefilled before the timed decode steps
ROW_KEYS = ("method", "phase", "batch", "seq", "ms", "tokens_per_s", "vs_lora", "peak_mem_bytes", "status")


def base_model(preset: str, max_positions: int, device: str) -> nn.Module:
    torch.manual_seed(0)
    cfg = LMConfig.preset(preset, seq_len=max(PRESETS[preset]["seq_len"], max_positions))
    return build_model(cfg).to(device).eval()


def build(method: str, base: nn.Module, rank: int, adapter_dir: str) -> nn.Module:
    """A copy of ``base`` with ``method``'s adapters (random, non-zero), in eval mode."""
    torch.manual_seed(1)
    targets = list(TABLES["llama"])
    if method == "base":
        return copy.deepcopy(base)
    if method == "lora":
        return static_lora(base, rank, 2 * rank, targets, random_b=True).eval()
    if method.startswith("bem-"):
        bem = BEMConfig(rank=rank, alpha=2.0 * rank, level=method.removeprefix("bem-"))
        return attach(copy.deepcopy(base), bem).eval()
    if method == "xlora":
        paths = {}
        for i in range(2):
            paths[str(i)] = f"{adapter_dir}/expert{i}"
            static_lora(base, rank, 2 * rank, targets, random_b=True).save_pretrained(paths[str(i)])
        return x_lora(base, paths).eval()
    raise ValueError(f"unknown method {method!r}; known: {list(METHODS)}")


# A measured call: (setup, run), the setup untimed before every run.
Timed = tuple[Callable[[], Any], Callable[[], Any]]


def prefill(model: nn.Module, ids: torch.Tensor) -> Timed:
    return (lambda: None), (lambda: model(input_ids=ids, use_cache=False))


def decode(model: nn.Module, prompt: torch.Tensor, tokens: int) -> Timed:
    """``tokens`` greedy single-token steps after ``prompt`` is in the KV cache; the setup is
    that prefill."""
    state: dict[str, Any] = {}

    keyword = cache_keyword(model)

    def setup() -> None:
        out = model(input_ids=prompt, use_cache=True)
        state["cache"], state["next"] = find_cache(out), out.logits[:, -1:].argmax(-1)

    def steps() -> None:
        cache, nxt = state["cache"], state["next"]
        for _ in range(tokens):
            out = model(input_ids=nxt, use_cache=True, **{keyword: cache})
            cache, nxt = find_cache(out), out.logits[:, -1:].argmax(-1)

    return setup, steps


def timed_rounds(calls: dict[str, Timed], repeats: int, device: str) -> dict[str, float]:
    """Median ms of each call over ``repeats`` rounds, the calls interleaved within a round
    (warm them up before)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (setup, run) in calls.items():
            setup()
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(1000 * (time.perf_counter() - start))
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def _skipped(err: Exception) -> str:
    """The status of a method that does not run here: why, in a few words."""
    return f"skipped: {type(err).__name__}: {str(err).splitlines()[0][:80]}"


def measure_memory(method: str, preset: str, batch: int, seq: int, rank: int, device: str) -> dict[str, Any]:
    """One prefill of ``method`` (runs inside :func:`run_isolated`, which adds the peak)."""
    base = base_model(preset, seq, device)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        model = build(method, base, rank, tmp)
        del base
        prefill(model, torch.randint(0, 256, (batch, seq), device=device))()
    return {}


def bench_rows(preset: str, configs: list[tuple[int, int]], methods: list[str], rank: int, repeats: int,
               decode_tokens: int, device: str, memory: bool) -> Iterator[dict[str, Any]]:
    """The rows of every phase, a prefill per ``(batch, seq)`` of ``configs`` then the decode (none
    if ``decode_tokens`` is 0), each phase's rows once all its methods are timed; ``memory``:
    measure the prefills' peak memory too."""
    longest = max([s for _, s in configs] + [PROMPT + decode_tokens])
    base = base_model(preset, longest, device)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        models, unbuilt = {}, {}
        for method in methods:
            try:
                models[method] = build(method, base, rank, tmp)
            except Exception as err:  # a peer that does not run here: say why, go on
                unbuilt[method] = _skipped(err)
        phases = [("prefill", b, s) for b, s in configs] + ([("decode", 1, PROMPT)] if decode_tokens else [])
        for phase, batch, seq in phases:
            torch.manual_seed(2)
            ids = torch.randint(0, 256, (batch, seq), device=device)
            calls, failed = {}, dict(unbuilt)
            for method, model in models.items():
                setup, run = prefill(model, ids) if phase == "prefill" else decode(model, ids, decode_tokens)
                try:  # the warm-up, and whether it runs at all
                    setup()
                    run()
                    calls[method] = setup, run
                except Exception as err:
                    failed[method] = _skipped(err)
            ms = timed_rounds(calls, repeats, device)
            per = decode_tokens if phase == "decode" else 1
            for method in methods:
                row = dict(method=method, phase=phase, batch=batch, seq=seq, status=failed.get(method, "ok"))
                if method not in ms:
                    yield make_row(ROW_KEYS, **row)
                    continue
                row["ms"] = ms[method] / per
                row["tokens_per_s"] = batch * (1 if phase == "decode" else seq) * 1000 / row["ms"]
                row["vs_lora"] = ms[method] / ms["lora"] if "lora" in ms else None
                if memory and phase == "prefill":
                    row["peak_mem_bytes"] = run_isolated(
                        f"{__name__}:measure_memory", {"method": method, "preset": preset, "batch": batch,
                                                       "seq": seq, "rank": rank, "device": device},
                        device=device, imports=["transformers", "peft"])["peak_mem_bytes"]
                yield make_row(ROW_KEYS, **row)


class BEMBench(Benchmark):
    """The command: :func:`bench_rows` of the options."""

    HELP = "prefill and per-token decode latency and peak memory: base vs static LoRA (PEFT) vs BEM vs X-LoRA"
    DEFAULT_JSON = "results/bem_bench.json"
    TABLE = Table([
        Column("method", "method", 10, align="<"), Column("phase", "phase", 7, align="<"),
        Column("batch", "batch", 5), Column("seq", "seq", 5), Column("ms", "ms", 9, lambda v: f"{v:.2f}"),
        Column("tokens_per_s", "tokens/s", 9, lambda v: f"{v:,.0f}"),
        Column("vs_lora", "vs lora", 7, lambda v: f"{v:.3f}x"),
        Column("peak_mem_bytes", "peak mem", 9, format_bytes), Column("status", "status", 6, align="<"),
    ])

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--preset", default="small", choices=list(PRESETS),
                            help="base model size (default: small)")
        parser.add_argument("--configs", nargs="+", default=[f"{b}x{s}" for b, s in CONFIGS], metavar="BxT",
                            help="prefill (batch x seq) configs (default: %(default)s)")
        parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="default: all")
        parser.add_argument("--rank", type=int, default=8, help="adapter rank (default: 8)")
        parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default: 5)")
        parser.add_argument("--decode-tokens", type=int, default=32,
                            help="decode steps timed after a 128-token prompt, 0: no decode row (default: 32)")
        parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs (fresh processes)")

    def check_options(self, args: argparse.Namespace) -> None:
        """Also parses ``--configs`` into ``(batch, seq)`` pairs."""
        try:
            args.configs = [tuple(int(v) for v in c.lower().split("x")) for c in args.configs]
        except ValueError:
            raise ValueError(f"--configs must be BxT pairs such as 4x256, got {args.configs}") from None
        if any(len(c) != 2 or min(c) < 1 for c in args.configs):
            raise ValueError(f"--configs must be BxT pairs of positive integers, got {args.configs}")
        check_at_least(args, 1, "rank", "repeats")
        check_at_least(args, 0, "decode_tokens")

    def intro(self, args: argparse.Namespace, machine: dict[str, Any]) -> str:
        return f"base: the LM system's {args.preset} preset; adapters of rank {args.rank}"

    def rows(self, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
        return bench_rows(args.preset, args.configs, args.methods, args.rank, args.repeats, args.decode_tokens,
                          args.device, not args.no_memory)

    def count(self, args: argparse.Namespace) -> int:
        return len(args.methods) * (len(args.configs) + (1 if args.decode_tokens else 0))


COMMAND = BEMBench()
