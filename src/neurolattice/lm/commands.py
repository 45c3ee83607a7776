"""``neurolattice lm train | eval | sample``: the command-line side of :mod:`.experiment`:
train the LM data-parallel, score it in held-out bits per byte, continue a prompt.

``train`` runs alone or under ``torchrun``, e.g.
``torchrun --nproc_per_node 2 -m neurolattice.cli lm train --out runs/lm``.

Each command has the shape :mod:`neurolattice.cli` expects (see :mod:`neurolattice.cmdline`).
"""

from __future__ import annotations

import argparse

import torch

from neurolattice import cmdline, device
from neurolattice.config import sections_help
from neurolattice.train import TrainConfig, options

from .compress import NAMES, compressor_bits_per_byte
from .config import PRESETS, DataConfig, LMConfig
from .experiment import DEFAULTS, HELDOUT_FILES, Experiment, LMRun, build_experiment, load_run, run_config
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
    def check(args: argparse.Namespace) -> Experiment:
        options.check_run_arguments(args)
        return build_experiment(args.preset, args.data, args.config, args.overrides)

    @staticmethod
    def run(args: argparse.Namespace, exp: Experiment) -> int:
        record = options.train_run(args, lambda: build_model(exp.lm), exp.task, exp.train,
                                   run_config(exp.lm, exp.data),
                                   records={HELDOUT_FILES: exp.task.data.heldout_files})
        if record is not None:  # the main process
            heldout = f"held-out bits per byte: {record['eval_bpb']:.4f}" if "eval_bpb" in record else None
            options.print_trained(args.out, "lm", heldout, "sample")
        return 0


class Eval(cmdline.OnRun):
    HELP = "held-out bits per byte of a trained LM (run or step directory)"

    @classmethod
    def add_options(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--compressors", action=argparse.BooleanOptionalAction, default=True,
                            help="also compress the same held-out bytes with zlib, bzip2 and xz, and xz given the "
                                 "training text (default: on; ~30 s for the default corpus)")
        cmdline.add_json_argument(parser, 'the figures {"bits_per_byte", "tokens", "heldout_bytes", '
                                          '"compressors": {name: bits_per_byte}}')

    @classmethod
    def load(cls, args: argparse.Namespace) -> tuple[LMRun, LMTask]:
        run = load_run(args.ckpt)
        task = LMTask(run.load_data(), run.lm)
        if len(task.data.heldout) == 0:
            raise ValueError(f"{args.ckpt} holds out no text (data.heldout_fraction = {run.data.heldout_fraction})")
        return run, task

    @staticmethod
    def run(args: argparse.Namespace, loaded: tuple[LMRun, LMTask]) -> int:
        run, task = loaded
        with torch.no_grad():
            bpb = task.evaluate(run.model.to(device.use(args)), progress=True)["bpb"]
        result = {"bits_per_byte": bpb, "tokens": int(task.count_targets(task.data.heldout[:]))}
        print(f"held-out bits per byte: {bpb:.4f} over {result['tokens']} tokens "
              f"({len(task.data.heldout_files)} files)")
        if args.compressors:
            corpus = run.data.corpus()
            heldout = b"".join(corpus.heldout_docs)
            print("compressing the same held-out bytes (zlib, bzip2, xz; xz given the training text) ...", flush=True)
            result["heldout_bytes"] = len(heldout)
            result["compressors"] = compressor_bits_per_byte(heldout, b"".join(corpus.train_docs))
            print(f"bits per byte on the {len(heldout):,} held-out bytes:")
            for name, value in [("this LM", bpb), *((NAMES[k], v) for k, v in result["compressors"].items())]:
                print(f"  {name:<32} {value:.4f}")
        cmdline.write_json(args.json, result)
        return 0


class Sample(cmdline.OnRun):
    HELP = "continue a prompt with a trained LM (run or step directory)"

    @classmethod
    def add_options(cls, parser: argparse.ArgumentParser) -> None:
        options.add_sampling_arguments(parser)

    @classmethod
    def load(cls, args: argparse.Namespace) -> LMRun:
        run = load_run(args.ckpt)
        options.check_sampling(args, run.lm.seq_len)
        return run

    @staticmethod
    def run(args: argparse.Namespace, run: LMRun) -> int:
        model = run.model.to(device.setup(args))
        print(continue_prompt(model, run.lm.eod_id, args.prompt, args.max_new_tokens, args.temperature,
                              args.greedy, args.seed, run.tokenizer()))
        return 0
