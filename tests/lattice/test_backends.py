"""The backend switch: choices, fallback with one warning, checkpoints independent of it."""

import warnings

import pytest
import torch

from neurolattice.lattice import LatticeConfig, LatticeMoE, backends
from neurolattice.lattice.kernels import cpu_functional

from .conftest import make, states_for


def test_unknown_backend_is_one_line_error():
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'torch', 'cpp', 'triton'\], got 'cuda'"):
        LatticeMoE(LatticeConfig(dims=(3, 3, 3)), backend="cuda")


def test_auto_picks_cpp_where_z_rows_fill_a_vector(small_config):
    lanes = cpu_functional.lanes(torch.float32)
    long_rows = LatticeConfig(dims=(2, 2, lanes), state_size=3, hidden_local=2, hidden_functional=3,
                              hidden_distant=2, hidden_gate=2)
    assert LatticeMoE(long_rows).backend_in_use(torch.device("cpu")) == "cpp"
    assert LatticeMoE(small_config).backend_in_use(torch.device("cpu")) == "torch"   # Z = 6 < lanes
    assert LatticeMoE(small_config, backend="cpp").backend_in_use(torch.device("cpu")) == "cpp"


def test_no_compiler_falls_back_to_torch_with_one_warning(monkeypatch):
    # z-rows as long as the widest vector (16 float32 lanes), so auto would pick cpp
    small_config = LatticeConfig(dims=(2, 2, 16), state_size=3, hidden_local=2, hidden_functional=3,
                                 hidden_distant=2, hidden_gate=2)
    def no_compiler():
        raise cpu_functional.KernelUnavailable("no C++ compiler found ($CXX, c++, g++, clang++)")

    monkeypatch.setattr(cpu_functional, "load", no_compiler)
    caches = (backends._load, backends.resolve)  # what earlier tests resolved (step.py holds resolve)
    for cache in caches:
        cache.cache_clear()
    try:
        model = make(small_config, backend="auto")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = model(states_for(small_config, 1))
        assert model.backend_in_use(out.device) == "torch"
    finally:  # forget the fallback, so later tests resolve the real kernel again
        for cache in caches:
            cache.cache_clear()
    messages = {str(w.message) for w in caught}
    assert messages == {"neurolattice: KernelUnavailable: no C++ compiler found ($CXX, c++, g++, clang++); "
                        "using the torch backend"}


def test_cpp_backend_is_for_cpu_tensors_only():
    assert backends.availability("cpp", "cuda") == "the cpp backend runs on cpu, not cuda"
    assert backends.availability("torch", "cuda") == ""


def test_backend_is_not_in_the_checkpoint(small_config):
    a, b = make(small_config, backend="torch"), make(small_config, backend="cpp")
    assert a.config == b.config and "backend" not in a.config.to_dict()
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_block_size_follows_the_last_level_cache(tmp_path):
    from neurolattice.lattice.step import default_block_elems, last_level_cache_bytes

    for index, size in enumerate(["48K", "32K", "1024K", "32768K"]):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    assert last_level_cache_bytes(tmp_path) == 32 << 20
    # whatever this machine's cache, the default stays within its stated range
    assert (1 << 18) <= default_block_elems() <= (1 << 23)
