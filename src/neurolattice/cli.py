"""Command line: ``neurolattice SYSTEM COMMAND [options]``, e.g. ``neurolattice lattice bench``.

Each system is a subparser and each of its commands a subparser under it, defined by a
module or class with ``HELP`` (one line), ``add_arguments(parser)``, ``check(args)`` (a one-line
``ValueError`` for bad input; returns what the command needs, prepared) and
``run(args, prepared) -> int`` (see :mod:`neurolattice.cmdline`). A ``ValueError`` (bad input,
also when found during the work) exits with status 2 and one line after the usage; a
:class:`~neurolattice.io.RunError` (a full disk, a locked run folder, an interrupted training)
with its status and one line; ``NEUROLATTICE_TRACEBACK=1`` shows the traceback instead.
Adding a command or a system is one entry in :data:`SYSTEMS`.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from neurolattice import __version__
from neurolattice.io import RunError

# Set (to anything) to see the traceback behind a one-line error.
TRACEBACK_ENV = "NEUROLATTICE_TRACEBACK"

# system -> (help, {command: "module" or "module:attribute", a thing with HELP, add_arguments,
# check and run}). Only the invoked system's commands are imported: the LM's pull in
# transformers, which the lattice's commands do not need.
SYSTEMS: dict[str, tuple[str, dict[str, str]]] = {
    "lattice": ("the 3D lattice MoE network", {
        "train": "neurolattice.lattice.commands:Train", "eval": "neurolattice.lattice.commands:Eval",
        "show": "neurolattice.lattice.commands:Show", "bench": "neurolattice.lattice.bench:COMMAND",
        "bench-train": "neurolattice.lattice.bench_train:COMMAND",
        "bench-dist": "neurolattice.lattice.bench_dist:COMMAND",
    }),
    "lm": ("a small decoder LM trained data-parallel", {
        "train": "neurolattice.lm.commands:Train", "eval": "neurolattice.lm.commands:Eval",
        "sample": "neurolattice.lm.commands:Sample", "bench": "neurolattice.lm.bench:COMMAND",
    }),
    "bem": ("routed low-rank adapters (BEM) for Hugging Face causal LMs", {
        "train": "neurolattice.bem.commands:Train", "eval": "neurolattice.bem.commands:Eval",
        "generate": "neurolattice.bem.commands:Generate", "experiment": "neurolattice.bem.study",
        "bench": "neurolattice.bem.bench:COMMAND",
    }),
    "neurograph": ("the discrete phase-signal graph", {
        "train": "neurolattice.neurograph.commands:Train", "eval": "neurolattice.neurograph.commands:Eval",
        "show": "neurolattice.neurograph.commands:Show", "bench": "neurolattice.neurograph.bench:COMMAND",
    }),
}


def load_command(target: str) -> Any:
    """The command object named by ``"module"`` or ``"module:attribute"``."""
    module, _, attribute = target.partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attribute) if attribute else loaded


def build_parser(system: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the commands of ``system`` (the one being invoked) loaded."""
    parser = argparse.ArgumentParser(prog="neurolattice", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    systems = parser.add_subparsers(dest="system", required=True, metavar="SYSTEM")
    for name, (system_help, commands) in SYSTEMS.items():
        system_parser = systems.add_parser(name, help=system_help, description=system_help)
        subparsers = system_parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
        for command_name, target in commands.items() if name == system else ():
            module = load_command(target)
            command = subparsers.add_parser(command_name, help=module.HELP, description=module.HELP)
            module.add_arguments(command)
            command.set_defaults(command_module=module, command_parser=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``neurolattice`` script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    system = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(system).parse_args(argv)
    try:
        prepared = args.command_module.check(args)
        return args.command_module.run(args, prepared)
    except ValueError as err:  # bad input, found before or during the work
        if os.environ.get(TRACEBACK_ENV):
            raise
        args.command_parser.error(str(err))   # prints the usage and the message, exits with 2
    except RunError as err:    # a failure of the run itself: one line, what is left
        if os.environ.get(TRACEBACK_ENV):
            raise
        print(f"{args.command_parser.prog}: error: {err}", file=sys.stderr)
        return err.status
    except OSError as err:     # what no writer turned into a RunError: a full disk, a folder gone
        if os.environ.get(TRACEBACK_ENV) or err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        print(f"{args.command_parser.prog}: error: {err.strerror}: {err.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # one that no trainer turned into a RunError (nothing to save)
        print(f"{args.command_parser.prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    from neurolattice.train.distributed import exit_process

    exit_process(main())
