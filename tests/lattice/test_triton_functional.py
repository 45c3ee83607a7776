"""The Triton functional aggregation against the torch path and a per-cell reference, run by
Triton's CPU interpreter; and its one-line refusal of CPU tensors outside the interpreter."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]  # the script imports tests.bounds from here

SCRIPT = textwrap.dedent("""
    import math
    import os
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch
    import torch.nn.functional as F
    from neurolattice.lattice import LatticeConfig, experts
    from neurolattice.lattice.geometry import lattice_geometry, pad_lattice
    from neurolattice.lattice.reference import neighbours
    from neurolattice.lattice.kernels.triton_functional import TritonFunctionalAggregate
    from tests.bounds import float32_bound
    from tests.lattice.conftest import make, states_for

    CASES = [  # name, dims, boundary, radii (local, functional, distant), batch, H
        ("open", (3, 2, 4), "open", (1.0, 1.5, 2.5), 3, 7),
        ("periodic-side-2", (2, 3, 3), "periodic", (1.0, 1.5, 2.5), 1, 5),
        ("open-side-1", (1, 4, 3), "open", (1.0, 1.5, 2.5), 1, 4),
        ("periodic-sides-1-2", (1, 2, 5), "periodic", (1.0, 1.5, 2.5), 3, 3),
        # functional = the axis offsets at distance 2: the cells (1, y, 1) have none of them
        ("open-some-empty", (3, 2, 3), "open", (1.9, 2.0, 2.5), 3, 6),
        # no lattice distance lies in (1, 1.2]: the functional tier has no offsets at all
        ("no-offsets", (2, 3, 2), "open", (1.0, 1.2, 2.5), 3, 5),
    ]

    def inputs(dims, boundary, radii, batch, H, seed):
        geometry = lattice_geometry(dims, boundary, radii)
        gen = torch.Generator().manual_seed(seed)
        P, q = (torch.randn(batch, *dims, H, generator=gen, dtype=torch.float64) for _ in range(2))
        v = torch.randn(H, generator=gen, dtype=torch.float64)
        bias = None
        if boundary == "open":   # as LatticeMoE builds it: 0 inside, -inf in the padding
            inside = pad_lattice(torch.ones(1, *dims, 1), geometry.pad, "open") > 0
            bias = torch.zeros(inside.shape, dtype=torch.float64).masked_fill(~inside, float("-inf"))
        return geometry, P, q, v, bias

    def per_cell(P, q, v, config):
        # hagg of each cell from its own neighbour search, a softmax over a list (no padding, no offsets)
        B, X, Y, Z, H = q.shape
        rows = []
        for cell in [(a, b, c) for a in range(X) for b in range(Y) for c in range(Z)]:
            tier = neighbours(cell, config)[1]
            if not tier:
                rows.append(torch.zeros(B, H, dtype=q.dtype))
                continue
            h = torch.stack([F.gelu(P[:, a, b, c] + q[:, cell[0], cell[1], cell[2]]) for a, b, c in tier], 1)
            w = torch.softmax(h @ v, dim=1)                                       # (B, K)
            rows.append((w.unsqueeze(-1) * h).sum(1))
        return torch.stack(rows, 1).view(B, X, Y, Z, H)

    def run(fn, P, q, v, bias, geometry, boundary, G, dtype):
        P, q, v = (t.to(dtype, copy=True).requires_grad_() for t in (P, q, v))
        p_pad = pad_lattice(P, geometry.pad, boundary)
        p_pad.retain_grad()
        bias = None if bias is None else bias.to(dtype)
        out = fn(p_pad, q, v, bias, geometry.offsets[1], geometry.pad, 1)
        out.backward(G.to(dtype))
        return out.detach(), p_pad.grad, P.grad, q.grad, v.grad

    worst = 0.0
    for name, dims, boundary, radii, batch, H in CASES:
        geometry, P, q, v, bias = inputs(dims, boundary, radii, batch, H, seed=len(name))
        K = len(geometry.offsets[1])
        G = torch.randn(q.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        config = LatticeConfig(dims=dims, boundary=boundary, r_local=radii[0], r_functional=radii[1],
                               r_distant=radii[2])
        empty = torch.tensor([[[not neighbours((a, b, c), config)[1] for c in range(dims[2])]
                               for b in range(dims[1])] for a in range(dims[0])])
        assert (name == "open-some-empty") == bool(empty.any() and not empty.all()), name
        assert (name == "no-offsets") == (K == 0), name

        # float64: the kernels compute in float64, so they are the torch path up to summation order
        torch_path = run(experts.FunctionalAggregate.apply, P, q, v, bias, geometry, boundary, G, torch.float64)
        triton_path = run(TritonFunctionalAggregate.apply, P, q, v, bias, geometry, boundary, G, torch.float64)
        for label, got, want in zip(["hagg", "dP_pad", "dP", "dq", "dv"], triton_path, torch_path):
            assert got.dtype == torch.float64 and got.shape == want.shape, (name, label)
            assert (got - want).abs().max().item() <= 1e-10, (name, label)
        assert (triton_path[0][:, empty] == 0).all(), name

        # and the per-cell reference: values, and gradients for P (through the padding), q, v
        Pr, qr, vr = (t.clone().requires_grad_() for t in (P, q, v))
        expected = per_cell(Pr, qr, vr, config)
        if expected.requires_grad:
            ref_grads = torch.autograd.grad(expected, (Pr, qr, vr), G, materialize_grads=True)
        else:   # no cell has a functional neighbour: nothing reached the inputs
            ref_grads = [torch.zeros_like(t) for t in (Pr, qr, vr)]
        for label, got, want in zip(["hagg", "dP", "dq", "dv"], triton_path[:1] + triton_path[2:],
                                    [expected.detach(), *ref_grads]):
            assert (got - want).abs().max().item() <= 1e-10, (name, label)

        # float32 inputs, against the float64 torch path on the same (rounded) inputs. One evaluation's
        # error is bounded in the suite's way, terms * u * scale (tests/bounds.py), with terms the chained
        # roundings on a cell's path: the H-long score, the K-step online softmax (a rescale and an add
        # per step), and 8 for the gelu, erf, exp, P + Q and the division. A score's absolute error is a
        # relative error of its weight, so every scale carries sigma = max(1, largest |score|).
        lo = [t.float().double() for t in (P, q, v)]
        exact = run(experts.FunctionalAggregate.apply, *lo, bias, geometry, boundary, G.float().double(),
                    torch.float64)
        got32 = run(TritonFunctionalAggregate.apply, *lo, bias, geometry, boundary, G.float().double(),
                    torch.float32)
        h_max = lo[0].abs().max().item() + lo[1].abs().max().item()        # |gelu(u)| <= |u|
        v1, v_max = lo[2].abs().sum().item(), lo[2].abs().max().item()
        sigma = max(1.0, v1 * h_max)
        g_max, g1 = G.abs().max().item(), G.abs().sum(-1).max().item()
        # gradient magnitudes: the softmax weights of a cell sum to 1, so its terms of dq sum to at most
        # d = gelu'max (g_max + 2 |G|_1 h_max v_max); dP_j gathers one term from each of <= K cells, and
        # dv a term of at most 2 |G|_1 h_max^2 from each of the N cells. Gradients add the H-long G . h,
        # the gather over K offsets (or all N * K terms, for dv) and 4 more roundings.
        d = 1.13 * (g_max + 2 * g1 * h_max * v_max)
        N = q[..., 0].numel()
        fwd = H + 2 * K + 8
        bounds = {
            "hagg": float32_bound(h_max * sigma, terms=fwd),
            "dP_pad": float32_bound(max(1, K) * d * sigma, terms=fwd + H + K + 4),
            "dP": float32_bound(max(1, K) * d * sigma, terms=fwd + H + K + 4),
            "dq": float32_bound(d * sigma, terms=fwd + H + K + 4),
            "dv": float32_bound(N * 2 * g1 * h_max ** 2 * sigma, terms=fwd + H + N * K + 4),
        }
        for label, got, want in zip(bounds, got32, exact):
            assert got.dtype == torch.float32, (name, label)
            err = (got.double() - want).abs().max().item()
            assert err <= bounds[label], (name, label, err, bounds[label])
            worst = max(worst, err / bounds[label])

    # inside the step: LatticeMoE with the kernel in place of the torch path, in slabs of one x-plane
    # (so the kernel sees halo'd slices of the padded states and of the bias), values and gradients
    for boundary in ("open", "periodic"):
        config = LatticeConfig(dims=(3, 2, 3), boundary=boundary, state_size=4, hidden_local=3,
                               hidden_functional=5, hidden_distant=3, hidden_gate=3)
        model = make(config, block_elems=1, chunk_elems=1)
        x = states_for(config, 2).requires_grad_()
        results = []
        for agg in (experts.FunctionalAggregate, TritonFunctionalAggregate):
            experts_aggregate, experts.FunctionalAggregate = experts.FunctionalAggregate, agg
            try:
                out = model(x)
                grads = torch.autograd.grad(out.square().sum(), [x, *model.functional.parameters()])
            finally:
                experts.FunctionalAggregate = experts_aggregate
            results.append([out, *grads])
        for got, want in zip(results[1], results[0]):
            assert (got - want).abs().max().item() <= 1e-10, boundary
    print("worst float32 error / bound", worst)
""")


def test_triton_aggregate_matches_torch_path_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "worst float32 error / bound" in result.stdout


def test_cpu_tensors_outside_the_interpreter_get_one_line(monkeypatch):
    # Importing needs Triton, not CUDA; a launch on CPU tensors without the interpreter is refused
    # before any kernel runs, naming the device it got.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from neurolattice.lattice.kernels.triton_functional import TritonFunctionalAggregate

    p_pad, q, v = torch.zeros(1, 3, 3, 3, 4), torch.zeros(1, 1, 1, 1, 4), torch.zeros(4)
    with pytest.raises(ValueError, match=r"needs CUDA tensors \(or TRITON_INTERPRET=1\), got p_pad on cpu") as info:
        TritonFunctionalAggregate.apply(p_pad, q, v, None, ((1, 0, 0),), (1, 1, 1), 1)
    assert "\n" not in str(info.value)


def test_padded_shapes_are_checked(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # past the device check, to the shape check
    from neurolattice.lattice.kernels.triton_functional import aggregate_forward

    q, v = torch.zeros(2, 3, 3, 3, 4), torch.zeros(4)
    with pytest.raises(ValueError, match=r"p_pad must be .* = \[2, 5, 5, 5, 4\] .*got \[2, 4, 5, 5, 4\]"):
        aggregate_forward(torch.zeros(2, 4, 5, 5, 4), q, v, None, ((1, 0, 0),), (1, 1, 1))
    with pytest.raises(ValueError, match=r"score_bias must be \[1, X', Y', Z', 1\] = \[1, 5, 5, 5, 1\]"):
        aggregate_forward(torch.zeros(2, 5, 5, 5, 4), q, v, torch.zeros(1, 3, 3, 3, 1), ((1, 0, 0),), (1, 1, 1))
