"""``neurolattice bem train | eval | generate``: the command-line side of :mod:`.experiment`:
fine-tune BEM on a base LM, score it per domain, continue a prompt with it.

Each command has the shape :mod:`neurolattice.cli` expects: ``HELP``, ``add_arguments``,
``check`` (one-line ``ValueError``) and ``run``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from neurolattice.config import sections_help
from neurolattice.io import atomic_write_json
from neurolattice.lm.model import continue_prompt
from neurolattice.train import TrainConfig, options, resolve_checkpoint

from .attach import detach
from .config import BEMConfig
from .data import DOMAINS, DomainDataConfig
from .experiment import DEFAULTS, Base, build_configs, build_task, load_run, run_config
from .train import BEMModel, TaskConfig


def config_help() -> str:
    return sections_help({"bem": BEMConfig, "data": DomainDataConfig, "task": TaskConfig, "train": TrainConfig},
                         DEFAULTS)


class Train:
    HELP = "fine-tune BEM on a base LM over the two-domain mix (Python source + CPython docs prose)"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.epilog = config_help()
        parser.add_argument("--base", required=True, metavar="CKPT",
                            help="base LM: a run or step directory of `neurolattice lm train`")
        parser.add_argument("--config", metavar="FILE.toml", help="TOML file with [bem], [data], [task], [train]")
        options.add_run_arguments(parser, "runs/bem")
        parser.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides")

    @staticmethod
    def check(args: argparse.Namespace) -> None:
        options.check_run_arguments(args)
        args.configs = build_configs(args.config, args.overrides)
        bem, data, task_cfg, _ = args.configs
        args.base = Base.load(args.base)
        args.task = build_task(args.base, bem, data, task_cfg)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        bem, data, task_cfg, train = args.configs
        record = options.train_run(args, lambda: BEMModel(args.base.model, bem), args.task, train,
                                   run_config(args.base, bem, data, task_cfg))
        if record is not None:  # the main process
            out = Path(args.out)
            if "eval_bpb" in record:
                print("held-out bits per byte: " + ", ".join(f"{d} {record[f'eval_{d}_bpb']:.4f}" for d in DOMAINS))
            print(f"checkpoint: {resolve_checkpoint(out)}")
            print(f"next: neurolattice bem eval {out}   |   neurolattice bem generate {out} --prompt TEXT")
        return 0


class Eval:
    HELP = "held-out loss per domain of a BEM checkpoint, beside its base model's"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("ckpt", metavar="CKPT", help="BEM run directory or one of its step directories")
        parser.add_argument("--base", metavar="CKPT", help="base LM (default: the one the adapters were trained on)")
        parser.add_argument("--json", metavar="PATH", help='also write {"base": {...}, "bem": {...}} here')

    @staticmethod
    def check(args: argparse.Namespace) -> None:
        (bem, data, task_cfg), base, args.model = load_run(args.ckpt, args.base)
        args.task = build_task(base, bem, data, task_cfg)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        with torch.no_grad():
            result = {"bem": args.task.evaluate(args.model)}
            result["base"] = args.task.evaluate(detach(args.model.lm))  # the base model, as it was
        print(f"{'model':<6} " + " ".join(f"{d + ' bpb':>12}" for d in DOMAINS) + f" {'mean bpb':>10}")
        for name in ("base", "bem"):
            r = result[name]
            print(f"{name:<6} " + " ".join(f"{r[f'{d}_bpb']:>12.4f}" for d in DOMAINS) + f" {r['bpb']:>10.4f}")
        if args.json:
            atomic_write_json(args.json, result)
            print(f"figures: {args.json}")
        return 0


class Generate:
    HELP = "continue a prompt with a BEM checkpoint (greedy or sampled, with the KV cache)"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("ckpt", metavar="CKPT", help="BEM run directory or one of its step directories")
        parser.add_argument("--base", metavar="CKPT", help="base LM (default: the one the adapters were trained on)")
        options.add_sampling_arguments(parser)

    @staticmethod
    def check(args: argparse.Namespace) -> None:
        _, args.base_run, args.model = load_run(args.ckpt, args.base)
        options.check_sampling(args, args.base_run.seq_len)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        print(continue_prompt(args.model, args.base_run.eod_id, args.prompt, args.max_new_tokens, args.temperature,
                              args.greedy, args.seed))
        return 0
