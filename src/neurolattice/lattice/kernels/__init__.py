"""Fused kernels of the functional tier's aggregation, one module per backend (see
:mod:`neurolattice.lattice.backends`): :mod:`.cpu_functional` (C++, CPU) and
:mod:`.triton_functional` (Triton, CUDA). Importing this package imports neither a compiler
nor Triton."""
