"""Benchmark reports shared by every system: fixed-width tables printed row by row, JSON files.

A :class:`Table` knows its columns up front, so a benchmark can print the header first and
each row as soon as it is measured. :func:`write_results` writes the rows (a JSON list, the
interface other tools read) and, beside them, the machine header they were measured on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from neurolattice.io import atomic_write_json


def format_bytes(n: float | None) -> str:
    """Decimal units: ``1500 -> '1.5 kB'``, ``2.5e9 -> '2.5 GB'``, ``None -> '-'``."""
    if n is None:
        return "-"
    units = ("B", "kB", "MB", "GB", "TB")
    k = 0
    while abs(n) >= 1000 and k < len(units) - 1:
        n /= 1000
        k += 1
    return f"{n:.0f} B" if k == 0 else f"{n:.1f} {units[k]}"


@dataclass(frozen=True)
class Column:
    """One table column: the row key it shows, its title, width and how a value is written
    (``None`` is always written ``-``)."""

    key: str
    title: str
    width: int
    fmt: Callable[[Any], str] = str
    align: str = ">"


class Table:
    """A fixed-width text table over dict rows, printable header first and row by row."""

    def __init__(self, columns: Sequence[Column]) -> None:
        self.columns = tuple(columns)

    def _line(self, cells: Sequence[str]) -> str:
        return "  ".join(f"{cell:{c.align}{c.width}}" for c, cell in zip(self.columns, cells)).rstrip()

    def header(self) -> str:
        """The title line and a rule under it."""
        return "\n".join([self._line([c.title for c in self.columns]),
                          self._line(["-" * c.width for c in self.columns])])

    def row(self, row: dict[str, Any]) -> str:
        return self._line(["-" if row[c.key] is None else c.fmt(row[c.key]) for c in self.columns])

    def render(self, rows: Sequence[dict[str, Any]]) -> str:
        return "\n".join([self.header(), *(self.row(r) for r in rows)])


def format_machine(info: dict[str, Any]) -> str:
    """The machine header as ``key: value`` lines."""
    return "\n".join(f"{key}: {value}" for key, value in info.items())


def machine_path(path: str | Path) -> Path:
    """Where :func:`write_results` puts the machine header: ``x.json -> x.machine.json``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.machine.json")


def write_results(path: str | Path, rows: Sequence[dict[str, Any]], machine: dict[str, Any]) -> Path:
    """Write ``rows`` as a JSON list to ``path`` and ``machine`` to :func:`machine_path`,
    each atomically. Returns ``path``."""
    atomic_write_json(machine_path(path), machine)
    return atomic_write_json(path, list(rows))


class Results:
    """A benchmark's rows as they come: each is printed under the table's header (through tqdm,
    so a progress bar stays below) and the whole list is written again (:func:`write_results`),
    so a run cut short keeps every row it measured."""

    def __init__(self, table: Table, path: str | Path, machine: dict[str, Any]) -> None:
        self.table, self.path, self.machine = table, path, machine
        self.rows: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        tqdm.write(self.table.row(row))
        write_results(self.path, self.rows, self.machine)

    def done(self) -> None:
        """Say where the rows and the machine header are."""
        print(f"\nwrote {self.path} and {machine_path(self.path)}")

