"""``neurolattice bem experiment``: the two-domain study.

The base is an LM trained by the LM system on its default corpus (``--base``). Every method
fine-tunes a fresh copy of it for the same steps on the same balanced mix of Python source and
English prose (:mod:`neurolattice.bem.data`), with the base frozen, and is scored on each
domain's held-out text:

* ``base``: no fine-tuning.
* ``lora``: a static LoRA (PEFT, rank ``r``, ``lora_alpha`` = BEM's ``alpha``, no dropout) on
  the same modules BEM attaches to.
* ``bem-<level>``: BEM of rank ``r`` at each routing level, trained end to end
  (:class:`~neurolattice.bem.train.BEMTask`).
* ``bem-imitation``: two static LoRAs of rank ``r / 2``, each trained on one domain alone for
  the same steps, stacked into a BEM of rank ``r`` (:func:`~neurolattice.bem.train.stack_experts`);
  only the controller then trains, to output each row's expert code (expert imitation), at
  the prefix level.

It prints a table (held-out bits per byte per domain, trainable parameters) and writes the rows
as JSON (``--json``) with the machine.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from neurolattice.bench.harness import machine_info
from neurolattice.bench.report import Column, Table, format_machine, write_results
from neurolattice.lm.data import PackedDataset
from neurolattice.train import Task, TrainConfig, Trainer, seed_everything

from .attach import bem_parameters, target_levels
from .config import BEMConfig
from .data import DOMAINS, DomainData, DomainDataConfig
from .experiment import Base
from .peers import lora_weights, static_lora
from .train import BEMModel, BEMTask, TaskConfig, imitation_loss, stack_experts

HELP = "two-domain fine-tune (Python + prose): base vs static LoRA (PEFT) vs BEM, held-out loss per domain"
LEVELS = ("token", "chunk", "prefix")
COLUMNS = [Column("method", "method", 14, align="<"), Column("level", "level", 7, align="<"),
           Column("trainable_params", "trainable", 10, lambda v: f"{v:,}"),
           *(Column(f"{d}_bpb", f"{d} bpb", 10, lambda v: f"{v:.4f}") for d in DOMAINS),
           Column("mean_bpb", "mean bpb", 9, lambda v: f"{v:.4f}"), Column("minutes", "min", 5, lambda v: f"{v:.1f}")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, metavar="CKPT",
                        help="base LM: a run or step directory of `neurolattice lm train`")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of every fine-tune (default: 200)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per step (default: 16)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: 2e-3)")
    parser.add_argument("--rank", type=int, default=8, help="adapter rank r (default: 8)")
    parser.add_argument("--levels", default=",".join(LEVELS), help="BEM levels to run (default: %(default)s)")
    parser.add_argument("--no-imitation", action="store_true", help="skip the expert-imitation row")
    parser.add_argument("--train-bytes", type=int, default=DomainDataConfig.train_bytes,
                        help="training text per domain, bytes (default: %(default)s)")
    parser.add_argument("--heldout-bytes", type=int, default=DomainDataConfig.heldout_bytes,
                        help="held-out text per domain, bytes (default: %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="write the rows here (with the machine)")


@dataclass
class Study:
    """What the study runs on: the base, the two domains' rows, the training config of every
    method, the BEM levels."""

    base: Base
    data: DomainData
    train: TrainConfig
    levels: list[str]


def check(args: argparse.Namespace) -> Study:
    levels = [level.strip() for level in args.levels.split(",") if level.strip()]
    unknown = [level for level in levels if level not in LEVELS]
    if unknown:
        raise ValueError(f"--levels: unknown level {unknown[0]!r}; known: {list(LEVELS)}")
    if args.rank < 2 or args.rank % 2:
        raise ValueError(f"--rank must be an even integer >= 2 (imitation stacks two experts of rank r/2), "
                         f"got {args.rank}")
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=min(20, args.steps),
                             weight_decay=0.0, eval_every=0, log_every=max(1, args.steps // 10))
    base = Base.load(args.base)
    data_cfg = DomainDataConfig(train_bytes=args.train_bytes, heldout_bytes=args.heldout_bytes)
    return Study(base, base.domains(data_cfg), train, levels)


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fine_tune(model: nn.Module, task: Task, cfg: TrainConfig) -> dict[str, float]:
    """Train with the shared trainer (no checkpoints); the held-out figures of the end."""
    seed_everything(cfg.seed)
    record = Trainer(model, task, cfg).fit()
    return {k.removeprefix("eval_"): v for k, v in record.items() if k.startswith("eval_")}


class ImitationTask(Task):
    """Train the controller to give each row its domain's expert code (MSE on the codes)."""

    def __init__(self, data: DomainData, target: torch.Tensor) -> None:
        self.target = target  # [E, S, r]
        self.train_data = TensorDataset(data.train[:][0], data.train_domain)  # batch: (inputs, domains)

    def count_targets(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return len(batch[0])

    def loss_sum(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                 grad_checkpointing: bool = False) -> torch.Tensor:
        inputs, domain = batch
        target = self.target.to(inputs.device)[domain]
        return len(inputs) * imitation_loss(model, inputs, torch.ones_like(inputs), target)


def run(args: argparse.Namespace, study: Study) -> int:
    base, data, cfg, rank = study.base.model, study.data, study.train, args.rank
    bem_defaults = BEMConfig(rank=rank)
    eval_task = BEMTask(data, None, TaskConfig())
    rows: list[dict[str, Any]] = []
    table = Table(COLUMNS)
    print(f"base {study.base.path}; {len(data.train)} training rows of {data.seq_len} tokens "
          f"({', '.join(f'{d}: {len(data.heldout[d])} held-out rows' for d in DOMAINS)}); "
          f"{cfg.steps} steps of {cfg.batch_size} rows per method")

    def add(method: str, level: str, figures: dict[str, float], started: float, params: int) -> None:
        row = {"method": method, "level": level, "rank": rank, "trainable_params": params,
               **{f"{d}_{k}": figures[f"{d}_{k}"] for d in DOMAINS for k in ("bpb", "loss")},
               "mean_bpb": figures["bpb"], "minutes": (time.monotonic() - started) / 60}
        rows.append(row)
        print(table.row(row), flush=True)

    print(table.header())
    started = time.monotonic()
    with torch.no_grad():
        add("base", "-", eval_task.evaluate(base.eval()), started, 0)

    targets = list(target_levels(base, bem_defaults))  # PEFT's target_modules: the modules BEM wraps
    started = time.monotonic()
    seed_everything(cfg.seed)  # every adapter's initialisation from the same seed, run after run
    lora = static_lora(base, rank, bem_defaults.alpha, targets)
    add("lora (peft)", "-", fine_tune(lora, eval_task, cfg), started, trainable(lora))

    for level in study.levels:
        started = time.monotonic()
        bem_cfg = BEMConfig(rank=rank, level=level)
        seed_everything(cfg.seed)
        model = BEMModel(copy.deepcopy(base), bem_cfg)
        add(f"bem-{level}", level, fine_tune(model, BEMTask(data, bem_cfg), cfg), started, trainable(model))

    if not args.no_imitation:
        started = time.monotonic()
        experts, expert_params = [], 0
        for d in range(len(DOMAINS)):
            seed_everything(cfg.seed + d)
            expert = static_lora(base, rank // 2, bem_defaults.alpha / 2, targets)
            task = BEMTask(data, None, TaskConfig())
            task.train_data = PackedDataset(data.train.rows[data.train_domain == d])
            fine_tune(expert, task, cfg)
            experts.append(lora_weights(expert))
            expert_params += trainable(expert)
        # Each expert's scaling is (alpha / 2) / (r / 2) = alpha / r, BEM's own scaling. The
        # domain is a property of the row: route at the prefix level (a token code from a
        # byte's input embedding alone cannot know which domain the byte is in).
        bem_cfg = BEMConfig(rank=rank, level="prefix")
        seed_everything(cfg.seed)
        model = BEMModel(copy.deepcopy(base), bem_cfg)
        target = stack_experts(model, experts, bem_cfg.alpha / rank)
        for p in bem_parameters(model.lm)["adapters"]:  # the experts stay as trained
            p.requires_grad_(False)
        controller_params = trainable(model)
        Trainer(model, ImitationTask(data, target), cfg).fit()
        with torch.no_grad():
            figures = eval_task.evaluate(model.eval())
        add("bem-imitation", bem_cfg.level, figures, started, expert_params + controller_params)

    if args.json:
        print(f"figures: {write_results(args.json, rows, machine_info('cpu'))}")
    print(format_machine(machine_info("cpu")))
    return 0
