"""``neurolattice bem train | eval | generate``: the command-line side of :mod:`.experiment`:
fine-tune BEM on a base LM, score it per domain, continue a prompt with it.

Each command has the shape :mod:`neurolattice.cli` expects (see :mod:`neurolattice.cmdline`).
"""

from __future__ import annotations

import argparse

import torch

from neurolattice import cmdline, device
from neurolattice.config import sections_help
from neurolattice.lm.model import continue_prompt
from neurolattice.train import TrainConfig, options

from .attach import detach
from .config import BEMConfig
from .data import DomainDataConfig
from .experiment import DEFAULTS, BEMRun, Experiment, build_experiment, build_task, load_run, run_config
from .train import BEMModel, BEMTask, TaskConfig


def config_help() -> str:
    return sections_help({"bem": BEMConfig, "data": DomainDataConfig, "task": TaskConfig, "train": TrainConfig},
                         DEFAULTS)


def parse_folders(pairs: list[str] | None) -> dict[str, str] | None:
    """``["code=src", "docs=doc"]`` -> ``{"code": "src", "docs": "doc"}`` (None for no ``--data``)."""
    if not pairs:
        return None
    folders = {}
    for pair in pairs:
        name, sep, folder = pair.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--data takes NAME=DIR (a domain's name and its folder of text), got {pair!r}")
        if name in folders:
            raise ValueError(f"--data names domain {name!r} twice")
        folders[name] = folder
    if len(folders) < 2:
        raise ValueError(f"--data needs two or more domains to route between, got {list(folders)}")
    return folders


def print_bpb(rows: dict[str, dict[str, float]], domains: tuple[str, ...]) -> None:
    """A table of held-out bits per byte: one row per model, a column per domain and the mean."""
    print(f"{'model':<6} " + " ".join(f"{d + ' bpb':>12}" for d in domains) + f" {'mean bpb':>10}")
    for name, r in rows.items():
        print(f"{name:<6} " + " ".join(f"{r[f'{d}_bpb']:>12.4f}" for d in domains) + f" {r['bpb']:>10.4f}")


class Train:
    HELP = ("fine-tune BEM on a base LM over a mix of domains (by default Python source and CPython docs prose; "
            "--data for your own)")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.epilog = config_help()
        parser.add_argument("--base", required=True, metavar="CKPT",
                            help="base LM: a run or step directory of `neurolattice lm train`")
        parser.add_argument("--data", action="append", metavar="NAME=DIR",
                            help="a domain: its name and a folder of text files (repeat, two or more; "
                                 "default: python and prose from the standard library)")
        parser.add_argument("--config", metavar="FILE.toml", help="TOML file with [bem], [data], [task], [train]")
        options.add_run_arguments(parser, "runs/bem")
        parser.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides")

    @staticmethod
    def check(args: argparse.Namespace) -> Experiment:
        options.check_run_arguments(args)
        return build_experiment(args.base, args.config, args.overrides, parse_folders(args.data))

    @staticmethod
    def run(args: argparse.Namespace, exp: Experiment) -> int:
        record = options.train_run(args, lambda: BEMModel(exp.base.model, exp.bem), exp.task, exp.train,
                                   run_config(exp.base, exp.bem, exp.data, exp.task_config))
        if record is not None:  # the main process
            heldout = None if "eval_bpb" not in record else "held-out bits per byte: " + ", ".join(
                f"{d} {record[f'eval_{d}_bpb']:.4f}" for d in exp.task.data.domains)
            options.print_trained(args.out, "bem", heldout, "generate")
        return 0


class _OnRun(cmdline.OnRun):
    CKPT_HELP = "BEM run directory or one of its step directories"

    @classmethod
    def add_options(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--base", metavar="CKPT", help="base LM (default: the one the adapters were trained on)")

    @classmethod
    def load(cls, args: argparse.Namespace) -> BEMRun:
        return load_run(args.ckpt, args.base)


class Eval(_OnRun):
    HELP = "held-out loss per domain of a BEM checkpoint, beside its base model's"

    @classmethod
    def add_options(cls, parser: argparse.ArgumentParser) -> None:
        super().add_options(parser)
        cmdline.add_json_argument(parser, 'the figures {"base": {...}, "bem": {...}}')

    @classmethod
    def load(cls, args: argparse.Namespace) -> tuple[BEMRun, BEMTask]:
        run = super().load(args)
        return run, build_task(run.base, run.bem, run.data, run.task_config)

    @staticmethod
    def run(args: argparse.Namespace, loaded: tuple[BEMRun, BEMTask]) -> int:
        run, task = loaded
        model = run.model.to(device.use(args))
        with torch.no_grad():
            result = {"bem": task.evaluate(model, progress=True)}
            result["base"] = task.evaluate(detach(model.lm), progress=True)  # the base model, as it was
        print_bpb({name: result[name] for name in ("base", "bem")}, task.data.domains)
        cmdline.write_json(args.json, result)
        return 0


class Generate(_OnRun):
    HELP = "continue a prompt with a BEM checkpoint (greedy or sampled, with the KV cache)"

    @classmethod
    def add_options(cls, parser: argparse.ArgumentParser) -> None:
        super().add_options(parser)
        options.add_sampling_arguments(parser)

    @classmethod
    def load(cls, args: argparse.Namespace) -> BEMRun:
        run = super().load(args)
        options.check_sampling(args, run.base.seq_len)
        return run

    @staticmethod
    def run(args: argparse.Namespace, run: BEMRun) -> int:
        model = run.model.to(device.setup(args))
        print(continue_prompt(model, run.base.eod_id, args.prompt, args.max_new_tokens, args.temperature,
                              args.greedy, args.seed))
        return 0
