"""The one-line errors the tests expect: from library code, and from the command line."""

from __future__ import annotations

import contextlib

import pytest

from neurolattice.cli import main


@contextlib.contextmanager
def one_line_error(match: str | None = None, error: type[Exception] = ValueError):
    """``with one_line_error("words"): ...``: the body must raise ``error`` whose message matches
    ``match`` (a regex, as in ``pytest.raises``) and is one line; yields pytest's ``ExceptionInfo``."""
    with pytest.raises(error, match=match) as info:
        yield info
    assert "\n" not in str(info.value), str(info.value)


def cli_error(capsys, argv: list[str]) -> str:
    """The message of the one line a rejected command prints after its usage: the command must
    exit with status 2 and the line read ``neurolattice SYSTEM COMMAND: error: MESSAGE``."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"neurolattice {argv[0]} ")
    return lines[-1].split(" error: ", 1)[1]


def run_error(capsys, argv: list[str], status: int = 1) -> str:
    """The message of the one line a failed run prints (a full disk, a locked folder, Ctrl-C):
    the command must return ``status`` and its last stderr line read
    ``neurolattice SYSTEM COMMAND: error: MESSAGE``."""
    capsys.readouterr()
    assert main(argv) == status
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"neurolattice {argv[0]} {argv[1]}: error: "), line
    return line.split(" error: ", 1)[1]
