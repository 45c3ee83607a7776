"""neurolattice: fast, reference-checked neural systems made of many small units."""

__version__ = "0.1.0"
