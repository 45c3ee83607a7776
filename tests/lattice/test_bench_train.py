"""`neurolattice lattice bench-train`: one row per (T, checkpointing, backend), with the flop columns."""

import json

from neurolattice import cli
from neurolattice.lattice import bench_train
from neurolattice.lattice.backends import BACKENDS, availability


def test_cli_bench_train_writes_a_row_per_backend(tmp_path):
    path = tmp_path / "train.json"
    argv = ["lattice", "bench-train", "--steps", "1", "--dims", "3", "3", "2", "--state-size", "4",
            "--batch", "2", "--repeats", "1", "--json", str(path)]
    assert cli.main(argv) == 0
    rows = json.loads(path.read_text())
    assert [(r["grad_checkpointing"], r["backend"]) for r in rows] == [(c, b) for c in (False, True) for b in BACKENDS]
    for row in rows:
        assert tuple(row) == bench_train.ROW_KEYS
        if availability(row["backend"]):
            assert row["status"].startswith("skipped: ")
            continue
        assert row["status"] == "ok"
        assert row["gflops"] > 0 and 0 < row["peak_fraction"] < 5
