"""Runs saved before the 2026-12 restructuring (commit 29350c4: the shared data module, NeuroGraph's
task module, the LM and BEM library code out of the commands) load and evaluate with today's code.

``tests/fixtures/<system>`` is a tiny run ``<system> train`` wrote then (checkpoints without the
trainer state, which evaluation does not read); ``<system>-eval.json`` is what ``<system> eval``
printed of it then.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from neurolattice.cli import main

FIXTURES = Path(__file__).with_name("fixtures")


@pytest.mark.parametrize("system, keys, samples", [
    ("lattice", ["accuracy", "accuracy_T0"], "test_samples"),
    ("neurograph", ["accuracy", "untrained_accuracy"], None),
])
def test_a_run_saved_before_loads_and_evaluates_alike(system, keys, samples, tmp_path, capsys):
    run = shutil.copytree(FIXTURES / system, tmp_path / system)
    then = json.loads((FIXTURES / f"{system}-eval.json").read_text())
    assert main([system, "eval", str(run), "--json", str(tmp_path / "now.json")]) == 0
    now = json.loads((tmp_path / "now.json").read_text())
    count = then[samples] if samples else 450  # digits' held-out quarter
    for key in keys:
        # an accuracy counts argmax decisions: another CPU's last-bit rounding may flip one borderline
        # sample, so the same weights on the same data agree to within one sample
        assert abs(now[key] - then[key]) <= 1 / count + 1e-12, key
