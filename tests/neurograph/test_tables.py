"""Lookup tables and the signal's derivatives against finite differences of the continuous formula."""

import math

import pytest
import torch

from neurolattice.neurograph.tables import Tables, signal, strength


def continuous(p: torch.Tensor, a: torch.Tensor, N: int, M: int) -> torch.Tensor:
    """s(p, a) = cos(2 pi p / N) exp(sin(2 pi a / M - pi)) for real p, a (independent of the tables)."""
    return torch.cos(2 * math.pi * p / N) * torch.exp(torch.sin(2 * math.pi * a / M - math.pi))


@pytest.mark.parametrize("N, M", [(512, 1024), (16, 32)])
def test_tables_equal_formula(N, M):
    t = Tables(N, M)
    p = torch.arange(N).repeat_interleave(3)[: 3 * N]
    a = torch.randint(0, M, p.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(t.values(p, a), continuous(p.double(), a.double(), N, M), rtol=0, atol=1e-12)


@pytest.mark.parametrize("N, M", [(512, 1024), (64, 128)])
def test_signal_derivatives_match_finite_differences(N, M):
    t = Tables(N, M)
    gen = torch.Generator().manual_seed(1)
    p = torch.randint(0, N, (200,), generator=gen).double().requires_grad_()
    a = torch.randint(0, M, (200,), generator=gen).double().requires_grad_()
    weights = torch.randn(200, generator=gen, dtype=torch.float64)
    (signal(p, a, t) * weights).sum().backward()
    h = 1e-4
    pd, ad = p.detach(), a.detach()
    fd_p = (continuous(pd + h, ad, N, M) - continuous(pd - h, ad, N, M)) / (2 * h) * weights
    fd_a = (continuous(pd, ad + h, N, M) - continuous(pd, ad - h, N, M)) / (2 * h) * weights
    torch.testing.assert_close(p.grad, fd_p, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(a.grad, fd_a, rtol=1e-6, atol=1e-9)


def test_magnitude_derivative_is_the_spec_formula():
    M = 1024
    t = Tables(512, M)
    theta = 2 * math.pi * torch.arange(M, dtype=torch.float64) / M - math.pi
    torch.testing.assert_close(t.dg, theta.cos() * theta.sin().exp() * 2 * math.pi / M)


def test_strength_adds_components_in_order():
    sig = torch.tensor([[1e16, 1.0, -1e16], [0.5, 0.25, 0.125]], dtype=torch.float64)
    assert strength(sig).tolist() == [(1e16 + 1.0) + -1e16, 0.875]
