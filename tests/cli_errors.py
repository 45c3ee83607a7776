"""The one-line errors of the command line, as the tests read them."""

from __future__ import annotations

import pytest

from neurolattice.cli import main


def one_line_error(capsys, argv: list[str]) -> str:
    """The message of the one line a rejected command prints after its usage: the command must
    exit with status 2 and the line read ``neurolattice SYSTEM COMMAND: error: MESSAGE``."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"neurolattice {argv[0]} ")
    return lines[-1].split(" error: ", 1)[1]
