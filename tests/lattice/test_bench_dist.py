"""`neurolattice lattice bench-dist` on a tiny lattice, 1 and 2 processes: the rows' keys, and
the halo bytes the profiler counted against the analytic count (3 launches, about 25 s on 2 cores)."""

import json

from neurolattice import cli
from neurolattice.lattice import bench_dist

from ..errors import cli_error


def test_cli_bench_dist_rows_and_halo_bytes(tmp_path):
    path = tmp_path / "dist.json"
    argv = ["lattice", "bench-dist", "--dims", "8", "3", "2", "--processes", "1", "2", "--batch", "2",
            "--repeats", "1", "--json", str(path)]
    assert cli.main(argv) == 0
    rows = json.loads(path.read_text())
    assert [(r["mode"], r["processes"], r["pass"]) for r in rows] == [
        (mode, p, name) for mode in bench_dist.MODES for p in (1, 2) for name in bench_dist.PASSES]
    for row in rows:
        assert tuple(row) == bench_dist.ROW_KEYS
        assert row["status"] == "ok", row["status"]
        p, (X, Y, Z) = row["processes"], row["dims"]
        assert (X, Y, Z) == ((8, 3, 2) if row["mode"] == "strong" else (8 * p, 3, 2))
        assert row["halo"] == 4 and row["slab_planes"] == 8 // p * (p if row["mode"] == "weak" else 1)
        # h planes of [B, Y, Z, S] float32 each way across each of the P - 1 boundaries, per exchange
        exchanges = 2 if row["pass"] == "forward+backward" else 1
        assert row["halo_bytes"] == exchanges * (p - 1) * 2 * 4 * Y * Z * 32 * 2 * 4
        assert 0 < row["ms_exchange"] < row["ms_per_step"]
        assert row["ms_compute"] == row["ms_per_step"] - row["ms_exchange"]
        assert row["scaling_efficiency"] > 0 and (p > 1 or row["scaling_efficiency"] == 1)
        assert row["oversubscribed"] is False and row["cell_steps_per_s"] > 0


def test_a_lattice_too_thin_for_the_processes_is_one_line(capsys):
    assert cli_error(capsys, ["lattice", "bench-dist", "--dims", "6", "3", "2", "--processes", "2"]) == (
        "a lattice of X = 6 planes cannot be split over 2 ranks: a slab needs at least 4 plane(s) "
        "(the halo of r_distant = 4.5), so at most 1 ranks")
