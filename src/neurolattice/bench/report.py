"""Benchmark reports shared by every system: fixed-width tables printed row by row, JSON files,
and the command every benchmark is.

A :class:`Table` knows its columns up front, so a benchmark can print the header first and
each row as soon as it is measured. :func:`write_results` writes the rows (a JSON list, the
interface other tools read) and, beside them, the machine header they were measured on.
:class:`Benchmark` is a ``neurolattice SYSTEM bench`` command: a benchmark states its options
and how to measure its rows, the class gives every one the same ``--json``, ``--device`` and
``--threads``, checks and run.
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from neurolattice.device import add_device_arguments, check_device, check_threads
from neurolattice.io import atomic_write_json

from .harness import machine_info


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


def make_row(keys: Sequence[str], **values: Any) -> dict[str, Any]:
    """A row with exactly ``keys``, in their order: ``values``, and None for a key without one.
    A ``KeyError`` for a value whose key is not in ``keys``."""
    unknown = set(values) - set(keys)
    if unknown:
        raise KeyError(f"row keys are {list(keys)}, got also {sorted(unknown)}")
    return {key: values.get(key) for key in keys}


def check_at_least(args: argparse.Namespace, minimum: int, *names: str) -> None:
    """A one-line ``ValueError`` for the first option among ``names`` (``args`` attributes, e.g.
    ``"reference_cells"`` for ``--reference-cells``) whose value is below ``minimum``; None,
    an option left unset, passes."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


class Benchmark(ABC):
    """A benchmark command, ``neurolattice SYSTEM bench``, in the shape :mod:`neurolattice.cli`
    expects: ``HELP``, :meth:`add_arguments`, :meth:`check` and :meth:`run`.

    A benchmark subclasses it and states what is its own: the class attributes below, its
    options (:meth:`add_options`) and their checks (:meth:`check_options`), the rows it measures
    (:meth:`rows`, :meth:`count` of them) and what it prints above the table (:meth:`intro`).
    The rest every benchmark shares:

    - options: its own, then ``--device`` (default ``cpu``; none when :attr:`DEVICE` is False)
      and, when :attr:`THREADS` is True too, ``--threads``
      (:func:`neurolattice.device.add_device_arguments`), and ``--json PATH``;
    - checks: its own, then ``--threads >= 1`` and ``--device`` a device this machine has
      (:func:`neurolattice.device.check_device`); ``args.device`` then holds the name of the
      device it stands for (``auto`` becomes ``cpu`` or ``cuda``);
    - the run: ``--threads`` applied to this process (the benchmark passes them on to its
      measuring processes; the machine header reports them), the machine header
      (:func:`~neurolattice.bench.harness.machine_info`), the intro and the table's header printed,
      then each row as :meth:`rows` yields it, under them a progress bar; the rows and the machine
      header are written again after every row (:class:`Results`), and at the end where they are.
    """

    HELP: str                   # the command's one-line help
    TABLE: Table                # the printed columns
    DEFAULT_JSON: str           # where --json writes by default
    DEVICE = True               # takes --device (default cpu); False: measures on the CPU only
    THREADS = False             # takes --threads too (with DEVICE)

    @abstractmethod
    def add_options(self, parser: argparse.ArgumentParser) -> None:
        """The benchmark's own options."""

    @abstractmethod
    def check_options(self, args: argparse.Namespace) -> None:
        """A one-line ``ValueError`` for a bad value of the benchmark's own options."""

    @abstractmethod
    def rows(self, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
        """Measure the rows one after another, yielding each as soon as it is measured."""

    @abstractmethod
    def count(self, args: argparse.Namespace) -> int:
        """How many rows :meth:`rows` yields (the progress bar's total)."""

    def intro(self, args: argparse.Namespace, machine: dict[str, Any]) -> str:
        """Lines printed between the machine header and the table ("" for none); it may add to
        ``machine`` what the written header should also say."""
        return ""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        self.add_options(parser)
        if self.DEVICE:
            add_device_arguments(parser, default="cpu", threads=self.THREADS)
        parser.add_argument("--json", default=self.DEFAULT_JSON,
                            help="rows written here as a JSON list (default %(default)s); the machine "
                                 "header goes beside it as <name>.machine.json")

    def check(self, args: argparse.Namespace) -> None:
        self.check_options(args)
        if self.THREADS:
            check_threads(args.threads)
        if self.DEVICE:
            args.device = str(check_device(args.device))

    def run(self, args: argparse.Namespace, prepared: None = None) -> int:
        """Measure and report (``prepared``: what :meth:`check` returns, nothing for a benchmark)."""
        if self.THREADS and args.threads is not None:
            torch.set_num_threads(args.threads)
        machine = machine_info(args.device if self.DEVICE else "cpu")
        print(format_machine(machine), end="\n\n")
        intro = self.intro(args, machine)
        if intro:
            print(intro, end="\n\n")
        print(self.TABLE.header())
        results = Results(self.TABLE, args.json, machine)
        for row in tqdm(self.rows(args), total=self.count(args), unit="row", disable=None, leave=False):
            results.add(row)
        results.done()
        return 0
