"""Fused kernels of the functional tier's aggregation, one module per backend (see
:mod:`neurolattice.lattice.backends`)."""
