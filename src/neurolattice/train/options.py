"""The command line the training commands share: the options of a training run (the run
directory, a time budget, resuming; every system's ``train``), training with them on one model
(:func:`train_run`, the LM and BEM), and the options of continuing a prompt."""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neurolattice import cmdline, device
from neurolattice.io import FolderLock, atomic_write_json

from . import distributed
from .checkpoint import repair_run, resolve_checkpoint
from .trainer import Task, TrainConfig, Trainer, seed_everything


def add_run_arguments(parser: argparse.ArgumentParser, default_out: str,
                      stops_at: str = "the first logging step") -> None:
    """``--out DIR``, ``--max-minutes M`` (it stops the run at ``stops_at`` after M minutes),
    ``--resume``, ``--device`` and ``--threads``."""
    parser.add_argument("--out", default=default_out, help="run directory (default: %(default)s)")
    parser.add_argument("--max-minutes", type=float, metavar="M",
                        help=f"stop, with a checkpoint, at {stops_at} after M minutes")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    device.add_device_arguments(parser)


def check_run_arguments(args: argparse.Namespace) -> None:
    """One-line ``ValueError`` for a bad ``--device`` or ``--threads``, a negative budget,
    ``--resume`` without a run in ``--out``, a new run over an existing one, or an ``--out``
    (or ``--json``, where the command has it) that cannot be written."""
    device.check_arguments(args)
    cmdline.check_outputs(args)
    if args.max_minutes is not None and not args.max_minutes >= 0:
        raise ValueError(f"--max-minutes must be >= 0, got {args.max_minutes}")
    check_out(args.out, args.resume)


@contextlib.contextmanager
def run_folder(out: str, resume: bool | None) -> Iterator[None]:
    """Hold ``out`` for the run inside: its :class:`~neurolattice.io.FolderLock` (a second
    process writing there gets one line); under the lock, repair what a crash left
    (:func:`~neurolattice.train.checkpoint.repair_run`, saying what in one line), then
    :func:`check_out` again (the first check ran before the lock; this one decides)."""
    with FolderLock(out):
        nested = {p.parent for p in Path(out).glob("*/*step-*")}  # a run inside the run: the lattice's T0/
        for run in (Path(out), *sorted(nested)):
            repaired = repair_run(run)
            if repaired:
                print(repaired, flush=True)
        check_out(out, resume)
        yield


def main_holds(out: str, resume: bool | None) -> contextlib.AbstractContextManager:
    """:func:`run_folder` on the main process, nothing on the others: under ``torchrun`` rank 0
    alone locks, repairs and writes ``out``. The others reach the run's files only after the
    first collective of building the model (DDP's broadcast, a sharded lattice's assembly),
    which rank 0 enters after the repair."""
    return run_folder(out, resume) if distributed.is_main() else contextlib.nullcontext()


def check_out(out: str, resume: bool | None = False) -> None:
    """One-line ``ValueError`` unless ``--out`` is free for a new run (``resume`` False), holds one
    to continue (True); None: the command cannot resume, so it says only "choose another"."""
    has_run = (Path(out) / "latest").exists()
    if resume and not has_run:
        raise ValueError(f"--resume: {out} holds no run to continue")
    if not resume and has_run:
        hint = "choose another --out" if resume is None else "pass --resume, or choose another --out"
        raise ValueError(f"{out} already holds a run: {hint}")


def deadline(args: argparse.Namespace) -> float | None:
    """The ``time.monotonic()`` at which ``--max-minutes`` runs out (None: no budget)."""
    return None if args.max_minutes is None else time.monotonic() + 60 * args.max_minutes


def stopped(args: argparse.Namespace, step: int, steps: int) -> str:
    """What a ``train`` stopped by ``--max-minutes`` says: where it stopped."""
    return f"stopped at step {step} of {steps}: --max-minutes {args.max_minutes} ran out"


def train_run(args: argparse.Namespace, build: Callable[[], nn.Module], task: Task, train: TrainConfig,
              model_config: dict[str, Any], records: dict[str, Any] | None = None) -> dict[str, float] | None:
    """Train the model ``build()`` makes (after seeding with ``train.seed``) on ``task`` into
    ``--out`` with the shared trainer, alone or on the ranks ``torchrun`` started; ``--resume``
    continues the run there and ``--max-minutes`` stops it with a checkpoint. The main process
    holds ``--out`` (:func:`run_folder`), writes ``records`` (file name -> JSON) into it before
    training and says where the budget stopped it. A ``ValueError`` of the trainer (a batch the
    ranks do not divide, a resumed run of another config) reaches the command line: one line.

    ``--device`` and ``--threads`` say where: on CUDA each rank takes GPU ``LOCAL_RANK``.

    Returns the last logged record on the main process, None on the others (which print nothing).
    """
    kind = device.setup(args).type
    with distributed.init_from_env(kind) as here:
        if distributed.is_main():
            print(f"device: {device.describe(here)}, {distributed.world_size()} process(es)", flush=True)
        # In a function of its own, so the trainer and its DDP wrapper are freed before the
        # process group is destroyed (freeing them after can hang gloo at exit).
        return _train(args, build, task, train, model_config, records or {}, here)


def _train(args: argparse.Namespace, build: Callable[[], nn.Module], task: Task, train: TrainConfig,
           model_config: dict[str, Any], records: dict[str, Any], here: torch.device) -> dict[str, float] | None:
    stop_at = deadline(args)
    out = Path(args.out)
    with main_holds(args.out, args.resume):
        seed_everything(train.seed)
        trainer = Trainer(build().to(here), task, train, out_dir=out, model_config=model_config)
        if args.resume:
            trainer.resume()
        if distributed.is_main():
            for name, value in records.items():
                atomic_write_json(out / name, value)
        record = trainer.fit(deadline=stop_at)
    if not distributed.is_main():
        return None
    if trainer.step < train.steps:
        print(stopped(args, trainer.step, train.steps))
    return record


def print_trained(out: str, system: str, heldout: str | None, then: str) -> None:
    """What a finished ``train`` prints on the main process: the ``heldout`` line (if any), the
    checkpoint, and the commands to run next: ``eval`` and ``then`` (e.g. ``"sample"``)."""
    if heldout:
        print(heldout)
    print(f"checkpoint: {resolve_checkpoint(out)}")
    print(f"next: neurolattice {system} eval {out}   |   neurolattice {system} {then} {out} --prompt TEXT")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """``--prompt``, ``--max-new-tokens``, ``--temperature``, ``--greedy``, ``--seed``."""
    parser.add_argument("--prompt", required=True, help="text to continue (it starts a document)")
    parser.add_argument("--max-new-tokens", type=int, metavar="N",
                        help="bytes to generate at most (default: the rest of the model's context)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default: 0.8)")
    parser.add_argument("--greedy", action="store_true", help="take the most likely byte (no sampling)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")


def check_sampling(args: argparse.Namespace, seq_len: int) -> None:
    """One-line ``ValueError`` unless the temperature is positive and the prompt (an
    end-of-document token, then one token per byte) plus ``--max-new-tokens`` (default: all the
    room left) fit in ``seq_len`` tokens."""
    if not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    context = 1 + len(args.prompt.encode("utf-8"))  # end-of-document, then the prompt
    room = seq_len - context
    args.max_new_tokens = room if args.max_new_tokens is None else args.max_new_tokens
    if not 1 <= args.max_new_tokens <= room:
        raise ValueError(f"the prompt ({context - 1} bytes) + --max-new-tokens {args.max_new_tokens} must fit "
                         f"in the model's context of {seq_len} tokens, with at least 1 new token")
