"""Command line: ``neurolattice SYSTEM COMMAND [options]``, e.g. ``neurolattice lattice bench``.

Each system is a subparser and each of its commands a subparser under it, defined by a
module with ``HELP`` (one line), ``add_arguments(parser)``, ``check(args)`` (a one-line
``ValueError`` for bad input) and ``run(args) -> int``. Adding a command or a system is one
entry in :data:`SYSTEMS`. Bad input exits with status 2 and that one line after the usage.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from neurolattice import __version__
from neurolattice.lattice import bench as lattice_bench
from neurolattice.lattice import bench_train as lattice_bench_train
from neurolattice.lattice import commands as lattice_commands
from neurolattice.lm import bench as lm_bench
from neurolattice.lm import commands as lm_commands

# system -> (help, {command: module or class with HELP, add_arguments, check, run})
SYSTEMS: dict[str, tuple[str, dict[str, Any]]] = {
    "lattice": ("the 3D lattice MoE network", {
        "train": lattice_commands.Train, "eval": lattice_commands.Eval,
        "show": lattice_commands.Show, "bench": lattice_bench, "bench-train": lattice_bench_train,
    }),
    "lm": ("a small decoder LM trained data-parallel", {
        "train": lm_commands.Train, "eval": lm_commands.Eval, "sample": lm_commands.Sample,
        "bench": lm_bench,
    }),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neurolattice", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    systems = parser.add_subparsers(dest="system", required=True, metavar="SYSTEM")
    for system, (system_help, commands) in SYSTEMS.items():
        system_parser = systems.add_parser(system, help=system_help, description=system_help)
        subparsers = system_parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
        for name, module in commands.items():
            command = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
            module.add_arguments(command)
            command.set_defaults(command_module=module, command_parser=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``neurolattice`` script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        args.command_module.check(args)
    except ValueError as err:
        args.command_parser.error(str(err))   # prints the usage and the message, exits with 2
    return args.command_module.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
