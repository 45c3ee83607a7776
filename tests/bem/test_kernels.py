"""Triton shrink/expand kernels against the torch path, run by Triton's CPU interpreter."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]  # the script imports tests.bounds from here

SCRIPT = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch
    from neurolattice.bem.kernels import triton as kernels
    from tests.bounds import float32_bound

    torch.manual_seed(0)
    worst = 0.0
    for n, k_in, out, r in [(1, 8, 8, 1), (37, 45, 70, 3), (64, 32, 64, 8), (5, 130, 17, 20)]:
        for dtype in (torch.float32, torch.float64):
            loads = 0 if dtype == torch.float32 else 1  # float64 inputs are rounded to float32 on load
            x, v = torch.randn(n, k_in, dtype=dtype), torch.randn(k_in, r, dtype=dtype)
            u, codes = torch.randn(out, r, dtype=dtype), torch.randn(n, r, dtype=dtype)
            y = torch.randn(n, out, dtype=dtype)
            t = kernels.shrink(x, v, codes)
            expected_t = ((x.double() @ v.double()) * codes.double())
            assert t.shape == (n, r) and t.dtype == torch.float32
            # float32 kernel vs float64: terms = the k_in-long sum x V and the product with the code (and
            # rounding x, V, codes on load); scale: t
            err_t = (t.double() - expected_t).abs().max().item()
            assert err_t <= float32_bound(expected_t, terms=k_in + 1 + 3 * loads), (n, k_in, out, r, dtype, err_t)
            delta = expected_t @ u.double().T
            expected = y.double() + delta
            pointer = y.data_ptr()
            got = kernels.expand_(y, t, u)
            assert got is y and y.data_ptr() == pointer and y.dtype == dtype
            # then the r-long sum t U^T and the add of y (and rounding U, y on load); scale: y and the delta
            err = (y.double() - expected).abs().max().item()
            assert err <= float32_bound(expected, delta, terms=k_in + r + 2 + 5 * loads), (n, k_in, out, r, dtype, err)
            worst = max(worst, err_t / expected_t.abs().max().item(), err / expected.abs().max().item())
    x = torch.randn(4, 9)[:, ::2]  # non-contiguous input
    v, codes = torch.randn(5, 2), torch.randn(4, 2)
    want = (x @ v) * codes
    # float32 both: terms = the 5-long sum x V and the product with the code; scale: the result
    assert (kernels.shrink(x, v, codes) - want).abs().max().item() <= float32_bound(want, terms=x.shape[1] + 1)
    print("worst relative error", worst)
""")


def test_triton_kernels_match_torch_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "worst relative error" in result.stdout
