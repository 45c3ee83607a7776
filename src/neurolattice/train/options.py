"""The command-line options every training command shares: the run directory, a time budget
and resuming."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_run_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    """``--out DIR``, ``--max-minutes M`` and ``--resume``."""
    parser.add_argument("--out", default=default_out, help="run directory (default: %(default)s)")
    parser.add_argument("--max-minutes", type=float, metavar="M",
                        help="stop, with a checkpoint, at the first logging step after M minutes")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")


def check_run_arguments(args: argparse.Namespace) -> None:
    """One-line ``ValueError`` for a negative budget, ``--resume`` without a run in ``--out``, or a
    new run over an existing one."""
    if args.max_minutes is not None and not args.max_minutes >= 0:
        raise ValueError(f"--max-minutes must be >= 0, got {args.max_minutes}")
    has_run = (Path(args.out) / "latest").exists()
    if args.resume and not has_run:
        raise ValueError(f"--resume: {args.out} holds no run to continue")
    if not args.resume and has_run:
        raise ValueError(f"{args.out} already holds a run: pass --resume, or choose another --out")


def deadline(args: argparse.Namespace) -> float | None:
    """The ``time.monotonic()`` at which ``--max-minutes`` runs out (None: no budget)."""
    return None if args.max_minutes is None else time.monotonic() + 60 * args.max_minutes
