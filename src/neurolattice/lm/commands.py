"""``neurolattice lm train | eval | sample``: train the LM data-parallel, score it in held-out
bits per byte, continue a prompt.

A run directory (``--out``) holds the checkpoints, ``metrics.jsonl`` and
``heldout_files.json`` (the files that never train). Each step directory is also a
``save_pretrained`` directory (see :mod:`neurolattice.train.checkpoint`); its
``run_config.json`` records the model and data configs, so ``eval`` rebuilds the held-out set
from it. ``train`` runs alone or under ``torchrun``, e.g.
``torchrun --nproc_per_node 2 -m neurolattice.cli lm train --out runs/lm``.

Each command has the shape :mod:`neurolattice.cli` expects: ``HELP``, ``add_arguments``,
``check`` (one-line ``ValueError``) and ``run``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from neurolattice.config import config_from_dict, config_to_dict, layered_config, sections_help
from neurolattice.io import atomic_write_json
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

from .config import PRESETS, LMConfig
from .data import ByteTokenizer, LMData, load_lm_data
from .model import build_model
from .task import LMTask

SECTIONS = ("model", "data", "train")
# Training defaults for the LM (a 32 x 256-byte batch suits the tiny preset); every value can
# be overridden by a TOML file with these tables or by SECTION.KEY=VALUE.
DEFAULTS: dict[str, dict[str, Any]] = {
    "train": {"steps": 2000, "batch_size": 32, "lr": 3e-3, "warmup_steps": 100, "weight_decay": 0.1,
              "eval_every": 250, "checkpoint_every": 250, "log_every": 10},
}
HELDOUT_FILES = "heldout_files.json"


@dataclass
class DataConfig:
    """The text the model trains on and how it is split and cut (see :func:`.load_lm_data`)."""

    folder: str | None = field(
        default=None, metadata={"help": "folder of text files (--data; default: the Python standard library)"}
    )
    seq_len: int | None = field(default=None, metadata={"help": "tokens per sequence (default: model.seq_len)"})
    heldout_fraction: float = field(default=0.1, metadata={"help": "fraction of the files held out"})
    seed: int = field(default=0, metadata={"help": "seed of the split by file"})
    max_bytes: int | None = field(default=None, metadata={"help": "cap on the text read (default: all of it)"})

    def __post_init__(self) -> None:
        if self.seq_len is not None and (not isinstance(self.seq_len, int) or isinstance(self.seq_len, bool)
                                         or self.seq_len < 1):
            raise ValueError(f"seq_len must be a positive integer, got {self.seq_len!r}")

    def load(self) -> LMData:
        return load_lm_data(self.folder, self.seq_len, self.heldout_fraction, self.seed, self.max_bytes)


def build_configs(preset: str, data_dir: str | None = None, config_file: str | None = None,
                  overrides: list[str] = ()) -> tuple[LMConfig, DataConfig, TrainConfig]:
    """The preset, :data:`DEFAULTS`, the TOML file, then the overrides (later wins); ``data_dir``
    sets ``data.folder``. Unknown keys and a ``data.seq_len`` above ``model.seq_len`` are
    one-line ``ValueError``s."""
    layers, user = layered_config(SECTIONS, DEFAULTS, config_file, overrides)
    lm = LMConfig.preset(preset, **layers["model"])
    if data_dir is not None:
        layers["data"]["folder"] = data_dir
    data = config_from_dict(DataConfig, layers["data"])
    if data.folder is not None:
        data.folder = str(Path(data.folder).resolve())
    data.seq_len = data.seq_len or lm.seq_len
    if data.seq_len > lm.seq_len:
        raise ValueError(f"data.seq_len {data.seq_len} exceeds the model's maximum positions "
                         f"model.seq_len = {lm.seq_len}")
    return lm, data, TrainConfig.from_dict(layers["train"])


def run_config(lm: LMConfig, data: DataConfig) -> dict[str, Any]:
    """What the trainer saves under ``"model"`` in ``run_config.json`` (and checks on resume)."""
    return {"model": lm.to_dict(), "data": config_to_dict(data)}


def load_run(path: str | Path) -> tuple[LMConfig, DataConfig, torch.nn.Module]:
    """The configs and the trained model (eval mode, CPU) of a run or step directory."""
    ckpt = resolve_checkpoint(path)
    saved = read_config(ckpt)
    try:
        lm = LMConfig.from_dict(saved["model"]["model"])
        data = config_from_dict(DataConfig, saved["model"]["data"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{ckpt} is not an LM checkpoint (run_config.json lacks {err})") from None
    model = build_model(lm)
    load_checkpoint(ckpt, model)
    return lm, data, model.eval()


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
        add_run_arguments(parser, "runs/lm")
        parser.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides")

    @staticmethod
    def check(args: argparse.Namespace) -> None:
        check_run_arguments(args)
        args.configs = build_configs(args.preset, args.data, args.config, args.overrides)
        lm, data, _ = args.configs
        args.task = LMTask(data.load(), lm)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        with distributed.init_from_env() as device:
            # In a function of its own, so the trainer and its DDP wrapper are freed before the
            # process group is destroyed (freeing them after can hang gloo at exit).
            _train(args, device)
        return 0


def _train(args: argparse.Namespace, device: torch.device) -> None:
    stop_at = deadline(args)
    lm, data, train = args.configs
    out = Path(args.out)
    seed_everything(train.seed)
    model = build_model(lm).to(device)
    try:  # the batch split over the ranks, the resumed run's config
        trainer = Trainer(model, args.task, train, out_dir=out, model_config=run_config(lm, data))
        if args.resume:
            trainer.resume()
    except ValueError as err:
        args.command_parser.error(str(err))
    if distributed.is_main():
        atomic_write_json(out / HELDOUT_FILES, args.task.data.heldout_files)
    record = trainer.fit(deadline=stop_at)
    if distributed.is_main():
        if trainer.step < train.steps:
            print(f"stopped at step {trainer.step} of {train.steps}: --max-minutes {args.max_minutes} ran out")
        if "eval_bpb" in record:
            print(f"held-out bits per byte: {record['eval_bpb']:.4f}")
        print(f"checkpoint: {resolve_checkpoint(out)}")
        print(f"next: neurolattice lm eval {out}   |   neurolattice lm sample {out} --prompt TEXT")


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
        add_sampling_arguments(parser)

    @staticmethod
    def check(args: argparse.Namespace) -> None:
        args.lm, _, args.model = load_run(args.ckpt)
        check_sampling(args, args.lm.seq_len)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        print(continue_prompt(args.model, args.lm.eod_id, args))
        return 0


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """``--prompt``, ``--max-new-tokens``, ``--temperature``, ``--greedy``, ``--seed``."""
    parser.add_argument("--prompt", required=True, help="text to continue (it starts a document)")
    parser.add_argument("--max-new-tokens", type=int, metavar="N",
                        help="bytes to generate at most (default: the rest of the model's context)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default: 0.8)")
    parser.add_argument("--greedy", action="store_true", help="take the most likely byte (no sampling)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")


def check_sampling(args: argparse.Namespace, seq_len: int) -> None:
    """One-line ``ValueError`` unless the temperature is positive and the prompt plus
    ``--max-new-tokens`` (default: all the room left) fit in ``seq_len`` tokens."""
    if not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    context = 1 + len(args.prompt.encode("utf-8"))  # end-of-document, then the prompt
    room = seq_len - context
    args.max_new_tokens = room if args.max_new_tokens is None else args.max_new_tokens
    if not 1 <= args.max_new_tokens <= room:
        raise ValueError(f"the prompt ({context - 1} bytes) + --max-new-tokens {args.max_new_tokens} must fit "
                         f"in the model's context of {seq_len} tokens, with at least 1 new token")


def continue_prompt(model: torch.nn.Module, eod: int, args: argparse.Namespace) -> str:
    """The prompt and its continuation by ``model.generate`` (byte tokens, KV cache), as
    :func:`add_sampling_arguments` asked."""
    tokenizer = ByteTokenizer()
    ids = torch.cat([torch.tensor([eod]), tokenizer.encode(args.prompt)])[None]  # (1, T)
    sampling = {"do_sample": False} if args.greedy else {
        "do_sample": True, "temperature": args.temperature, "top_k": 0}
    torch.manual_seed(args.seed)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), eos_token_id=eod,
                             pad_token_id=eod, max_new_tokens=args.max_new_tokens, **sampling)
    return args.prompt + tokenizer.decode(out[0, ids.shape[1]:])
