"""Helpers shared by every system's config dataclass."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build the dataclass ``cls`` from ``data``; unknown keys raise a one-line ``ValueError``."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} key(s) {unknown}; known keys: {sorted(known)}"
        )
    return cls(**data)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready dict of a config dataclass (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


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
    (``defaults[section]`` over the dataclass's) and help, generated from the dataclasses
    ``classes`` (``{section: cls}``); ``skip`` lists ``section.key`` names not to offer."""
    tables = ", ".join(f"[{s}]" for s in classes)
    lines = [f"config keys (TOML tables {tables}, or SECTION.KEY=VALUE{'; ' + note if note else ''}):"]
    for section, cls in classes.items():
        for f in dataclasses.fields(cls):
            if f"{section}.{f.name}" in skip:
                continue
            default = defaults.get(section, {}).get(f.name, f.default)
            lines.append(f"  {section}.{f.name} = {default!r}: {f.metadata.get('help', '')}")
    return "\n".join(lines)
