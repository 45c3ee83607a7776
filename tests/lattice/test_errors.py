"""Bad input gets a one-line ValueError that names the problem."""

import pytest
import torch

from neurolattice.lattice import LatticeConfig, LatticeMoE

from ..errors import one_line_error


@pytest.fixture(scope="module")
def model():
    return LatticeMoE(LatticeConfig(dims=(3, 4, 5), state_size=8))


def _one_line(excinfo, *words):
    for word in words:
        assert word in str(excinfo.value), str(excinfo.value)


@pytest.mark.parametrize("shape, words", [
    ((3, 4, 5, 8), ["[*, 3, 4, 5, 8]", "[3, 4, 5, 8]"]),          # wrong rank
    ((2, 3, 4, 6, 8), ["[*, 3, 4, 5, 8]", "[2, 3, 4, 6, 8]"]),    # wrong lattice shape
    ((2, 3, 4, 5, 7), ["state size", "7"]),                       # wrong state size
])
def test_bad_shapes(model, shape, words):
    with one_line_error() as excinfo:
        model(torch.zeros(shape))
    _one_line(excinfo, *words)


def test_integer_dtype(model):
    with one_line_error() as excinfo:
        model(torch.zeros(1, 3, 4, 5, 8, dtype=torch.int64))
    _one_line(excinfo, "floating", "int64")


def test_dtype_mismatch(model):
    with one_line_error() as excinfo:
        model(torch.zeros(1, 3, 4, 5, 8, dtype=torch.float64))
    _one_line(excinfo, "float64", "float32")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_states(model, bad):
    x = torch.zeros(2, 3, 4, 5, 8)
    x[1, 2, 3, 4, 5] = bad
    with one_line_error() as excinfo:
        model(x)
    _one_line(excinfo, "NaN or inf")


def test_not_a_tensor(model):
    with one_line_error() as excinfo:
        model([[1.0]])
    _one_line(excinfo, "torch.Tensor")


@pytest.mark.parametrize("kwargs, words", [
    (dict(r_local=2.0, r_functional=1.5), ["strictly increasing"]),
    (dict(r_functional=4.5, r_distant=4.5), ["strictly increasing"]),
    (dict(r_local=0.0), ["strictly increasing"]),
    (dict(r_distant=float("nan")), ["finite"]),
    (dict(dims=(0, 4, 4)), ["dims", ">= 1"]),
    (dict(dims=(4, 4)), ["three integers"]),
    (dict(dims=(4, 4, 2.5)), ["three integers"]),
    (dict(boundary="toroidal"), ["boundary", "toroidal"]),
    (dict(state_size=0), ["state_size"]),
    (dict(ode_steps=0), ["ode_steps"]),
])
def test_invalid_config(kwargs, words):
    with one_line_error() as excinfo:
        LatticeConfig(**kwargs)
    _one_line(excinfo, *words)


def test_unknown_config_key():
    with one_line_error() as excinfo:
        LatticeConfig.from_dict({"dims": [3, 3, 3], "r_lcoal": 1.0})
    _one_line(excinfo, "r_lcoal")


def test_config_round_trip():
    config = LatticeConfig.relative((6, 5, 4), boundary="periodic")
    assert LatticeConfig.from_dict(config.to_dict()) == config
