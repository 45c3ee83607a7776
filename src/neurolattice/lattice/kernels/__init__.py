"""Device kernels for the lattice step: :mod:`.triton_functional` computes the functional
tier's streamed attention (:class:`~neurolattice.lattice.experts.FunctionalAggregate`) in
Triton for CUDA tensors. Importing this package imports no Triton."""
