"""Triton shrink/expand kernels against the torch path, run by Triton's CPU interpreter."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch
    from neurolattice.bem.kernels import triton as kernels

    torch.manual_seed(0)
    worst = 0.0
    for n, k_in, out, r in [(1, 8, 8, 1), (37, 45, 70, 3), (64, 32, 64, 8), (5, 130, 17, 20)]:
        for dtype, tol in [(torch.float32, 1e-5), (torch.float64, 1e-5)]:
            x, v = torch.randn(n, k_in, dtype=dtype), torch.randn(k_in, r, dtype=dtype)
            u, codes = torch.randn(out, r, dtype=dtype), torch.randn(n, r, dtype=dtype)
            y = torch.randn(n, out, dtype=dtype)
            t = kernels.shrink(x, v, codes)
            expected_t = ((x.double() @ v.double()) * codes.double())
            assert t.shape == (n, r) and t.dtype == torch.float32
            err_t = ((t.double() - expected_t).abs().max() / expected_t.abs().max()).item()
            expected = y.double() + expected_t @ u.double().T
            pointer = y.data_ptr()
            got = kernels.expand_(y, t, u)
            assert got is y and y.data_ptr() == pointer and y.dtype == dtype
            err = ((y.double() - expected).abs().max() / expected.abs().max()).item()
            assert err_t <= tol and err <= tol, (n, k_in, out, r, dtype, err_t, err)
            worst = max(worst, err_t, err)
    x = torch.randn(4, 9)[:, ::2]  # non-contiguous input
    v, codes = torch.randn(5, 2), torch.randn(4, 2)
    assert (kernels.shrink(x, v, codes) - (x @ v) * codes).abs().max().item() <= 1e-5
    print("worst relative error", worst)
""")


def test_triton_kernels_match_torch_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "worst relative error" in result.stdout
