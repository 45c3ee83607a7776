import torch

from neurolattice.neurograph import NeuroGraph, NeuroGraphConfig


def small_config(**kwargs) -> NeuroGraphConfig:
    """A graph of tens of nodes, for comparisons with the reference."""
    base = dict(n=40, n_input=8, n_output=4, fan_in=3, N=16, M=32, D=3, k=3, T_max=6, t_min=3, seed=0)
    return NeuroGraphConfig(**{**base, **kwargs})


def make_net(config: NeuroGraphConfig, features: int = 5, dtype=torch.float64) -> NeuroGraph:
    return NeuroGraph(config, features, dtype=dtype)


def features(batch: int, width: int = 5, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(batch, width, generator=torch.Generator().manual_seed(seed), dtype=dtype)
