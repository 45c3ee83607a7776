"""The environment is the one the project says it is: the venv holds exactly the locked set, and
README's compatibility table and pyproject.toml's lower bounds name the versions the lock files pin."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
TABLED = ("torch", "transformers", "peft")  # the columns of README's compatibility table


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """``name -> version`` of a pip constraints file of ``name==version`` lines."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"{path.name}: not an exact pin: {line!r}"
            out[canonical(name)] = version
    return out


def readme_row(label: str) -> dict[str, str]:
    """The versions in the README compatibility-table row whose first cell starts with ``label``."""
    text = (ROOT / "README.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| set |"))
    columns = [canonical(c.strip()) for c in header.strip("|").split("|")]
    row = next(line for line in text.splitlines() if line.startswith(f"| {label}"))
    return dict(zip(columns, (c.strip().strip("`") for c in row.strip("|").split("|"))))


@pytest.mark.lock
def test_the_venv_is_the_locked_set():
    lock = pins(ROOT / "requirements.lock")
    installed = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    installed.pop("neurolattice")
    installed.pop("pip", None)  # the venv's own, not a dependency
    off = {name: (version, lock.get(name)) for name, version in installed.items() if lock.get(name) != version}
    missing = sorted(set(lock) - set(installed))
    assert not off, f"installed (version, lock version) differ; run `make lock` or reinstall: {off}"
    assert not missing, f"locked but not installed: {missing}"


def test_readme_table_names_the_locked_and_the_lowest_versions():
    lock, lowest = pins(ROOT / "requirements.lock"), pins(ROOT / "requirements-lowest.txt")
    for label, pinned in (("locked", lock), ("lowest", lowest)):
        row = readme_row(label)
        assert {name: row[name] for name in TABLED} == {name: pinned[name] for name in TABLED}, label


def test_lower_bounds_are_the_lowest_tested_releases():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    lowest = pins(ROOT / "requirements-lowest.txt")
    for requirement in declared:
        bound = next(Version(s.version) for s in requirement.specifier if s.operator == ">=")
        assert Version(lowest[canonical(requirement.name)]) == bound, requirement
