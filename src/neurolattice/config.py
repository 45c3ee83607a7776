"""The base of every system's config dataclass (:class:`Config`: field bounds, ``to_dict`` /
``from_dict``) and the layering of TOML files and ``SECTION.KEY=VALUE`` overrides over it."""

from __future__ import annotations

import dataclasses
import math
import operator
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

# The limits a Bound may set: (attribute, symbol, test).
LIMITS = (("ge", ">=", operator.ge), ("gt", ">", operator.gt), ("le", "<=", operator.le), ("lt", "<", operator.lt))


@dataclass(frozen=True)
class Bound:
    """The values one config field accepts, declared beside its help:
    ``field(default=32, metadata={"help": "...", "bound": Bound(int, gt=0)})``.

    ``kind`` is ``int`` (an integer, not a bool), ``float`` (a finite int or float, not a bool)
    or ``bool``; ``ge`` / ``gt`` / ``le`` / ``lt`` limit a number (``>=``, ``>``, ``<=``, ``<``);
    ``choices`` lists the values the field may take; ``optional`` accepts ``None`` as well.
    ``says`` completes "NAME must be ...", spelled from the rest unless given: ``"a positive
    integer"``, ``"an integer >= 0"``, ``"a finite number > 1"``, ``"in [0, 1)"``, ``"one of (...)"``.
    """

    kind: type | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] = ()
    optional: bool = False
    says: str = ""

    def __post_init__(self) -> None:
        if not self.says:
            object.__setattr__(self, "says", self.spell())

    def limits(self) -> list[tuple[str, Any, float]]:
        """``(symbol, test, limit)`` of each limit set."""
        return [(symbol, test, getattr(self, name)) for name, symbol, test in LIMITS
                if getattr(self, name) is not None]

    def spell(self) -> str:
        """The expectation in words, from ``kind``, the limits, ``choices`` and ``optional``."""
        if self.choices:
            text = f"one of {self.choices}"
        elif self.kind is bool:
            text = "true or false"
        else:
            noun = "integer" if self.kind is int else "finite number"
            limits = [f"{symbol} {limit}" for symbol, _, limit in self.limits()]
            if len(limits) == 2:  # an interval
                low = f"[{self.ge}" if self.ge is not None else f"({self.gt}"
                high = f"{self.le}]" if self.le is not None else f"{self.lt})"
                text = f"in {low}, {high}"
            elif limits == ["> 0"]:
                text = f"a positive {noun}"
            else:
                text = " ".join([("an " if self.kind is int else "a ") + noun, *limits])
        return f"none or {text}" if self.optional else text

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if self.choices:
            return value in self.choices
        if self.kind is bool:
            return isinstance(value, bool)
        if isinstance(value, bool) or not isinstance(value, int if self.kind is int else (int, float)):
            return False
        if self.kind is float and not math.isfinite(value):
            return False
        return all(test(value, limit) for _, test, limit in self.limits())


class Config:
    """Base of every config dataclass: ``__post_init__`` checks each field against the
    :class:`Bound` in its metadata (``"NAME must be SAYS, got VALUE"``, one line); a subclass
    with rules across fields runs them after ``super().__post_init__()``. ``to_dict`` and
    ``from_dict`` turn a config into JSON-ready data and back."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            bound = f.metadata.get("bound")
            value = getattr(self, f.name)
            if bound is not None and not bound.accepts(value):
                raise ValueError(f"{f.name} must be {bound.says}, got {value!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], saved: bool = False) -> Self:
        """The config of ``data``, its keys checked first (:meth:`check_keys`). A ``saved`` one
        that lacks a field whose metadata says ``"old_runs_had": VALUE`` gets VALUE (what runs
        saved before the field existed did, where today's default differs)."""
        cls.check_keys(data, saved)
        if saved:
            data = {**{f.name: f.metadata["old_runs_had"] for f in dataclasses.fields(cls)
                       if f.name not in data and "old_runs_had" in f.metadata}, **data}
        return cls(**data)

    @classmethod
    def check_keys(cls, data: Any, saved: bool = False) -> None:
        """One-line ``ValueError`` unless ``data`` is a dict of this config's keys. A user's
        config may leave keys out (they take their defaults); a ``saved`` one (read back from a
        run) may not: a missing key is an error naming it, never today's default, except for a
        field whose metadata says ``"old_runs_lack": True`` (added after runs were saved
        without it; its default is what those runs did)."""
        if not isinstance(data, dict):
            raise ValueError(f"a {cls.__name__} must be a table of keys, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; known keys: {sorted(known)}")
        if saved:
            missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in data
                             and not f.metadata.get("old_runs_lack") and "old_runs_had" not in f.metadata)
            if missing:
                raise ValueError(f"the saved {cls.__name__} lacks key(s) {missing}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict: tuples become lists, a nested config a nested dict."""
        return dataclasses.asdict(
            self, dict_factory=lambda items: {k: list(v) if isinstance(v, tuple) else v for k, v in items})


def parse_value(raw: str) -> Any:
    """A command-line value as a TOML literal (``3``, ``0.1``, ``true``, ``[8, 8, 3]``, ``"x"``);
    anything that is not one stays a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    """A TOML config file as a dict; a missing or malformed file is a one-line ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"config file {path} is not valid TOML: {err}") from None


def merge_sections(sections: tuple[str, ...], *layers: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Merge layers of ``{section: {key: value}}`` (later wins); a top-level key that is not one
    of ``sections`` is a one-line ``ValueError``."""
    merged: dict[str, dict[str, Any]] = {s: {} for s in sections}
    for layer in layers:
        for section, values in layer.items():
            if section not in sections or not isinstance(values, dict):
                raise ValueError(f"unknown config section {section!r}; expected tables {list(sections)}")
            merged[section].update(values)
    return merged


def parse_overrides(pairs: list[str], sections: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``["train.lr=0.003", "lattice.dims=[8, 8, 3]"]`` -> ``{"train": {"lr": 0.003}, ...}``."""
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"expected SECTION.KEY=VALUE with SECTION in {list(sections)}, got {pair!r}")
        if section not in sections:
            raise ValueError(f"unknown config section {section!r} in {pair!r}; expected one of {list(sections)}")
        out.setdefault(section, {})[name] = parse_value(raw.strip())
    return out


def layered_config(sections: tuple[str, ...], defaults: dict[str, dict[str, Any]], config_file: str | None,
                   overrides: list[str]) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """``defaults``, then the TOML ``config_file``, then the ``SECTION.KEY=VALUE`` ``overrides``
    (later wins). Returns the merged sections and what the user set (file and overrides)."""
    user = merge_sections(sections, load_toml(config_file) if config_file else {},
                          parse_overrides(list(overrides), sections))
    return merge_sections(sections, defaults, user), user


def sections_help(classes: dict[str, type], defaults: dict[str, dict[str, Any]],
                  skip: tuple[str, ...] = (), note: str = "") -> str:
    """The keys a TOML file or ``SECTION.KEY=VALUE`` may set, one line each with its default
    (``defaults[section]`` over the dataclass's), help and bound, generated from the dataclasses
    ``classes`` (``{section: cls}``); ``skip`` lists ``section.key`` names not to offer."""
    tables = ", ".join(f"[{s}]" for s in classes)
    lines = [f"config keys (TOML tables {tables}, or SECTION.KEY=VALUE{'; ' + note if note else ''}):"]
    for section, cls in classes.items():
        for f in dataclasses.fields(cls):
            if f"{section}.{f.name}" in skip:
                continue
            default = defaults.get(section, {}).get(f.name, f.default)
            bound = f.metadata.get("bound")
            lines.append(f"  {section}.{f.name} = {default!r}: {f.metadata.get('help', '')}"
                         + (f" [{bound.says}]" if bound else ""))
    return "\n".join(lines)
