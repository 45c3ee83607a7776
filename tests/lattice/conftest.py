import pytest
import torch

from neurolattice.lattice import LatticeConfig, LatticeMoE
from neurolattice.lattice.backends import BACKENDS, availability


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> torch.nn.Module:
    """Random parameters (not the initial ones): every weight, bias, the ODE decay and the norm."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale)
    return model


def make(config: LatticeConfig, dtype=torch.float64, seed: int = 0, **kwargs) -> LatticeMoE:
    return randomize(LatticeMoE(config, **kwargs), seed).to(dtype)


def backend_params() -> list:
    """Every backend as a pytest param, skipped with the reason where it cannot run on the CPU here."""
    return [pytest.param(name, marks=pytest.mark.skipif(bool(availability(name)),
                                                        reason=f"{name} backend unavailable: {availability(name)}"))
            for name in BACKENDS]


def states_for(config: LatticeConfig, batch: int, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *config.dims, config.state_size, generator=gen, dtype=torch.float64).to(dtype)


@pytest.fixture
def small_config() -> LatticeConfig:
    return LatticeConfig(dims=(5, 4, 6), state_size=6, hidden_local=5, hidden_functional=7,
                         hidden_distant=4, hidden_gate=3)
