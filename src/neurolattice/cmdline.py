"""What every system's ``commands.py`` shares: the ``--json`` option and its writer, how an
accuracy is printed, and :class:`OnRun`, the base of the commands that work on a saved run
(``eval``, ``show``, ``sample``, ``generate``).

A command (see :mod:`neurolattice.cli`) has ``HELP``, ``add_arguments(parser)``,
``check(args)`` (one-line ``ValueError`` for bad input; returns what ``run`` needs, prepared)
and ``run(args, prepared) -> int``.
"""

from __future__ import annotations

import argparse
from typing import Any

from neurolattice import device
from neurolattice.io import atomic_write_json, check_writable


def add_json_argument(parser: argparse.ArgumentParser, what: str = "the held-out figures") -> None:
    """``--json PATH``: also write ``what`` there."""
    parser.add_argument("--json", metavar="PATH", help=f"also write {what} here as JSON")


def write_json(path: str | None, result: Any) -> None:
    """Write ``result`` to ``path`` atomically and say where (nothing when ``path`` is None)."""
    if path:
        atomic_write_json(path, result)
        print(f"figures: {path}")


def check_outputs(args: argparse.Namespace) -> None:
    """One-line ``ValueError`` unless ``--out`` (a folder) and ``--json`` (a file), where the
    command has them and they are given, can be written: checked before any work."""
    if getattr(args, "out", None):
        check_writable(args.out, "--out", folder=True)
    if getattr(args, "json", None):
        check_writable(args.json, "--json", folder=False)


def percent(value: float | None) -> str:
    """An accuracy (a fraction) as every command prints it: ``97.8%``; ``n/a`` for None."""
    return "n/a" if value is None else f"{100 * value:.1f}%"


class OnRun:
    """A command on a saved run: the positional ``CKPT`` (a run directory or one of its step
    directories), ``--device`` and ``--threads``, then the command's own options
    (:meth:`add_options`). :meth:`check` loads the run (one-line errors for a missing, corrupt or
    foreign checkpoint) with :meth:`load` and returns it; ``run`` gets it."""

    HELP = ""
    CKPT_HELP = "run directory or one of its step directories"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("ckpt", metavar="CKPT", help=cls.CKPT_HELP)
        device.add_device_arguments(parser)
        cls.add_options(parser)

    @classmethod
    def add_options(cls, parser: argparse.ArgumentParser) -> None:
        """The command's options after ``CKPT``, ``--device`` and ``--threads``."""

    @classmethod
    def check(cls, args: argparse.Namespace) -> Any:
        device.check_arguments(args)
        check_outputs(args)
        return cls.load(args)

    @classmethod
    def load(cls, args: argparse.Namespace) -> Any:
        """The saved run ``args.ckpt`` (and whatever else the command needs), loaded and checked."""
        raise NotImplementedError
