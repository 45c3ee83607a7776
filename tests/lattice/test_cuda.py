"""Every backend that runs on CUDA (``torch``, ``triton``) against the per-cell reference, on the GPU:
values and gradients in float64, the fused Triton path against the torch path in float32 at a size
where blocks and slabs matter. Skipped without a CUDA device (``make bench-gpu`` runs them there)."""

import pytest
import torch

from neurolattice.lattice import LatticeConfig
from neurolattice.lattice.backends import BACKENDS, availability
from neurolattice.lattice.reference import reference_step

from ..bounds import float32_bound
from .conftest import make, states_for
from .test_step import CASES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

CUDA_BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(
    bool(torch.cuda.is_available() and availability(name, "cuda")),
    reason=f"{name} backend unavailable on cuda")) for name in BACKENDS if name != "cpp"]


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("name", ["open", "periodic", "relative", "side-1", "side-2-periodic", "empty-local-tier",
                                  "single-cell", "no-functional", "default-sizes"])
def test_cuda_step_and_gradients_match_reference_float64(name, backend):
    config = CASES[name]
    model = make(config, block_elems=200, chunk_elems=20, backend=backend)
    x = states_for(config, 3)
    weight = states_for(config, 3, seed=7)
    names = ["states"] + [n for n, _ in model.named_parameters()]

    def grads(step, module, states):
        states = states.clone().requires_grad_()
        out = step(states)
        return [out.detach(), *torch.autograd.grad((out * weight.to(states.device)).sum(),
                                                   [states, *module.parameters()], materialize_grads=True)]

    expected = grads(lambda s: reference_step(model, s), model, x)
    gpu = model.to("cuda")
    assert gpu.backend_in_use(x.new_empty(0, device="cuda").device) == backend
    got = grads(gpu, gpu, x.to("cuda"))
    for what, a, b in zip(["output", *names], got, expected):
        assert (a.cpu() - b).abs().max().item() <= 1e-10, what


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_float32_matches_torch_path_at_30_cubed(backend):
    config = LatticeConfig(dims=(30, 30, 30))
    x = states_for(config, 2, dtype=torch.float32).cuda()
    plain = make(config, dtype=torch.float32, backend="torch").cuda()
    fused = make(config, dtype=torch.float32, backend=backend).cuda()
    expected = plain(x)
    # two float32 evaluations of one formula in other orders: the terms of test_step's float32 bound
    terms = (max(plain.geometry.num_offsets) + config.state_size + config.hidden_functional
             + 4 * config.ode_steps * (config.state_size + config.hidden_distant))
    assert (fused(x) - expected).abs().max().item() <= float32_bound(expected, terms=terms)
