"""`neurolattice neurograph bench`: rows, speedup, JSON and bad options (no timing assertions)."""

import json

import pytest

from neurolattice import cli
from neurolattice.bench.report import machine_path
from neurolattice.neurograph import bench


def test_cli_bench_rows_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["neurograph", "bench", "--sizes", "230", "260", "--reference-max", "230", "--batch", "4",
            "--reference-batch", "1", "--repeats", "1", "--threads", "1", "--json", str(path)]
    assert cli.main(argv) == 0
    rows = json.loads(path.read_text())
    assert [(r["method"], r["nodes"]) for r in rows] == [("reference", 230), ("fast", 230), ("fast", 260)]
    for row in rows:
        assert tuple(row) == bench.ROW_KEYS and row["status"] == "ok"
        assert row["ms_per_sample"] > 0 and row["peak_mem_bytes"] >= 0 and row["steps"] >= 1
    assert rows[1]["speedup"] == pytest.approx(rows[0]["ms_per_sample"] / rows[1]["ms_per_sample"])
    assert rows[0]["speedup"] is None and rows[2]["speedup"] is None
    assert {"cpu", "torch", "device"} <= set(json.loads(machine_path(path).read_text()))
    assert "ms/sample" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["--sizes", "100"], ["--sizes", ">= 210"]),
    (["--batch", "0"], ["--batch must be >= 1"]),
    (["--device", "tpu"], ["--device"]),
])
def test_bad_options(argv, words, capsys):
    with pytest.raises(SystemExit):
        cli.main(["neurograph", "bench", *argv])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    for word in words:
        assert word in err
