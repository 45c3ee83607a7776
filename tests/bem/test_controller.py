"""The fast controller against the per-token reference, full and incremental, values and grads."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neurolattice.bem import BEMConfig
from neurolattice.bem.controller import BEMController, ema_matrix
from neurolattice.bem.reference import reference_route

FEATURES = 5


def make_controller(slot_levels, seed=0, scale=0.7, **overrides) -> BEMController:
    """A float64 controller with random parameters (large enough that some codes hit the clamp);
    the temperatures get their own test values in ``test_temperature_scales_the_logit``."""
    config = BEMConfig(**{"rank": 3, "hidden": 6, "chunk_size": 3, "prefix_len": 5, "max_norm": 3.0,
                          "beta": 0.8, **overrides})
    torch.manual_seed(seed)
    controller = BEMController(config, FEATURES, slot_levels).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in controller.named_parameters():
            if not name.startswith("temperature_raw"):  # T stays 1: u spread over (0, 1)
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale)
    return controller


def inputs(batch, length, pads=(), seed=1):
    """Features [B, T, H] and a mask with ``pads[b]`` left pads in row b plus one pad inside row 0."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, length, FEATURES, generator=gen, dtype=torch.float64)
    mask = torch.ones(batch, length, dtype=torch.bool)
    for b, n in enumerate(pads):
        mask[b, :n] = False
    if length > 4:
        mask[0, length // 2] = False
    return features, mask


MIXES = {
    "token+chunk": ["token", "chunk", "token", "chunk"],
    "chunk": ["chunk", "chunk"],
    "prefix": ["prefix", "prefix", "prefix"],
    "all-levels": ["token", "prefix", "chunk"],
}
SIZES = {  # (chunk_size, prefix_len)
    "C<P": (3, 5), "C>P": (4, 2), "C=P": (3, 3), "C=1": (1, 4), "P=1": (3, 1),
}


def assert_matches_reference(controller, context, features, mask, tol=1e-10):
    ref = reference_route(controller, features, mask)
    real = mask[..., None, None]
    for level in controller.levels:
        for key in ("codes", "dynamic", "uncertainty"):
            fast = getattr(context, key)[level]
            expected = ref[key][level]
            diff = ((fast - expected).abs() * (real if fast.dim() == 4 else mask[..., None])).max().item()
            assert diff <= tol, (level, key, diff)
            assert torch.isfinite(fast).all()


@pytest.mark.parametrize("sizes", list(SIZES))
@pytest.mark.parametrize("mix", list(MIXES))
def test_full_sequence_matches_reference(mix, sizes):
    c, p = SIZES[sizes]
    controller = make_controller(MIXES[mix], chunk_size=c, prefix_len=p)
    features, mask = inputs(3, 13, pads=(0, 3, 12))
    context, _ = controller.route(features, mask)
    assert_matches_reference(controller, context, features, mask)


def test_clamp_and_uncertainty_are_exercised():
    controller = make_controller(MIXES["all-levels"])
    features, mask = inputs(2, 10)
    context, _ = controller.route(features, mask)
    for level in controller.levels:
        norms = torch.linalg.vector_norm(context.dynamic[level], dim=-1)[mask]
        assert (norms > 3.0 - 1e-9).any() and (norms < 2.9).any(), level  # some clamped, some not
        u = context.uncertainty[level][mask]
        assert u.min() > 0.1 and u.max() < 0.9999 and u.std() > 0.01, level


def split_route(controller, features, mask, cuts):
    """Route the sequence in pieces cut at ``cuts``, continuing the state; codes concatenated."""
    state, pieces = None, []
    bounds = [0, *cuts, features.shape[1]]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        context, state = controller.route(features[:, lo:hi], mask[:, lo:hi], state)
        pieces.append(context)
    assert state.length == features.shape[1]
    return {level: torch.cat([ctx.codes[level] for ctx in pieces], 1) for level in controller.levels}


@pytest.mark.parametrize("sizes", ["C<P", "C>P", "C=1", "P=1"])
def test_token_by_token_matches_full(sizes):
    c, p = SIZES[sizes]
    controller = make_controller(MIXES["all-levels"], chunk_size=c, prefix_len=p)
    features, mask = inputs(3, 17, pads=(0, 2, 5))
    full, _ = controller.route(features, mask)
    pieces = split_route(controller, features, mask, list(range(1, 17)))
    for level in controller.levels:
        assert ((pieces[level] - full.codes[level]).abs() * mask[..., None, None]).max().item() <= 1e-10


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(1, 19), max_size=6, unique=True), c=st.integers(1, 5), p=st.integers(1, 7),
       pad=st.integers(0, 20))
def test_random_splits_match_full(cuts, c, p, pad):
    controller = make_controller(MIXES["all-levels"], chunk_size=c, prefix_len=p)
    features, mask = inputs(2, 20, pads=(0, pad))
    full, _ = controller.route(features, mask)
    pieces = split_route(controller, features, mask, sorted(cuts))
    for level in controller.levels:
        assert ((pieces[level] - full.codes[level]).abs() * mask[..., None, None]).max().item() <= 1e-10


def test_incremental_matches_reference():
    controller = make_controller(MIXES["token+chunk"], chunk_size=2, prefix_len=3)
    features, mask = inputs(2, 11, pads=(0, 4))
    state, contexts = None, []
    for lo, hi in [(0, 4), (4, 5), (5, 9), (9, 11)]:
        context, state = controller.route(features[:, lo:hi], mask[:, lo:hi], state)
        contexts.append(context)
    ref = reference_route(controller, features, mask)
    for level in controller.levels:
        codes = torch.cat([ctx.codes[level] for ctx in contexts], 1)
        assert ((codes - ref["codes"][level]).abs() * mask[..., None, None]).max().item() <= 1e-10


def test_parameter_gradients_match_reference():
    controller = make_controller(MIXES["all-levels"], chunk_size=2, prefix_len=3)
    features, mask = inputs(2, 9, pads=(0, 2))
    weights = {level: torch.randn(2, 9, 3, 3, dtype=torch.float64) * mask[..., None, None]
               for level in controller.levels}

    def grads(codes):
        loss = sum((codes[level] * weights[level]).sum() for level in controller.levels)
        return torch.autograd.grad(loss, list(controller.parameters()), allow_unused=True)

    fast = grads(controller.route(features, mask)[0].codes)
    ref = grads(reference_route(controller, features, mask)["codes"])
    for (name, _), a, b in zip(controller.named_parameters(), fast, ref):
        assert (a is None) == (b is None), name
        if a is not None:
            assert (a - b).abs().max().item() <= 1e-10, name


def test_gradcheck_features():
    controller = make_controller(MIXES["all-levels"], chunk_size=2, prefix_len=3, hidden=3, rank=2)
    features, mask = inputs(1, 6, pads=(1,))
    features.requires_grad_(True)

    def fn(f):
        context, _ = controller.route(f, mask)
        return tuple(context.codes[level] for level in controller.levels)

    assert torch.autograd.gradcheck(fn, (features,), fast_mode=True)


def test_codes_are_causal():
    controller = make_controller(MIXES["all-levels"])
    features, mask = inputs(2, 14)
    before, _ = controller.route(features, mask)
    changed = features.clone()
    changed[:, 9:] += 1.0
    after, _ = controller.route(changed, mask)
    for level in controller.levels:
        assert torch.equal(before.codes[level][:, :9], after.codes[level][:, :9])
        assert not torch.equal(before.codes[level][:, 9:], after.codes[level][:, 9:]) or level == "prefix"


def test_all_pad_rows_give_finite_codes():
    controller = make_controller(MIXES["all-levels"])
    features, mask = inputs(2, 7)
    mask[1] = False
    context, state = controller.route(features, mask)
    for level in controller.levels:
        assert torch.isfinite(context.codes[level]).all()
    assert state.seen.tolist() == [6, 0]


def test_ema_matrix_is_the_recurrence():
    beta, k = 0.7, 6
    z = torch.randn(k, 4, dtype=torch.float64)
    expected = [z[0]]
    for j in range(1, k):
        expected.append(beta * expected[-1] + (1 - beta) * z[j])
    got = ema_matrix(k, beta, dtype=torch.float64) @ z
    assert (got - torch.stack(expected)).abs().max().item() <= 1e-12


def test_only_used_levels_are_built():
    assert set(make_controller(["token"]).heads) == {"token"}
    assert set(make_controller(["prefix"]).heads) == {"prefix"}
    assert set(make_controller(["chunk", "token"]).heads) == {"token", "prefix", "chunk"}


def test_route_rejects_bad_shapes_and_batch_changes():
    controller = make_controller(["token"])
    features, mask = inputs(2, 5)
    with pytest.raises(ValueError, match="features"):
        controller.route(features[0], mask)
    _, state = controller.route(features, mask)
    with pytest.raises(ValueError, match="batch"):
        controller.route(features[:1], mask[:1], state)


def test_temperature_scales_the_logit():
    controller = make_controller(MIXES["all-levels"], chunk_size=2, prefix_len=3)
    with torch.no_grad():
        for i, t in enumerate(controller.temperature_raw.values()):
            t.fill_(-0.5 + i)
    features, mask = inputs(2, 9, pads=(0, 2))
    context, _ = controller.route(features, mask)
    assert_matches_reference(controller, context, features, mask)
