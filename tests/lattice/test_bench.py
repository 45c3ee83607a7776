"""`neurolattice lattice bench`: rows, JSON, skips and bad options (no timing assertions)."""

import importlib.util
import json

import pytest

from neurolattice import cli
from neurolattice.bench.report import machine_path
from neurolattice.lattice import bench

HAS_PYG = importlib.util.find_spec("torch_geometric") is not None


def test_cli_bench_writes_one_row_per_method_and_size(tmp_path, capsys):
    path = tmp_path / "out" / "bench.json"
    argv = ["lattice", "bench", "--sizes", "4", "5", "--reference-cells", "2", "--repeats", "1",
            "--threads", "1", "--peak-size", "64", "--json", str(path)]
    assert cli.main(argv) == 0
    rows = json.loads(path.read_text())
    assert isinstance(rows, list)
    assert [(r["method"], r["size"]) for r in rows] == [(m, n) for n in (4, 5) for m in bench.default_methods("cpu")]
    assert "triton" in bench.METHODS and "triton" not in bench.default_methods("cpu")  # a CUDA backend
    for row in rows:
        assert tuple(row) == bench.ROW_KEYS
        if row["method"] == "pyg" and not HAS_PYG:
            assert row["status"] == "skipped: torch_geometric not installed"
            continue
        assert row["status"] == "ok"
        assert isinstance(row["ms_per_step"], float) and row["ms_per_step"] > 0
        assert isinstance(row["cell_steps_per_s"], float) and row["cell_steps_per_s"] > 0
        assert isinstance(row["gflops"], float) and row["gflops"] > 0
        assert 0 < row["peak_fraction"] < 5
        assert isinstance(row["peak_mem_bytes"], int) and row["peak_mem_bytes"] >= 0
        assert row["scaled"] is (row["method"] == "reference")
    machine = json.loads(machine_path(path).read_text())
    assert {"cpu", "torch_threads", "torch", "device", "matmul_peak"} <= set(machine)
    out = capsys.readouterr().out
    assert "ms/step" in out and "GFLOP/s" in out and out.count("\ntorch ") == 2 and "\nfast " not in out


def test_pyg_row_is_skipped_without_torch_geometric(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch_geometric" else find_spec(name, *a))
    row = bench.bench_row("pyg", 4, batch=1, dtype="float32", device="cpu", repeats=1, reference_cells=2)
    assert row == {"method": "pyg", "size": 4, "ms_per_step": None, "cell_steps_per_s": None,
                   "gflops": None, "peak_fraction": None, "peak_mem_bytes": None, "scaled": False,
                   "status": "skipped: torch_geometric not installed"}


@pytest.mark.parametrize("method", bench.default_methods("cpu"))
def test_method_that_would_not_fit_is_skipped_not_run(monkeypatch, method):
    monkeypatch.setattr(bench, "available_memory_bytes", lambda device: 10**6)
    monkeypatch.setattr(bench, "run_isolated", lambda *a, **k: pytest.fail("must not run"))
    row = bench.bench_row(method, 100, batch=1, dtype="float32", device="cpu", repeats=1, reference_cells=2)
    need = bench.estimate_bytes(method, 100, 1, "float32")
    assert row["status"] == f"skipped: needs ~{need / 1e9:.1f} GB, have 0.0 GB"
    assert row["ms_per_step"] is None and row["peak_mem_bytes"] is None


def test_backend_that_cannot_run_is_skipped_with_its_reason(monkeypatch):
    monkeypatch.setattr(bench, "availability", lambda name, device: "KernelUnavailable: no C++ compiler found")
    row = bench.bench_row("cpp", 4, batch=1, dtype="float32", device="cpu", repeats=1, reference_cells=2)
    assert row["status"] == "skipped: KernelUnavailable: no C++ compiler found" and row["ms_per_step"] is None


def test_flops_per_cell_counts_the_default_step():
    # interior cells: 26 / 96 / 266 neighbours; at 100^3 nearly every cell is interior
    assert 90_000 < bench.flops_per_cell(bench.bench_config(100)) < 95_000
    assert bench.flops_per_cell(bench.bench_config(30)) < bench.flops_per_cell(bench.bench_config(100))


def test_pyg_estimate_grows_with_edges_batch_and_dtype():
    est = bench.estimate_bytes
    assert est("pyg", 100, 1, "float32") > 24e9 > est("pyg", 30, 1, "float32")
    assert est("pyg", 30, 2, "float32") > est("pyg", 30, 1, "float32")
    assert est("pyg", 30, 1, "float64") > est("pyg", 30, 1, "float32")


def test_sample_cells_spread_over_the_lattice():
    cells = bench.sample_cells((10, 10, 10), 32)
    assert len(cells) == len(set(cells)) == 32
    assert cells[0] == (0, 0, 0) and cells[-1] == (9, 9, 9)
    assert any(all(4 <= c <= 5 for c in cell) or all(2 <= c <= 7 for c in cell) for cell in cells)
    assert bench.sample_cells((2, 2, 1), 32) == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]


@pytest.mark.parametrize("args, message", [
    (["--sizes", "0"], "--sizes must be positive integers, got [0]"),
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--reference-cells", "0"], "--reference-cells must be >= 1, got 0"),
    (["--device", "tpu9"], "--device must be a torch device such as cpu or cuda, got 'tpu9'"),
])
def test_bad_options_exit_2_with_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["lattice", "bench", *args])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"neurolattice lattice bench: error: {message}"
