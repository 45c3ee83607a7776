"""``neurolattice lm train | eval | sample``: the command-line side of :mod:`.experiment`:
train the LM data-parallel, score it in held-out bits per byte, continue a prompt.

``train`` runs alone or under ``torchrun``, e.g.
``torchrun --nproc_per_node 2 -m neurolattice.cli lm train --out runs/lm``.

Each command has the shape :mod:`neurolattice.cli` expects: ``HELP``, ``add_arguments``,
``check`` (one-line ``ValueError``) and ``run``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from neurolattice.config import sections_help
from neurolattice.io import atomic_write_json
from neurolattice.train import TrainConfig, distributed, options, resolve_checkpoint

from .config import PRESETS, DataConfig, LMConfig
from .experiment import DEFAULTS, HELDOUT_FILES, build_configs, load_run, run_config
from .model import build_model, continue_prompt
from .task import LMTask


def config_help() -> str:
    """The keys a TOML file or ``SECTION.KEY=VALUE`` may set, generated from the dataclasses."""
    return sections_help({"model": LMConfig, "data": DataConfig, "train": TrainConfig}, DEFAULTS,
                         note="model defaults are the tiny preset's")


class Train:
    HELP = "train the LM on a folder of text (the Python standard library by default), alone or under torchrun"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.epilog = config_help()
        parser.add_argument("--data", metavar="DIR", help="folder of text files (default: the standard library)")
        parser.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model size (default: tiny)")
        parser.add_argument("--config", metavar="FILE.toml", help="TOML file with [model], [data], [train]")
        options.add_run_arguments(parser, "runs/lm")
        parser.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides")

    @staticmethod
    def check(args: argparse.Namespace) -> None:
        options.check_run_arguments(args)
        args.configs = build_configs(args.preset, args.data, args.config, args.overrides)
        lm, data, _ = args.configs
        args.task = LMTask(data.load(), lm)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        lm, data, train = args.configs
        record = options.train_run(args, lambda: build_model(lm), args.task, train, run_config(lm, data),
                                   records={HELDOUT_FILES: args.task.data.heldout_files})
        if record is not None:  # the main process
            out = Path(args.out)
            if "eval_bpb" in record:
                print(f"held-out bits per byte: {record['eval_bpb']:.4f}")
            print(f"checkpoint: {resolve_checkpoint(out)}")
            print(f"next: neurolattice lm eval {out}   |   neurolattice lm sample {out} --prompt TEXT")
        return 0


class Eval:
    HELP = "held-out bits per byte of a trained LM (run or step directory)"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("ckpt", metavar="CKPT", help="run directory or one of its step directories")
        parser.add_argument("--json", metavar="PATH", help='also write {"bits_per_byte", "tokens"} here')

    @staticmethod
    def check(args: argparse.Namespace) -> None:
        lm, data, args.model = load_run(args.ckpt)
        args.task = LMTask(data.load(), lm)
        if len(args.task.data.heldout) == 0:
            raise ValueError(f"{args.ckpt} holds out no text (data.heldout_fraction = {data.heldout_fraction})")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        task = args.task
        with distributed.init_from_env() as device, torch.no_grad():
            bpb = task.evaluate(args.model.to(device))["bpb"]
        result = {"bits_per_byte": bpb, "tokens": int(task.count_targets(task.data.heldout[:]))}
        print(f"held-out bits per byte: {bpb:.4f} over {result['tokens']} tokens "
              f"({len(task.data.heldout_files)} files)")
        if args.json:
            atomic_write_json(args.json, result)
            print(f"figures: {args.json}")
        return 0


class Sample:
    HELP = "continue a prompt with a trained LM (run or step directory)"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("ckpt", metavar="CKPT", help="run directory or one of its step directories")
        options.add_sampling_arguments(parser)

    @staticmethod
    def check(args: argparse.Namespace) -> None:
        args.lm, _, args.model = load_run(args.ckpt)
        options.check_sampling(args, args.lm.seq_len)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        print(continue_prompt(args.model, args.lm.eod_id, args.prompt, args.max_new_tokens, args.temperature,
                              args.greedy, args.seed))
        return 0
