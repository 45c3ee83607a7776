"""The BEM layer against the token-by-token reference; the in-place CPU path; sparse application."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from neurolattice.bem import BEMConfig
from neurolattice.bem.controller import BEMController, RoutingContext
from neurolattice.bem.kernels import add_adapter_
from neurolattice.bem.layer import BEMLinear
from neurolattice.bem.reference import reference_layer

from ..bounds import float32_bound
from ..errors import one_line_error

B, T, IN, OUT, R = 2, 5, 7, 6, 3


def make_layer(kind: str, slots=2, slot=1, sparse_threshold=0.0, seed=0) -> tuple[BEMLinear, BEMController]:
    torch.manual_seed(seed)
    base = nn.Linear(IN, OUT) if kind == "linear" else Conv1D(OUT, IN)
    nn.init.normal_(base.bias)
    controller = BEMController(BEMConfig(rank=R, hidden=4), IN, ["token"] * slots).double()
    layer = BEMLinear(base, slot, "token", R, controller, sparse_threshold).double()
    with torch.no_grad():
        layer.U.normal_()
    return layer, controller


def set_codes(controller: BEMController, codes: torch.Tensor) -> None:
    """Route by hand: ``codes`` [B, T, S, r] for the token level."""
    controller.last = RoutingContext({"token": codes}, {"token": codes}, {"token": codes[..., :1, 0]},
                                     torch.ones(codes.shape[:2], dtype=torch.bool))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_layer_matches_reference(kind):
    layer, controller = make_layer(kind)
    codes = torch.randn(B, T, 2, R, dtype=torch.float64)
    set_codes(controller, codes)
    x = torch.randn(B, T, IN, dtype=torch.float64)
    expected = reference_layer(layer, x, codes[..., 1, :])
    assert (layer(x) - expected).abs().max().item() <= 1e-12


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_layer_gradcheck(kind):
    layer, controller = make_layer(kind)
    x = torch.randn(B, T, IN, dtype=torch.float64, requires_grad=True)
    codes = torch.randn(B, T, 2, R, dtype=torch.float64, requires_grad=True)

    def fn(x, codes, u, v):
        set_codes(controller, codes)
        return torch.func.functional_call(layer, {"U": u, "V": v}, (x,))

    u = layer.U.detach().clone().requires_grad_(True)
    v = layer.V.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (x, codes, u, v), fast_mode=True)


def test_v_is_initialised_like_peft_lora_a_and_u_at_zero():
    layer, _ = make_layer("linear")
    fresh = BEMLinear(nn.Linear(400, 30), 0, "token", 8, layer.controller)
    assert fresh.V.shape == (400, 8) and fresh.U.shape == (30, 8) and (fresh.U == 0).all()
    bound = 1 / 400 ** 0.5  # kaiming_uniform(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in))
    assert fresh.V.abs().max() <= bound and fresh.V.abs().max() > 0.9 * bound


def test_cpu_path_adds_in_place_into_the_base_output():
    y = torch.randn(10, OUT)
    x, v, u, codes = torch.randn(10, IN), torch.randn(IN, R), torch.randn(OUT, R), torch.randn(10, R)
    delta = ((x @ v) * codes) @ u.T
    expected = y + delta
    pointer = y.data_ptr()
    with torch.no_grad():
        out = add_adapter_(y, x, v, u, codes)
    assert out is y and y.data_ptr() == pointer
    # float32: addmm_ adds into y where the reference adds after; terms = the IN-long sum x V, the code's
    # product, the R-long sum with U and the add of y; scale: the result and the delta
    assert (y - expected).abs().max().item() <= float32_bound(expected, delta, terms=IN + R + 2)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_sparse_application_equals_dense_with_small_codes_zeroed(kind):
    threshold = 0.6
    sparse, controller = make_layer(kind, sparse_threshold=threshold)
    dense, dense_controller = make_layer(kind)
    codes = torch.randn(B, T, 2, R, dtype=torch.float64)
    codes[0, 1] *= 0.01  # all entries below the threshold: skipped
    codes[1, 3, 1] = torch.tensor([0.5, -0.59, 0.7], dtype=torch.float64)  # one entry above: kept
    x = torch.randn(B, T, IN, dtype=torch.float64)
    set_codes(controller, codes)
    skipped = (codes[..., 1, :].abs() < threshold).all(-1, keepdim=True)
    assert skipped.any() and not skipped.all()
    zeroed = codes.clone()
    zeroed[..., 1, :] = codes[..., 1, :].masked_fill(skipped, 0.0)
    set_codes(dense_controller, zeroed)
    assert (sparse(x) - dense(x)).abs().max().item() <= 1e-12
    set_codes(dense_controller, codes)
    assert (sparse(x) - dense(x)).abs().max().item() > 1e-6  # the skipped tokens did matter


def test_repr_shows_sizes_rank_level_and_slot():
    layer, _ = make_layer("conv1d")
    text = repr(layer)
    assert f"in_features={IN}, out_features={OUT}, rank={R}, level='token', slot=1" in text


def test_layer_errors_are_one_line():
    layer, controller = make_layer("linear")
    x = torch.randn(B, T, IN, dtype=torch.float64)
    with pytest.raises(ValueError, match="no routing context"):
        layer(x)
    set_codes(controller, torch.randn(B, T + 1, 2, R, dtype=torch.float64))
    with one_line_error(r"routing context is for \[B, T\] = \[2, 6\]"):
        layer(x)
    with pytest.raises(ValueError, match="nn.Linear or transformers' Conv1D, got Embedding"):
        BEMLinear(nn.Embedding(3, 4), 0, "token", 2, controller)
