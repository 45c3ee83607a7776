"""Bench report: tables and result files."""

import json

from neurolattice.bench.report import Column, Table, format_bytes, machine_path, write_results


def test_format_bytes():
    assert [format_bytes(n) for n in (None, 512, 1500, 2.5e9)] == ["-", "512 B", "1.5 kB", "2.5 GB"]


def test_table_header_rows_and_none():
    table = Table([Column("name", "name", 6, align="<"), Column("ms", "ms", 8, lambda v: f"{v:.1f}")])
    text = table.render([{"name": "fast", "ms": 12.345}, {"name": "pyg", "ms": None}])
    assert text.splitlines() == ["name          ms", "------  --------",
                                 "fast        12.3", "pyg            -"]


def test_write_results_keeps_the_rows_a_list(tmp_path):
    path = tmp_path / "r" / "bench.json"
    write_results(path, [{"a": 1}], {"cpu": "x"})
    assert json.loads(path.read_text()) == [{"a": 1}]
    assert machine_path(path) == tmp_path / "r" / "bench.machine.json"
    assert json.loads(machine_path(path).read_text()) == {"cpu": "x"}
