"""User data files as the tests write them."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_npz(path: Path, **arrays: np.ndarray) -> str:
    """``arrays`` saved as the ``.npz`` at ``path``; returns the path as a string, ready for argv."""
    np.savez(path, **arrays)
    return str(path)
