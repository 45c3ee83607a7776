"""``neurolattice bem train | eval | generate``: fine-tune BEM on a base LM, score it per
domain, continue a prompt with it.

The base model is an LM trained by the LM system (``neurolattice lm train``: a run directory
or one of its step directories). A BEM run directory (``--out``) holds step directories whose
``model.safetensors`` has the BEM tensors only (controller, U, V) and whose
``run_config.json`` names the base (its path and :func:`~neurolattice.bem.train.base_fingerprint`):
loading adapters onto another base model is refused with one line.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neurolattice.config import config_from_dict, config_to_dict, layered_config, sections_help
from neurolattice.io import atomic_write_json
from neurolattice.lm.commands import add_sampling_arguments, check_sampling, continue_prompt
from neurolattice.lm.commands import load_run as load_lm_run
from neurolattice.train import (
    TrainConfig,
    Trainer,
    distributed,
    load_checkpoint,
    read_config,
    resolve_checkpoint,
    seed_everything,
)
from neurolattice.train.options import add_run_arguments, check_run_arguments, deadline

from .attach import detach
from .config import BEMConfig
from .data import DOMAINS, DomainDataConfig, load_domain_data
from .train import BEMModel, BEMTask, TaskConfig, base_fingerprint

SECTIONS = ("bem", "data", "task", "train")
# Fine-tuning defaults (a few minutes on a CPU for the LM system's tiny preset).
DEFAULTS: dict[str, dict[str, Any]] = {
    "train": {"steps": 300, "batch_size": 16, "lr": 2e-3, "warmup_steps": 20, "weight_decay": 0.0,
              "eval_every": 100, "checkpoint_every": 100, "log_every": 10},
}


@dataclass
class Base:
    """A base LM of the LM system, loaded: where from, its fingerprint, the model (eval, CPU)."""

    path: str
    fingerprint: str
    model: torch.nn.Module
    seq_len: int
    eod_id: int
    heldout_fraction: float
    seed: int

    @classmethod
    def load(cls, path: str | Path) -> Base:
        lm, data, model = load_lm_run(path)
        return cls(str(resolve_checkpoint(path).resolve()), base_fingerprint(model), model, lm.seq_len,
                   lm.eod_id, data.heldout_fraction, data.seed)

    def record(self) -> dict[str, Any]:
        return {"path": self.path, "fingerprint": self.fingerprint}


def build_configs(config_file: str | None = None, overrides: list[str] = ()
                  ) -> tuple[BEMConfig, DomainDataConfig, TaskConfig, TrainConfig]:
    """:data:`DEFAULTS`, the TOML file, then the overrides (later wins); unknown keys are
    one-line ``ValueError``s."""
    layers, _ = layered_config(SECTIONS, DEFAULTS, config_file, overrides)
    return (config_from_dict(BEMConfig, layers["bem"]), config_from_dict(DomainDataConfig, layers["data"]),
            config_from_dict(TaskConfig, layers["task"]), TrainConfig.from_dict(layers["train"]))


def load_bem_run(path: str | Path, base_path: str | None = None) -> tuple[dict[str, Any], Base, BEMModel]:
    """A BEM checkpoint on its base model (``base_path``, default: the one it was trained on):
    the saved config, the base and the model (eval mode)."""
    ckpt = resolve_checkpoint(path)
    saved = read_config(ckpt).get("model", {})
    if not {"base", "bem", "data", "task"} <= saved.keys():
        raise ValueError(f"{ckpt} is not a BEM checkpoint (its run_config.json has no base/bem/data/task)")
    base = Base.load(base_path or saved["base"]["path"])
    if base.fingerprint != saved["base"]["fingerprint"]:
        raise ValueError(f"{ckpt} holds adapters for another base model: fingerprint {saved['base']['fingerprint']} "
                         f"({saved['base']['path']}), but {base.path} is {base.fingerprint}")
    model = BEMModel(base.model, config_from_dict(BEMConfig, saved["bem"]))
    load_checkpoint(ckpt, model)
    return saved, base, model.eval()


def saved_task(saved: dict[str, Any], base: Base) -> BEMTask:
    """The task of a BEM run (its saved configs), with the held-out text of both domains."""
    data = config_from_dict(DomainDataConfig, saved["data"])
    domains = load_domain_data(data, data.seq_len or base.seq_len, base.heldout_fraction, base.seed)
    return BEMTask(domains, config_from_dict(BEMConfig, saved["bem"]), config_from_dict(TaskConfig, saved["task"]))


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
        add_run_arguments(parser, "runs/bem")
        parser.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides")

    @staticmethod
    def check(args: argparse.Namespace) -> None:
        check_run_arguments(args)
        args.configs = build_configs(args.config, args.overrides)
        bem, data, task_cfg, _ = args.configs
        args.base = Base.load(args.base)
        data.seq_len = data.seq_len or args.base.seq_len
        if data.seq_len > args.base.seq_len:
            raise ValueError(f"data.seq_len {data.seq_len} exceeds the base model's {args.base.seq_len} positions")
        domains = load_domain_data(data, data.seq_len, args.base.heldout_fraction, args.base.seed)
        args.task = BEMTask(domains, bem, task_cfg)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        with distributed.init_from_env() as device:
            _train(args, device)
        return 0


def _train(args: argparse.Namespace, device: torch.device) -> None:
    stop_at = deadline(args)
    bem, data, task_cfg, train = args.configs
    out = Path(args.out)
    seed_everything(train.seed)
    model = BEMModel(args.base.model, bem).to(device)
    run_config = {"base": args.base.record(), "bem": config_to_dict(bem), "data": config_to_dict(data),
                  "task": config_to_dict(task_cfg)}
    try:
        trainer = Trainer(model, args.task, train, out_dir=out, model_config=run_config)
        if args.resume:
            trainer.resume()
    except ValueError as err:
        args.command_parser.error(str(err))
    record = trainer.fit(deadline=stop_at)
    if distributed.is_main():
        if trainer.step < train.steps:
            print(f"stopped at step {trainer.step} of {train.steps}: --max-minutes {args.max_minutes} ran out")
        if "eval_bpb" in record:
            print("held-out bits per byte: " + ", ".join(f"{d} {record[f'eval_{d}_bpb']:.4f}" for d in DOMAINS))
        print(f"checkpoint: {resolve_checkpoint(out)}")
        print(f"next: neurolattice bem eval {out}   |   neurolattice bem generate {out} --prompt TEXT")


class Eval:
    HELP = "held-out loss per domain of a BEM checkpoint, beside its base model's"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("ckpt", metavar="CKPT", help="BEM run directory or one of its step directories")
        parser.add_argument("--base", metavar="CKPT", help="base LM (default: the one the adapters were trained on)")
        parser.add_argument("--json", metavar="PATH", help='also write {"base": {...}, "bem": {...}} here')

    @staticmethod
    def check(args: argparse.Namespace) -> None:
        saved, base, args.model = load_bem_run(args.ckpt, args.base)
        args.task = saved_task(saved, base)

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
        add_sampling_arguments(parser)

    @staticmethod
    def check(args: argparse.Namespace) -> None:
        _, args.base_run, args.model = load_bem_run(args.ckpt, args.base)
        check_sampling(args, args.base_run.seq_len)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        print(continue_prompt(args.model, args.base_run.eod_id, args))
        return 0
